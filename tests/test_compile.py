"""torch.compile(fullgraph=True) of a training step that calls gvpo_loss or linear_gvpo_loss, against eager.

The step puts a small layer in front of the loss (so the loss's gradient flows on through compiled code) and
returns the loss and a statistic; fullgraph=True fails on any graph break. The loss, the statistic and the
gradient of every leaf must match eager. Inductor (which compiles C++ on the CPU, seconds per graph) runs one case
per path; aot_eager, which traces the same forward and backward graphs, runs the others. The ops themselves are
checked by torch.library.opcheck (schema, fake shapes, autograd registration, AOT dispatch).
"""

import pytest
import torch
from cases import Case, make_inputs

import gvpo_kernels as gk
from gvpo_kernels import cpu, ops

CPU = torch.device("cpu")
BACKENDS = ["cpu", "torch"] if cpu.unavailable_reason() is None else ["torch"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def logits_step(layer, x, labels, rewards, kwargs):
    logits = layer(x)
    loss, stats = gk.gvpo_loss(logits, labels, rewards, return_stats=True, **kwargs)
    return 2.0 * loss, stats.grad_seq_logprob


def linear_step(layer, x, weight, bias, labels, rewards, kwargs):
    hidden = torch.tanh(layer(x))
    loss, stats = gk.linear_gvpo_loss(hidden, weight, labels, rewards, bias=bias, return_stats=True, **kwargs)
    return 2.0 * loss, stats.seq_logprob


def run_step(step, layer, leaves, *args):
    """Loss, statistic and every gradient (the layer's parameters and the leaves) of one call of ``step``."""
    params = [*layer.parameters(), *leaves]
    for p in params:
        p.grad = None
    loss, stat = step(layer, *args)
    loss.backward()
    return [loss.detach(), stat] + [p.grad.clone() for p in params]


def check_compiled_matches_eager(make_step_args, leaves, layer, step, compiler):
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    for args in make_step_args():  # more than one shape: the second call recompiles with dynamic sizes
        want = run_step(step, layer, leaves(args), *args)
        got = run_step(compiled, layer, leaves(args), *args)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


LOGITS_CASES = [
    ("inductor", Case(groups=(2, 2), seq_len=8, vocab=64)),
    ("aot_eager", Case(layout="packed", groups=(2, 3, 1), shuffled=True, vocab=64, temperature=0.7)),
    ("aot_eager", Case(groups=(3,), seq_len=5, vocab=33, anchor=False, reduction="sum", inplace=True)),
    ("aot_eager", Case(groups=(2, 2), seq_len=6, vocab=40, dtype=torch.bfloat16)),
]
LINEAR_CASES = [
    ("inductor", Case(hidden_size=16, groups=(2, 2), seq_len=8, vocab=64, bias=True)),
    ("aot_eager", Case(hidden_size=16, groups=(2, 2), seq_len=8, vocab=64, anchor=False)),
    ("aot_eager", Case(hidden_size=16, layout="packed", groups=(2, 3, 1), shuffled=True, vocab=64, mask="empty")),
    ("aot_eager", Case(hidden_size=16, groups=(2, 2), seq_len=6, vocab=40, dtype=torch.bfloat16)),
]


def _shapes(case):
    """The case, then the same case one sequence-length shorter (padded) or reseeded (packed: other lengths)."""
    return [case, case.replace(seq_len=case.seq_len - 1, seed=1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler, case", LOGITS_CASES, ids=lambda v: v if isinstance(v, str) else v.id)
def test_logits_step(compiler, case, backend):
    width = 12
    layer = torch.nn.Linear(width, case.vocab, dtype=case.dtype)

    def make_step_args():
        for c in _shapes(case):
            inputs = make_inputs(c.replace(hidden_size=width), CPU)
            x = inputs["hidden"].detach().requires_grad_()
            kwargs = dict(inputs["kwargs"], backend=backend, inplace_backward=c.inplace)
            yield x, inputs["labels"], inputs["rewards"], kwargs

    check_compiled_matches_eager(make_step_args, lambda args: [args[0]], layer, logits_step, compiler)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler, case", LINEAR_CASES, ids=lambda v: v if isinstance(v, str) else v.id)
def test_linear_step(compiler, case, backend):
    layer = torch.nn.Linear(case.hidden_size, case.hidden_size, dtype=case.dtype)

    def make_step_args():
        for c in _shapes(case):
            inputs = make_inputs(c, CPU)
            yield (inputs["hidden"], inputs["weight"], inputs["bias"], inputs["labels"], inputs["rewards"],
                   dict(inputs["kwargs"], backend=backend))

    def leaves(args):
        return [t for t in args[:3] if t is not None]

    check_compiled_matches_eager(make_step_args, leaves, layer, linear_step, compiler)


def test_inplace_backward_under_compile_leaves_the_logits_alone():
    """inplace_backward is an eager-mode memory saving; compiled, the gradient gets its own buffer."""
    inputs = make_inputs(Case(groups=(2, 2), seq_len=5, vocab=17), CPU)
    logits = inputs["logits"]
    before = logits.detach().clone()

    def step(logits):
        return gk.gvpo_loss(logits, inputs["labels"], inputs["rewards"], inplace_backward=True, **inputs["kwargs"])

    torch.compile(step, fullgraph=True, backend="aot_eager")(logits).backward()
    torch.testing.assert_close(logits.detach(), before, rtol=0, atol=0)
    expected = before.clone().requires_grad_()
    gk.reference.gvpo_loss(expected, inputs["labels"], inputs["rewards"], **inputs["kwargs"]).backward()
    torch.testing.assert_close(logits.grad, expected.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_pass_opcheck(backend):
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of the three ops."""
    inputs = make_inputs(Case(hidden_size=16, vocab=64, groups=(2, 2), seq_len=6, bias=True, layout="packed"), CPU)
    kw = inputs["kwargs"]
    common = (inputs["labels"], inputs["rewards"], kw.get("group_ids"), kw["mask"], kw["cu_seqlens"],
              kw["ref_logprobs"], kw.get("group_size"), 0.1, 0.8, "mean", -100, backend)
    torch.library.opcheck(ops.linear_loss_op, (inputs["hidden"], inputs["weight"], inputs["bias"], *common,
                                               True, True, True, True))
    torch.library.opcheck(ops.linear_loss_op, (inputs["hidden"], inputs["weight"], None, *common, False, True,
                                               False, False))
    logits = torch.randn(inputs["labels"].numel(), 64, requires_grad=True)
    for entropy in (False, True):
        torch.library.opcheck(ops.logits_loss_op, (logits, *common, entropy))
    _, _, _, grad_seq, _, lse, target, token_seq = ops.logits_loss_op(logits.detach(), *common, False)
    torch.library.opcheck(ops.logits_backward_op, (logits.detach(), target, token_seq, lse, grad_seq,
                                                   torch.tensor(1.5), 0.8, backend))
