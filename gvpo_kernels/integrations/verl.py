"""verl plug-in: the GVPO policy loss, registered as ``actor_rollout_ref.actor.policy_loss.loss_mode=gvpo``.

Importing this module (verl imports it in every worker when ``actor_rollout_ref.model.external_lib`` names it) does
two things:

1. ``register_policy_loss("gvpo")`` registers :func:`compute_policy_loss_gvpo`, so that verl's
   ``get_policy_loss_fn("gvpo")`` returns it.
2. It installs the group-id hook (:func:`install_group_id_hook`). verl's policy-loss signature is
   ``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)``: it carries
   no group ids. The actor's loss function, ``verl.workers.utils.losses.ppo_loss(config, model_output, data,
   dp_group)``, does see the whole micro-batch ``data``, and in it verl's per-sample ``uid`` (the prompt id that
   the trainer attaches to every rollout and that its GRPO advantage groups by). The hook wraps ``ppo_loss`` so
   that, for the duration of each call, the micro-batch's uids, as int64 group ids in row order, sit in a context
   variable that the policy loss reads (:func:`current_group_ids`). Outside verl's actor, pass them yourself with
   ``with group_ids(uids): ...``.

The loss, for the S sequences of one micro-batch (``log_prob``, ``old_log_prob``, ``advantages``, ``response_mask``
all (S, T), right-padded responses, as verl hands them over):

    s_i = sum_t log_prob[i, t]       over response tokens      (verl's log-probs: its temperature already applied)
    a_i = sum_t old_log_prob[i, t]   the anchor: the policy before this update, as in the official recipe
    A_i = advantages[i, t], constant over the response tokens (their mean is taken): verl's GRPO outcome
          advantage; with norm_adv_by_std_in_grpo=False it is R_i - mean of R over the uid group, the centred
          reward GVPO needs
    L_G = 1 / (2 max(k_G - 1, 1)) * sum_{i in G} [(r_i - mean_G r) - (A_i - mean_G A)]^2,  r_i = beta (s_i - a_i)
    loss = dp_size / global_batch_size * sum_G k_G L_G

where G runs over the uid groups present in the micro-batch and k_G is the number of their rows in it. Summed over
micro-batches and averaged over data-parallel ranks (as verl's gradient accumulation and FSDP do), this is the mean
of L_G over the groups of the mini-batch when groups are whole in each micro-batch, and the loss is
``gvpo_kernels.reference.gvpo_loss`` with the same groups, ``reduction="sum"``, times ``dp_size * k /
global_batch_size``. A group cut across micro-batches is centred over each piece, so keep groups whole: rollouts
of one prompt are consecutive in verl's batch; keep ``trainer.balance_batch=False`` (it reorders samples by length),
``actor.shuffle=False``, ``actor.use_dynamic_bsz=False`` and make ``ppo_micro_batch_size_per_gpu`` a multiple of
``rollout.n``. A micro-batch holding a group of another size than ``rollout.n`` gets a warning (once).

beta is ``actor_rollout_ref.actor.policy_loss.ppo_kl_coef`` (default 0.1, the official value): verl's configs are
typed dataclasses that reject new keys, and GVPO's beta is the coefficient of the KL term of the objective it
solves. Not used by GVPO: ``clip_ratio*`` (no importance ratio), ``loss_agg_mode`` (GVPO is per sequence),
``rollout_is_weights`` (GVPO needs no importance sampling; a warning is given once if verl passes them). Keep
``actor.use_kl_loss=False`` and ``algorithm.use_kl_in_reward=False``: the KL is in GVPO's objective already.

In verl the log-probs are computed by verl's actor before the policy loss is called, so this loss works on
per-token log-probs, O(S x T); to keep verl from holding the full logits use its own
``actor_rollout_ref.model.use_fused_kernels=True``. The fused hidden-state path of this package
(:func:`gvpo_kernels.linear_gvpo_loss`) is used by the TRL plug-in.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Sequence

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

LOSS_NAME = "gvpo"
_GROUP_IDS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("gvpo_group_ids", default=None)
_WARNED: set[str] = set()


# ---- group ids ---------------------------------------------------------------------------------------------------

def uids_to_group_ids(uids: Sequence[Any]) -> torch.Tensor:
    """(S,) int64 group ids, numbered by first appearance, from any per-sample uids (verl's are strings)."""
    if isinstance(uids, torch.Tensor):
        uids = uids.tolist()
    numbering: dict[Any, int] = {}
    return torch.tensor([numbering.setdefault(u, len(numbering)) for u in uids], dtype=torch.int64)


@contextmanager
def group_ids(uids: Sequence[Any] | torch.Tensor):
    """Make ``uids`` (one per row of the micro-batch, in row order) the groups of the GVPO loss inside the block."""
    token = _GROUP_IDS.set(uids_to_group_ids(uids))
    try:
        yield
    finally:
        _GROUP_IDS.reset(token)


def current_group_ids() -> torch.Tensor:
    """The (S,) int64 group ids set by :func:`group_ids` or by the ``ppo_loss`` hook; a clear error if none."""
    ids = _GROUP_IDS.get()
    if ids is None:
        raise RuntimeError(
            "loss_mode='gvpo' needs the group (uid) of every sample, and none was given. In verl, the hook that "
            "passes them is installed when gvpo_kernels.integrations.verl is imported in the worker: set "
            "actor_rollout_ref.model.external_lib=gvpo_kernels.integrations.verl. Elsewhere, call the loss inside "
            "`with gvpo_kernels.integrations.verl.group_ids(uids):`.")
    return ids


def install_group_id_hook() -> None:
    """Wrap verl's actor loss ``ppo_loss`` so that each micro-batch's ``uid`` reaches the policy loss.

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
        with group_ids(uids):
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
        config: verl's ``ActorConfig``; uses ``policy_loss.ppo_kl_coef`` (beta) and ``global_batch_info``
            (``dp_size``, ``global_batch_size``, set by verl's ``ppo_loss``; without them the micro-batch is the
            whole batch).
        rollout_is_weights: ignored, with a warning once.

    Returns:
        ``(loss, metrics)``: a float32 scalar and a dict of floats (``actor/gvpo_implicit_reward``: mean of r_i,
        ``actor/gvpo_grad_seq_logprob_abs``: mean |dL/ds_i| of this micro-batch's loss, ``actor/ppo_kl``).
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

    groups = current_group_ids().to(log_prob.device)
    if groups.numel() != log_prob.size(0):
        raise ValueError(f"{groups.numel()} group ids for {log_prob.size(0)} sequences: the uids must be those of "
                         "this micro-batch, one per row, in row order")
    mask = response_mask.bool()
    zero = log_prob.new_zeros(())
    seq_logprob = torch.where(mask, log_prob.float(), zero.float()).sum(-1)                # s_i, (S,)
    seq_anchor = torch.where(mask, old_log_prob.detach().float(), zero.float()).sum(-1)    # a_i
    num_tokens = mask.sum(-1)
    centred_reward = torch.where(mask, advantages.detach().float(), zero.float()).sum(-1) / num_tokens.clamp(min=1)

    group, sizes = _group_index(groups)
    implicit_reward = beta * (seq_logprob - seq_anchor)                                     # r_i
    diff = _centre(implicit_reward, group, sizes) - _centre(centred_reward, group, sizes)
    bessel = (sizes - 1).clamp(min=1).float()[group]
    per_seq = diff.square() / (2 * bessel)                       # sum over a group's rows = L_G
    weight = sizes.float()[group]                                # k_G: sum_G k_G L_G
    info = getattr(config, "global_batch_info", None) or {}
    dp_size = info.get("dp_size") or 1
    global_batch_size = info.get("global_batch_size") or log_prob.size(0)
    scale = float(dp_size) / float(global_batch_size)
    loss = (weight * per_seq).sum() * scale

    expected = config.get("rollout_n", None)
    if (isinstance(expected, int) and bool((sizes != expected).any())) or sizes.min() != sizes.max():
        _warn_once("partial", "loss_mode='gvpo': the uid groups of a micro-batch have sizes "
                   f"{sorted(sizes.tolist())} (rollout.n = {expected}); a group cut across micro-batches is centred "
                   "over each piece. Keep groups whole: trainer.balance_batch=False, actor.shuffle=False, "
                   "actor.use_dynamic_bsz=False, ppo_micro_batch_size_per_gpu a multiple of rollout.n")
    with torch.no_grad():
        scored = mask.any(-1)
        old_minus_new = torch.where(mask, (old_log_prob - log_prob).float(), zero.float())
        metrics = {
            "actor/gvpo_implicit_reward": implicit_reward.mean().item(),
            "actor/gvpo_grad_seq_logprob_abs": (beta * scale * weight * diff / bessel).abs().mean().item(),
            "actor/ppo_kl": (old_minus_new.sum() / num_tokens.sum().clamp(min=1)).item() if scored.any() else 0.0,
        }
    return loss, metrics


def _group_index(groups: torch.Tensor):
    """(S,) ids -> (S,) dense group index in [0, G) and (G,) group sizes."""
    _, group = torch.unique(groups, return_inverse=True)
    sizes = torch.bincount(group)
    return group, sizes


def _centre(values: torch.Tensor, group: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """values minus the mean of their group; differentiable."""
    sums = values.new_zeros(sizes.numel()).index_add(0, group, values)
    return values - (sums / sizes.to(values.dtype))[group]


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


install_group_id_hook()
