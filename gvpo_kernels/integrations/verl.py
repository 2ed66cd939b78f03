"""verl plug-in: the GVPO policy loss, registered as ``actor_rollout_ref.actor.policy_loss.loss_mode=gvpo``.

Importing this module (verl imports it in every process through this package's ``verl.plugins`` entry point, and
again where ``actor_rollout_ref.model.external_lib`` names it) does three things:

1. ``register_policy_loss("gvpo")`` registers :func:`compute_policy_loss_gvpo`.
2. The group hook (:func:`install_group_id_hook`): verl's policy-loss signature ``(old_log_prob, log_prob,
   advantages, response_mask, loss_agg_mode, config, rollout_is_weights)`` carries no groups. The actor's loss
   function ``verl.workers.utils.losses.ppo_loss(config, model_output, data, dp_group)`` sees the micro-batch
   ``data``, with verl's per-sample ``uid`` (the prompt id that verl's GRPO advantage groups by), and verl's
   data-parallel process group. The hook wraps ``ppo_loss`` so that, during each call, the uids as global int64
   group ids (:func:`uids_to_group_ids`, a hash of the uid string, equal on every rank) and ``dp_group`` sit in a
   context variable that the policy loss reads. Outside verl, set them with ``with group_ids(uids, pg): ...``.
3. The balancing hook (:func:`install_balance_hook`): verl's ``RayPPOTrainer._balance_batch``
   (``trainer.balance_batch=True``) reorders the batch by sequence length across ranks and scatters groups. When
   ``loss_mode`` is ``gvpo`` the hook runs :func:`balance_batch_keeping_groups` instead, which balances lengths
   across ranks while keeping each prompt's responses in one micro-batch step; for any other loss mode verl's
   own balancing runs unchanged. The patch is applied when ``verl.trainer.ppo.ray_trainer`` is imported.

The loss, for the micro-batch of one step (each rank holds S rows: ``log_prob``, ``old_log_prob``,
``advantages``, ``response_mask`` all (S, T), right-padded responses, as verl hands them over):

    s_i = sum_t log_prob[i, t]       over response tokens      (verl's log-probs: its temperature already applied)
    a_i = sum_t old_log_prob[i, t]   the anchor: the policy before this update, as in the official recipe
    A_i = mean over the response tokens of advantages[i, t]: verl's GRPO outcome advantage, which with
          algorithm.norm_adv_by_std_in_grpo=False is R_i - mean of R over the uid group
    L_G = 1 / (2 max(k_G - 1, 1)) * sum_{i in G} [(r_i - mean_G r) - (A_i - mean_G A)]^2,  r_i = beta (s_i - a_i)

G runs over the uid groups of the step on *all* data-parallel ranks: ``gvpo_kernels.gvpo_loss`` with
``group_process_group=dp_group`` centres each group over every rank holding part of it, so a group split over
ranks gives the single-process result. Each rank returns

    loss = loss_scale / num_groups * sum_G L_G         (the same value on every rank)

with the gradient of its own sequences multiplied by ``dp_size``, because verl (FSDP) averages gradients and the
loss metric over ranks. ``num_groups`` = ``global_batch_size / rollout_n``, the mini-batch's groups. Summed over
the micro-batch steps of a mini-batch, this is ``loss_scale`` x the mean of L_G over the mini-batch's groups:
``gvpo_kernels.reference.gvpo_loss`` on the whole mini-batch, ``reduction="mean"``.

Scale: the official recipe sums per micro-batch, so its objective is (ppo_micro_batch_size_per_gpu / rollout.n) x
this mean. ``GVPO_LOSS_SCALE`` (environment variable, read at each call; default 1) sets ``loss_scale``: a number
> 0, or ``recipe`` for ppo_micro_batch_size_per_gpu / rollout_n, the recipe's exact gradient magnitude.

Groups must be whole within each micro-batch step (across ranks): a group cut across steps is centred over each
piece, and gets a warning (once). ``trainer.balance_batch=True`` with the hook above arranges that; without it,
verl's order (a prompt's responses consecutive) does when ``ppo_micro_batch_size_per_gpu`` is a multiple of
``rollout.n``. Either way keep ``actor.shuffle=False`` and ``actor.use_dynamic_bsz=False``.

beta is ``actor_rollout_ref.actor.policy_loss.ppo_kl_coef`` (default 0.1, the official value): verl's configs are
typed dataclasses that reject new keys, and GVPO's beta is the coefficient of the KL term of the objective it
solves. Not used by GVPO: ``clip_ratio*`` (no importance ratio), ``loss_agg_mode`` (GVPO is per sequence),
``rollout_is_weights`` (GVPO needs no importance sampling; a warning is given once if verl passes them). Keep
``actor.use_kl_loss=False`` and ``algorithm.use_kl_in_reward=False``: the KL is in GVPO's objective already.

Why per-token log-probs and not hidden states: verl's engine computes the log-probs itself (its
``prepare_model_outputs``) and hands the loss function ``model_output["log_probs"]``, never the last hidden state
or the LM head, so this loss works on O(S x T) log-probs and cannot fuse the head. The logits are verl's to
avoid: ``actor_rollout_ref.model.use_fused_kernels=True`` makes verl compute log-probs and entropy from the hidden
states in chunks (its fused linear-for-PPO kernel), without the full logits. The fused hidden-state path of this
package (:func:`gvpo_kernels.linear_gvpo_loss`) is used by the TRL plug-in.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import hashlib
import importlib.abc
import importlib.util
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Sequence

import torch
import torch.distributed as dist
from verl.trainer.ppo.core_algos import register_policy_loss

import gvpo_kernels as gk

LOSS_NAME = "gvpo"
LOSS_SCALE_ENV = "GVPO_LOSS_SCALE"
_GROUPS: contextvars.ContextVar[tuple[torch.Tensor, Any] | None] = contextvars.ContextVar("gvpo_groups",
                                                                                         default=None)
_WARNED: set[str] = set()


# ---- group ids ---------------------------------------------------------------------------------------------------

def uids_to_group_ids(uids: Sequence[Any] | torch.Tensor) -> torch.Tensor:
    """(S,) int64 global group ids from per-sample uids (verl's are strings): the first 8 bytes of the blake2b hash
    of ``str(uid)``, the same in every process (Python's ``hash()`` of a string is salted per process)."""
    if isinstance(uids, torch.Tensor):
        uids = uids.tolist()
    return torch.tensor([int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "little",
                                        signed=True) for u in uids], dtype=torch.int64)


@contextmanager
def group_ids(uids: Sequence[Any] | torch.Tensor, process_group=None):
    """Inside the block, ``uids`` (one per row of the micro-batch, in row order) are the groups of the GVPO loss,
    centred over the ranks of ``process_group`` (verl's data-parallel group; None: this process alone)."""
    token = _GROUPS.set((uids_to_group_ids(uids), process_group))
    try:
        yield
    finally:
        _GROUPS.reset(token)


def current_group_ids() -> tuple[torch.Tensor, Any]:
    """The (S,) int64 group ids and the process group set by :func:`group_ids` or by the ``ppo_loss`` hook."""
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
        with group_ids(uids, dp_group):
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
    """GVPO policy loss for verl (see the module docstring for the formula and its normalisation).

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

    groups, process_group = current_group_ids()
    groups = groups.to(log_prob.device)
    if groups.numel() != log_prob.size(0):
        raise ValueError(f"{groups.numel()} group ids for {log_prob.size(0)} sequences: the uids must be those of "
                         "this micro-batch, one per row, in row order")
    if process_group is not None and dist.get_world_size(process_group) == 1:
        process_group = None
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=log_prob.device)
    seq_logprob = torch.where(mask, log_prob.float(), zero).sum(-1)                       # s_i, (S,)
    num_tokens = mask.sum(-1)
    centred_reward = torch.where(mask, advantages.detach().float(), zero).sum(-1) / num_tokens.clamp(min=1)

    # gvpo_loss does the group stage, across ranks: one class of logit 0 scores log-prob 0 at every token, and the
    # anchor old - new makes its implicit reward beta * (s_i - a_i). Its dloss/ds_i then drives our s_i.
    anchor = torch.where(mask, (old_log_prob.detach() - log_prob.detach()).float(), zero)
    group_sum, stats = gk.gvpo_loss(
        log_prob.new_zeros(*log_prob.shape, 1, dtype=torch.float32), torch.zeros_like(mask, dtype=torch.int64),
        centred_reward, group_ids=groups, mask=mask, ref_logprobs=anchor, beta=beta, reduction="sum",
        backend="torch", return_stats=True, group_process_group=process_group)
    surrogate = (stats.grad_seq_logprob * (seq_logprob - seq_logprob.detach())).sum()  # value 0, grad dL/ds_i

    sizes = _group_sizes(groups, process_group)
    info = getattr(config, "global_batch_info", None) or {}
    dp_size = int(info.get("dp_size") or 1)
    global_batch_size = info.get("global_batch_size")
    rollout_n = config.get("rollout_n", None)
    num_groups = global_batch_size / rollout_n if global_batch_size and rollout_n else len(sizes)
    factor = _loss_scale(config) / num_groups
    # verl averages gradients (and the loss metric) over the dp ranks: the global sum counts once in the value,
    # the gradient of this rank's sequences dp_size times. Without a process group the sum is this rank's share.
    value_weight = 1 if process_group is not None else dp_size
    loss = factor * (value_weight * group_sum + dp_size * surrogate)

    if isinstance(rollout_n, int) and any(k != rollout_n for k in sizes.values()):
        _warn_once("partial", "loss_mode='gvpo': the uid groups of a micro-batch step have sizes "
                   f"{sorted(sizes.values())} over all ranks (rollout.n = {rollout_n}); a group cut across "
                   "micro-batch steps is centred over each piece. Keep groups whole: trainer.balance_batch=True "
                   "(with this plug-in's group-keeping balancing) or ppo_micro_batch_size_per_gpu a multiple of "
                   "rollout.n, actor.shuffle=False, actor.use_dynamic_bsz=False")
    with torch.no_grad():
        old_minus_new = torch.where(mask, (old_log_prob - log_prob).float(), zero)
        metrics = {
            "actor/gvpo_implicit_reward": stats.implicit_reward.mean().item(),
            "actor/gvpo_grad_seq_logprob_abs": (factor * dp_size * stats.grad_seq_logprob).abs().mean().item(),
            "actor/ppo_kl": (old_minus_new.sum() / num_tokens.sum().clamp(min=1)).item(),
        }
    return loss, metrics


def _group_sizes(groups: torch.Tensor, process_group) -> dict[int, int]:
    """{global group id: its number of sequences in this step, over every rank of ``process_group``}."""
    local = collections.Counter(groups.tolist())
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


# ---- group-keeping batch balancing -------------------------------------------------------------------------------

def group_balanced_order(uids: Sequence[Any], workloads: Sequence[float], dp_size: int,
                         micro_batch_size: int) -> list[list[int]]:
    """Row order that balances work across ranks and keeps every group in one micro-batch step.

    verl hands rank r the rows [r B / dp, (r + 1) B / dp) of the batch (B rows) and splits them in order into
    micro-batches of ``micro_batch_size``; micro-batch step m is the m-th micro-batch of every rank, dp x micro
    rows. Groups (equal size k, dp x micro a multiple of k) are assigned to steps balancing the steps' total
    workloads, then each step's rows into dp shares of micro_batch_size rows with balanced workloads (verl's
    Karmarkar-Karp ``get_seqlen_balanced_partitions``, both times), the heaviest share going to the rank with the
    least work so far.

    Args:
        uids: (B,) per-row group keys (verl's ``uid``).
        workloads: (B,) per-row cost (verl's ``calculate_workload`` of the sequence lengths).
        dp_size, micro_batch_size: the data-parallel size and ``ppo_micro_batch_size_per_gpu``.

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
    """Make ``trainer_cls._balance_batch`` run :func:`balance_batch_keeping_groups` when the actor's loss_mode is
    ``gvpo`` and verl's own method otherwise. Idempotent."""
    original = trainer_cls._balance_batch
    if getattr(original, "_gvpo_hook", False):
        return

    @functools.wraps(original)
    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        if self.config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla") == LOSS_NAME:
            return balance_batch_keeping_groups(self, batch, metrics, logging_prefix, keep_minibatch)
        return original(self, batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)

    _balance_batch._gvpo_hook = True
    trainer_cls._balance_batch = _balance_batch


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


def install_balance_hook() -> None:
    """Patch ``verl.trainer.ppo.ray_trainer.RayPPOTrainer`` (:func:`patch_balance_batch`) now if that module is
    imported, else when it is (it imports Ray and the rollout servers, which this plug-in does not need)."""
    name = "verl.trainer.ppo.ray_trainer"

    def patch(module):
        patch_balance_batch(module.RayPPOTrainer)

    if name in sys.modules:
        patch(sys.modules[name])
    elif not any(isinstance(f, _PatchOnImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(name, patch))


install_group_id_hook()
install_balance_hook()
