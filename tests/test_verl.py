"""verl plug-in: the registered "gvpo" policy loss against the reference GVPO loss, with verl's own objects.

verl pins transformers < 5.11, so these tests run in their own environment: ``bash scripts/test-verl.sh``.
Log-probs come from logits made here, so the reference (``gvpo_kernels.reference.gvpo_loss`` on those logits) and
the gradient with respect to the logits are exact oracles. Rewards reach the loss the way verl hands them over:
token-level scores -> verl's GRPO outcome advantage with ``norm_adv_by_std_in_grpo=False``.
"""

import math
import sys
import types
import warnings
from functools import partial

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl", reason="verl is not installed here; run `bash scripts/test-verl.sh`, which "
                                          "creates .venv-verl with verl 0.9.1")

from verl import DataProto  # noqa: E402
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils import losses as verl_losses  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from gvpo_kernels import reference  # noqa: E402
from gvpo_kernels.integrations import verl as plugin  # noqa: E402

BETA = 0.1
TEMPERATURE = 0.8
K = 3  # rollout.n
VOCAB = 11


def rel_err(got, want):
    got, want = got.detach().double(), want.detach().double()
    scale = want.norm().item()
    return (got - want).norm().item() / scale if scale > 0 else (got - want).norm().item()


def make_actor_config(**overrides):
    options = dict(strategy="fsdp", rollout_n=K, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=K,
                   use_kl_loss=False, policy_loss=PolicyLossConfig(loss_mode="gvpo", ppo_kl_coef=BETA))
    options.update(overrides)
    return FSDPActorConfig(**options)


def make_rollouts(uids, response_len=5, seed=0, dtype=torch.float32):
    """Logits (S, T, V) as a leaf, labels, a right-padded response mask (one response fully masked, as a truncated
    one can be), raw rewards (S,), verl's token-level scores (reward at the last response token) and an anchor."""
    g = torch.Generator().manual_seed(seed)
    num = len(uids)
    logits = (torch.randn(num, response_len, VOCAB, generator=g) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (num, response_len), generator=g)
    lengths = torch.randint(1, response_len + 1, (num,), generator=g)
    lengths[1] = response_len
    mask = torch.arange(response_len)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 5, (num,), generator=g).to(dtype)
    scores = torch.zeros(num, response_len, dtype=dtype)
    scores[torch.arange(num), lengths - 1] = rewards
    anchor = (-torch.rand(num, response_len, generator=g) * 4).to(dtype).masked_fill(~mask, 0.0)
    return logits, labels, mask, rewards, scores, anchor


def token_logprobs(logits, labels):
    return torch.log_softmax(logits / TEMPERATURE, dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def verl_advantages(scores, mask, uids, norm_by_std=False):
    grpo = get_adv_estimator_fn("grpo")
    advantages, _ = grpo(token_level_rewards=scores, response_mask=mask.float(), index=np.array(uids, dtype=object),
                         norm_adv_by_std_in_grpo=norm_by_std)
    return advantages


def gvpo_via_verl(logits, labels, mask, advantages, anchor, uids, config):
    fn = get_policy_loss_fn("gvpo")
    with plugin.group_ids(uids):
        return fn(old_log_prob=anchor, log_prob=token_logprobs(logits, labels), advantages=advantages,
                  response_mask=mask, loss_agg_mode=config.loss_agg_mode, config=config, rollout_is_weights=None)


UIDS = ["q7", "q2", "q7", "q5", "q2", "q5", "q7", "q5", "q2"]  # 3 groups of 3, interleaved


def test_registered_and_hook_installed():
    assert get_policy_loss_fn("gvpo") is plugin.compute_policy_loss_gvpo
    assert getattr(verl_losses.ppo_loss, "_gvpo_hook", False)


def test_loss_and_gradient_equal_reference():
    logits, labels, mask, rewards, scores, anchor = make_rollouts(UIDS)
    config = make_actor_config()
    advantages = verl_advantages(scores, mask, UIDS)
    loss, metrics = gvpo_via_verl(logits, labels, mask, advantages, anchor, UIDS, config)
    (grad,) = torch.autograd.grad(loss, logits)

    # No global batch info: the micro-batch is the batch, so loss = k / S * sum_G L_G = mean over groups of L_G.
    group_ids = plugin.uids_to_group_ids(UIDS)
    kwargs = dict(group_ids=group_ids, mask=mask, beta=BETA, temperature=TEMPERATURE, reduction="mean")

    def ref(dtype):
        leaf = logits.detach().to(dtype).requires_grad_()
        value = reference.gvpo_loss(leaf, labels, rewards.to(dtype), ref_logprobs=anchor.to(dtype), **kwargs)
        return value, torch.autograd.grad(value, leaf)[0]

    baseline, baseline_grad = ref(torch.float32)
    oracle, oracle_grad = ref(torch.float64)
    for name, got, base, want in [("loss", loss, baseline, oracle), ("grad", grad, baseline_grad, oracle_grad)]:
        err, base_err = rel_err(got, want), rel_err(base, want)
        assert err <= base_err + 1e-5, f"{name}: error {err:.3g} vs the float32 reference's {base_err:.3g}"
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert set(metrics) == {"actor/gvpo_implicit_reward", "actor/gvpo_grad_seq_logprob_abs", "actor/ppo_kl"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())

    # What a wrong plug-in would compute differs: contiguous groups, no anchor, std-normalised advantages.
    wrong = {
        "contiguous groups": reference.gvpo_loss(logits, labels, rewards, group_size=K, mask=mask, beta=BETA,
                                                 temperature=TEMPERATURE, ref_logprobs=anchor),
        "no anchor": reference.gvpo_loss(logits, labels, rewards, ref_logprobs=None, **kwargs),
    }
    for what, value in wrong.items():
        assert not math.isclose(value.item(), oracle.item(), rel_tol=1e-3), what
    normed, _ = gvpo_via_verl(logits, labels, mask, verl_advantages(scores, mask, UIDS, norm_by_std=True), anchor,
                              UIDS, config)
    assert not math.isclose(normed.item(), loss.item(), rel_tol=1e-3)
    regrouped, _ = gvpo_via_verl(logits, labels, mask, advantages, anchor, sorted(UIDS), config)
    assert not math.isclose(regrouped.item(), loss.item(), rel_tol=1e-3)


def test_global_batch_normalisation():
    """dp_size / global_batch_size from verl's global_batch_info scale sum_G k_G L_G."""
    logits, labels, mask, rewards, scores, anchor = make_rollouts(UIDS, seed=3)
    config = make_actor_config()
    config.global_batch_info.update(dp_size=4, global_batch_size=36)
    loss, _ = gvpo_via_verl(logits, labels, mask, verl_advantages(scores, mask, UIDS), anchor, UIDS, config)
    total = reference.gvpo_loss(logits.detach(), labels, rewards, group_ids=plugin.uids_to_group_ids(UIDS),
                                mask=mask, ref_logprobs=anchor, beta=BETA, temperature=TEMPERATURE, reduction="sum")
    torch.testing.assert_close(loss, total * K * 4 / 36, rtol=1e-5, atol=1e-7)


def test_through_verl_ppo_loss_hook_with_micro_batches():
    """The actor path: DataProto with uids -> TensorDict -> micro-batches -> verl's ppo_loss (hooked) -> gvpo. The
    sum over micro-batches of whole groups is the mean over groups of L_G for the whole mini-batch."""
    uids = ["a", "a", "b", "b", "b", "a", "c", "c", "d", "d", "d", "c"]  # whole groups per micro-batch of 6
    num, prompt_len, response_len = len(uids), 3, 4
    logits, labels, mask, rewards, scores, anchor = make_rollouts(uids, response_len=response_len, seed=5)
    prompt_lens = torch.tensor([3, 2, 1, 3, 3, 2, 1, 2, 3, 3, 1, 2])
    prompt_mask = torch.arange(prompt_len)[None, :] >= (prompt_len - prompt_lens)[:, None]  # left padding
    attention = torch.cat([prompt_mask, mask], dim=1).long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    prompts = torch.randint(0, VOCAB, (num, prompt_len))
    data = DataProto.from_dict(
        tensors=dict(input_ids=torch.cat([prompts, labels], 1), attention_mask=attention, position_ids=positions,
                     prompts=prompts, responses=labels, response_mask=mask.long(), old_log_probs=anchor,
                     advantages=verl_advantages(scores, mask, uids)),
        non_tensors=dict(uid=np.array(uids, dtype=object)))
    batch = left_right_2_no_padding(data.to_tensordict())
    tu.assign_non_tensor(batch, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=num)

    # verl's actor hands the loss the model's log-probs in no-padding layout: one row per real token, where the
    # row before each response token holds that token's log-prob.
    per_token = token_logprobs(logits, labels)

    def model_output_for(rows):
        pieces = []
        for i in rows:
            pieces += [per_token.new_zeros(int(prompt_lens[i]) - 1), per_token[i, mask[i]], per_token.new_zeros(1)]
        return {"log_probs": torch.cat(pieces)}

    config = make_actor_config(ppo_micro_batch_size_per_gpu=6)
    loss_fn = partial(verl_losses.ppo_loss, config=config)  # what verl's actor builds in init_model
    total = 0.0
    for index, micro in enumerate(tu.chunk_tensordict(batch, 2)):
        rows = range(index * 6, index * 6 + 6)
        loss, metrics = loss_fn(model_output=model_output_for(rows), data=micro, dp_group=None)
        total = total + loss
    (grad,) = torch.autograd.grad(total, logits)

    leaf = logits.detach().double().requires_grad_()
    want = reference.gvpo_loss(leaf, labels, rewards.double(), group_ids=plugin.uids_to_group_ids(uids), mask=mask,
                               ref_logprobs=anchor.double(), beta=BETA, temperature=TEMPERATURE, reduction="mean")
    (want_grad,) = torch.autograd.grad(want, leaf)
    assert rel_err(total, want) < 1e-5 and rel_err(grad, want_grad) < 1e-5
    assert "actor/pg_loss" in metrics and "actor/gvpo_implicit_reward" in metrics


def test_hook_reaches_engine_workers_and_uid_errors(monkeypatch):
    original = verl_losses.ppo_loss.__wrapped__
    stub = types.ModuleType("verl.workers.engine_workers")
    stub.ppo_loss = original  # as if the actor module had imported ppo_loss before the plug-in
    monkeypatch.setitem(sys.modules, "verl.workers.engine_workers", stub)
    plugin.install_group_id_hook()
    assert stub.ppo_loss is verl_losses.ppo_loss

    logits, labels, mask, rewards, scores, anchor = make_rollouts(UIDS)
    fn = get_policy_loss_fn("gvpo")
    args = dict(old_log_prob=anchor, log_prob=token_logprobs(logits, labels), advantages=scores, response_mask=mask,
                config=make_actor_config())
    with pytest.raises(RuntimeError, match="external_lib=gvpo_kernels.integrations.verl"):
        fn(**args)
    with plugin.group_ids(UIDS[:-1]), pytest.raises(ValueError, match="8 group ids for 9 sequences"):
        fn(**args)
    with plugin.group_ids(["x", "x", "y", "y", "y", "z", "z", "z", "z"]), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        plugin._WARNED.clear()
        fn(**args)
    assert any("Keep groups whole" in str(x.message) for x in w)
