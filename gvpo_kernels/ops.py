"""The two losses' autograd: eager autograd.Functions, and torch.library custom ops (namespace ``gvpo``) that
torch.compile traces as single nodes. Both run the same implementation functions below.

    gvpo::gvpo_loss(logits, labels, rewards, ..., entropy)
                                       -> loss, s, r, dL/ds (S,), mean entropy (S,) or (0,), lse, target, token_seq (N,)
    gvpo::gvpo_loss_backward(logits, target, token_seq, lse, dL/ds, grad_loss, ...)          -> dL/dlogits
    gvpo::linear_gvpo_loss(hidden, weight, bias, labels, rewards, ..., entropy)
                                       -> loss, s, r, dL/ds, mean entropy, d_hidden, d_weight, d_bias

Eager calls go through plain autograd.Functions (:class:`_LogitsLoss`, :class:`_InplaceLogitsLoss`,
:class:`_LinearLoss`): calling a custom op imports torch's compile machinery (sympy, fake tensors: ~900 modules,
~150 MB), which an eager caller should not pay for. Under torch.compile the ops run, so the compiler sees only
their fake implementations (output shapes from input shapes) and the autograd formulas registered here.

Either way the implementation runs eagerly: it builds the Layout (``layout.build``: the checks that need the
values, before any kernel) and runs the backend that :func:`select_backend` picks for the device: the C++ kernels
on the CPU (``cpu``), Triton on CUDA, chunked torch elsewhere.

The logits path saves O(N) floats and recomputes the softmax in its backward. The linear path computes its
gradients in the forward, for grad_loss = 1, and its backward scales them: its outputs then have the same shapes
whichever GEMM schedule the backend picks (``cpu.linear_loss_and_grads``), and nothing N x V is ever kept.
Neither is twice differentiable: a backward with ``create_graph=True`` raises, rather than return a gradient
that silently has no graph.

:func:`gvpo_loss` and :func:`linear_gvpo_loss` are what functional.py calls.
"""

import contextlib
import numbers
import warnings
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from . import cpu, layout, torch_impl
from ._alloc import empty
from .layout import Layout

# ----------------------------------------------------------------------------------------------------------------
# entry points


def gvpo_loss(logits, labels, rewards, *, group_size, group_ids, mask, cu_seqlens, ref_logprobs, beta, temperature,
              reduction, ignore_index, backend, inplace_backward, entropy):
    """loss (), seq_logprob, implicit_reward, grad_seq_logprob (S,) and seq_entropy ((S,) with ``entropy``, else
    (0,)) of the logits path (see functional.gvpo_loss).

    With ``inplace_backward`` in eager mode the gradient is written over the logits during the forward
    (:class:`_InplaceLogitsLoss`); under torch.compile, where the compiler owns the buffers, the op path runs.
    """
    _check_kinds(logits.device, group_size, rewards=rewards, group_ids=group_ids, mask=mask, cu_seqlens=cu_seqlens,
                 ref_logprobs=ref_logprobs)
    args = (labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, _int_or_none(group_size), float(beta),
            float(temperature), reduction, int(ignore_index), backend, bool(entropy))
    if torch.compiler.is_compiling():
        return logits_loss_op(logits, *args)[:5]
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        return _InplaceLogitsLoss.apply(logits, *args)
    return _LogitsLoss.apply(logits, *args)


def linear_gvpo_loss(hidden, weight, bias, labels, rewards, *, group_size, group_ids, mask, cu_seqlens, ref_logprobs,
                     beta, temperature, reduction, ignore_index, backend, entropy):
    """loss (), seq_logprob, implicit_reward, grad_seq_logprob (S,) and seq_entropy ((S,) with ``entropy``, else
    (0,)) of the linear path (see functional.linear_gvpo_loss). The gradients that will be needed are computed in
    the forward."""
    _check_kinds(hidden.device, group_size, rewards=rewards, group_ids=group_ids, mask=mask, cu_seqlens=cu_seqlens,
                 ref_logprobs=ref_logprobs)
    grad_on = torch.is_grad_enabled()
    args = (hidden, weight, bias, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs,
            _int_or_none(group_size), float(beta), float(temperature), reduction, int(ignore_index), backend,
            grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad, bool(entropy))
    if torch.compiler.is_compiling():
        return linear_loss_op(*args)[:5]
    return _LinearLoss.apply(*args)


def _check_kinds(device, group_size, **tensors) -> None:
    """What layout.build would reject by name but the dispatcher meets first: optional arguments that are not
    tensors, tensors on another device (a meta tensor would route the op to its fake), a group_size not an int."""
    for name, value in tensors.items():
        if value is not None or name == "rewards":
            layout._check_tensor(name, value)
            layout._check_device(name, value, device)
    if group_size is not None:
        layout.check_count("group_size", group_size)


def _int_or_none(value):
    return None if value is None else int(value)


def _layout(vocab_size, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, reduction,
            ignore_index) -> Layout:
    return layout.build(labels, rewards, vocab_size=vocab_size, group_size=group_size, group_ids=group_ids,
                        mask=mask, cu_seqlens=cu_seqlens, ref_logprobs=ref_logprobs, ignore_index=ignore_index,
                        reduction=reduction)


def _own_precision(device):
    """Autocast off inside the ops: the backends choose their own precision (float32 accumulation whatever the
    input dtype) and take the inputs in the dtypes they come in; an autocast region around the call would
    otherwise turn their float32 products into bfloat16 ones."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _num_seqs(labels, cu_seqlens) -> int:
    """S from the shapes alone (0 for packed input without cu_seqlens, which the real op rejects)."""
    if labels.dim() == 2:
        return labels.shape[0]
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 0


def no_double_backward(name: str) -> None:
    """Raise if a backward runs with create_graph=True (grad mode is on inside backward only then): these losses'
    gradients are computed by kernels, not by differentiable torch ops, so a second derivative would silently be 0."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"gvpo_kernels.{name} is not twice differentiable: backward(create_graph=True) or "
                           "torch.autograd.grad(..., create_graph=True) through it is not supported (a gradient "
                           "penalty on its gradient would silently be zero); use gvpo_kernels.reference for that")


def _hand_out_once(ctx, attr: str, name: str, why: str):
    """The gradients a forward left on ``ctx.<attr>``, released: a second backward (retain_graph=True) raises,
    as does a backward with create_graph=True."""
    no_double_backward(name)
    value = getattr(ctx, attr)
    if value is None:
        raise RuntimeError(f"gvpo_kernels.{name}: a second backward through the same call is not supported ({why});"
                           " run the loss again for a second backward")
    setattr(ctx, attr, None)
    return value


def _backend_for(name: str, device: torch.device, num_tokens: int, num_seqs: int):
    """The backend for a call; an empty call (no token or no sequence) runs the torch backend, whose ops take
    empty tensors as they come, once the named backend has been checked to be able to run."""
    impl = select_backend(name, device)
    return torch_impl if num_tokens == 0 or num_seqs == 0 else impl


# ----------------------------------------------------------------------------------------------------------------
# the logits path: implementation


def _logits_forward(logits, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta,
                    temperature, reduction, ignore_index, backend, entropy):
    """The forward of the logits path -> (loss, seq_logprob, implicit_reward, grad_seq_logprob, seq_entropy, lse,
    Layout, rows, backend); ``rows`` is the (B', T', V) view of the logits that the backend read
    (layout.as_rows); seq_entropy is (0,) unless ``entropy``, from the same pass as the lse."""
    lay = _layout(logits.shape[-1], labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size,
                  reduction, ignore_index)
    impl = _backend_for(backend, logits.device, lay.num_tokens, lay.num_seqs)
    rows = layout.as_rows(logits)
    with _own_precision(logits.device):
        token_logprob, lse, token_entropy = token_pass(entropy_backend(impl, backend, "token_stats_forward", entropy),
                                                       rows, lay.target, temperature, entropy)
        loss, seq_logprob, implicit_reward, grad_seq_logprob = impl.group_stage(token_logprob, lay, beta)
    seq_entropy = _seq_entropy(token_entropy, lay)
    return loss, seq_logprob, implicit_reward, grad_seq_logprob, seq_entropy, lse, lay, rows, impl


def _seq_entropy(token_entropy, lay: Layout):
    """GVPOStats.entropy: (S,) mean over each sequence's scored tokens, or (0,) when not asked for."""
    if token_entropy is None:
        return torch.zeros(0, dtype=torch.float32, device=lay.target.device)
    return seq_mean(token_entropy, lay)


def _logits_backward(logits, target, token_seq, lse, grad_seq_logprob, grad_loss, temperature, backend):
    """dL/dlogits, the shape and dtype of logits: grad_loss * dL/ds / T * (onehot - softmax), 0 where not scored."""
    rows = layout.as_rows(logits)
    grad = empty(rows.shape, dtype=rows.dtype, device=rows.device)
    impl = _backend_for(backend, logits.device, target.numel(), grad_seq_logprob.numel())
    with _own_precision(logits.device):
        impl.token_backward(rows, _token_layout(target, token_seq), lse, grad_seq_logprob, grad_loss, temperature,
                            out=grad)
    return grad.view(logits.shape)


def _token_layout(target, token_seq) -> Layout:
    """A Layout holding the per-token fields only: all that a backend's token_backward reads."""
    return Layout(target=target, token_seq=token_seq, token_ref=None, cu_seqlens=None, rewards=None, seq_group=None,
                  group_order=None, group_ptr=None, max_group_size=0, scale=1.0)


# ----------------------------------------------------------------------------------------------------------------
# the logits path: eager autograd


class _LogitsLoss(torch.autograd.Function):
    """The logits path in eager mode; arguments as :func:`logits_loss_op`'s. Saves O(N), recomputes in backward."""

    @staticmethod
    def forward(ctx, logits, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta,
                temperature, reduction, ignore_index, backend, entropy):
        loss, *stats, lse, lay, _, _ = _logits_forward(
            logits, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta, temperature,
            reduction, ignore_index, backend, entropy)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*stats)
        ctx.save_for_backward(logits, lse, lay.target, lay.token_seq, stats[2])
        ctx.temperature, ctx.backend = temperature, backend
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        return _logits_grads(ctx, grad_loss, _logits_backward)


def _logits_grads(ctx, grad_loss, logits_backward):
    """The backward of the logits path, eager (``_logits_backward``) or traced (``logits_backward_op``), from the
    saved (logits, lse, target, token_seq, grad_seq_logprob)."""
    no_double_backward("gvpo_loss")
    if grad_loss is None:
        return (None,) * 14
    logits, lse, target, token_seq, grad_seq_logprob = ctx.saved_tensors
    grad = logits_backward(logits, target, token_seq, lse, grad_seq_logprob, grad_loss, ctx.temperature, ctx.backend)
    return (grad,) + (None,) * 13


class _InplaceLogitsLoss(torch.autograd.Function):
    """inplace_backward=True in eager mode: the forward also writes dL/dlogits (for grad_loss = 1) over the logits'
    storage, and the backward scales it in place, so no second N x V buffer exists. Same arguments as the op.

    The logits' version counter is bumped, so another autograd node that saved them (a z-loss on the logits, an op
    whose output they are) raises "modified by an inplace operation" instead of using the overwritten values.
    Logits whose rows share memory (``expand``) are refused. float16 gradients are stored pre-multiplied by a power
    of two that keeps them in float16's range (:func:`_float16_headroom`), so that loss scaling loses no more to
    rounding than PyTorch's own float16 backward does."""

    @staticmethod
    def forward(ctx, logits, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta,
                temperature, reduction, ignore_index, backend, entropy):
        if layout.has_overlap(layout.as_rows(logits)):
            raise ValueError("inplace_backward=True needs logits whose elements do not share memory (these are an "
                             "expanded or overlapping view); pass logits.contiguous() or inplace_backward=False")
        loss, *stats, lse, lay, rows, impl = _logits_forward(
            logits, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta, temperature,
            reduction, ignore_index, backend, entropy)
        grad_seq_logprob = stats[2]
        stored_scale = _float16_headroom(grad_seq_logprob, temperature, rows.dtype)
        with _own_precision(logits.device):
            impl.token_backward(rows, lay, lse, grad_seq_logprob, stored_scale, temperature, out=rows)
        torch.autograd.graph.increment_version(logits)
        ctx.mark_non_differentiable(*stats)
        # not save_for_backward: its logits were overwritten on purpose
        ctx.grad_rows, ctx.shape, ctx.stored_scale = rows, logits.shape, stored_scale
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad = _hand_out_once(ctx, "grad_rows", "gvpo_loss", "with inplace_backward=True the gradient lives in "
                              "the logits' storage and was handed out by the first backward")
        if grad_loss is None:
            grad_loss = torch.ones((), dtype=torch.float32, device=grad.device)
        scale = grad_loss.float() / ctx.stored_scale
        if grad.device.type != "cpu" or scale.item() != 1.0:
            grad.mul_(scale)
        return (grad.reshape(ctx.shape),) + (None,) * 13


def _float16_headroom(grad_seq_logprob, temperature: float, dtype) -> Tensor:
    """The factor, a float32 scalar, by which inplace_backward stores dL/dlogits in the logits' storage: 1, or for
    float16 the power of two (up to 2^24) that brings the largest possible entry, max |dL/ds| / T, to 2^15.

    Every entry is bounded by |dL/ds_i| / T (|onehot - softmax| <= 1), so nothing overflows, and small entries keep
    the bits they would lose at scale 1: the backward's multiplication by grad_loss / factor then gives what
    rounding grad_loss * dL/dlogits to float16 once would, as PyTorch's float16 backward under loss scaling does.
    Computed on the device (no sync)."""
    one = torch.ones((), dtype=torch.float32, device=grad_seq_logprob.device)
    if dtype != torch.float16 or grad_seq_logprob.numel() == 0:
        return one
    peak = grad_seq_logprob.abs().max().float() / temperature
    return torch.exp2(torch.floor(torch.log2(2.0**15 / peak)).clamp(0, 24))


# ----------------------------------------------------------------------------------------------------------------
# the logits path: the ops, for torch.compile


@torch.library.custom_op("gvpo::gvpo_loss", mutates_args=())
def logits_loss_op(logits: Tensor, labels: Tensor, rewards: Tensor, group_ids: Optional[Tensor],
                   mask: Optional[Tensor], cu_seqlens: Optional[Tensor], ref_logprobs: Optional[Tensor],
                   group_size: Optional[int], beta: float, temperature: float, reduction: str, ignore_index: int,
                   backend: str, entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                         Tensor]:
    """loss (), seq_logprob, implicit_reward, grad_seq_logprob (S,) float32, seq_entropy ((S,) or (0,)), and for
    the backward lse (N,) float32, target and token_seq (N,) int64."""
    loss, *stats, lse, lay, _, _ = _logits_forward(
        logits, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta, temperature, reduction,
        ignore_index, backend, entropy)
    return loss, *stats, lse, lay.target, lay.token_seq


@logits_loss_op.register_fake
def _(logits, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta, temperature, reduction,
      ignore_index, backend, entropy):
    num_seqs, num_tokens = _num_seqs(labels, cu_seqlens), labels.numel()
    f32, i64 = dict(dtype=torch.float32), dict(dtype=torch.int64)
    per_seq = [logits.new_empty((num_seqs,), **f32) for _ in range(3)]
    return (logits.new_empty((), **f32), *per_seq, logits.new_empty((num_seqs if entropy else 0,), **f32),
            logits.new_empty((num_tokens,), **f32), logits.new_empty((num_tokens,), **i64),
            logits.new_empty((num_tokens,), **i64))


def _logits_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the outputs other than the loss get no gradient: no zeros for them
    _, seq_logprob, implicit_reward, grad_seq_logprob, seq_entropy, lse, target, token_seq = output
    ctx.mark_non_differentiable(seq_logprob, implicit_reward, grad_seq_logprob, seq_entropy, lse, target, token_seq)
    ctx.save_for_backward(inputs[0], lse, target, token_seq, grad_seq_logprob)
    ctx.temperature, ctx.backend = inputs[9], inputs[12]


def _logits_op_backward(ctx, grad_loss, *_):
    return _logits_grads(ctx, grad_loss, logits_backward_op)


logits_loss_op.register_autograd(_logits_op_backward, setup_context=_logits_setup_context)


@torch.library.custom_op("gvpo::gvpo_loss_backward", mutates_args=())
def logits_backward_op(logits: Tensor, target: Tensor, token_seq: Tensor, lse: Tensor, grad_seq_logprob: Tensor,
                       grad_loss: Tensor, temperature: float, backend: str) -> Tensor:
    """dL/dlogits, the shape and dtype of logits: grad_loss * dL/ds / T * (onehot - softmax), 0 where not scored."""
    return _logits_backward(logits, target, token_seq, lse, grad_seq_logprob, grad_loss, temperature, backend)


@logits_backward_op.register_fake
def _(logits, target, token_seq, lse, grad_seq_logprob, grad_loss, temperature, backend):
    return logits.new_empty(logits.shape)


# ----------------------------------------------------------------------------------------------------------------
# the linear path: implementation


def linear_stages(impl, rows, weight, bias, lay: Layout, beta: float, temperature: float, needs, entropy=False):
    """The linear path on one backend: loss, seq_logprob, implicit_reward, grad_seq_logprob, and for grad_loss = 1
    d_hidden (B', T', H), d_weight (V, H), d_bias (V,), each None where ``needs`` (three booleans) says so, then
    token_entropy (N,) from the same forward with ``entropy``, else None."""
    if hasattr(impl, "linear_loss_and_grads"):  # the backend picks its own GEMM schedule
        if entropy:
            return impl.linear_loss_and_grads(rows, weight, bias, lay, beta, temperature, needs, entropy=True)
        return (*impl.linear_loss_and_grads(rows, weight, bias, lay, beta, temperature, needs), None)
    token_logprob, lse, token_entropy = linear_token_pass(impl, rows, weight, bias, lay.target, temperature,
                                                          entropy)
    loss, *stats = impl.group_stage(token_logprob, lay, beta)
    if not any(needs):
        return loss, *stats, None, None, None, token_entropy
    ones = torch.ones((), dtype=torch.float32, device=rows.device)
    grads = impl.linear_backward(rows, weight, bias, lay, lse, stats[2], ones, temperature)
    return (loss, *stats, *(d if need else None for d, need in zip(grads, needs)), token_entropy)


def head_for_kernels(weight, bias):
    """The LM head as the kernels read it: weight (V, H) with unit stride along H (a copy only when it has not),
    bias (V,) contiguous (a copy of V elements when it is strided or expanded)."""
    weight = weight if weight.stride(-1) == 1 or weight.shape[-1] == 1 else weight.contiguous()
    return weight, None if bias is None else bias.contiguous()


def _linear_forward(hidden, weight, bias, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size,
                    beta, temperature, reduction, ignore_index, backend, needs, entropy):
    """loss, seq_logprob, implicit_reward, grad_seq_logprob, seq_entropy ((S,) with ``entropy``, else (0,)), and
    the gradients ``needs`` asks for (None where not), for grad_loss = 1: d_hidden (hidden's shape and dtype),
    d_weight (V, H), d_bias (V,)."""
    lay = _layout(weight.shape[0], labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size,
                  reduction, ignore_index)
    needs = (needs[0], needs[1], needs[2] and bias is not None)
    impl = _backend_for(backend, hidden.device, lay.num_tokens, lay.num_seqs)
    if not hasattr(impl, "linear_loss_and_grads"):
        impl = entropy_backend(impl, backend, "linear_token_stats_forward", entropy)
    weight, bias = head_for_kernels(weight, bias)
    with _own_precision(hidden.device):
        loss, *stats, d_hidden, d_weight, d_bias, token_entropy = linear_stages(
            impl, layout.as_rows(hidden), weight, bias, lay, beta, temperature, needs, entropy)
    if d_hidden is not None:
        d_hidden = d_hidden.reshape(hidden.shape)
    return (loss, *stats, _seq_entropy(token_entropy, lay), d_hidden, d_weight, d_bias)


# ----------------------------------------------------------------------------------------------------------------
# the linear path: eager autograd


class _LinearLoss(torch.autograd.Function):
    """The linear path in eager mode; arguments as :func:`linear_loss_op`'s. The gradients, computed in the forward
    for grad_loss = 1, are held by the context (not saved tensors: the backward scales them in place and hands
    them out, so a second backward would find them changed) and released by the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size,
                beta, temperature, reduction, ignore_index, backend, grad_hidden, grad_weight, grad_bias, entropy):
        loss, *stats, d_hidden, d_weight, d_bias = _linear_forward(
            hidden, weight, bias, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta,
            temperature, reduction, ignore_index, backend, (grad_hidden, grad_weight, grad_bias), entropy)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*stats)
        ctx.grads = (d_hidden, d_weight, d_bias)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = _hand_out_once(ctx, "grads", "linear_gvpo_loss", "its gradients are computed in the forward and the "
                               "first backward handed them out")
        if grad_loss is None:
            return (None,) * 19
        if grad_loss.device.type != "cpu" or grad_loss.item() != 1.0:
            grads = [None if d is None else d.mul_(grad_loss) for d in grads]
        return (*grads,) + (None,) * 16


# ----------------------------------------------------------------------------------------------------------------
# the linear path: the op, for torch.compile


@torch.library.custom_op("gvpo::linear_gvpo_loss", mutates_args=())
def linear_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, rewards: Tensor,
                   group_ids: Optional[Tensor], mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                   ref_logprobs: Optional[Tensor], group_size: Optional[int], beta: float, temperature: float,
                   reduction: str, ignore_index: int, backend: str, grad_hidden: bool, grad_weight: bool,
                   grad_bias: bool, entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                            Tensor]:
    """loss (), seq_logprob, implicit_reward, grad_seq_logprob (S,) float32, seq_entropy ((S,) or (0,)), and the
    gradients asked for, for grad_loss = 1: d_hidden (hidden's shape and dtype), d_weight (V, H), d_bias (V,); (0,)
    where not asked for."""
    loss, *stats, d_hidden, d_weight, d_bias = _linear_forward(
        hidden, weight, bias, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta,
        temperature, reduction, ignore_index, backend, (grad_hidden, grad_weight, grad_bias), entropy)
    grads = [like.new_empty((0,)) if d is None else d
             for d, like in zip((d_hidden, d_weight, d_bias), (hidden, weight, weight))]
    return (loss, *stats, *grads)


@linear_loss_op.register_fake
def _(hidden, weight, bias, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta, temperature,
      reduction, ignore_index, backend, grad_hidden, grad_weight, grad_bias, entropy):
    num_seqs = _num_seqs(labels, cu_seqlens)
    per_seq = [hidden.new_empty((n,), dtype=torch.float32) for n in (num_seqs,) * 3 + (num_seqs if entropy else 0,)]
    grads = [like.new_empty(shape if need else (0,)) for like, shape, need in
             ((hidden, hidden.shape, grad_hidden), (weight, weight.shape, grad_weight),
              (weight, weight.shape[:1], grad_bias and bias is not None))]
    return (hidden.new_empty((), dtype=torch.float32), *per_seq, *grads)


def _linear_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs other than the loss
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[5:])
    ctx.needs = inputs[15:18]


def _linear_op_backward(ctx, grad_loss, *_):
    """Traced: the saved gradients times grad_loss, out of place (the compiler plans the buffers)."""
    no_double_backward("linear_gvpo_loss")
    if grad_loss is None:
        return (None,) * 19
    grads = [d * grad_loss if need else None for d, need in zip(ctx.saved_tensors, ctx.needs)]
    return (*grads,) + (None,) * 16


linear_loss_op.register_autograd(_linear_op_backward, setup_context=_linear_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# token statistics: per-token log-probs (and entropy), eager autograd


def token_stats(logits, labels, *, mask, cu_seqlens, temperature, ignore_index, backend, entropy):
    """(token_logprob, token_entropy or None), each labels' shape, float32, 0 where not scored (see
    functional.token_logprobs)."""
    _check_kinds(logits.device, None, mask=mask, cu_seqlens=cu_seqlens)
    return _TokenStats.apply(logits, labels, mask, cu_seqlens, float(temperature), int(ignore_index), backend,
                             bool(entropy))


def linear_token_stats(hidden, weight, bias, labels, *, mask, cu_seqlens, temperature, ignore_index, backend,
                       entropy):
    """The same from hidden states and the LM head, the logits never materialised (functional.linear_token_logprobs)."""
    _check_kinds(hidden.device, None, mask=mask, cu_seqlens=cu_seqlens)
    return _LinearTokenStats.apply(hidden, weight, bias, labels, mask, cu_seqlens, float(temperature),
                                   int(ignore_index), backend, bool(entropy))


def entropy_backend(impl, name: str, kernel: str, entropy: bool):
    """The backend that computes token statistics: ``impl``, unless ``entropy`` is asked for and ``impl`` lacks the
    entropy ``kernel`` (token_stats_forward / linear_token_stats_forward: the log-sum-exp's streaming pass with one
    more running sum); then, for "auto", the torch backend (chunked, any device), and for a named backend an error."""
    if not entropy or hasattr(impl, kernel):
        return impl
    if name != "auto":
        raise RuntimeError(f"backend={name!r} has no entropy kernel ({kernel}) in this build; backend='torch' or "
                           "'auto' computes the entropy with the chunked torch pass")
    return torch_impl


def stat_coefs(target, grad_logprob, grad_entropy, temperature: float):
    """(N,) float32 coefficients of each token's log-prob and entropy gradients: the upstream gradients (labels'
    shape, or None for 0) / T, 0 where not scored; what the backends' token_stats_backward take."""
    zero = torch.zeros(target.shape, dtype=torch.float32, device=target.device)
    coefs = []
    for g in (grad_logprob, grad_entropy):
        c = zero if g is None else g.reshape(-1).float() / temperature
        coefs.append(torch.where(target >= 0, c, zero).contiguous())
    return coefs


def seq_mean(token_values, lay: Layout):
    """(S,) float32 mean of ``token_values`` (N,) over each sequence's scored tokens (0 for a sequence with none)."""
    scored = (lay.target >= 0).float()
    sums = torch.zeros((2, lay.num_seqs), dtype=torch.float32, device=token_values.device)
    sums[0].index_add_(0, lay.token_seq, token_values * scored)
    sums[1].index_add_(0, lay.token_seq, scored)
    return sums[0] / sums[1].clamp(min=1)


def token_pass(impl, rows, target, temperature: float, entropy: bool):
    """The logits path's forward: token_logprob, lse and (with ``entropy``) token_entropy (N,), else None."""
    if entropy:
        return impl.token_stats_forward(rows, target, temperature)
    return (*impl.token_forward(rows, target, temperature), None)


def linear_token_pass(impl, rows, weight, bias, target, temperature: float, entropy: bool):
    """The linear path's forward without gradients: as :func:`token_pass`."""
    if entropy:
        return impl.linear_token_stats_forward(rows, weight, bias, target, temperature)
    return (*impl.linear_forward(rows, weight, bias, target, temperature), None)


def _per_token_layout(target) -> Layout:
    """Each token its own sequence: the loss kernels' backward then scales token n's (onehot - softmax) by
    entry n of the upstream gradient."""
    return _token_layout(target, torch.arange(target.numel(), device=target.device))


def _shaped(shape, token_logprob, token_entropy):
    """The (N,) token statistics in the labels' shape (the entropy None when not asked for)."""
    return token_logprob.view(shape), None if token_entropy is None else token_entropy.view(shape)


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, mask, cu_seqlens, temperature, ignore_index, backend, entropy):
        target = layout.token_targets(labels, vocab_size=logits.shape[-1], mask=mask, cu_seqlens=cu_seqlens,
                                      ignore_index=ignore_index)
        impl = entropy_backend(_backend_for(backend, logits.device, target.numel(), 1), backend,
                               "token_stats_forward", entropy)
        rows = layout.as_rows(logits)
        with _own_precision(logits.device):
            token_logprob, lse, token_entropy = token_pass(impl, rows, target, temperature, entropy)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, target, lse, token_entropy)
        ctx.impl, ctx.temperature = impl, temperature
        return _shaped(labels.shape, token_logprob, token_entropy)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        no_double_backward("token_logprobs")
        logits, target, lse, token_entropy = ctx.saved_tensors
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 8
        rows = layout.as_rows(logits)
        grad = empty(rows.shape, dtype=rows.dtype, device=rows.device)
        with _own_precision(logits.device):
            if token_entropy is not None:
                coefs = stat_coefs(target, grad_logprob, grad_entropy, ctx.temperature)
                ctx.impl.token_stats_backward(rows, target, lse, token_entropy, *coefs, ctx.temperature, out=grad)
            else:
                ones = torch.ones((), dtype=torch.float32, device=rows.device)
                ctx.impl.token_backward(rows, _per_token_layout(target), lse, grad_logprob.reshape(-1).float(),
                                        ones, ctx.temperature, out=grad)
        return (grad.view(logits.shape),) + (None,) * 7


class _LinearTokenStats(torch.autograd.Function):
    """Saves hidden, weight, bias and O(N) floats; the backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, mask, cu_seqlens, temperature, ignore_index, backend, entropy):
        target = layout.token_targets(labels, vocab_size=weight.shape[0], mask=mask, cu_seqlens=cu_seqlens,
                                      ignore_index=ignore_index)
        impl = entropy_backend(_backend_for(backend, hidden.device, target.numel(), 1), backend,
                               "linear_token_stats_forward", entropy)
        rows = layout.as_rows(hidden)
        weight, bias = head_for_kernels(weight, bias)
        with _own_precision(hidden.device):
            token_logprob, lse, token_entropy = linear_token_pass(impl, rows, weight, bias, target, temperature,
                                                                  entropy)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(rows, weight, bias, target, lse, token_entropy)
        ctx.impl, ctx.temperature, ctx.hidden_shape = impl, temperature, hidden.shape
        return _shaped(labels.shape, token_logprob, token_entropy)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        no_double_backward("linear_token_logprobs")
        rows, weight, bias, target, lse, token_entropy = ctx.saved_tensors
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 10
        with _own_precision(rows.device):
            if token_entropy is not None:
                coefs = stat_coefs(target, grad_logprob, grad_entropy, ctx.temperature)
                grads = ctx.impl.linear_token_stats_backward(rows, weight, bias, target, lse, token_entropy, *coefs,
                                                             ctx.temperature)
            else:
                ones = torch.ones((), dtype=torch.float32, device=rows.device)
                grads = ctx.impl.linear_backward(rows, weight, bias, _per_token_layout(target), lse,
                                                 grad_logprob.reshape(-1).float(), ones, ctx.temperature)
        d_hidden, d_weight, d_bias = grads
        return (d_hidden.reshape(ctx.hidden_shape), d_weight, d_bias) + (None,) * 7


# ----------------------------------------------------------------------------------------------------------------
# backends

_warned = set()


def select_backend(name: str, device: torch.device):
    """The backend for ``name`` on ``device``: a namespace of token_forward, group_stage, token_backward,
    linear_forward, linear_backward (and optionally linear_loss_and_grads).

    "auto": Triton on CUDA, the C++ kernels on the CPU, torch elsewhere; where the first choice cannot run it
    warns (once per reason, for the CPU) and runs the torch backend. "triton" and "cpu" raise RuntimeError saying
    why they cannot run.
    """
    if name == "auto":
        if device.type == "cuda":
            from .triton import unavailable_reason

            reason = unavailable_reason(device)
            if reason is None:
                return _triton_backend()
            warnings.warn(f"gvpo_kernels: falling back to the torch backend: {reason}", stacklevel=3)
            return torch_impl
        if device.type == "cpu":
            reason = cpu.unavailable_reason()
            if reason is None:
                return cpu
            if reason not in _warned:
                _warned.add(reason)
                warnings.warn(f"gvpo_kernels: backend='auto' runs the slower torch backend on the CPU because {reason}",
                              stacklevel=3)
        return torch_impl
    if name == "triton":
        from .triton import unavailable_reason

        reason = unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        return _triton_backend()
    if name == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' runs C++ kernels on CPU tensors; these are on {device.type}")
        reason = cpu.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend='cpu' cannot run: {reason}")
        return cpu
    return torch_impl


def _triton_backend():
    from .triton import group, linear, logprob

    kernels = dict(group_stage=group.group_stage)
    for module, names in ((logprob, ("token_forward", "token_backward", "token_stats_forward",
                                     "token_stats_backward")),
                          (linear, ("linear_forward", "linear_backward", "linear_loss_and_grads",
                                    "linear_token_stats_forward", "linear_token_stats_backward"))):
        kernels.update((name, getattr(module, name)) for name in names if hasattr(module, name))
    return SimpleNamespace(**kernels)
