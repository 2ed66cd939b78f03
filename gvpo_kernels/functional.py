"""gvpo_loss and linear_gvpo_loss: check the arguments, then run the loss's torch.library op (gvpo_kernels.ops).

The whole flow, for every backend:

    here:     static checks   shapes, dtypes, devices, options (layout.check_*); nothing reads a tensor's values
    the op:   layout          layout.build: the checks that read values; padded/packed -> flat tokens, groups
              backend         ops.select_backend: C++ kernels on the CPU (cpu.py), Triton on CUDA, torch otherwise
    forward:  token stage     logits -> per-token log-prob and log-sum-exp         (N,), (N,)   reads N x V once
                              (linear: logits = hidden @ W.T + b, chunk by chunk, never stored)
              group stage     -> s_i, r_i, dL/ds_i per sequence, the loss           (S,) ...     O(N + S)
    backward: token stage     dL/dlogits = grad * dL/ds_i / T * (onehot - softmax)  (N, V)       recomputed from lse
                              (linear: contracted at once into d_hidden, d_weight, d_bias, during the forward)

Only O(N + S) floats are saved between forward and backward (the linear path keeps its gradients instead). Each
loss is one custom op with fake shapes and registered autograd, so torch.compile(fullgraph=True) traces it whole.
With ``inplace_backward=True`` (eager mode) the backward of gvpo_loss runs at the end of the forward, writing into
the logits' own storage.
"""

from __future__ import annotations

import torch

from . import distributed, layout, ops
from .layout import GVPOStats
from .ops import select_backend  # noqa: F401  (picks a backend by name and device; callers and tests use it here)


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
    softcap: float | None = None,
    logit_scale: float = 1.0,
    entropy_coef: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = False,
    return_stats: bool = False,
    group_process_group=None,
    vocab_process_group=None,
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
        beta: scale of the implicit reward r_i = beta * (s_i - a_i), > 0 (GVPO's KL coefficient). The official
            recipe uses 0.1.
        temperature: the logits are divided by it before the softmax (use the sampling temperature).
        softcap: for models whose logits are soft-capped (Gemma-2's ``final_logit_softcapping``, Grok): the
            softmax sees softcap * tanh(logits * logit_scale / softcap) / temperature. None (default): no cap.
        logit_scale: the logits are multiplied by it first (Cohere's ``logit_scale``; Granite's ``logits_scaling``
            divides: pass its reciprocal). 1.0 by default. Without a softcap it folds into the temperature.
        entropy_coef: an entropy bonus: the loss is the GVPO loss minus entropy_coef times the mean token entropy
            over the call's scored tokens (every scored token weighs the same, whatever its sequence: TRL's
            entropy bonus, whatever its loss_type). Its gradient comes from the same backward. 0 (default): none.
        reduction: "mean" over groups (default) or "sum".
        ignore_index: label value of positions that are not scored.
        backend: "auto" (CUDA -> "triton", CPU -> "cpu", the C++ kernels, else "torch"), "triton", "cpu" or
            "torch".
        inplace_backward: write dL/dlogits into the logits' storage during the forward, so no second N x V buffer
            exists. The logits are then consumed: their values are overwritten by the gradient. Eager mode only:
            under torch.compile the gradient gets a buffer of its own.
        return_stats: also return a :class:`GVPOStats` of per-sequence s_i, r_i, dL/ds_i and the mean token entropy
            (detached), the entropy from the same pass over the logits as the log-probs, and the loss's GVPO part
            and entropy bonus.
        group_process_group: a torch.distributed process group over which the sequences of a group are spread;
            each rank passes its own sequences with global ``group_ids``. The loss is then the global one.
        vocab_process_group: a process group over which the vocabulary is split in contiguous slices, rank order:
            each rank passes its columns of the logits and the same global labels. See gvpo_kernels/distributed.py
            (eager only, no ``inplace_backward``).

    Returns:
        The loss, a float32 scalar; with ``return_stats``, ``(loss, stats)``. The gradient of the logits has their
        dtype and shape. ``-inf`` logits at columns that are no scored label are fine; a scored label whose logit
        is ``-inf`` has log-prob ``-inf``, so its sequence's s_i is -inf and the loss NaN (as log_softmax gives).
        Not twice differentiable: a backward with ``create_graph=True`` raises.

    Example::

        logits = model(input_ids).logits[:, :-1]              # (B, T-1, V), B = prompts x k samples
        labels = input_ids[:, 1:].masked_fill(~response_mask[:, 1:], -100)
        loss = gk.gvpo_loss(logits, labels, rewards, group_size=k, ref_logprobs=old_logprobs, beta=0.1)
        loss.backward()
    """
    opts = _options(beta=beta, temperature=temperature, reduction=reduction, ignore_index=ignore_index,
                    backend=backend, group_size=group_size, entropy=return_stats, softcap=softcap,
                    logit_scale=logit_scale, entropy_coef=entropy_coef)
    layout.check_flag("inplace_backward", inplace_backward)
    layout.check_flag("return_stats", return_stats)
    layout.check_process_group("group_process_group", group_process_group)
    layout.check_process_group("vocab_process_group", vocab_process_group)
    layout.check_logits(logits, labels)
    data = ops.Data(labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs)
    if group_process_group is not None or vocab_process_group is not None:
        problem = ValueError("inplace_backward is not supported together with a process group") \
            if inplace_backward else None  # raised on this rank after the first exchange, so no rank waits
        outs = distributed.gvpo_loss(logits, data, opts, group_process_group, vocab_process_group, problem)
    else:
        _check_inplace(logits, inplace_backward)
        outs = ops.gvpo_loss(logits, data, opts, inplace_backward)
    return (outs[0], _stats(outs)) if return_stats else outs[0]


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
    softcap: float | None = None,
    logit_scale: float = 1.0,
    entropy_coef: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    return_stats: bool = False,
    group_process_group=None,
    vocab_process_group=None,
):
    """GVPO loss from hidden states and the LM head, without ever materialising the (N, V) logits.

    Args:
        hidden: (B, T, H) padded or (N, H) packed; float32, bfloat16, float16 (or float64): the last hidden
            state, e.g. ``outputs.hidden_states[-1]``; ``hidden[t]`` scores ``labels[t]`` (shift before the call).
        weight: (V, H), the LM head in nn.Linear layout (``model.lm_head.weight``), same dtype as hidden.
        bias: (V,) or None.
        labels, rewards and the keywords: as in :func:`gvpo_loss` (no ``inplace_backward``: nothing N x V exists).
            With ``vocab_process_group`` each rank passes its rows of the weight (and bias); its d_hidden is then
            its slice's contribution, to be summed over that group (see gvpo_kernels/distributed.py).

    Returns:
        The loss, a float32 scalar; with ``return_stats``, ``(loss, stats)``. Gradients flow to hidden, weight
        and bias, each in its own dtype; the weight gradient is accumulated in float32. They are computed in the
        forward (when grad is enabled and an input requires it) and scaled by the upstream gradient in backward.

    Example::

        out = model.model(input_ids, attention_mask=attention_mask)         # the decoder, without the LM head
        hidden = out.last_hidden_state[:, :-1]                               # (B, T-1, H)
        labels = input_ids[:, 1:].masked_fill(~response_mask[:, 1:], -100)
        loss = gk.linear_gvpo_loss(hidden, model.lm_head.weight, labels, rewards, group_size=k,
                                   ref_logprobs=old_logprobs, beta=0.1)
        loss.backward()
    """
    opts = _options(beta=beta, temperature=temperature, reduction=reduction, ignore_index=ignore_index,
                    backend=backend, group_size=group_size, entropy=return_stats, softcap=softcap,
                    logit_scale=logit_scale, entropy_coef=entropy_coef)
    layout.check_flag("return_stats", return_stats)
    layout.check_process_group("group_process_group", group_process_group)
    layout.check_process_group("vocab_process_group", vocab_process_group)
    layout.check_linear(hidden, weight, bias, labels)
    data = ops.Data(labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs)
    if group_process_group is not None or vocab_process_group is not None:
        outs = distributed.linear_gvpo_loss(hidden, weight, bias, data, opts, group_process_group,
                                            vocab_process_group)
    else:
        outs = ops.linear_gvpo_loss(hidden, weight, bias, data, opts)
    return (outs[0], _stats(outs)) if return_stats else outs[0]


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """Per-token log-probs of the labels (and the entropy of each token's distribution), fused: the softmax is
    never stored.

    Args:
        logits: (B, T, V) padded or (N, V) packed, float32 / bfloat16 / float16 (or float64); ``logits[t]`` scores
            ``labels[t]`` (shifted by the caller).
        labels: (B, T) or (N,) int64 (int32 accepted); positions equal to ``ignore_index`` are not scored.
        temperature: the statistics are those of softmax(logits / temperature).
        softcap, logit_scale: a soft-cap and a scale of the logits, as in :func:`gvpo_loss`.
        mask: like labels, bool or 0/1: which positions are scored. Default: all not ignored.
        cu_seqlens: (S + 1,) offsets of packed sequences; required for (N, V) logits (checked, as in the losses).
        return_entropy: also return each scored token's entropy, -sum_v p_v log p_v of that softmax,
            from the same streaming pass as the log-sum-exp, on every backend.
        backend: "auto", "triton", "cpu" or "torch", as in :func:`gvpo_loss`.

    Returns:
        ``logprob`` (labels' shape, float32, 0 where not scored), or ``(logprob, entropy)`` likewise. Both are
        differentiable (an entropy bonus can go into the loss); the logits' gradient has their dtype.

    Example::

        with torch.no_grad():                         # the old policy's log-probs for the anchor
            old_logprobs = gk.token_logprobs(logits, labels)
        logprob, entropy = gk.token_logprobs(logits, labels, return_entropy=True)
        (-(0.01 * entropy).sum()).backward()           # an entropy bonus
    """
    opts = _stats_options(temperature, ignore_index, return_entropy, backend, softcap, logit_scale)
    layout.check_logits(logits, labels)
    logprob, entropy = ops.token_stats(logits, ops.Data(labels, mask=mask, cu_seqlens=cu_seqlens), opts)
    return (logprob, entropy) if return_entropy else logprob


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """:func:`token_logprobs` of ``hidden @ weight.T + bias`` without materialising the (N, V) logits.

    Args:
        hidden: (B, T, H) padded or (N, H) packed; weight: (V, H) as in nn.Linear, hidden's dtype; bias: (V,) or
            None. The other arguments as in :func:`token_logprobs`.

    Returns:
        ``logprob`` or ``(logprob, entropy)``, labels' shape, float32, 0 where not scored. Gradients flow to hidden,
        weight and bias (the backward recomputes the logits chunk by chunk; the weight gradient in float32).

    Example::

        hidden = model.model(input_ids).last_hidden_state[:, :-1]
        ref_logprobs = gk.linear_token_logprobs(hidden, model.lm_head.weight, input_ids[:, 1:])
    """
    opts = _stats_options(temperature, ignore_index, return_entropy, backend, softcap, logit_scale)
    layout.check_linear(hidden, weight, bias, labels)
    logprob, entropy = ops.linear_token_stats(hidden, weight, bias, ops.Data(labels, mask=mask, cu_seqlens=cu_seqlens),
                                              opts)
    return (logprob, entropy) if return_entropy else logprob


def _stats(outs) -> GVPOStats:
    """GVPOStats of a loss's outputs (loss, s, r, dL/ds, seq_entropy, entropy_bonus)."""
    loss, seq_logprob, implicit_reward, grad_seq_logprob, seq_entropy, bonus = outs
    return GVPOStats(seq_logprob, implicit_reward, grad_seq_logprob, seq_entropy, (loss + bonus).detach(), bonus)


def _options(*, beta, temperature, reduction, ignore_index, backend, group_size, entropy, softcap, logit_scale,
             entropy_coef) -> ops.Options:
    """The checked options of a loss, as the autograd layer takes them."""
    layout.check_options(beta=beta, temperature=temperature, reduction=reduction, ignore_index=ignore_index,
                         backend=backend, softcap=softcap, logit_scale=logit_scale, entropy_coef=entropy_coef)
    if group_size is not None:
        layout.check_count("group_size", group_size)
    _check_no_functorch()
    return ops.Options(group_size=None if group_size is None else int(group_size), beta=float(beta),
                       temperature=float(temperature), softcap=None if softcap is None else float(softcap),
                       logit_scale=float(logit_scale), reduction=reduction, ignore_index=int(ignore_index),
                       backend=backend, entropy=bool(entropy), entropy_coef=float(entropy_coef))


def _stats_options(temperature, ignore_index, return_entropy, backend, softcap, logit_scale) -> ops.Options:
    layout.check_options(beta=None, temperature=temperature, reduction="mean", ignore_index=ignore_index,
                         backend=backend, softcap=softcap, logit_scale=logit_scale)
    layout.check_flag("return_entropy", return_entropy)
    _check_no_functorch()
    return ops.Options(temperature=float(temperature), softcap=None if softcap is None else float(softcap),
                       logit_scale=float(logit_scale), ignore_index=int(ignore_index), backend=backend,
                       entropy=bool(return_entropy))


def _check_inplace(logits, inplace_backward) -> None:
    """inplace_backward overwrites the logits with their gradient: never a leaf that requires grad (a parameter
    would silently become its own gradient; PyTorch refuses in-place ops on such leaves too)."""
    compiled = torch.compiler.is_compiling()  # compiled, the gradient gets a buffer of its own
    if inplace_backward and not compiled and logits.is_leaf and logits.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("inplace_backward=True would overwrite logits that are a leaf tensor requiring grad (an "
                           "nn.Parameter, or a tensor made with requires_grad=True) with their own gradient; pass "
                           "the output of the op that made the logits (model(...).logits), or "
                           "inplace_backward=False")


def _check_no_functorch() -> None:
    """torch.func transforms (grad, vmap, ...) cannot see through the fused kernels: say so plainly."""
    if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(ops.common.FUNCTORCH_MESSAGE)
