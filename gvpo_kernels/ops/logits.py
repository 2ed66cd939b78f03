"""The GVPO loss from logits: its eager autograd.Functions and the torch.library custom ops torch.compile traces.

Forward: the backend's token stage (log-prob, normaliser, entropy per token; reads N x V once), then the stage
(group stage and every token's coefficients, O(N + S)). Saved: O(N) floats; the backward recomputes the softmax
(one more read of N x V, one write). With ``inplace_backward`` (eager) the backward runs at the end of the forward,
into the logits' own storage.

    gvpo::gvpo_loss(logits, <Data>, <Options>)
        -> loss, s, r, dL/ds, seq_entropy, entropy_bonus, norm, target, c_lp, c_ent, H
    gvpo::gvpo_loss_backward(logits, target, norm, c_lp, c_ent, H, grad_loss, <Options>) -> dL/dlogits

(c_ent and H are (0,) without an entropy bonus; seq_entropy is (0,) unless Options.entropy.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import layout
from .._alloc import empty
from ..backend import Coefs
from .common import (DATA_SCHEMA, Call, Data, Options, hand_out_once, no_double_backward, num_seqs, op_schema,
                     outputs, own_precision, prepare, scale_coefs)
from .select import attempt, backend_for


def gvpo_loss(logits: Tensor, data: Data, opts: Options, inplace_backward: bool):
    """loss (), seq_logprob, implicit_reward, grad_seq_logprob (S,), seq_entropy ((S,) with opts.entropy, else
    (0,)) and entropy_bonus () of the logits path (functional.gvpo_loss documents the arguments)."""
    data.check_kinds(logits.device, opts.group_size)
    if torch.compiler.is_compiling():
        return logits_loss_op(logits, *data, *opts.args())[:6]
    call = prepare(logits.shape[-1], logits.device, data, opts)
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        return _InplaceLogitsLoss.apply(logits, call)
    return _LogitsLoss.apply(logits, call)


def forward(logits: Tensor, call: Call):
    """-> (loss, s, r, dL/ds, seq_entropy, entropy_bonus), norm (2, N), Coefs for grad_loss = 1, rows (the
    (B', T', V) view of the logits the backend read)."""
    rows = layout.as_rows(logits)
    with own_precision(logits.device):
        stats = call.impl.token_forward(rows, call.lay.target, call.opts.spec, call.opts.token_entropy)
        stats, group, coefs = call.stage(stats)
    return outputs(group, stats, call), stats.norm, coefs, rows


def backward(logits: Tensor, target: Tensor, norm: Tensor, coefs: Coefs, impl, opts: Options) -> Tensor:
    """dL/dlogits, logits' shape and dtype, from the saved normaliser and coefficients (already times grad_loss);
    on the torch backend where ``impl``'s kernel cannot run (select.attempt)."""
    rows = layout.as_rows(logits)
    grad = empty(rows.shape, dtype=rows.dtype, device=rows.device)

    def work(backend):
        with own_precision(logits.device):
            backend.token_backward(rows, target, norm, coefs, opts.spec, grad)

    attempt(opts.backend, impl, work)
    return grad.view(logits.shape)


class _LogitsLoss(torch.autograd.Function):
    """The logits path in eager mode: saves O(N) floats, recomputes the softmax in backward. distributed.py runs
    it too, with a Call whose stage works across ranks."""

    @staticmethod
    def forward(ctx, logits, call: Call):
        call, (outs, norm, coefs, _) = call.attempt(lambda c: forward(logits, c))
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*outs[1:])
        ctx.save_for_backward(logits, norm, call.lay.target, *coefs)
        ctx.impl, ctx.opts = call.impl, call.opts
        return outs

    @staticmethod
    def backward(ctx, grad_loss, *_):
        no_double_backward("gvpo_loss")
        if grad_loss is None:
            return None, None
        logits, norm, target, *coefs = ctx.saved_tensors
        coefs = scale_coefs(Coefs(*coefs), grad_loss)
        return backward(logits, target, norm, coefs, ctx.impl, ctx.opts), None


class _InplaceLogitsLoss(torch.autograd.Function):
    """inplace_backward=True in eager mode: the forward also writes dL/dlogits (for grad_loss = 1) over the logits'
    storage, and the backward scales it in place, so no second N x V buffer exists.

    The logits' version counter is bumped, so another autograd node that saved them (a z-loss on the logits, an op
    whose output they are) raises "modified by an inplace operation" instead of using the overwritten values.
    Logits whose rows share memory (``expand``) are refused. float16 gradients are stored pre-multiplied by a power
    of two that keeps them in float16's range (:func:`_float16_headroom`), so that loss scaling loses no more to
    rounding than PyTorch's own float16 backward does."""

    @staticmethod
    def forward(ctx, logits, call: Call):
        if layout.has_overlap(layout.as_rows(logits)):
            raise ValueError("inplace_backward=True needs logits whose elements do not share memory (these are an "
                             "expanded or overlapping view); pass logits.contiguous() or inplace_backward=False")
        def forward_and_backward(c: Call):  # one attempt: a fallback reruns both (a failed kernel wrote nothing)
            outs, norm, coefs, rows = forward(logits, c)
            stored_scale = _float16_headroom(coefs, c.opts.spec, rows.dtype)
            with own_precision(logits.device):
                c.impl.token_backward(rows, c.lay.target, norm, scale_coefs(coefs, stored_scale), c.opts.spec, rows)
            return outs, rows, stored_scale

        _, (outs, rows, stored_scale) = call.attempt(forward_and_backward)
        torch.autograd.graph.increment_version(logits)
        ctx.mark_non_differentiable(*outs[1:])
        # not save_for_backward: its logits were overwritten on purpose
        ctx.grad_rows, ctx.shape, ctx.stored_scale = rows, logits.shape, stored_scale
        return outs

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad = hand_out_once(ctx, "grad_rows", "gvpo_loss", "with inplace_backward=True the gradient lives in "
                             "the logits' storage and was handed out by the first backward")
        if grad_loss is None:
            grad_loss = torch.ones((), dtype=torch.float32, device=grad.device)
        scale = grad_loss.float() / ctx.stored_scale
        if grad.device.type != "cpu" or scale.item() != 1.0:
            grad.mul_(scale)
        return grad.reshape(ctx.shape), None


def _float16_headroom(coefs: Coefs, spec, dtype) -> Tensor:
    """The factor, a float32 scalar, by which inplace_backward stores dL/dlogits in the logits' storage: 1, or for
    float16 the power of two (up to 2^24) that brings the largest possible entry to 2^15.

    Every entry is bounded by (|c_lp| + |c_ent| (1 + H)) max dz/dx of its row (|onehot - p| <= 1, p |log p| <= 1),
    so nothing overflows, and small entries keep the bits they would lose at scale 1: the backward's
    multiplication by grad_loss / factor then gives what rounding grad_loss * dL/dlogits to float16 once would, as
    PyTorch's float16 backward under loss scaling does. Computed on the device (no sync)."""
    one = torch.ones((), dtype=torch.float32, device=coefs.logprob.device)
    if dtype != torch.float16 or coefs.logprob.numel() == 0:
        return one
    bound = coefs.logprob.abs()
    if coefs.entropy is not None:
        bound = bound + coefs.entropy.abs() * (1.0 + coefs.token_entropy.abs())
    peak = bound.max() * (spec.max_dz_dx / spec.s)
    return torch.exp2(torch.floor(torch.log2(2.0**15 / peak)).clamp(0, 24))


# ----------------------------------------------------------------------------------------------------------------
# the ops, for torch.compile


def _loss_op(logits, *args):
    data, opts = Data(*args[:6]), Options.from_args(args[6:])
    call = prepare(logits.shape[-1], logits.device, data, opts)
    call, (outs, norm, coefs, _) = call.attempt(lambda c: forward(logits, c))
    extra = [logits.new_empty((0,), dtype=torch.float32) if c is None else c for c in coefs[1:]]  # no aliases
    return (*outs, norm, call.lay.target, coefs.logprob, *extra)


logits_loss_op = torch.library.custom_op(
    "gvpo::gvpo_loss", _loss_op, mutates_args=(),
    schema=op_schema("Tensor logits, " + DATA_SCHEMA, "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
                     "Tensor, Tensor, Tensor, Tensor)"))


@logits_loss_op.register_fake
def _(logits, *args):
    data, opts = Data(*args[:6]), Options.from_args(args[6:])
    n_seq, n_tok = num_seqs(data), data.labels.numel()
    f32 = dict(dtype=torch.float32)
    bonus = n_tok if opts.entropy_coef != 0.0 else 0
    return (logits.new_empty((), **f32), *(logits.new_empty((n_seq,), **f32) for _ in range(3)),
            logits.new_empty((n_seq if opts.entropy else 0,), **f32), logits.new_empty((), **f32),
            logits.new_empty((2, n_tok), **f32),
            logits.new_empty((n_tok,), dtype=torch.int64), logits.new_empty((n_tok,), **f32),
            logits.new_empty((bonus,), **f32), logits.new_empty((bonus,), **f32))


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the outputs other than the loss get no gradient: no zeros for them
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(inputs[0], *output[6:])
    ctx.opts = Options.from_args(inputs[7:])


def _op_backward(ctx, grad_loss, *_):
    no_double_backward("gvpo_loss")
    if grad_loss is None:
        return (None,) * (7 + len(ctx.opts.args()))
    logits, norm, target, c_lp, c_ent, entropy = ctx.saved_tensors
    grad = logits_backward_op(logits, target, norm, c_lp, c_ent, entropy, grad_loss, *ctx.opts.args())
    return (grad,) + (None,) * (6 + len(ctx.opts.args()))


logits_loss_op.register_autograd(_op_backward, setup_context=_setup_context)


def _backward_op(logits, target, norm, c_lp, c_ent, entropy, grad_loss, *args):
    opts = Options.from_args(args)
    bonus = c_ent.numel() > 0
    coefs = scale_coefs(Coefs(c_lp, c_ent if bonus else None, entropy if bonus else None), grad_loss)
    impl = backend_for(opts.backend, logits.device, num_tokens=target.numel())
    return backward(logits, target, norm, coefs, impl, opts)


logits_backward_op = torch.library.custom_op(
    "gvpo::gvpo_loss_backward", _backward_op, mutates_args=(),
    schema=op_schema("Tensor logits, Tensor target, Tensor norm, Tensor c_lp, Tensor c_ent, Tensor token_entropy, "
                     "Tensor grad_loss", "Tensor"))


@logits_backward_op.register_fake
def _(logits, *args):
    return logits.new_empty(logits.shape)
