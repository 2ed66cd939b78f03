"""verl plug-in: the GVPO policy loss as ``actor_rollout_ref.actor.policy_loss.loss_mode=gvpo`` (verl 0.9.1).

Importing this module (verl imports it in every process through this package's ``verl.plugins`` entry point):

1. registers :func:`compute_policy_loss_gvpo`, which runs :func:`gvpo_kernels.gvpo_loss_from_logprobs` on verl's
   per-token log-probs, with ``old_log_prob`` as the anchor and each response's mean advantage as its centred
   reward (verl's GRPO advantage with ``norm_adv_by_std_in_grpo=False`` is R_i - mean R);
2. wraps verl's actor loss ``verl.workers.utils.losses.ppo_loss`` (:func:`install_group_id_hook`) so that the
   micro-batch's ``uid`` (the groups) and ``dp_group`` (groups are centred across the data-parallel ranks) reach it;
3. patches verl's trainers when they are imported, for ``loss_mode=gvpo`` only: the v1 trainer
   (``verl.trainer.ppo.v1.trainer_base.PPOTrainer``, the default, :func:`patch_v1_trainer`) gets a group-keeping
   ``_balance_batch`` (whole groups per rank, mini-batch and micro-batch), ``force_group_size`` for dynamic batch
   size, and its conditions checked at start; the legacy trainer (``RayPPOTrainer``, ``trainer.use_v1=False``)
   keeps its group-keeping ``_balance_batch`` when ``trainer.balance_batch=True`` (:func:`patch_balance_batch`).

A group must be whole within each micro-batch step (the m-th micro-batch of every rank): under v1 a cut group is
an error, under the legacy trainer a warning. Each micro-batch step's loss is ``loss_scale / num_groups x
sum_G L_G`` (the mini-batch's ``num_groups``; the gradient of the rank's sequences times ``dp_size``, which FSDP
averages away), so a mini-batch's summed loss is ``loss_scale`` x the mean of L_G over its groups.
``GVPO_LOSS_SCALE`` sets ``loss_scale`` (unset: 1; ``recipe``: ppo_micro_batch_size_per_gpu / rollout.n, the
official recipe's gradient magnitude). README.md, "Use with verl", has the command and the conditions.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import hashlib
import importlib.abc
import importlib.util
import itertools
import os
import re
import sys
import warnings
from contextlib import contextmanager
from typing import Any, NamedTuple, Sequence

import torch
import torch.distributed as dist
from verl.trainer.ppo.core_algos import register_policy_loss

import gvpo_kernels as gk

LOSS_NAME = "gvpo"
LOSS_SCALE_ENV = "GVPO_LOSS_SCALE"
WHOLE_GROUPS_KEY = "gvpo_group_size"  # data key set by the v1 hook: micro-batch steps hold whole groups of this size
_PAD_UID = re.compile(r"pad[0-9a-f]{32}")  # the uid of verl's synthetic padding rows (trainer/ppo/padding_utils.py)
_WARNED: set[str] = set()


class Groups(NamedTuple):
    """The groups of one micro-batch, set by :func:`group_ids` (the ``ppo_loss`` hook uses it)."""

    ids: torch.Tensor  # (S,) int64 global group ids, one per row
    process_group: Any  # the data-parallel process group, or None
    whole_size: int | None  # every group must have this many rows in the step (v1), else a cut group only warns
    padding: torch.Tensor  # (S,) bool, verl's synthetic padding rows (no response: they add nothing)


_GROUPS: contextvars.ContextVar[Groups | None] = contextvars.ContextVar("gvpo_groups", default=None)


# ---- group ids ---------------------------------------------------------------------------------------------------

def uids_to_group_ids(uids: Sequence[Any] | torch.Tensor) -> torch.Tensor:
    """(S,) int64 global group ids from per-sample uids (verl's are strings): the first 8 bytes of the blake2b hash
    of ``str(uid)``, the same in every process (Python's ``hash()`` of a string is salted per process)."""
    if isinstance(uids, torch.Tensor):
        uids = uids.tolist()
    return torch.tensor([int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "little",
                                        signed=True) for u in uids], dtype=torch.int64)


@contextmanager
def group_ids(uids: Sequence[Any] | torch.Tensor, process_group=None, *, whole_groups_of: int | None = None):
    """Inside the block, ``uids`` (one per row of the micro-batch, in row order) are the groups of the GVPO loss,
    centred over the ranks of ``process_group`` (verl's data-parallel group; None: this process alone). With
    ``whole_groups_of=n`` a group without n rows over the ranks (verl's padding rows aside) is an error."""
    uid_list = uids.tolist() if isinstance(uids, torch.Tensor) else list(uids)
    padding = torch.tensor([bool(_PAD_UID.fullmatch(str(u))) for u in uid_list], dtype=torch.bool)
    token = _GROUPS.set(Groups(uids_to_group_ids(uid_list), process_group, whole_groups_of, padding))
    try:
        yield
    finally:
        _GROUPS.reset(token)


def current_groups() -> Groups:
    """The :class:`Groups` set by :func:`group_ids` or by the ``ppo_loss`` hook."""
    groups = _GROUPS.get()
    if groups is None:
        raise RuntimeError(
            "loss_mode='gvpo' needs the group (uid) of every sample, and none was given. In verl, the hook that "
            "passes them is installed when gvpo_kernels.integrations.verl is imported in the worker: set "
            "actor_rollout_ref.model.external_lib=gvpo_kernels.integrations.verl. Elsewhere, call the loss inside "
            "`with gvpo_kernels.integrations.verl.group_ids(uids):`.")
    return groups


def install_group_id_hook() -> None:
    """Wrap verl's actor loss ``ppo_loss`` so that each micro-batch's ``uid`` and ``dp_group`` reach the loss.

    Patches ``verl.workers.utils.losses.ppo_loss`` and, when already imported, the name that
    ``verl.workers.engine_workers`` imported from it (the actor builds ``partial(ppo_loss, config=...)`` from that
    name in ``init_model``, after the model config has imported ``external_lib``). Idempotent.
    """
    from verl.workers.utils import losses

    if not getattr(losses.ppo_loss, "_gvpo_hook", False):
        losses.ppo_loss = _with_group_ids(losses.ppo_loss)
    workers = sys.modules.get("verl.workers.engine_workers")
    imported = getattr(workers, "ppo_loss", None) if workers is not None else None
    if imported is not None and not getattr(imported, "_gvpo_hook", False):
        workers.ppo_loss = losses.ppo_loss


def _with_group_ids(ppo_loss):
    @functools.wraps(ppo_loss)
    def ppo_loss_with_group_ids(config, model_output, data, dp_group=None):
        uids = _micro_batch_uids(data)
        if uids is None:
            return ppo_loss(config=config, model_output=model_output, data=data, dp_group=dp_group)
        from verl.utils import tensordict_utils as tu

        whole = tu.get_non_tensor_data(data=data, key=WHOLE_GROUPS_KEY, default=None)
        with group_ids(uids, dp_group, whole_groups_of=whole):
            return ppo_loss(config=config, model_output=model_output, data=data, dp_group=dp_group)

    ppo_loss_with_group_ids._gvpo_hook = True
    return ppo_loss_with_group_ids


def _micro_batch_uids(data) -> list | None:
    """The micro-batch's per-row ``uid`` (a NonTensorStack in verl's TensorDict), or None if it has none."""
    if "uid" not in data.keys():
        return None
    from verl.utils import tensordict_utils as tu

    uids = tu.get(data, "uid")
    return list(uids) if uids is not None else None


# ---- the loss ----------------------------------------------------------------------------------------------------

@register_policy_loss(LOSS_NAME)
def compute_policy_loss_gvpo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """GVPO policy loss for verl (see the module docstring for its normalisation).

    Args:
        old_log_prob: (S, T) float, log-probs of the response tokens under the policy before the update (anchor).
        log_prob: (S, T) float, the same under the current policy (gradient flows through it).
        advantages: (S, T) float, verl's GRPO outcome advantage broadcast over the response tokens; run with
            ``algorithm.norm_adv_by_std_in_grpo=False`` so that it is the group-centred reward.
        response_mask: (S, T) bool or 0/1, the response tokens.
        loss_agg_mode: ignored (GVPO is a per-sequence loss).
        config: verl's ``ActorConfig``; uses ``policy_loss.ppo_kl_coef`` (beta), ``rollout_n``,
            ``ppo_micro_batch_size_per_gpu`` (for ``GVPO_LOSS_SCALE=recipe``) and ``global_batch_info``
            (``dp_size``, ``global_batch_size``, set by verl's ``ppo_loss``; without them the step is the batch).
        rollout_is_weights: ignored, with a warning once.

    Returns:
        ``(loss, metrics)``: a float32 scalar and a dict of floats (``actor/gvpo_implicit_reward``: mean of r_i,
        ``actor/gvpo_grad_seq_logprob_abs``: mean |dloss/ds_i| of this rank, ``actor/ppo_kl``).
    """
    if config is None:
        raise ValueError("loss_mode='gvpo' needs verl's ActorConfig as config (for policy_loss.ppo_kl_coef)")
    if log_prob.ndim != 2 or old_log_prob.shape != log_prob.shape or advantages.shape != log_prob.shape \
            or response_mask.shape != log_prob.shape:
        raise ValueError("old_log_prob, log_prob, advantages and response_mask must all be (S, T); got "
                         f"{tuple(old_log_prob.shape)}, {tuple(log_prob.shape)}, {tuple(advantages.shape)}, "
                         f"{tuple(response_mask.shape)}")
    beta = float(config.policy_loss.get("ppo_kl_coef", 0.1))
    if not beta > 0:
        raise ValueError(f"GVPO's beta (actor.policy_loss.ppo_kl_coef) must be > 0, got {beta}")
    if rollout_is_weights is not None:
        _warn_once("rollout_is_weights", "loss_mode='gvpo' ignores rollout_is_weights: GVPO needs no importance "
                   "sampling")

    groups = current_groups()
    ids = groups.ids.to(log_prob.device)
    if ids.numel() != log_prob.size(0):
        raise ValueError(f"{ids.numel()} group ids for {log_prob.size(0)} sequences: the uids must be those of "
                         "this micro-batch, one per row, in row order")
    process_group = groups.process_group
    if process_group is not None and dist.get_world_size(process_group) == 1:
        process_group = None
    rollout_n = config.get("rollout_n", None)
    sizes = _group_sizes(groups.ids[~groups.padding], process_group)  # over all ranks, before the loss's exchange
    _check_whole_groups(sizes, groups.whole_size or (rollout_n if isinstance(rollout_n, int) else None),
                        strict=groups.whole_size is not None)

    mask = response_mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=log_prob.device)
    num_tokens = mask.sum(-1)
    centred_reward = torch.where(mask, advantages.detach().float(), zero).sum(-1) / num_tokens.clamp(min=1)
    group_sum, stats = gk.gvpo_loss_from_logprobs(
        log_prob, centred_reward, mask=mask, group_ids=ids, ref_logprobs=old_log_prob.detach(), beta=beta,
        reduction="sum", group_process_group=process_group, return_stats=True)

    info = getattr(config, "global_batch_info", None) or {}
    dp_size = int(info.get("dp_size") or 1)
    global_batch_size = info.get("global_batch_size")
    num_groups = global_batch_size / rollout_n if global_batch_size and rollout_n else len(sizes)
    factor = _loss_scale(config) / max(num_groups, 1)
    # verl averages gradients (and the loss metric) over the dp ranks: the gradient of this rank's sequences counts
    # dp_size times; the value is the global sum with a process group, this rank's share (x dp_size) without.
    value_weight = 1 if process_group is not None else dp_size
    loss = factor * (dp_size * group_sum - (dp_size - value_weight) * group_sum.detach())

    with torch.no_grad():
        old_minus_new = torch.where(mask, (old_log_prob - log_prob).float(), zero)
        metrics = {
            "actor/gvpo_implicit_reward": stats.implicit_reward.mean().item() if len(ids) else 0.0,
            "actor/gvpo_grad_seq_logprob_abs": (factor * dp_size * stats.grad_seq_logprob).abs().mean().item()
            if len(ids) else 0.0,
            "actor/ppo_kl": (old_minus_new.sum() / num_tokens.sum().clamp(min=1)).item(),
        }
    return loss, metrics


def _check_whole_groups(sizes: dict[int, int], expected: int | None, strict: bool) -> None:
    """Every group of the step (``sizes``, over all ranks, so that every rank decides alike) must have ``expected``
    (rollout.n) rows: an error where the batch was arranged for whole groups (v1), a warning once otherwise."""
    if expected is None:
        return
    cut = sorted(k for k in sizes.values() if k != expected)
    if not cut:
        return
    message = (f"loss_mode='gvpo': this micro-batch step holds groups (prompts) with {cut} rows over all ranks, not "
               f"rollout.n = {expected}: a prompt's responses are cut across micro-batch steps, and the loss would "
               "centre each piece alone, which is not GVPO.")
    if strict:
        raise ValueError(message + " The plug-in arranged this batch for whole groups: something reordered it "
                         "afterwards (actor.shuffle=True, a custom sampler or worker, dynamic batch size without "
                         "force_group_size).")
    _warn_once("partial", message + " Keep groups whole: trainer.balance_batch=True (with this plug-in's "
               "group-keeping balancing) or ppo_micro_batch_size_per_gpu a multiple of rollout.n, actor.shuffle="
               "False, actor.use_dynamic_bsz=False")


def _group_sizes(ids: torch.Tensor, process_group) -> dict[int, int]:
    """{global group id: its number of rows in this step, over every rank of ``process_group``}."""
    local = collections.Counter(ids.tolist())
    if process_group is None:
        return dict(local)
    everyone = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(everyone, local, group=process_group)
    return dict(sum(everyone, collections.Counter()))


def _loss_scale(config) -> float:
    """``GVPO_LOSS_SCALE``: unset -> 1; ``recipe`` -> ppo_micro_batch_size_per_gpu / rollout_n; else a number > 0."""
    text = os.environ.get(LOSS_SCALE_ENV, "").strip()
    if not text:
        return 1.0
    if text.lower() == "recipe":
        micro, n = config.get("ppo_micro_batch_size_per_gpu", None), config.get("rollout_n", None)
        if not micro or not n:
            raise ValueError(f"{LOSS_SCALE_ENV}=recipe needs actor.ppo_micro_batch_size_per_gpu and rollout.n, got "
                             f"{micro} and {n}")
        return micro / n
    try:
        scale = float(text)
    except ValueError:
        scale = float("nan")
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"{LOSS_SCALE_ENV} must be a number > 0 or 'recipe', got {text!r}")
    return scale


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


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
        if not micro or int(micro) % n:
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
        if _is_gvpo(self.config):
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


install_group_id_hook()
install_balance_hook()
