"""The GVPO loss from per-token log-probs, for frameworks whose policy loss never sees logits (verl, OpenRLHF,
NeMo-RL, slime, AReaL: they hand the loss the log-probs their model computed).

    loss = gvpo_loss_from_logprobs(token_logprobs, rewards, group_size=k, mask=response_mask, ref_logprobs=old)

The arguments are checked and flattened by ``layout`` as for the logits losses (the log-probs stand where the
token stage's output would be: there is no vocabulary here), the group stage is the torch backend's
(``torch_impl.group_stage``) or, with ``group_process_group``, the across-ranks one of ``distributed.py``
(``distributed._prepare`` for the checks and the group exchange, ``distributed.group_stage_across_ranks``).
The verl plug-in (integrations/verl.py) calls it.
Everything is O(N + S): the backward writes dL/ds_i at each scored token of sequence i.
"""

from __future__ import annotations

import torch

from . import distributed, layout, torch_impl
from .layout import GVPOStats
from .ops.common import Data, Options, build_layout

_IGNORE_INDEX = -100  # the placeholder labels are all 0, so no position is ignored: the mask decides


def gvpo_loss_from_logprobs(
    token_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.1,
    reduction: str = "mean",
    group_process_group=None,
    return_stats: bool = False,
):
    """GVPO loss from per-token log-probs that carry the policy's gradient.

    With s_i the sum of sequence i's scored log-probs and a_i the same sum of ``ref_logprobs``, this is the loss
    of :func:`gvpo_kernels.gvpo_loss` (see DESIGN.md): per group G of k_G sequences,
    L_G = sum_{i in G} [(r_i - mean_G r) - (R_i - mean_G R)]^2 / (2 max(k_G - 1, 1)), r_i = beta (s_i - a_i).

    Args:
        token_logprobs: (B, T) padded, or (N,) packed with ``cu_seqlens``; float32, bfloat16, float16 (or
            float64): log pi(token) of each position under the current policy (its temperature already applied),
            with grad. Values at positions that are not scored are never read (padding may hold anything).
        rewards: (S,) float, one per sequence; S = B padded, len(cu_seqlens) - 1 packed.
        mask: like token_logprobs, bool or 0/1: the scored (response) positions. Default: every position.
        group_size: k; groups are consecutive runs of k sequences. Exactly one of group_size / group_ids.
        group_ids: (S,) int64 (int32 accepted), any id per sequence; groups of any sizes and order.
        cu_seqlens: (S + 1,) int32/int64 offsets of packed sequences; required for (N,) token_logprobs, refused
            for (B, T) ones. Packed input is supported on every path, across ranks included.
        ref_logprobs: like token_logprobs, float: the anchor's per-token log-probs (the policy before the update,
            as in the official recipe, or a frozen reference); never differentiated. None: on-policy,
            a_i = s_i detached (the loss value is then constant; the gradient is not).
        beta: > 0, GVPO's KL coefficient (the official recipe's 0.1).
        reduction: "mean" over groups (default) or "sum".
        group_process_group: a torch.distributed process group over which the sequences of a group are spread:
            each rank passes its own sequences with global ``group_ids``, and gets the global loss and, for its
            sequences, the single-process gradient (DDP/FSDP average gradients: scale by the world size).
        return_stats: also return a :class:`GVPOStats` (per-sequence s_i, r_i, dL/ds_i, detached float32).
            Its ``entropy`` is ``zeros(0)`` and its ``entropy_bonus`` 0: there are no logits to take an entropy of.

    Returns:
        The loss, a float32 scalar computed in float32 whatever the input dtype; with ``return_stats``,
        ``(loss, stats)``. The gradient of ``token_logprobs`` has its dtype and shape: dL/ds_i at every scored
        position of sequence i, 0 elsewhere. Not twice differentiable (``create_graph=True`` raises).
        Bad arguments raise TypeError / ValueError naming the argument, as in the logits losses.

    Example::

        logp = gk.token_logprobs(logits, labels)           # or the log-probs your framework computed, (B, T)
        loss = gk.gvpo_loss_from_logprobs(logp, rewards, group_size=k, mask=response_mask,
                                          ref_logprobs=old_logprobs, beta=0.1)
        loss.backward()
    """
    layout.check_process_group("group_process_group", group_process_group)
    problem, labels = None, None
    try:
        layout.check_options(beta=beta, temperature=1.0, reduction=reduction, ignore_index=_IGNORE_INDEX,
                             backend="torch")
        layout.check_flag("return_stats", return_stats)
        labels = layout.check_token_logprobs(token_logprobs, mask=mask, ref_logprobs=ref_logprobs, rewards=rewards,
                                             group_ids=group_ids, cu_seqlens=cu_seqlens)
    except (TypeError, ValueError) as exc:
        if group_process_group is None:
            raise
        problem = exc  # raised after the first exchange, so that the other ranks raise too instead of waiting
    data = Data(labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs)
    opts = Options(group_size=group_size, beta=beta, reduction=reduction, ignore_index=_IGNORE_INDEX,
                   backend="torch")
    if group_process_group is None:
        lay, ranks = build_layout(1, data, opts), None
    else:
        device = next((t.device for t in (token_logprobs, rewards) if isinstance(t, torch.Tensor)),
                      torch.device("cpu"))
        call = distributed._prepare(1, device, data, opts, group_process_group, None, problem)
        lay, ranks = call.lay, call.stage.ranks
    loss, seq_logprob, implicit_reward, grad_seq_logprob = LogprobGVPOLoss.apply(token_logprobs, lay, ranks,
                                                                                 float(beta))
    if not return_stats:
        return loss
    entropy = torch.zeros(0, dtype=torch.float32, device=loss.device)
    return loss, GVPOStats(seq_logprob, implicit_reward, grad_seq_logprob, entropy, loss.detach(),
                           torch.zeros((), dtype=torch.float32, device=loss.device))


class LogprobGVPOLoss(torch.autograd.Function):
    """(token_logprobs, Layout, distributed.Ranks or None, beta) -> loss, s, r, dL/ds (the last three (S,) float32,
    not differentiable). Backward: grad_loss * dL/ds_i at each scored token of sequence i, 0 elsewhere."""

    @staticmethod
    def forward(ctx, token_logprobs, lay, ranks, beta):
        flat = token_logprobs.detach().reshape(-1).float()
        scored = lay.target >= 0
        token_logprob = torch.where(scored, flat, torch.zeros_like(flat))  # padding may hold inf or NaN
        if ranks is None:
            group = torch_impl.group_stage(token_logprob, lay, beta)
        else:
            group = distributed.group_stage_across_ranks(token_logprob, lay, beta, ranks)
        loss = group.loss
        seq_logprob, implicit_reward, grad_seq_logprob = (x.float() for x in group[1:4])
        ctx.mark_non_differentiable(seq_logprob, implicit_reward, grad_seq_logprob)
        ctx.lay, ctx.shape, ctx.dtype = lay, token_logprobs.shape, token_logprobs.dtype
        ctx.save_for_backward(grad_seq_logprob)
        return loss.float(), seq_logprob, implicit_reward, grad_seq_logprob

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative would silently be 0
            raise RuntimeError("gvpo_kernels.gvpo_loss_from_logprobs is not twice differentiable: backward with "
                               "create_graph=True through it is not supported; use "
                               "gvpo_kernels.reference.gvpo_loss_from_logprobs for that")
        (grad_seq_logprob,) = ctx.saved_tensors
        lay = ctx.lay
        coef = grad_seq_logprob[lay.token_seq] * grad_loss
        grad = torch.where(lay.target >= 0, coef, torch.zeros_like(coef))
        return grad.to(ctx.dtype).reshape(ctx.shape), None, None, None
