"""verl plug-in: the GVPO policy loss as ``actor_rollout_ref.actor.policy_loss.loss_mode=gvpo`` (verl 0.9.1).

Importing this module (verl imports it in every process through this package's ``verl.plugins`` entry point):

1. registers :func:`compute_policy_loss_gvpo`, which runs :func:`gvpo_kernels.gvpo_loss_from_logprobs` on verl's
   per-token log-probs, with ``old_log_prob`` as the anchor and each response's mean advantage as its centred
   reward (verl's GRPO advantage with ``norm_adv_by_std_in_grpo=False`` is R_i - mean R);
2. wraps verl's actor loss ``verl.workers.utils.losses.ppo_loss`` (:func:`install_group_id_hook`) so that the
   micro-batch's ``uid`` (the groups) and ``dp_group`` (groups are centred across the data-parallel ranks) reach it;
3. patches verl's trainers when they are imported, for ``loss_mode=gvpo`` only, so that each prompt's responses
   stay in one micro-batch step: the v1 trainer (the default) and the legacy one (``trainer.use_v1=False``), see
   :mod:`gvpo_kernels.integrations.verl_trainers`, whose names this module re-exports.

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

from .verl_trainers import (LOSS_NAME, TRAINER_MODULES, WHOLE_GROUPS_KEY, _PatchOnImport,  # noqa: F401 (re-exported)
                            balance_batch_keeping_groups, balance_batch_v1, check_v1_config, group_balanced_order,
                            install_balance_hook, patch_balance_batch, patch_v1_trainer, v1_group_order)

LOSS_SCALE_ENV = "GVPO_LOSS_SCALE"
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


install_group_id_hook()
install_balance_hook()
