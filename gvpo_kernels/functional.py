"""gvpo_loss and linear_gvpo_loss: check the arguments, pick a backend, run it inside an autograd.Function.

The whole flow, for every backend:

    forward:  token stage   logits -> per-token log-prob and log-sum-exp         (N,), (N,)   reads N x V once
                            (linear: logits = hidden @ W.T + b, tile by tile, never stored)
              group stage   -> s_i, r_i, dL/ds_i per sequence, the loss           (S,) ...     O(N + S)
    backward: token stage   dL/dlogits = grad * dL/ds_i / T * (onehot - softmax)  (N, V)       recomputed from lse
                            (linear: contracted at once into d_hidden, d_weight, d_bias)

Only O(N + S) floats are saved between forward and backward. With ``inplace_backward=True`` the backward of
gvpo_loss runs at the end of the forward, writing into the logits' own storage.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

from . import cpu, layout, torch_impl
from ._alloc import empty
from .layout import GVPOStats


def gvpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.1,
    temperature: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = False,
    return_stats: bool = False,
):
    """GVPO loss from logits, fused: no softmax or N x V intermediate is ever stored.

    Args:
        logits: (B, T, V) padded or (N, V) packed; float32, bfloat16, float16 (or float64). ``logits[t]``
            scores ``labels[t]``: shift them before the call as for any causal-LM loss.
        labels: (B, T) or (N,) int64 (int32 accepted). Positions equal to ``ignore_index`` are not scored.
        rewards: (S,) float, one per sequence; S = B padded, len(cu_seqlens) - 1 packed.
        group_size: k; groups are consecutive runs of k sequences. Exactly one of group_size / group_ids.
        group_ids: (S,) int64, any id per sequence; groups may have any sizes (size 1 adds nothing) and order.
        mask: like labels, bool or 0/1; which positions are scored (the response tokens). Default: all not ignored.
        cu_seqlens: (S + 1,) int32/int64 offsets of the packed sequences; required for (N, V) logits.
        ref_logprobs: like labels, float: per-token log-probs of the anchor policy (the policy before the update,
            or a frozen reference). None: on-policy, a_i = s_i detached (the loss value is then constant).
        beta: scale of the implicit reward r_i = beta * (s_i - a_i). The official recipe uses 0.1.
        temperature: the logits are divided by it before the softmax (use the sampling temperature).
        reduction: "mean" over groups (default) or "sum".
        ignore_index: label value of positions that are not scored.
        backend: "auto" (CUDA -> "triton", otherwise "torch"), "triton", "cpu" or "torch".
        inplace_backward: write dL/dlogits into the logits' storage during the forward, so no second N x V buffer
            exists. The logits are then consumed: their values are overwritten by the gradient.
        return_stats: also return a :class:`GVPOStats` of per-sequence s_i, r_i and dL/ds_i (detached).

    Returns:
        The loss, a float32 scalar; with ``return_stats``, ``(loss, stats)``. The gradient of the logits has their
        dtype and shape.

    Example::

        logits = model(input_ids).logits[:, :-1]              # (B, T-1, V), B = prompts x k samples
        labels = input_ids[:, 1:].masked_fill(~response_mask[:, 1:], -100)
        loss = gk.gvpo_loss(logits, labels, rewards, group_size=k, ref_logprobs=old_logprobs, beta=0.1)
        loss.backward()
    """
    layout.check_options(beta=beta, temperature=temperature, reduction=reduction, ignore_index=ignore_index,
                         backend=backend)
    vocab_size = layout.check_logits(logits, labels)
    lay = layout.build(labels, rewards, vocab_size=vocab_size, group_size=group_size, group_ids=group_ids,
                       mask=mask, cu_seqlens=cu_seqlens, ref_logprobs=ref_logprobs, ignore_index=ignore_index,
                       reduction=reduction)
    impl = select_backend(backend, logits.device)
    loss, *stats = _GVPOLogitsFunction.apply(logits, impl, lay, float(beta), float(temperature),
                                             bool(inplace_backward))
    return (loss, GVPOStats(*stats)) if return_stats else loss


class _GVPOLogitsFunction(torch.autograd.Function):
    """One autograd.Function for every backend: ``impl`` supplies token_forward, group_stage, token_backward."""

    @staticmethod
    def forward(ctx, logits, impl, lay, beta, temperature, inplace_backward):
        rows = layout.as_rows(logits)
        token_logprob, lse = impl.token_forward(rows, lay.target, temperature)
        loss, seq_logprob, implicit_reward, grad_seq = impl.group_stage(token_logprob, lay, beta)
        ctx.mark_non_differentiable(seq_logprob, implicit_reward, grad_seq)
        ctx.impl, ctx.lay, ctx.temperature, ctx.shape = impl, lay, temperature, logits.shape
        ctx.inplace = inplace_backward and ctx.needs_input_grad[0]
        if ctx.inplace:  # the gradient for grad_loss = 1, written over the logits
            impl.token_backward(rows, lay, lse, grad_seq, loss.new_ones(()), temperature, out=rows)
            ctx.grad_rows = rows  # not save_for_backward: the logits it views were just overwritten on purpose
        elif ctx.needs_input_grad[0]:
            ctx.save_for_backward(rows, lse, grad_seq)
        return loss, seq_logprob, implicit_reward, grad_seq

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.inplace:
            grad = ctx.grad_rows
            del ctx.grad_rows
            if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
                grad.mul_(grad_loss)
        else:
            rows, lse, grad_seq = ctx.saved_tensors
            grad = empty(rows.shape, dtype=rows.dtype, device=rows.device)
            ctx.impl.token_backward(rows, ctx.lay, lse, grad_seq, grad_loss, ctx.temperature, out=grad)
        return grad.reshape(ctx.shape), None, None, None, None, None


def linear_gvpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.1,
    temperature: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    return_stats: bool = False,
):
    """GVPO loss from hidden states and the LM head, without ever materialising the (N, V) logits.

    Args:
        hidden: (B, T, H) padded or (N, H) packed; float32, bfloat16, float16 (or float64): the last hidden
            state, e.g. ``outputs.hidden_states[-1]``; ``hidden[t]`` scores ``labels[t]`` (shift before the call).
        weight: (V, H), the LM head in nn.Linear layout (``model.lm_head.weight``), same dtype as hidden.
        bias: (V,) or None.
        labels, rewards and the keywords: as in :func:`gvpo_loss` (no ``inplace_backward``: nothing N x V exists).

    Returns:
        The loss, a float32 scalar; with ``return_stats``, ``(loss, stats)``. Gradients flow to hidden, weight
        and bias, each in its own dtype; the weight gradient is accumulated in float32.

    Example::

        out = model.model(input_ids, attention_mask=attention_mask)         # the decoder, without the LM head
        hidden = out.last_hidden_state[:, :-1]                               # (B, T-1, H)
        labels = input_ids[:, 1:].masked_fill(~response_mask[:, 1:], -100)
        loss = gk.linear_gvpo_loss(hidden, model.lm_head.weight, labels, rewards, group_size=k,
                                   ref_logprobs=old_logprobs, beta=0.1)
        loss.backward()
    """
    layout.check_options(beta=beta, temperature=temperature, reduction=reduction, ignore_index=ignore_index,
                         backend=backend)
    vocab_size = layout.check_linear(hidden, weight, bias, labels)
    lay = layout.build(labels, rewards, vocab_size=vocab_size, group_size=group_size, group_ids=group_ids,
                       mask=mask, cu_seqlens=cu_seqlens, ref_logprobs=ref_logprobs, ignore_index=ignore_index,
                       reduction=reduction)
    impl = select_backend(backend, hidden.device)
    loss, *stats = _GVPOLinearFunction.apply(hidden, weight, bias, impl, lay, float(beta), float(temperature))
    return (loss, GVPOStats(*stats)) if return_stats else loss


class _GVPOLinearFunction(torch.autograd.Function):
    """The linear path for every backend: ``impl`` supplies linear_forward, group_stage, linear_backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, impl, lay, beta, temperature):
        rows = layout.as_rows(hidden)
        token_logprob, lse = impl.linear_forward(rows, weight, bias, lay.target, temperature)
        loss, seq_logprob, implicit_reward, grad_seq = impl.group_stage(token_logprob, lay, beta)
        ctx.mark_non_differentiable(seq_logprob, implicit_reward, grad_seq)
        ctx.impl, ctx.lay, ctx.temperature, ctx.shape = impl, lay, temperature, hidden.shape
        ctx.save_for_backward(rows, weight, bias, lse, grad_seq)
        return loss, seq_logprob, implicit_reward, grad_seq

    @staticmethod
    def backward(ctx, grad_loss, *_):
        rows, weight, bias, lse, grad_seq = ctx.saved_tensors
        d_hidden, d_weight, d_bias = ctx.impl.linear_backward(rows, weight, bias, ctx.lay, lse, grad_seq,
                                                              grad_loss, ctx.temperature)
        return d_hidden.reshape(ctx.shape), d_weight, d_bias, None, None, None, None


def select_backend(name: str, device: torch.device):
    """The backend for ``name`` on ``device``: a namespace of token_forward, group_stage, token_backward,
    linear_forward, linear_backward."""
    if name == "auto":
        if device.type != "cuda":
            return torch_impl
        from .triton import unavailable_reason

        reason = unavailable_reason(device)
        if reason is None:
            return _triton_backend()
        warnings.warn(f"gvpo_kernels: falling back to the torch backend: {reason}", stacklevel=3)
        return torch_impl
    if name == "triton":
        from .triton import unavailable_reason

        reason = unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        return _triton_backend()
    if name == "cpu":
        reason = cpu.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend='cpu' cannot run: {reason}")
    return torch_impl


def _triton_backend():
    from .triton import group, linear, logprob

    return SimpleNamespace(token_forward=logprob.token_forward, group_stage=group.group_stage,
                           token_backward=logprob.token_backward, linear_forward=linear.linear_forward,
                           linear_backward=linear.linear_backward)
