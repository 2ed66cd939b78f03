"""Token statistics (per-token log-probs and entropies) from logits or from hidden states and the LM head: eager
autograd.Functions and the custom ops torch.compile traces.

Forward: the backend's token stage (or the GEMM schedule's forward on the linear path). Saved: O(N) floats (the
normaliser, the entropies) besides the inputs; the backward recomputes the softmax (and the logits) from them.

    gvpo::token_logprobs(logits, labels, mask, cu_seqlens, <Options>) -> logprob, entropy, norm, target
    gvpo::token_logprobs_backward(logits, target, norm, entropy, grad_logprob, grad_entropy, <Options>) -> dlogits
    gvpo::linear_token_logprobs(hidden, weight, bias, labels, mask, cu_seqlens, <Options>)
        -> logprob, entropy, norm, target
    gvpo::linear_token_logprobs_backward(hidden, weight, bias, target, norm, entropy, grad_logprob, grad_entropy,
                                         needs x3, <Options>) -> d_hidden, d_weight, d_bias

(entropy is (0,) unless Options.entropy; the upstream gradients are (0,) where there is none.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import layout, schedule
from .._alloc import empty
from ..backend import upstream_coefs
from .common import Data, Options, no_double_backward, op_schema, own_precision
from .linear import head_for_kernels
from .select import attempt, backend_for

_DATA = "Tensor labels, Tensor? mask, Tensor? cu_seqlens"


def token_stats(logits: Tensor, data: Data, opts: Options):
    """(token_logprob, token_entropy or None), each labels' shape, float32, 0 where not scored."""
    data.check_kinds(logits.device, None)
    args = (data.labels, data.mask, data.cu_seqlens, *opts.args())
    if torch.compiler.is_compiling():
        logprob, entropy = token_stats_op(logits, *args)[:2]
        return logprob, entropy if opts.entropy else None
    return _TokenStats.apply(logits, data, opts)


def linear_token_stats(hidden: Tensor, weight: Tensor, bias, data: Data, opts: Options):
    """The same from hidden states and the LM head, the logits never materialised."""
    data.check_kinds(hidden.device, None)
    if torch.compiler.is_compiling():
        logprob, entropy = linear_stats_op(hidden, weight, bias, data.labels, data.mask, data.cu_seqlens,
                                           *opts.args())[:2]
        return logprob, entropy if opts.entropy else None
    return _LinearTokenStats.apply(hidden, weight, bias, data, opts)


def _targets(vocab_size: int, data: Data, opts: Options) -> Tensor:
    return layout.token_targets(data.labels, vocab_size=vocab_size, mask=data.mask, cu_seqlens=data.cu_seqlens,
                                ignore_index=opts.ignore_index)


def _run(opts: Options, device, target, work):
    """``work(backend)`` on the backend of the call (select.attempt: the torch one where a kernel cannot run)."""
    impl = backend_for(opts.backend, device, num_tokens=target.numel())
    with own_precision(device):
        return attempt(opts.backend, impl, work)


def _forward(logits, data: Data, opts: Options):
    target = _targets(logits.shape[-1], data, opts)
    rows = layout.as_rows(logits)
    stats = _run(opts, logits.device, target, lambda impl: impl.token_forward(rows, target, opts.spec, opts.entropy))
    return stats, target


def _backward(logits, target, norm, entropy, grad_logprob, grad_entropy, opts: Options):
    rows = layout.as_rows(logits)
    grad = empty(rows.shape, dtype=rows.dtype, device=rows.device)
    coefs = upstream_coefs(target, grad_logprob, grad_entropy, entropy, opts.spec)
    _run(opts, logits.device, target, lambda impl: impl.token_backward(rows, target, norm, coefs, opts.spec, grad))
    return grad.view(logits.shape)


def _linear_forward(hidden, weight, bias, data: Data, opts: Options):
    target = _targets(weight.shape[0], data, opts)
    rows = layout.as_rows(hidden)
    weight, bias = head_for_kernels(weight, bias)

    def work(impl):
        linear_work = impl.linear_work(rows, weight, bias, target, opts.spec, (False,) * 3, opts.entropy)
        return schedule.forward(linear_work, target.numel(), opts.entropy)

    return _run(opts, hidden.device, target, work), target


def _linear_backward(hidden, weight, bias, target, norm, entropy, grad_logprob, grad_entropy, needs, opts: Options):
    rows = layout.as_rows(hidden)
    weight, bias = head_for_kernels(weight, bias)
    coefs = upstream_coefs(target, grad_logprob, grad_entropy, entropy, opts.spec)

    def work(impl):
        linear_work = impl.linear_work(rows, weight, bias, target, opts.spec, needs, entropy is not None)
        return schedule.backward(linear_work, norm, coefs)

    grads = _run(opts, hidden.device, target, work)
    return (None if grads.hidden is None else grads.hidden.reshape(hidden.shape)), grads.weight, grads.bias


def _shaped(shape, stats):
    """The (N,) token statistics in the labels' shape (the entropy None when not asked for)."""
    return stats.logprob.view(shape), None if stats.entropy is None else stats.entropy.view(shape)


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, data: Data, opts: Options):
        stats, target = _forward(logits, data, opts)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, target, stats.norm, stats.entropy)
        ctx.opts = opts
        return _shaped(data.labels.shape, stats)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        no_double_backward("token_logprobs")
        if grad_logprob is None and grad_entropy is None:
            return None, None, None
        logits, target, norm, entropy = ctx.saved_tensors
        return _backward(logits, target, norm, entropy, grad_logprob, grad_entropy, ctx.opts), None, None


class _LinearTokenStats(torch.autograd.Function):
    """Saves hidden, weight, bias and O(N) floats; the backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, data: Data, opts: Options):
        stats, target = _linear_forward(hidden, weight, bias, data, opts)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, target, stats.norm, stats.entropy)
        ctx.opts = opts
        return _shaped(data.labels.shape, stats)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        no_double_backward("linear_token_logprobs")
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 5
        hidden, weight, bias, target, norm, entropy = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grads = _linear_backward(hidden, weight, bias, target, norm, entropy, grad_logprob, grad_entropy,
                                 (needs[0], needs[1], needs[2] and bias is not None), ctx.opts)
        return (*grads, None, None)


# ----------------------------------------------------------------------------------------------------------------
# the ops, for torch.compile


def _none_if_empty(t, want: bool):
    return t if want else None


def _stats_op(logits, labels, mask, cu_seqlens, *args):
    opts = Options.from_args(args)
    stats, target = _forward(logits, Data(labels, mask=mask, cu_seqlens=cu_seqlens), opts)
    entropy = stats.entropy if opts.entropy else stats.logprob.new_empty((0,))
    return stats.logprob.view(labels.shape), entropy.view(labels.shape if opts.entropy else (0,)), stats.norm, target


token_stats_op = torch.library.custom_op(
    "gvpo::token_logprobs", _stats_op, mutates_args=(),
    schema=op_schema("Tensor logits, " + _DATA, "(Tensor, Tensor, Tensor, Tensor)"))


def _stats_fake(like, labels, opts: Options):
    f32 = dict(dtype=torch.float32)
    return (like.new_empty(labels.shape, **f32), like.new_empty(labels.shape if opts.entropy else (0,), **f32),
            like.new_empty((2, labels.numel()), **f32), like.new_empty((labels.numel(),), dtype=torch.int64))


@token_stats_op.register_fake
def _(logits, labels, mask, cu_seqlens, *args):
    return _stats_fake(logits, labels, Options.from_args(args))


def _stats_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.save_for_backward(inputs[0], output[3], output[2], output[1])
    ctx.opts = Options.from_args(inputs[4:])
    ctx.num_inputs = len(inputs)


def _upstream(grad, want: bool, like):
    """An upstream gradient for the backward op: (0,) where there is none."""
    return grad.float() if want and grad is not None else like.new_empty((0,), dtype=torch.float32)


def _stats_op_backward(ctx, grad_logprob, grad_entropy, *_):
    no_double_backward("token_logprobs")
    if grad_logprob is None and grad_entropy is None:
        return (None,) * ctx.num_inputs
    logits, target, norm, entropy = ctx.saved_tensors
    grad = token_stats_backward_op(logits, target, norm, entropy, _upstream(grad_logprob, True, norm),
                                   _upstream(grad_entropy, ctx.opts.entropy, norm), *ctx.opts.args())
    return (grad,) + (None,) * (ctx.num_inputs - 1)


token_stats_op.register_autograd(_stats_op_backward, setup_context=_stats_setup)


def _stats_backward_op(logits, target, norm, entropy, grad_logprob, grad_entropy, *args):
    opts = Options.from_args(args)
    return _backward(logits, target, norm, _none_if_empty(entropy, opts.entropy),
                     _none_if_empty(grad_logprob, grad_logprob.numel() > 0),
                     _none_if_empty(grad_entropy, grad_entropy.numel() > 0), opts)


token_stats_backward_op = torch.library.custom_op(
    "gvpo::token_logprobs_backward", _stats_backward_op, mutates_args=(),
    schema=op_schema("Tensor logits, Tensor target, Tensor norm, Tensor token_entropy, Tensor grad_logprob, "
                     "Tensor grad_entropy", "Tensor"))
token_stats_backward_op.register_fake(lambda logits, *args: logits.new_empty(logits.shape))


def _linear_stats_op(hidden, weight, bias, labels, mask, cu_seqlens, *args):
    opts = Options.from_args(args)
    stats, target = _linear_forward(hidden, weight, bias, Data(labels, mask=mask, cu_seqlens=cu_seqlens), opts)
    entropy = stats.entropy if opts.entropy else stats.logprob.new_empty((0,))
    return stats.logprob.view(labels.shape), entropy.view(labels.shape if opts.entropy else (0,)), stats.norm, target


linear_stats_op = torch.library.custom_op(
    "gvpo::linear_token_logprobs", _linear_stats_op, mutates_args=(),
    schema=op_schema("Tensor hidden, Tensor weight, Tensor? bias, " + _DATA, "(Tensor, Tensor, Tensor, Tensor)"))


@linear_stats_op.register_fake
def _(hidden, weight, bias, labels, mask, cu_seqlens, *args):
    return _stats_fake(hidden, labels, Options.from_args(args))


def _linear_stats_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2], output[3])
    hidden, weight, bias = inputs[:3]
    ctx.save_for_backward(hidden, weight, bias, output[3], output[2], output[1])
    ctx.needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    ctx.opts = Options.from_args(inputs[6:])
    ctx.num_inputs = len(inputs)


def _linear_stats_op_backward(ctx, grad_logprob, grad_entropy, *_):
    no_double_backward("linear_token_logprobs")
    if grad_logprob is None and grad_entropy is None:
        return (None,) * ctx.num_inputs
    hidden, weight, bias, target, norm, entropy = ctx.saved_tensors
    grads = linear_stats_backward_op(hidden, weight, bias, target, norm, entropy,
                                     _upstream(grad_logprob, True, norm),
                                     _upstream(grad_entropy, ctx.opts.entropy, norm), *ctx.needs, *ctx.opts.args())
    grads = [g if need else None for g, need in zip(grads, ctx.needs)]
    return (*grads,) + (None,) * (ctx.num_inputs - 3)


linear_stats_op.register_autograd(_linear_stats_op_backward, setup_context=_linear_stats_setup)


def _linear_stats_backward_op(hidden, weight, bias, target, norm, entropy, grad_logprob, grad_entropy, need_hidden,
                              need_weight, need_bias, *args):
    opts = Options.from_args(args)
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    grads = _linear_backward(hidden, weight, bias, target, norm, _none_if_empty(entropy, opts.entropy),
                             _none_if_empty(grad_logprob, grad_logprob.numel() > 0),
                             _none_if_empty(grad_entropy, grad_entropy.numel() > 0), needs, opts)
    return tuple(like.new_empty((0,)) if g is None else g for g, like in zip(grads, (hidden, weight, weight)))


linear_stats_backward_op = torch.library.custom_op(
    "gvpo::linear_token_logprobs_backward", _linear_stats_backward_op, mutates_args=(),
    schema=op_schema("Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor norm, "
                     "Tensor token_entropy, Tensor grad_logprob, Tensor grad_entropy, bool need_hidden, "
                     "bool need_weight, bool need_bias",
                     "(Tensor, Tensor, Tensor)"))


@linear_stats_backward_op.register_fake
def _(hidden, weight, bias, target, norm, entropy, grad_logprob, grad_entropy, need_hidden, need_weight, need_bias,
      *args):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty(weight.shape[:1] if need_bias and bias is not None else (0,)))
