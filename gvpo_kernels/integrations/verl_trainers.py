"""verl's trainers, patched for ``loss_mode=gvpo`` so that each prompt's responses stay in one micro-batch step.

Imported by :mod:`gvpo_kernels.integrations.verl`, which re-exports these names. When verl's trainer modules are
imported (:func:`install_balance_hook`, :data:`TRAINER_MODULES`):

- v1 (``verl.trainer.ppo.v1.trainer_base.PPOTrainer``, the default; :func:`patch_v1_trainer`): ``init`` checks
  :func:`check_v1_config`; ``_balance_batch`` keeps verl's padding and hands each rank whole groups, contiguous and
  aligned to rollout.n, balanced by token workload (:func:`v1_group_order`), and returns the batch;
  ``_update_actor`` sets ``force_group_size`` (dynamic batch size) and the data key :data:`WHOLE_GROUPS_KEY`
  that makes a cut group an error in the loss.
- legacy (``verl.trainer.ppo.ray_trainer.RayPPOTrainer``, ``trainer.use_v1=False``; :func:`patch_balance_batch`):
  with ``trainer.balance_batch=True``, whole groups per micro-batch step (:func:`group_balanced_order`).

Other loss modes run verl's own methods. README.md, "Use with verl", states the conditions.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import itertools
import sys
from typing import Any, Sequence

import torch

LOSS_NAME = "gvpo"
WHOLE_GROUPS_KEY = "gvpo_group_size"  # data key set by the v1 hook: micro-batch steps hold whole groups of this size


def _is_gvpo(config) -> bool:
    return config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla") == LOSS_NAME


# ---- v1 trainer (verl.trainer.ppo.v1.trainer_base.PPOTrainer, the default) ---------------------------------------

def check_v1_config(config, dp_size: int | None = None) -> None:
    """Raise one ValueError naming every key that keeps the v1 trainer from handing GVPO whole groups.

    Needed: ``actor.shuffle=False`` (it re-permutes each rank's rows); fixed micro-batches:
    ``ppo_micro_batch_size_per_gpu`` a multiple of ``rollout.n``; dynamic batch size: ``rollout.n`` x the longest
    sequence (``data.max_prompt_length + data.max_response_length``) within ``ppo_max_token_len_per_gpu`` (x the
    Ulysses size), since a group is never split. With ``dp_size``: ``ppo_mini_batch_size % dp_size == 0`` (each
    rank's share of a mini-batch is whole groups) and, fixed, the rank's mini-batch a multiple of the micro-batch.
    """
    actor, n = config.actor_rollout_ref.actor, int(config.actor_rollout_ref.rollout.n)
    key = "actor_rollout_ref.actor."
    problems = []
    if actor.get("shuffle", False):
        problems.append(f"{key}shuffle must be False (it re-permutes each rank's rows and cuts groups)")
    mini = int(actor.ppo_mini_batch_size)
    if actor.get("use_dynamic_bsz", False):
        data = config.get("data", {})
        longest = int(data.get("max_prompt_length", 0) or 0) + int(data.get("max_response_length", 0) or 0)
        limit = int(actor.ppo_max_token_len_per_gpu) * int(actor.get("ulysses_sequence_parallel_size", 1) or 1)
        if n * longest > limit:
            problems.append(f"{key}ppo_max_token_len_per_gpu ({limit} tokens per micro-batch) must hold a whole "
                            f"group: rollout.n ({n}) x the longest sequence ({longest}) = {n * longest}")
    else:
        micro = actor.get("ppo_micro_batch_size_per_gpu", None)
        if not micro:
            problems.append(f"{key}ppo_micro_batch_size_per_gpu must be set (a multiple of "
                            f"actor_rollout_ref.rollout.n, {n}), or use_dynamic_bsz=True")
        elif int(micro) % n:
            problems.append(f"{key}ppo_micro_batch_size_per_gpu ({micro}) must be a multiple of "
                            f"actor_rollout_ref.rollout.n ({n}), so that micro-batches hold whole groups")
        elif dp_size and mini % dp_size == 0 and (mini * n // dp_size) % int(micro):
            problems.append(f"{key}ppo_micro_batch_size_per_gpu ({micro}) must divide each rank's mini-batch "
                            f"(ppo_mini_batch_size x rollout.n / dp = {mini * n // dp_size} rows)")
    if dp_size and mini % dp_size:
        problems.append(f"{key}ppo_mini_batch_size ({mini} prompts) must be a multiple of the actor's data-parallel "
                        f"size ({dp_size}), so that each rank's share of a mini-batch is whole groups")
    if problems:
        raise ValueError("loss_mode='gvpo' under verl's v1 trainer (trainer.use_v1=True) keeps every prompt's "
                         "rollout.n responses in one micro-batch step; this configuration cannot:\n  - "
                         + "\n  - ".join(problems))


def v1_group_order(keys: Sequence[str], tags: Sequence[dict], n: int, dp_size: int,
                   mini_batch_groups: int) -> list[list[int]]:
    """Rows of a v1 batch (after verl's padding) for each rank, whole groups balanced over ranks.

    verl's v1 dispatch hands rank r the r-th of dp_size contiguous chunks; each rank cuts its rows, in order, into
    mini-batches of ``mini_batch_groups / dp_size`` groups and those into micro-batches (fixed size, or token
    budgets with ``force_group_size = n``). Here the groups (a uid's n rows; verl's padding rows in runs of n) are
    spread over the mini-batches and then over the ranks with verl's Karmarkar-Karp partitioning of their
    workloads, the heaviest share to the rank with the least work so far, each rank's groups of a mini-batch
    heaviest first (so that micro-batch m is alike on every rank), each group's rows together.

    Args:
        keys, tags: the batch's TransferQueue keys (``{uid}_{session}_{index}``) and tags (``seq_len``,
            ``is_padding``).
        n: rollout.n. dp_size: the actor's data-parallel size. mini_batch_groups: ppo_mini_batch_size (prompts).

    Returns:
        For each rank, its rows (indices into the batch), in order.
    """
    from verl.utils.seqlen_balancing import calculate_workload, get_seqlen_balanced_partitions

    rows_of: dict[str, list[int]] = {}
    padding: list[int] = []
    for row, (key, tag) in enumerate(zip(keys, tags)):
        if tag.get("is_padding", False):
            padding.append(row)
            continue
        uid, _, index = key.rsplit("_", 2)
        if index != "0":
            raise ValueError(f"loss_mode='gvpo' under verl's v1 trainer needs one output per rollout; {key!r} is "
                             "output " + index + " of an agent loop with several (not supported)")
        rows_of.setdefault(uid, []).append(row)
    odd = {uid: len(rows) for uid, rows in rows_of.items() if len(rows) != n}
    if odd or len(padding) % n:
        raise ValueError(f"loss_mode='gvpo' under verl's v1 trainer needs every prompt's rollout.n = {n} responses "
                         f"in the batch: prompts with {sorted(set(odd.values()))} responses ({len(odd)} of them"
                         f"{'' if not padding else f', and {len(padding)} padding rows'}). Failed or filtered "
                         "rollouts and per-prompt rollout counts give such groups; GVPO centres each whole group.")
    groups = list(rows_of.values()) + [padding[i:i + n] for i in range(0, len(padding), n)]
    per_rank = mini_batch_groups // dp_size
    if mini_batch_groups % dp_size or len(groups) % mini_batch_groups:
        raise ValueError(f"loss_mode='gvpo': {len(groups)} groups do not split into mini-batches of "
                         f"ppo_mini_batch_size = {mini_batch_groups} groups, {per_rank} per rank on {dp_size} ranks")
    seq_len = torch.tensor([int(tag["seq_len"]) for tag in tags], dtype=torch.int64)
    row_work = calculate_workload(seq_len).tolist()
    work = [sum(row_work[r] for r in g) for g in groups]

    minis = get_seqlen_balanced_partitions(work, k_partitions=len(groups) // mini_batch_groups, equal_size=True)
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    totals = [0] * dp_size
    for members in minis:
        shares = get_seqlen_balanced_partitions([work[g] for g in members], k_partitions=dp_size, equal_size=True)
        shares = sorted(([members[i] for i in share] for share in shares), key=lambda s: -sum(work[g] for g in s))
        for share, rank in zip(shares, sorted(range(dp_size), key=lambda r: totals[r])):
            for g in sorted(share, key=lambda g: -work[g]):
                ranks[rank].extend(groups[g])
            totals[rank] += sum(work[g] for g in share)
    return ranks


def _actor_dp_size(trainer) -> int:
    """The actor's data-parallel size, as verl's own ``_balance_batch`` reads it from the worker group."""
    worker_group = trainer.actor_rollout_wg
    if "actor" not in worker_group._dispatch_info:
        worker_group._dispatch_info["actor"] = worker_group._query_dispatch_info("actor")
    return max(worker_group._dispatch_info["actor"]) + 1


def balance_batch_v1(trainer, batch, metrics: dict, logging_prefix: str = "global_seqlen"):
    """``PPOTrainer._balance_batch`` for GVPO: verl's padding (``upsample_batch_to_divisible_size``), then the
    rows reordered by :func:`v1_group_order` (a KVBatchMeta, in place); logs verl's balance metrics and returns
    the batch."""
    from verl.trainer.ppo.v1 import trainer_base
    from verl.utils.seqlen_balancing import log_seqlen_unbalance

    config = trainer.config
    dp_size = _actor_dp_size(trainer)
    check_v1_config(config, dp_size)
    batch = trainer_base.upsample_batch_to_divisible_size(batch, trainer._get_required_batch_multiple(dp_size),
                                                          trainer.tokenizer.eos_token_id)
    ranks = v1_group_order(batch.keys, batch.tags, int(config.actor_rollout_ref.rollout.n), dp_size,
                           int(config.actor_rollout_ref.actor.ppo_mini_batch_size))
    batch.reorder([row for rows in ranks for row in rows])
    metrics.update(log_seqlen_unbalance(seqlen_list=[int(tag["seq_len"]) for tag in batch.tags],
                                        partitions=_positions(ranks), prefix=logging_prefix))
    return batch


def _positions(ranks: list[list[int]]) -> list[list[int]]:
    """Each rank's rows as positions in the reordered batch."""
    starts = itertools.accumulate((len(rows) for rows in ranks), initial=0)
    return [list(range(start, start + len(rows))) for start, rows in zip(starts, ranks)]


def patch_v1_trainer(trainer_cls) -> None:
    """For ``loss_mode=gvpo``: ``init`` checks :func:`check_v1_config` (before building the workers, and with the dp
    size after); ``_balance_batch`` is :func:`balance_batch_v1`; ``_update_actor`` marks the batch for whole
    groups (``gvpo_group_size``, which makes a cut group an error in the loss) and sets ``force_group_size`` with
    dynamic batch size. Other loss modes run verl's own methods. Idempotent."""
    if getattr(trainer_cls._balance_batch, "_gvpo_hook", False):
        return
    init, balance, update = trainer_cls.init, trainer_cls._balance_batch, trainer_cls._update_actor

    @functools.wraps(init)
    def _init(self, *args, **kwargs):
        if _is_gvpo(self.config):
            check_v1_config(self.config)
        result = init(self, *args, **kwargs)
        if _is_gvpo(self.config):
            check_v1_config(self.config, _actor_dp_size(self))
        return result

    @functools.wraps(balance)
    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        # (a step without an actor update, during critic warm-up, needs no whole groups)
        if _is_gvpo(self.config) and self.config.trainer.get("critic_warmup", 0) <= self.global_steps:
            return balance_batch_v1(self, batch, metrics, logging_prefix)
        return balance(self, batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)

    @functools.wraps(update)
    def _update_actor(self, batch, metrics):
        if not _is_gvpo(self.config):
            return update(self, batch, metrics)
        n = int(self.config.actor_rollout_ref.rollout.n)
        added = {WHOLE_GROUPS_KEY: n}
        if self.config.actor_rollout_ref.actor.get("use_dynamic_bsz", False):
            added["force_group_size"] = n  # verl's prepare_micro_batches keeps runs of n rows together
        batch.extra_info.update(added)
        try:
            return update(self, batch, metrics)
        finally:
            for key in added:
                batch.extra_info.pop(key, None)

    for method in (_init, _balance_batch, _update_actor):
        method._gvpo_hook = True
    trainer_cls.init, trainer_cls._balance_batch, trainer_cls._update_actor = _init, _balance_batch, _update_actor


# ---- legacy trainer (verl.trainer.ppo.ray_trainer.RayPPOTrainer, trainer.use_v1=False) ---------------------------

def group_balanced_order(uids: Sequence[Any], workloads: Sequence[float], dp_size: int,
                         micro_batch_size: int) -> list[list[int]]:
    """Row order for the legacy trainer that balances work across ranks and keeps every group in one micro-batch
    step.

    verl hands rank r the rows [r B / dp, (r + 1) B / dp) of the batch (B rows) and splits them in order into
    micro-batches of ``micro_batch_size``; micro-batch step m is the m-th micro-batch of every rank, dp x micro
    rows. Groups (equal size k, dp x micro a multiple of k) are assigned to steps balancing the steps' total
    workloads, then each step's rows into dp shares of micro_batch_size rows with balanced workloads (verl's
    Karmarkar-Karp ``get_seqlen_balanced_partitions``, both times), the heaviest share going to the rank with the
    least work so far. A group may be split over ranks within its step (the loss centres it across ranks).

    Returns:
        For each rank, its rows (indices into the batch) in the order it will hold them.
    """
    from verl.utils.seqlen_balancing import get_seqlen_balanced_partitions

    rows_of: dict[Any, list[int]] = {}
    for row, uid in enumerate(uids):
        rows_of.setdefault(uid, []).append(row)
    groups = list(rows_of.values())
    sizes = {len(g) for g in groups}
    step_rows = dp_size * micro_batch_size
    if len(sizes) != 1:
        raise ValueError(f"group-keeping balancing needs groups of one size (rollout.n), got sizes {sorted(sizes)}")
    (k,) = sizes
    if step_rows % k or len(uids) % step_rows:
        raise ValueError(f"group-keeping balancing needs dp_size x ppo_micro_batch_size_per_gpu ({dp_size} x "
                         f"{micro_batch_size}) to be a multiple of rollout.n ({k}) and to divide the batch size "
                         f"({len(uids)})")
    num_steps = len(uids) // step_rows
    group_work = [sum(workloads[r] for r in g) for g in groups]
    steps = get_seqlen_balanced_partitions(group_work, k_partitions=num_steps, equal_size=True)
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    totals = [0.0] * dp_size
    for step in steps:
        rows = [r for g in step for r in groups[g]]
        shares = [[rows[i] for i in sorted(share)] for share in
                  get_seqlen_balanced_partitions([workloads[r] for r in rows], k_partitions=dp_size, equal_size=True)]
        shares.sort(key=lambda share: -sum(workloads[r] for r in share))
        for share, rank in zip(shares, sorted(range(dp_size), key=lambda r: totals[r])):  # heaviest to lightest
            ranks[rank].extend(share)
            totals[rank] += sum(workloads[r] for r in share)
    return ranks


def balance_batch_keeping_groups(trainer, batch, metrics: dict, logging_prefix: str = "global_seqlen",
                                 keep_minibatch: bool = False) -> None:
    """``RayPPOTrainer._balance_batch`` for GVPO: reorder ``batch`` (a DataProto, in place) by
    :func:`group_balanced_order` and log verl's balance metrics. ``keep_minibatch`` is ignored: every micro-batch
    step holds whole groups, which is what the loss needs, whatever mini-batch a group lands in."""
    from verl.utils.seqlen_balancing import calculate_workload, log_seqlen_unbalance

    actor = trainer.config.actor_rollout_ref.actor
    if actor.get("use_dynamic_bsz", False) or actor.get("shuffle", False):
        raise ValueError("loss_mode='gvpo' with trainer.balance_batch=True needs actor.use_dynamic_bsz=False and "
                         "actor.shuffle=False: both regroup the rows of a rank after balancing")
    if "uid" not in batch.non_tensor_batch:
        raise ValueError("loss_mode='gvpo' balancing needs the batch's 'uid' (verl's prompt id) in non_tensor_batch")
    seqlens = batch.batch["attention_mask"].reshape(len(batch), -1).sum(-1)
    workloads = calculate_workload(seqlens).tolist()
    dp_size = trainer._get_dp_size(trainer.actor_rollout_wg, "actor")
    partitions = group_balanced_order(list(batch.non_tensor_batch["uid"]), workloads, dp_size,
                                      int(actor.ppo_micro_batch_size_per_gpu))
    batch.reorder(torch.tensor([row for rows in partitions for row in rows]))
    metrics.update(log_seqlen_unbalance(seqlen_list=seqlens.tolist(), partitions=partitions, prefix=logging_prefix))


def patch_balance_batch(trainer_cls) -> None:
    """Make the legacy ``trainer_cls._balance_batch`` run :func:`balance_batch_keeping_groups` when the actor's
    loss_mode is ``gvpo`` and verl's own method otherwise. Idempotent."""
    original = trainer_cls._balance_batch
    if getattr(original, "_gvpo_hook", False):
        return

    @functools.wraps(original)
    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        if _is_gvpo(self.config):
            return balance_batch_keeping_groups(self, batch, metrics, logging_prefix, keep_minibatch)
        return original(self, batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)

    _balance_batch._gvpo_hook = True
    trainer_cls._balance_batch = _balance_batch


# ---- patching verl's trainers when they are imported -------------------------------------------------------------

class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after the module named ``name`` is first executed (its import stays lazy)."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders, once
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _patch_when_imported(name: str, patch) -> None:
    if name in sys.modules:
        patch(sys.modules[name])
    elif not any(isinstance(f, _PatchOnImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(name, patch))


TRAINER_MODULES = {  # module -> how to patch it; both import Ray and the rollout servers, which this module does not
    "verl.trainer.ppo.ray_trainer": lambda module: patch_balance_batch(module.RayPPOTrainer),
    "verl.trainer.ppo.v1.trainer_base": lambda module: patch_v1_trainer(module.PPOTrainer),
}


def install_balance_hook() -> None:
    """Patch verl's trainers (:data:`TRAINER_MODULES`) now if imported, else when they are."""
    for name, patch in TRAINER_MODULES.items():
        _patch_when_imported(name, patch)
