"""verl plug-in: the registered "gvpo" policy loss against the reference GVPO loss, with verl's own objects, and
the patches of verl's trainers (the default v1 trainer and the legacy one) that keep each prompt's responses in one
micro-batch step.

verl pins transformers < 5.11, so these tests run in their own environment: ``bash scripts/test-verl.sh``.
Log-probs come from logits made here, so the reference (``gvpo_kernels.reference.gvpo_loss`` on those logits) and
the gradient with respect to the logits are exact oracles. Rewards reach the loss the way verl hands them over:
token-level scores -> verl's GRPO outcome advantage with ``norm_adv_by_std_in_grpo=False``. The v1 trainer's
methods run on a stand-in object holding what they read (tests/verl_worker.py ``Trainer``), their code verl's own
or the plug-in's; TransferQueue is installed (the verl extra), and faked only where verl's padding would talk to
its server. The multi-process tests run tests/verl_worker.py in 2 and 4 gloo processes.
"""

import math
import multiprocessing
import random
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

from helpers import verl_worker  # noqa: E402
from gvpo_kernels import reference  # noqa: E402
from gvpo_kernels.integrations import verl as plugin  # noqa: E402
from helpers.verl_worker import (BETA, K, TEMPERATURE, make_actor_config, make_rollouts, micro_batch_losses,  # noqa: E402
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


def test_legacy_group_balanced_order():
    """Legacy trainer: every micro-batch step (the m-th micro-batch of each rank) holds whole groups, each rank holds micro rows
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


def test_legacy_balance_hook_only_for_gvpo(monkeypatch):
    """Legacy trainer: the patched _balance_batch runs the group-keeping balancing for loss_mode=gvpo, verl's own otherwise."""
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


# ---- the v1 trainer (the default) ---------------------------------------------------------------------------------

def test_v1_trainer_patched_on_import():
    """Importing verl's v1 trainer module patches PPOTrainer's init, _balance_batch and _update_actor (the finder on
    sys.meta_path, or at once if it was imported before the plug-in)."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    assert all(getattr(getattr(PPOTrainer, name), "_gvpo_hook", False)
               for name in ("init", "_balance_batch", "_update_actor"))
    assert plugin.TRAINER_MODULES.keys() == {"verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.v1.trainer_base"}


def interleaved(num_prompts, n, seed=0, pad=0):
    """Keys and tags of a v1 batch in finishing order (a prompt's rollouts interleaved with the others'), then
    ``pad`` rows of verl's padding."""
    gen = random.Random(seed)
    rows = [(f"{p:08x}-aaaa-bbbb", s) for p in range(num_prompts) for s in range(n)]
    gen.shuffle(rows)
    keys = [f"{uid}_{s}_0" for uid, s in rows] + [f"{verl_worker.PAD_UID}_{i}_0" for i in range(pad)]
    tags = [{"seq_len": gen.randint(20, 900)} for _ in rows] + [{"seq_len": 128, "is_padding": True}] * pad
    return keys, tags


def v1_layout_ok(keys, tags, ranks, n, dp, mini):
    """Each rank: whole groups (n rows of one uid, or of padding) contiguous and aligned to n; so each mini-batch
    slice and fixed micro-batch of a multiple of n rows holds whole groups."""
    assert sorted(r for rows in ranks for r in rows) == list(range(len(keys)))
    assert len({len(rows) for rows in ranks}) == 1
    for rows in ranks:
        for start in range(0, len(rows), n):
            run = rows[start:start + n]
            uids = {keys[r].rsplit("_", 2)[0] for r in run}
            assert len(uids) == 1 and len(run) == n, run
        whole = {keys[r].rsplit("_", 2)[0] for r in rows}
        assert all(sum(keys[r].startswith(u + "_") for r in rows) % n == 0 for u in whole)
    return True


def test_v1_group_order():
    """The plug-in's v1 order on a batch in finishing order: whole groups per rank, per mini-batch slice and per
    fixed micro-batch; the ranks' workloads (and each mini-batch's) closer than verl's dispatch of the batch as it
    came; bad batches refused with a reason."""
    from verl.utils.seqlen_balancing import calculate_workload

    n, dp, mini = 4, 4, 8  # 15 prompts + a group's worth of padding: 2 mini-batches of 8 groups
    keys, tags = interleaved(15, n, pad=n)
    ranks = plugin.v1_group_order(keys, tags, n, dp, mini)
    assert v1_layout_ok(keys, tags, ranks, n, dp, mini)
    work = calculate_workload(torch.tensor([t["seq_len"] for t in tags])).tolist()

    def spread(parts):
        totals = [sum(work[r] for r in rows) for rows in parts]
        return (max(totals) - min(totals)) / (sum(totals) / len(totals))

    as_came = [list(range(r * 16, (r + 1) * 16)) for r in range(dp)]
    assert spread(ranks) < spread(as_came) / 4, (spread(ranks), spread(as_came))
    per_mini = len(ranks[0]) // 2
    for m in range(2):  # each mini-batch balanced too
        assert spread([rows[m * per_mini:(m + 1) * per_mini] for rows in ranks]) < spread(as_came)

    with pytest.raises(ValueError, match="every prompt's rollout.n = 4 responses"):
        plugin.v1_group_order(keys[1:], tags[1:], n, dp, mini)  # a failed rollout
    multi = list(keys)
    multi[1] = keys[0].rsplit("_", 1)[0] + "_1"
    with pytest.raises(ValueError, match="one output per rollout"):
        plugin.v1_group_order(multi, tags, n, dp, mini)  # an agent loop with two outputs per session
    with pytest.raises(ValueError, match="ppo_mini_batch_size = 6"):
        plugin.v1_group_order(keys, tags, n, dp, 6)


def test_v1_config_checks():
    """Each condition the v1 trainer must meet for whole groups, named in one error; a good config passes."""
    def problems(dp=None, **actor):
        config = verl_worker.v1_config(2, **actor)
        try:
            plugin.check_v1_config(config, dp)
        except ValueError as exc:
            return str(exc)
        return ""

    assert problems() == problems(dp=2) == problems(dynamic=True, dp=2) == ""
    assert "actor_rollout_ref.actor.shuffle must be False" in problems(shuffle=True)
    assert "ppo_micro_batch_size_per_gpu (4) must be a multiple of actor_rollout_ref.rollout.n (3)" in \
        problems(ppo_micro_batch_size_per_gpu=4)
    assert "ppo_micro_batch_size_per_gpu must be set" in problems(ppo_micro_batch_size_per_gpu=None)
    assert "ppo_micro_batch_size_per_gpu (9) must divide each rank's mini-batch" in \
        problems(ppo_micro_batch_size_per_gpu=9, dp=2)
    assert "ppo_mini_batch_size (8 prompts) must be a multiple of the actor's data-parallel size (3)" in problems(dp=3)
    assert "ppo_max_token_len_per_gpu (20 tokens per micro-batch) must hold a whole group" in \
        problems(dynamic=True, ppo_max_token_len_per_gpu=20)
    both = problems(shuffle=True, ppo_micro_batch_size_per_gpu=4)
    assert "shuffle" in both and "ppo_micro_batch_size_per_gpu" in both  # one error, every key


def test_v1_hooks_only_for_gvpo(monkeypatch):
    """For loss_mode=gvpo the patched methods run the plug-in's: init checks the config before building anything
    and the dp size after; _balance_batch pads as verl does (verl's own padding, TransferQueue faked) and returns
    the batch with whole groups per rank; _update_actor marks the batch (and sets force_group_size with dynamic
    batch size) during the update only. For another loss mode, verl's own methods run unchanged."""
    from verl.trainer.ppo import padding_utils
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    put = []

    class FakeTQ:  # the two calls of verl's upsample_batch_to_divisible_size
        @staticmethod
        def kv_batch_get(keys, partition_id, select_fields=None):
            sample = {"uid": "x", "prompts": torch.ones(3, dtype=torch.int64), "responses": torch.ones(2,
                      dtype=torch.int64), "input_ids": torch.ones(5, dtype=torch.int64),
                      "attention_mask": torch.ones(5, dtype=torch.int64), "position_ids": torch.arange(5),
                      "response_mask": torch.ones(2, dtype=torch.int64)}
            return [sample]

        @staticmethod
        def kv_batch_put(keys, partition_id, fields=None, tags=None):
            put.append((list(keys), fields))

    monkeypatch.setattr(padding_utils, "tq", FakeTQ)
    world = 2
    for loss_mode in ("gvpo", "vanilla"):
        trainer = verl_worker.Trainer(verl_worker.v1_config(world, loss_mode=loss_mode), world)
        batch, uids, _ = verl_worker.v1_batch(world)
        real = [i for i, tag in enumerate(batch.tags) if not tag.get("is_padding")]
        batch = batch.select_keys([batch.keys[i] for i in real])  # without the padding: verl's upsample adds it
        metrics = {}
        out = PPOTrainer._balance_batch(trainer, batch, metrics)
        assert len(out) == len(real) + K and sum(t.get("is_padding", False) for t in out.tags) == K
        assert put and len(put[-1][0]) == K
        assert any(key.startswith("global_seqlen") for key in metrics)
        ranks = [list(range(r * len(out) // world, (r + 1) * len(out) // world)) for r in range(world)]
        if loss_mode == "gvpo":
            assert v1_layout_ok(out.keys, out.tags, ranks, K, world, 4 * world)
        else:  # verl's own balancing deals rows, not groups
            with pytest.raises(AssertionError):
                v1_layout_ok(out.keys, out.tags, ranks, K, world, 4 * world)

        seen = []
        trainer.actor_rollout_wg.update_actor = lambda b: seen.append(dict(b.extra_info)) or {"metrics": {"mfu": [0]}}
        trainer._update_actor(out, {})
        assert seen[0].get(plugin.WHOLE_GROUPS_KEY) == (K if loss_mode == "gvpo" else None)
        assert "force_group_size" not in seen[0] and plugin.WHOLE_GROUPS_KEY not in out.extra_info
        trainer.config.actor_rollout_ref.actor.use_dynamic_bsz = True
        trainer._update_actor(out, {})
        assert seen[1].get("force_group_size") == (K if loss_mode == "gvpo" else None)

    # init: a bad config stops before verl builds anything; the dp size is checked once the workers exist
    bad = verl_worker.Trainer(verl_worker.v1_config(world, shuffle=True), world)
    with pytest.raises(ValueError, match="shuffle must be False"):
        PPOTrainer.init(bad)
    assert bad.setup_calls == 0
    odd_dp = verl_worker.Trainer(verl_worker.v1_config(world), 3)
    with pytest.raises(ValueError, match="data-parallel size"):
        PPOTrainer.init(odd_dp)
    assert odd_dp.setup_calls == 1
    vanilla = verl_worker.Trainer(verl_worker.v1_config(world, shuffle=True, loss_mode="vanilla"), world)
    PPOTrainer.init(vanilla)
    assert vanilla.setup_calls == 1


def test_whole_groups_required_when_marked():
    """With the v1 mark (whole_groups_of=n) a cut group is an error, verl's padding rows aside; unmarked (the
    legacy trainer) it is a warning."""
    uids = ["a", "a", "a", "b", "b", verl_worker.PAD_UID, verl_worker.PAD_UID]
    logits, labels, mask, rewards, scores, anchor = make_rollouts(uids, seed=2)
    mask[5:] = False
    args = dict(old_log_prob=anchor, log_prob=token_logprobs(logits, labels), advantages=verl_advantages(
        scores, mask, uids), response_mask=mask, config=make_actor_config())
    fn = get_policy_loss_fn("gvpo")
    with plugin.group_ids(uids, whole_groups_of=K), pytest.raises(ValueError, match=r"with \[2\] rows"):
        fn(**args)
    whole = [0, 1, 2, 5, 6]  # group a and the padding: fine
    with plugin.group_ids([uids[i] for i in whole], whole_groups_of=K):
        loss, _ = fn(**{k: v[whole] if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    assert torch.isfinite(loss)
    plugin._WARNED.clear()
    with plugin.group_ids(uids), pytest.warns(UserWarning, match="Keep groups whole"):
        fn(**args)


# ---- across ranks --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"world{w}")
def test_groups_split_over_ranks_equal_one_process(world, tmp_path):
    """2 and 4 gloo processes. Legacy trainer: groups dealt over the ranks in uneven shares, and the plug-in's
    balancing, give the single-process loss and gradient (FSDP's mean over ranks), also with
    GVPO_LOSS_SCALE=recipe; centring on each rank alone does not. v1 trainer: a batch in finishing order, the
    plug-in's _balance_batch and _update_actor, verl's own mini-batch iterator and prepare_micro_batches (fixed and
    dynamic): each mini-batch's loss and gradient equal the reference on that mini-batch (also with recipe scale);
    with verl's own v1 balancing the loss refuses (groups cut)."""
    context = multiprocessing.get_context("forkserver")
    # import verl once, in the server, not in every rank (Python 3.11's forkserver does not see tests/ on sys.path)
    context.set_forkserver_preload(["verl", "gvpo_kernels.integrations.verl", "verl.workers.utils.losses",
                                    "verl.trainer.ppo.v1.trainer_base", "verl.workers.engine.utils"])
    mp.start_processes(verl_worker.run_across_ranks, args=(world, str(tmp_path / "init")), nprocs=world,
                       start_method="forkserver")
