"""The GVPO loss from hidden states and the LM head: its eager autograd.Function and the custom op for
torch.compile. The logits are never materialised.

The forward runs the shared GEMM schedule (gvpo_kernels/schedule.py) on the backend's chunk kernels and computes
the gradients that will be needed, for grad_loss = 1; the backward scales them. Its outputs therefore have the
same shapes whichever schedule ran, and nothing N x V is ever kept.

    gvpo::linear_gvpo_loss(hidden, weight, bias, <Data>, grad_hidden, grad_weight, grad_bias, <Options>)
        -> loss, s, r, dL/ds, seq_entropy, entropy_bonus, d_hidden, d_weight, d_bias ((0,) where not asked for)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import layout, schedule
from .common import (DATA_SCHEMA, Call, Data, Options, hand_out_once, no_double_backward, num_seqs, op_schema,
                     outputs, own_precision, prepare)


def linear_gvpo_loss(hidden: Tensor, weight: Tensor, bias, data: Data, opts: Options):
    """loss (), seq_logprob, implicit_reward, grad_seq_logprob (S,), seq_entropy ((S,) with opts.entropy, else
    (0,)) and entropy_bonus () of the linear path (functional.linear_gvpo_loss documents the arguments). The
    gradients that will be needed are computed in the forward."""
    data.check_kinds(hidden.device, opts.group_size)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    if torch.compiler.is_compiling():
        return linear_loss_op(hidden, weight, bias, *data, *needs, *opts.args())[:6]
    call = prepare(weight.shape[0], hidden.device, data, opts)
    return _LinearLoss.apply(hidden, weight, bias, call, needs)


def head_for_kernels(weight, bias):
    """The LM head as the kernels read it: weight (V, H) with unit stride along H (a copy only when it has not),
    bias (V,) contiguous (a copy of V elements when it is strided or expanded)."""
    weight = weight if weight.stride(-1) == 1 or weight.shape[-1] == 1 else weight.contiguous()
    return weight, None if bias is None else bias.contiguous()


def forward(hidden, weight, bias, call: Call, needs):
    """-> (loss, s, r, dL/ds, seq_entropy, entropy_bonus), and for grad_loss = 1 (d_hidden (hidden's shape),
    d_weight, d_bias), each None where ``needs`` (three booleans) does not ask for it."""
    opts = call.opts
    needs = (needs[0], needs[1], needs[2] and bias is not None)
    weight, bias = head_for_kernels(weight, bias)
    with own_precision(hidden.device):
        work = call.impl.linear_work(layout.as_rows(hidden), weight, bias, call.lay.target, opts.spec, needs,
                                     opts.token_entropy)
        group, stats, grads = schedule.loss_and_grads(work, call.lay, call.stage, needs, opts.token_entropy,
                                                      local=call.stage.local)
    d_hidden = None if grads.hidden is None else grads.hidden.reshape(hidden.shape)
    return outputs(group, stats, call), (d_hidden, grads.weight, grads.bias)


class _LinearLoss(torch.autograd.Function):
    """The linear path in eager mode. The gradients, computed in the forward for grad_loss = 1, are held by the
    context (not saved tensors: the backward scales them in place and hands them out, so a second backward would
    find them changed) and released by the backward. distributed.py runs it too, with its own Call."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, call: Call, needs):
        _, (outs, grads) = call.attempt(lambda c: forward(hidden, weight, bias, c, needs))
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*outs[1:])
        ctx.grads = grads
        return outs

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = hand_out_once(ctx, "grads", "linear_gvpo_loss", "its gradients are computed in the forward and the "
                              "first backward handed them out")
        if grad_loss is None:
            return (None,) * 5
        if grad_loss.device.type != "cpu" or grad_loss.item() != 1.0:
            grads = [None if d is None else d.mul_(grad_loss) for d in grads]
        return (*grads, None, None)


# ----------------------------------------------------------------------------------------------------------------
# the op, for torch.compile

def _loss_op(hidden, weight, bias, *args):
    data, needs, opts = Data(*args[:6]), args[6:9], Options.from_args(args[9:])
    call = prepare(weight.shape[0], hidden.device, data, opts)
    _, (outs, grads) = call.attempt(lambda c: forward(hidden, weight, bias, c, needs))
    return (*outs, *(like.new_empty((0,)) if d is None else d for d, like in zip(grads, (hidden, weight, weight))))


linear_loss_op = torch.library.custom_op(
    "gvpo::linear_gvpo_loss", _loss_op, mutates_args=(),
    schema=op_schema("Tensor hidden, Tensor weight, Tensor? bias, " + DATA_SCHEMA
                     + ", bool grad_hidden, bool grad_weight, bool grad_bias",
                     "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"))


@linear_loss_op.register_fake
def _(hidden, weight, bias, *args):
    data, needs, opts = Data(*args[:6]), args[6:9], Options.from_args(args[9:])
    n_seq = num_seqs(data)
    f32 = dict(dtype=torch.float32)
    per_seq = [hidden.new_empty((n,), **f32) for n in (n_seq,) * 3 + (n_seq if opts.entropy else 0,)]
    grads = [like.new_empty(shape if need else (0,)) for like, shape, need in
             ((hidden, hidden.shape, needs[0]), (weight, weight.shape, needs[1]),
              (weight, weight.shape[:1], needs[2] and bias is not None))]
    return (hidden.new_empty((), **f32), *per_seq, hidden.new_empty((), **f32), *grads)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs other than the loss
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[6:])
    ctx.needs = inputs[9:12]
    ctx.num_inputs = len(inputs)


def _op_backward(ctx, grad_loss, *_):
    """Traced: the saved gradients times grad_loss, out of place (the compiler plans the buffers)."""
    no_double_backward("linear_gvpo_loss")
    if grad_loss is None:
        return (None,) * ctx.num_inputs
    grads = [d * grad_loss if need else None for d, need in zip(ctx.saved_tensors, ctx.needs)]
    return (*grads,) + (None,) * (ctx.num_inputs - 3)


linear_loss_op.register_autograd(_op_backward, setup_context=_setup_context)
