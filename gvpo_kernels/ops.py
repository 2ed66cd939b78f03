"""The two losses as torch.library custom ops (namespace ``gvpo``), which torch.compile traces as single nodes.

    gvpo::gvpo_loss(logits, labels, rewards, ...)         -> loss, s, r, dL/ds (S,), lse, target, token_seq (N,)
    gvpo::gvpo_loss_backward(logits, target, token_seq, lse, dL/ds, grad_loss, ...)          -> dL/dlogits
    gvpo::linear_gvpo_loss(hidden, weight, bias, labels, rewards, ...)
                                                          -> loss, s, r, dL/ds, d_hidden, d_weight, d_bias

An op's implementation always runs eagerly, compiled caller or not: it builds the Layout (``layout.build``: the
checks that need the values, before any kernel) and runs the backend that :func:`select_backend` picks for the
device: the C++ kernels on the CPU (``cpu``), Triton on CUDA, chunked torch elsewhere. The compiler sees only the
fake implementations (output shapes from input shapes) and the autograd formulas registered here.

The logits op saves O(N) floats and recomputes the softmax in its backward op. The linear op computes its gradients
in the forward, for grad_loss = 1, and its backward scales them: its outputs then have the same shapes whichever
GEMM schedule the backend picks (``cpu.linear_loss_and_grads``), and nothing N x V is ever kept.

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
              reduction, ignore_index, backend, inplace_backward):
    """loss (), seq_logprob, implicit_reward, grad_seq_logprob (S,) of the logits path (see functional.gvpo_loss).

    With ``inplace_backward`` in eager mode the gradient is written over the logits during the forward
    (:class:`_InplaceLogitsLoss`); under torch.compile, where the compiler owns the buffers, the op path runs.
    """
    _check_kinds(logits.device, group_size, rewards=rewards, group_ids=group_ids, mask=mask, cu_seqlens=cu_seqlens,
                 ref_logprobs=ref_logprobs)
    args = (labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, _int_or_none(group_size), float(beta),
            float(temperature), reduction, int(ignore_index), backend)
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _InplaceLogitsLoss.apply(logits, *args)
    loss, seq_logprob, implicit_reward, grad_seq_logprob, *_ = logits_loss_op(logits, *args)
    return loss, seq_logprob, implicit_reward, grad_seq_logprob


def linear_gvpo_loss(hidden, weight, bias, labels, rewards, *, group_size, group_ids, mask, cu_seqlens, ref_logprobs,
                     beta, temperature, reduction, ignore_index, backend):
    """loss (), seq_logprob, implicit_reward, grad_seq_logprob (S,) of the linear path (see
    functional.linear_gvpo_loss). The gradients that will be needed are computed in the forward."""
    _check_kinds(hidden.device, group_size, rewards=rewards, group_ids=group_ids, mask=mask, cu_seqlens=cu_seqlens,
                 ref_logprobs=ref_logprobs)
    grad_on = torch.is_grad_enabled()
    loss, seq_logprob, implicit_reward, grad_seq_logprob, *_ = linear_loss_op(
        hidden, weight, bias, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, _int_or_none(group_size),
        float(beta),
        float(temperature), reduction, int(ignore_index), backend, grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad)
    return loss, seq_logprob, implicit_reward, grad_seq_logprob


def _check_kinds(device, group_size, **tensors) -> None:
    """What layout.build would reject by name but the dispatcher meets first: optional arguments that are not
    tensors, tensors on another device (a meta tensor would route the op to its fake), a group_size not an int."""
    for name, value in tensors.items():
        if value is not None or name == "rewards":
            layout._check_tensor(name, value)
            layout._check_device(name, value, device)
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral)):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")


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


# ----------------------------------------------------------------------------------------------------------------
# the logits path


@torch.library.custom_op("gvpo::gvpo_loss", mutates_args=())
def logits_loss_op(logits: Tensor, labels: Tensor, rewards: Tensor, group_ids: Optional[Tensor],
                   mask: Optional[Tensor], cu_seqlens: Optional[Tensor], ref_logprobs: Optional[Tensor],
                   group_size: Optional[int], beta: float, temperature: float, reduction: str, ignore_index: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss (), seq_logprob, implicit_reward, grad_seq_logprob (S,) float32, and for the backward lse (N,) float32,
    target and token_seq (N,) int64."""
    lay = _layout(logits.shape[-1], labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size,
                  reduction, ignore_index)
    impl = select_backend(backend, logits.device)
    with _own_precision(logits.device):
        token_logprob, lse = impl.token_forward(layout.as_rows(logits), lay.target, temperature)
        loss, seq_logprob, implicit_reward, grad_seq_logprob = impl.group_stage(token_logprob, lay, beta)
    return loss, seq_logprob, implicit_reward, grad_seq_logprob, lse, lay.target, lay.token_seq


@logits_loss_op.register_fake
def _(logits, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta, temperature, reduction,
      ignore_index, backend):
    num_seqs, num_tokens = _num_seqs(labels, cu_seqlens), labels.numel()
    f32, i64 = dict(dtype=torch.float32), dict(dtype=torch.int64)
    per_seq = [logits.new_empty((num_seqs,), **f32) for _ in range(3)]
    return (logits.new_empty((), **f32), *per_seq, logits.new_empty((num_tokens,), **f32),
            logits.new_empty((num_tokens,), **i64), logits.new_empty((num_tokens,), **i64))


def _logits_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the outputs other than the loss get no gradient: no zeros for them
    _, seq_logprob, implicit_reward, grad_seq_logprob, lse, target, token_seq = output
    ctx.mark_non_differentiable(seq_logprob, implicit_reward, grad_seq_logprob, lse, target, token_seq)
    ctx.save_for_backward(inputs[0], lse, target, token_seq, grad_seq_logprob)
    ctx.temperature, ctx.backend = inputs[9], inputs[12]


def _logits_backward(ctx, grad_loss, *_):
    logits, lse, target, token_seq, grad_seq_logprob = ctx.saved_tensors
    grad = logits_backward_op(logits, target, token_seq, lse, grad_seq_logprob, grad_loss, ctx.temperature,
                              ctx.backend)
    return (grad,) + (None,) * 12


logits_loss_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


@torch.library.custom_op("gvpo::gvpo_loss_backward", mutates_args=())
def logits_backward_op(logits: Tensor, target: Tensor, token_seq: Tensor, lse: Tensor, grad_seq_logprob: Tensor,
                       grad_loss: Tensor, temperature: float, backend: str) -> Tensor:
    """dL/dlogits, the shape and dtype of logits: grad_loss * dL/ds / T * (onehot - softmax), 0 where not scored."""
    rows = layout.as_rows(logits)
    grad = empty(rows.shape, dtype=rows.dtype, device=rows.device)
    with _own_precision(logits.device):
        select_backend(backend, logits.device).token_backward(rows, _token_layout(target, token_seq), lse,
                                                              grad_seq_logprob, grad_loss, temperature, out=grad)
    return grad.view(logits.shape)


@logits_backward_op.register_fake
def _(logits, target, token_seq, lse, grad_seq_logprob, grad_loss, temperature, backend):
    return logits.new_empty(logits.shape)


def _token_layout(target, token_seq) -> Layout:
    """A Layout holding the per-token fields only: all that a backend's token_backward reads."""
    return Layout(target=target, token_seq=token_seq, token_ref=None, cu_seqlens=None, rewards=None, seq_group=None,
                  group_order=None, group_ptr=None, max_group_size=0, scale=1.0)


class _InplaceLogitsLoss(torch.autograd.Function):
    """inplace_backward=True in eager mode: the forward also writes dL/dlogits (for grad_loss = 1) over the logits'
    storage, and the backward scales it in place, so no second N x V buffer exists. Same arguments as the op."""

    @staticmethod
    def forward(ctx, logits, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta,
                temperature, reduction, ignore_index, backend):
        lay = _layout(logits.shape[-1], labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size,
                      reduction, ignore_index)
        impl = select_backend(backend, logits.device)
        rows = layout.as_rows(logits)
        with _own_precision(logits.device):
            token_logprob, lse = impl.token_forward(rows, lay.target, temperature)
            loss, seq_logprob, implicit_reward, grad_seq_logprob = impl.group_stage(token_logprob, lay, beta)
            impl.token_backward(rows, lay, lse, grad_seq_logprob, loss.new_ones(()), temperature, out=rows)
        ctx.mark_non_differentiable(seq_logprob, implicit_reward, grad_seq_logprob)
        ctx.grad_rows, ctx.shape = rows, logits.shape  # not save_for_backward: its logits were overwritten on purpose
        return loss, seq_logprob, implicit_reward, grad_seq_logprob

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad = ctx.grad_rows
        del ctx.grad_rows
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad.mul_(grad_loss)
        return (grad.reshape(ctx.shape),) + (None,) * 12


# ----------------------------------------------------------------------------------------------------------------
# the linear path


def linear_stages(impl, rows, weight, bias, lay: Layout, beta: float, temperature: float, needs):
    """The linear path on one backend: loss, seq_logprob, implicit_reward, grad_seq_logprob, and for grad_loss = 1
    d_hidden (B', T', H), d_weight (V, H), d_bias (V,), each None where ``needs`` (three booleans) says so."""
    if hasattr(impl, "linear_loss_and_grads"):  # the backend picks its own GEMM schedule
        return impl.linear_loss_and_grads(rows, weight, bias, lay, beta, temperature, needs)
    token_logprob, lse = impl.linear_forward(rows, weight, bias, lay.target, temperature)
    loss, *stats = impl.group_stage(token_logprob, lay, beta)
    if not any(needs):
        return loss, *stats, None, None, None
    ones = torch.ones((), dtype=torch.float32, device=rows.device)
    grads = impl.linear_backward(rows, weight, bias, lay, lse, stats[2], ones, temperature)
    return (loss, *stats, *(d if need else None for d, need in zip(grads, needs)))


@torch.library.custom_op("gvpo::linear_gvpo_loss", mutates_args=())
def linear_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, rewards: Tensor,
                   group_ids: Optional[Tensor], mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                   ref_logprobs: Optional[Tensor], group_size: Optional[int], beta: float, temperature: float,
                   reduction: str, ignore_index: int, backend: str, grad_hidden: bool, grad_weight: bool,
                   grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss (), seq_logprob, implicit_reward, grad_seq_logprob (S,) float32, and the gradients asked for, for
    grad_loss = 1: d_hidden (hidden's shape and dtype), d_weight (V, H), d_bias (V,); (0,) where not asked for."""
    lay = _layout(weight.shape[0], labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size,
                  reduction, ignore_index)
    needs = (grad_hidden, grad_weight, grad_bias and bias is not None)
    impl = select_backend(backend, hidden.device)
    with _own_precision(hidden.device):
        loss, *stats, d_hidden, d_weight, d_bias = linear_stages(impl, layout.as_rows(hidden), weight, bias, lay,
                                                                 beta, temperature, needs)
    shapes = (hidden.shape, weight.shape, weight.shape[:1])
    grads = [d.reshape(shape) if need else like.new_empty((0,))
             for d, need, shape, like in zip((d_hidden, d_weight, d_bias), needs, shapes, (hidden, weight, weight))]
    return (loss, *stats, *grads)


@linear_loss_op.register_fake
def _(hidden, weight, bias, labels, rewards, group_ids, mask, cu_seqlens, ref_logprobs, group_size, beta, temperature,
      reduction, ignore_index, backend, grad_hidden, grad_weight, grad_bias):
    num_seqs = _num_seqs(labels, cu_seqlens)
    per_seq = [hidden.new_empty((num_seqs,), dtype=torch.float32) for _ in range(3)]
    grads = [like.new_empty(shape if need else (0,)) for like, shape, need in
             ((hidden, hidden.shape, grad_hidden), (weight, weight.shape, grad_weight),
              (weight, weight.shape[:1], grad_bias and bias is not None))]
    return (hidden.new_empty((), dtype=torch.float32), *per_seq, *grads)


def _linear_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs other than the loss
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[4:])
    ctx.needs = inputs[15:18]


def _linear_backward(ctx, grad_loss, *_):
    """The gradients were computed in the forward for grad_loss = 1: scale them. Eagerly, in place (nothing else
    holds them: no second copy of d_weight), or not at all when grad_loss is 1 on the CPU (where checking costs no
    device sync); traced, out of place (the compiler plans the buffers)."""
    eager = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling()
    if eager and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
        scale = lambda d: d  # noqa: E731
    else:
        scale = (lambda d: d.mul_(grad_loss)) if eager else (lambda d: d * grad_loss)
    grads = [scale(d) if need else None for d, need in zip(ctx.saved_tensors, ctx.needs)]
    return (*grads,) + (None,) * 15


linear_loss_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


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

    return SimpleNamespace(token_forward=logprob.token_forward, group_stage=group.group_stage,
                           token_backward=logprob.token_backward, linear_forward=linear.linear_forward,
                           linear_backward=linear.linear_backward)
