"""verl plug-in: the registered "gvpo" policy loss against the reference GVPO loss, with verl's own objects.

verl pins transformers < 5.11, so these tests run in their own environment: ``bash scripts/test-verl.sh``.
Log-probs come from logits made here, so the reference (``gvpo_kernels.reference.gvpo_loss`` on those logits) and
the gradient with respect to the logits are exact oracles. Rewards reach the loss the way verl hands them over:
token-level scores -> verl's GRPO outcome advantage with ``norm_adv_by_std_in_grpo=False``. The multi-process
tests run tests/verl_worker.py in 2 and 4 gloo processes.
"""

import math
import multiprocessing
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

verl = pytest.importorskip("verl", reason="verl is not installed here; run `bash scripts/test-verl.sh`, which "
                                          "creates .venv-verl with verl 0.9.1")

from verl import DataProto  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.workers.utils import losses as verl_losses  # noqa: E402

import verl_worker  # noqa: E402
from gvpo_kernels import reference  # noqa: E402
from gvpo_kernels.integrations import verl as plugin  # noqa: E402
from verl_worker import (BETA, K, TEMPERATURE, make_actor_config, make_rollouts, micro_batch_losses,  # noqa: E402
                         reference_loss_and_grad, rel_err, token_logprobs, verl_advantages)


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


def test_through_verl_ppo_loss_hook_with_micro_batches(monkeypatch):
    """The actor path: DataProto with uids -> TensorDict -> micro-batches -> verl's ppo_loss (hooked) -> gvpo. The
    sum over micro-batches of whole groups is the mean over groups of L_G for the whole mini-batch; with
    GVPO_LOSS_SCALE=recipe it is the official recipe's objective, which sums L_G per micro-batch and divides by
    the number of micro-batches (gradient accumulation): (micro / n) x that mean."""
    uids = ["a", "a", "b", "b", "b", "a", "c", "c", "d", "d", "d", "c"]  # whole groups per micro-batch of 6
    logits, labels, mask, rewards, scores, anchor = make_rollouts(uids, response_len=4, seed=5)
    advantages = verl_advantages(scores, mask, uids)
    config = make_actor_config(ppo_micro_batch_size_per_gpu=6)
    args = (uids, logits, labels, mask, advantages, anchor, range(12), 6, config, 1, None)
    total, metrics = micro_batch_losses(*args)
    (grad,) = torch.autograd.grad(total, logits)
    want, want_grad = reference_loss_and_grad(logits, labels, mask, rewards, anchor, uids)
    assert rel_err(total, want) < 1e-5 and rel_err(grad, want_grad) < 1e-5
    assert "actor/pg_loss" in metrics and "actor/gvpo_implicit_reward" in metrics

    # the recipe's objective, written out: per micro-batch sum_i (d_i^2 / 2) / (n - 1), divided by the 2 micro-batches
    leaf = logits.detach().double().requires_grad_()
    recipe = 0.0
    for rows in (slice(0, 6), slice(6, 12)):
        recipe = recipe + reference.gvpo_loss(leaf[rows], labels[rows], rewards[rows].double(),
                                              group_ids=plugin.uids_to_group_ids(uids[rows]), mask=mask[rows],
                                              ref_logprobs=anchor[rows].double(), beta=BETA, temperature=TEMPERATURE,
                                              reduction="sum") / 2
    (recipe_grad,) = torch.autograd.grad(recipe, leaf)
    monkeypatch.setenv(plugin.LOSS_SCALE_ENV, "recipe")
    scaled, _ = micro_batch_losses(*args)
    (scaled_grad,) = torch.autograd.grad(scaled, logits)
    assert rel_err(scaled, recipe) < 1e-5 and rel_err(scaled_grad, recipe_grad) < 1e-5
    assert math.isclose(scaled.item(), 6 / K * total.item(), rel_tol=1e-5)
    monkeypatch.setenv(plugin.LOSS_SCALE_ENV, "0.5")
    assert math.isclose(micro_batch_losses(*args)[0].item(), 0.5 * total.item(), rel_tol=1e-5)
    monkeypatch.setenv(plugin.LOSS_SCALE_ENV, "-1")
    with pytest.raises(ValueError, match="GVPO_LOSS_SCALE must be a number > 0 or 'recipe'"):
        micro_batch_losses(*args)


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


def test_group_ids_are_a_stable_hash():
    """The same int64 id for a uid in every process and run (Python's hash() of a str is salted per process): a
    fixed value, the first 8 bytes of blake2b("q7")."""
    ids = plugin.uids_to_group_ids(["q7", "q2", "q7"])
    assert ids.dtype == torch.int64 and ids[0] == ids[2] != ids[1]
    assert int(ids[0]) == -1535682543295306014


def test_group_balanced_order():
    """Every micro-batch step (the m-th micro-batch of each rank) holds whole groups, each rank holds micro rows
    of each step, and the ranks' workloads are closer than in verl's order; bad sizes are refused."""
    dp, micro, n = 4, 3, 4
    uids = [f"p{p}" for p in range(12) for _ in range(n)]  # 48 rows: 4 steps of 12
    gen = torch.Generator().manual_seed(0)
    work = torch.randint(1, 100, (len(uids),), generator=gen).tolist()
    ranks = plugin.group_balanced_order(uids, work, dp, micro)
    assert sorted(r for rows in ranks for r in rows) == list(range(len(uids)))
    assert all(len(rows) == len(uids) // dp for rows in ranks)
    for step in range(len(uids) // (dp * micro)):
        held = [uids[r] for rows in ranks for r in rows[step * micro:(step + 1) * micro]]
        assert all(held.count(u) == n for u in held)

    def spread(parts):
        totals = [sum(work[r] for r in rows) for rows in parts]
        return max(totals) - min(totals)

    verl_order = [list(range(r * 12, (r + 1) * 12)) for r in range(dp)]
    assert spread(ranks) < spread(verl_order)
    with pytest.raises(ValueError, match="multiple of rollout.n"):
        plugin.group_balanced_order(uids, work, 2, 3)  # 6 rows per step, groups of 4
    with pytest.raises(ValueError, match="groups of one size"):
        plugin.group_balanced_order(uids[:-1], work[:-1], dp, micro)


def test_balance_hook_only_for_gvpo(monkeypatch):
    """The patched _balance_batch runs the group-keeping balancing for loss_mode=gvpo, verl's own otherwise."""
    from omegaconf import OmegaConf

    calls = []

    class Trainer:  # the parts of RayPPOTrainer that _balance_batch uses
        actor_rollout_wg = None

        def __init__(self, loss_mode):
            self.config = OmegaConf.create({"actor_rollout_ref": {"actor": {
                "policy_loss": {"loss_mode": loss_mode}, "ppo_micro_batch_size_per_gpu": 2, "shuffle": False,
                "use_dynamic_bsz": False}}})

        def _get_dp_size(self, worker_group, role):
            return 2

        def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
            calls.append(logging_prefix)

    plugin.patch_balance_batch(Trainer)
    plugin.patch_balance_batch(Trainer)  # idempotent
    uids = ["a"] * 4 + ["b"] * 4
    lengths = torch.tensor([9, 1, 1, 1, 9, 1, 1, 1])
    attention = (torch.arange(10)[None, :] < lengths[:, None]).long()
    batch = DataProto.from_dict(tensors={"attention_mask": attention, "row": torch.arange(8)},
                                non_tensors={"uid": np.array(uids, dtype=object)})
    metrics = {}
    Trainer("vanilla")._balance_batch(batch, metrics)
    assert calls == ["global_seqlen"] and batch.batch["row"].tolist() == list(range(8))
    Trainer("gvpo")._balance_batch(batch, metrics)
    rows = batch.batch["row"].tolist()
    assert calls == ["global_seqlen"] and sorted(rows) != rows and sorted(rows) == list(range(8))
    for step in (0, 1):  # rows step*2 .. +2 of each rank (4 rows per rank): whole groups
        held = {uids[r] for r in rows[step * 2:step * 2 + 2] + rows[4 + step * 2:4 + step * 2 + 2]}
        assert len(held) == 1
    assert sum(lengths[rows[:4]]) == sum(lengths[rows[4:]])  # the two long rows on different ranks
    assert any(key.startswith("global_seqlen") for key in metrics)

    # the patch waits for verl's trainer module to be imported (a finder on sys.meta_path), as for any module
    name = "verl.trainer.ppo.ray_trainer"
    assert name in sys.modules or any(getattr(f, "name", None) == name for f in sys.meta_path)
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    finder = plugin._PatchOnImport("colorsys", lambda module: setattr(module, "gvpo_patched", True))
    monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
    import colorsys

    assert colorsys.gvpo_patched and colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"world{w}")
def test_groups_split_over_ranks_equal_one_process(world, tmp_path):
    """2 and 4 gloo processes: groups dealt over the ranks in uneven shares, and the plug-in's balancing, give the
    single-process loss and gradient (FSDP's mean over ranks), also with GVPO_LOSS_SCALE=recipe; centring on each
    rank alone (the old plug-in) does not."""
    context = multiprocessing.get_context("forkserver")
    # import verl once, in the server, not in every rank (Python 3.11's forkserver does not see tests/ on sys.path)
    context.set_forkserver_preload(["verl", "gvpo_kernels.integrations.verl", "verl.workers.utils.losses"])
    mp.start_processes(verl_worker.run_across_ranks, args=(world, str(tmp_path / "init")), nprocs=world,
                       start_method="forkserver")
