"""torch.compile(fullgraph=True) of a training step that calls gvpo_loss or linear_gvpo_loss, against eager.

The step puts a small layer in front of the loss (so the loss's gradient flows on through compiled code) and
returns the loss and a statistic; fullgraph=True fails on any graph break. The loss, the statistic and the
gradient of every leaf must match eager. Inductor (which compiles C++ on the CPU, seconds per graph) runs one case
per path; aot_eager, which traces the same forward and backward graphs, runs the others. The ops themselves are
checked by torch.library.opcheck (schema, fake shapes, autograd registration, AOT dispatch).
"""

import pytest
import torch
from helpers.cases import Case, make_inputs

import gvpo_kernels as gk
from gvpo_kernels import cpu, ops
from gvpo_kernels.ops import linear as ops_linear
from gvpo_kernels.ops import logits as ops_logits
from gvpo_kernels.ops import stats as ops_stats

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
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of every op."""
    inputs = make_inputs(Case(hidden_size=16, vocab=64, groups=(2, 2), seq_len=6, bias=True, layout="packed"), CPU)
    kw = inputs["kwargs"]
    data = ops.Data(inputs["labels"], inputs["rewards"], kw.get("group_ids"), kw["mask"], kw["cu_seqlens"],
                    kw["ref_logprobs"])
    hidden, weight, bias = inputs["hidden"], inputs["weight"], inputs["bias"]
    logits = torch.randn(inputs["labels"].numel(), 64, requires_grad=True)
    for entropy, extra in ((False, {}), (True, dict(softcap=20.0, entropy_coef=0.1))):
        opts = ops.Options(group_size=kw.get("group_size"), temperature=0.8, backend=backend, entropy=entropy,
                           **extra)
        torch.library.opcheck(ops_linear.linear_loss_op, (hidden, weight, bias, *data, True, True, True,
                                                          *opts.args()))
        torch.library.opcheck(ops_linear.linear_loss_op, (hidden, weight, None, *data, False, True, False,
                                                          *opts.args()))
        torch.library.opcheck(ops_logits.logits_loss_op, (logits, *data, *opts.args()))
        stats_args = (inputs["labels"], kw["mask"], kw["cu_seqlens"], *opts.args())
        torch.library.opcheck(ops_stats.token_stats_op, (logits, *stats_args))
        torch.library.opcheck(ops_stats.linear_stats_op, (hidden, weight, bias, *stats_args))
    outs = ops_logits.logits_loss_op(logits.detach(), *data, *opts.args())
    torch.library.opcheck(ops_logits.logits_backward_op, (logits.detach(), outs[7], outs[6], *outs[8:],
                                                          torch.tensor(1.5), *opts.args()))
    logprob, entropy, norm, target = ops_stats.token_stats_op(logits.detach(), *stats_args)
    grads = (torch.randn(logprob.shape), torch.randn(entropy.shape))
    torch.library.opcheck(ops_stats.token_stats_backward_op, (logits.detach(), target, norm, entropy, *grads,
                                                              *opts.args()))
    logprob, entropy, norm, target = ops_stats.linear_stats_op(hidden.detach(), weight.detach(), bias.detach(),
                                                               *stats_args)
    torch.library.opcheck(ops_stats.linear_stats_backward_op, (hidden.detach(), weight.detach(), bias.detach(),
                                                               target, norm, entropy, *grads, True, True, True,
                                                               *opts.args()))


@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_compile_whole(backend, path):
    """torch.compile(fullgraph=True) of a step on token_logprobs / linear_token_logprobs (an entropy bonus and a
    log-prob term): no graph break, and the values and every leaf's gradient equal eager's."""
    inputs = make_inputs(Case(hidden_size=16, vocab=64, groups=(2, 2), seq_len=6, bias=True, layout="packed"), CPU)
    kw = inputs["kwargs"]
    leaves = [inputs[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]

    def step(hidden, weight, bias):
        if path == "logits":
            lp, ent = gk.token_logprobs(hidden @ weight.T + bias, inputs["labels"], mask=kw["mask"],
                                        cu_seqlens=kw["cu_seqlens"], temperature=0.7, return_entropy=True,
                                        backend=backend)
        else:
            lp, ent = gk.linear_token_logprobs(hidden, weight, inputs["labels"], bias=bias, mask=kw["mask"],
                                               cu_seqlens=kw["cu_seqlens"], temperature=0.7, return_entropy=True,
                                               backend=backend)
        return (lp * torch.linspace(0.5, 1.5, lp.numel())).sum() + 0.01 * ent.sum(), lp

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        for leaf in leaves:
            leaf.grad = None
        value, lp = fn(*leaves)
        value.backward()
        results.append((value.detach(), lp.detach(), *[leaf.grad.clone() for leaf in leaves]))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
