"""Inputs a demanding user passes that once gave silently wrong results or unclear errors, on every
backend: strided and stride-0 views of every tensor a kernel reads, -inf logits, in-place gradients that another
autograd node depends on, double and second backwards, empty calls, and the first eager call's imports."""

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.cases import Case, make_inputs, rel_err, run, run_linear
from conftest import DEVICE

import gvpo_kernels as gk
from gvpo_kernels import cpu

BACKENDS = ["torch", "cpu", "triton"]


def skip_unavailable(backend):
    if backend == "cpu" and (DEVICE.type != "cpu" or cpu.unavailable_reason() is not None):
        pytest.skip("the C++ kernels run on CPU tensors, once built")


def logits_inputs(**changes):
    return make_inputs(Case(groups=(3, 2, 3), seq_len=9, vocab=67).replace(**changes), DEVICE)


def linear_inputs(**changes):
    case = Case(groups=(3, 2, 3), seq_len=9, vocab=67, hidden_size=16, bias=True)
    return make_inputs(case.replace(**changes), DEVICE)


def assert_same_call(got, want, what):
    """Two calls of one backend on equal values: equal loss, gradients and stats (to float32 rounding)."""
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = got, want
    grads_a = grads_a if isinstance(grads_a, list) else [grads_a]
    grads_b = grads_b if isinstance(grads_b, list) else [grads_b]
    for name, a, b in zip(["loss", "grad", "grad", "grad", "stats", "stats", "stats"],
                          [loss_a, *grads_a, *stats_a], [loss_b, *grads_b, *stats_b]):
        if a is None and b is None:
            continue
        assert rel_err(a, b) <= 1e-6, f"{what}: {name} differs ({rel_err(a, b):.3g})"


def _strided(t):
    """The same values in a non-contiguous view: every other element of a buffer twice as long (last dim)."""
    wide = torch.zeros(*t.shape, 2, dtype=t.dtype, device=t.device)
    wide[..., 0] = t
    return wide[..., 0]


def _transposed(t):
    """The same values through a transposed buffer (2-D: column-major)."""
    return t.T.contiguous().T if t.dim() == 2 else _strided(t)


# ----------------------------------------------------------------------------------------------------------------
# strides: every tensor a kernel reads through a raw pointer


@pytest.mark.parametrize("view", [_strided, _transposed], ids=["strided", "transposed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_per_token_and_per_sequence_tensors(backend, view):
    """rewards as one column of a (B, num_reward_funcs) table, and strided labels, mask, ref_logprobs, group_ids."""
    skip_unavailable(backend)
    inputs = logits_inputs()
    logits, labels, rewards, kwargs = inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"]
    table = torch.stack([torch.randn_like(rewards), rewards, torch.randn_like(rewards)], dim=1)
    assert not table[:, 1].is_contiguous()
    want = run(gk.gvpo_loss, logits.detach().clone().requires_grad_(), labels, rewards, kwargs, backend=backend)
    strided = dict(kwargs, mask=view(kwargs["mask"]), ref_logprobs=view(kwargs["ref_logprobs"]),
                   group_ids=_strided(kwargs["group_ids"]))
    got = run(gk.gvpo_loss, logits, view(labels), table[:, 1], strided, backend=backend)
    assert_same_call(got, want, "strided inputs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride_zero_rewards_and_anchor(backend):
    """rewards.expand(S) of one value per batch and an expanded anchor row (stride 0)."""
    skip_unavailable(backend)
    inputs = logits_inputs(anchor=False)
    logits, labels, kwargs = inputs["logits"], inputs["labels"], inputs["kwargs"]
    seqs, seq_len = labels.shape
    rewards = torch.tensor([0.5], device=DEVICE).expand(seqs)
    ref = -torch.rand(1, seq_len, device=DEVICE).expand(seqs, seq_len)
    want = run(gk.gvpo_loss, logits.detach().clone().requires_grad_(), labels, rewards.contiguous(),
               dict(kwargs, ref_logprobs=ref.contiguous()), backend=backend)
    got = run(gk.gvpo_loss, logits, labels, rewards, dict(kwargs, ref_logprobs=ref), backend=backend)
    assert_same_call(got, want, "stride-0 inputs")


@pytest.mark.parametrize("bias_view", ["strided", "expanded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_bias(backend, bias_view):
    """A strided bias, and an expanded (stride-0) one, give what the same values in a contiguous bias give."""
    skip_unavailable(backend)
    inputs = linear_inputs()
    hidden, weight, labels, rewards, kwargs = (inputs[k] for k in ("hidden", "weight", "labels", "rewards",
                                                                   "kwargs"))
    vocab = weight.shape[0]
    if bias_view == "strided":
        bias = _strided(inputs["bias"].detach()).requires_grad_()
    else:
        bias = torch.full((1,), 0.3, device=DEVICE).expand(vocab).requires_grad_()
    dense = bias.detach().contiguous().requires_grad_()
    copies = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    want = run_linear(gk.linear_gvpo_loss, *copies, dense, labels, rewards, kwargs, backend=backend)
    got = run_linear(gk.linear_gvpo_loss, hidden, weight, bias, labels, rewards, kwargs, backend=backend)
    assert_same_call(got, want, f"{bias_view} bias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_hidden_and_weight(backend):
    """hidden as an expanded batch (stride 0 over sequences) and a weight whose rows are strided."""
    skip_unavailable(backend)
    inputs = linear_inputs(bias=False)
    labels, rewards, kwargs = inputs["labels"], inputs["rewards"], inputs["kwargs"]
    seqs, seq_len, hidden_size = inputs["hidden"].shape
    hidden = inputs["hidden"].detach()[:1].expand(seqs, seq_len, hidden_size).requires_grad_()
    wide = torch.zeros(inputs["weight"].shape[0], 2 * hidden_size, device=DEVICE)
    wide[:, :hidden_size] = inputs["weight"].detach()
    weight = wide[:, :hidden_size].requires_grad_()
    copies = [t.detach().contiguous().requires_grad_() for t in (hidden, weight)]
    want = run_linear(gk.linear_gvpo_loss, *copies, None, labels, rewards, kwargs, backend=backend)
    got = run_linear(gk.linear_gvpo_loss, hidden, weight, None, labels, rewards, kwargs, backend=backend)
    assert_same_call(got, want, "expanded hidden, strided weight")


# ----------------------------------------------------------------------------------------------------------------
# -inf logits


def _oracle_and_backend_logits(logits, labels, rewards, kwargs, backend):
    oracle = run(gk.reference.gvpo_loss, logits.detach().double().requires_grad_(), labels, rewards.double(),
                 kwargs)
    got = run(gk.gvpo_loss, logits, labels, rewards, kwargs, backend=backend)
    return oracle, got


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_at_unscored_columns(backend):
    """Vocabulary masking: -inf at columns that are no scored label (whole tiles of them, and scattered ones)."""
    skip_unavailable(backend)
    inputs = logits_inputs(vocab=300)
    logits, labels, rewards, kwargs = inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"]
    banned = torch.zeros(300, dtype=torch.bool, device=DEVICE)
    banned[128:300] = True
    banned[::7] = True
    labels = torch.where(banned[labels], torch.zeros_like(labels) + 1, labels)  # column 1 is allowed
    masked = logits.detach().masked_fill(banned, float("-inf")).requires_grad_()
    oracle, (loss, grad, stats) = _oracle_and_backend_logits(masked, labels, rewards, kwargs, backend)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[..., banned] == 0).all()
    assert rel_err(loss, oracle[0]) <= 1e-5 and rel_err(grad, oracle[1]) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_bias_over_vocabulary_blocks(backend):
    """The linear path with the head's bias at -inf over whole vocabulary blocks (no label there)."""
    skip_unavailable(backend)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    inputs = linear_inputs(vocab=600)
    hidden, weight, labels, rewards, kwargs = (inputs[k] for k in ("hidden", "weight", "labels", "rewards",
                                                                   "kwargs"))
    bias = inputs["bias"].detach().clone()
    bias[64:600] = float("-inf")
    labels = labels % 64
    bias.requires_grad_()
    copies = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    oracle = run_linear(gk.reference.linear_gvpo_loss, *copies, labels, rewards.double(), kwargs)
    loss, grads, _ = run_linear(gk.linear_gvpo_loss, hidden, weight, bias, labels, rewards, kwargs, backend=backend)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert rel_err(loss, oracle[0]) <= 1e-5
    for got, want in zip(grads, oracle[1]):
        assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_at_a_scored_label_is_nan_as_in_the_reference(backend):
    """A scored label whose logit is -inf has log-prob -inf: its s_i is -inf and the loss NaN, as the reference
    (and torch.log_softmax) give; the other sequences' statistics stay finite. Documented in functional.gvpo_loss."""
    skip_unavailable(backend)
    inputs = logits_inputs(mask="none", anchor=False)
    logits, labels, rewards, kwargs = inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"]
    bad = logits.detach().clone()
    bad[4, 2, labels[4, 2]] = float("-inf")
    oracle, (loss, _, stats) = _oracle_and_backend_logits(bad.requires_grad_(), labels, rewards, kwargs, backend)
    assert torch.isnan(oracle[0]) and torch.isnan(loss)
    assert stats.seq_logprob[4] == float("-inf") and torch.isfinite(stats.seq_logprob[:4]).all()


# ----------------------------------------------------------------------------------------------------------------
# inplace_backward


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_under_another_node_that_saved_the_logits_raises(backend):
    """A z-loss on the same logits saved them; writing the gradient over them must make autograd raise."""
    skip_unavailable(backend)
    inputs = logits_inputs()
    source = inputs["logits"]
    logits = source * 1.0  # a non-leaf, as a model's output is
    z_loss = torch.logsumexp(logits.float(), dim=-1).square().mean()  # saves the logits
    loss = gk.gvpo_loss(logits, inputs["labels"], inputs["rewards"], backend=backend, inplace_backward=True,
                        **inputs["kwargs"])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + 1e-3 * z_loss).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_refuses_a_leaf_that_requires_grad(backend):
    """A parameter (or any leaf requiring grad) would silently be overwritten with its own gradient: refused by
    name, and left unchanged; the same values as a non-leaf are accepted."""
    skip_unavailable(backend)
    inputs = logits_inputs()
    leaf = torch.nn.Parameter(inputs["logits"].detach().clone())
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="inplace_backward=True would overwrite logits that are a leaf"):
        gk.gvpo_loss(leaf, inputs["labels"], inputs["rewards"], backend=backend, inplace_backward=True,
                     **inputs["kwargs"])
    torch.testing.assert_close(leaf.detach(), before, rtol=0, atol=0)
    gk.gvpo_loss(leaf * 1.0, inputs["labels"], inputs["rewards"], backend=backend, inplace_backward=True,
                 **inputs["kwargs"]).backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_refuses_rows_that_share_memory(backend):
    skip_unavailable(backend)
    inputs = logits_inputs()
    seqs, seq_len, vocab = inputs["logits"].shape
    source = torch.randn(1, seq_len, vocab, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_backward"):
        gk.gvpo_loss(source.expand(seqs, seq_len, vocab), inputs["labels"], inputs["rewards"], backend=backend,
                     inplace_backward=True, **inputs["kwargs"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_float16_gradient_under_loss_scaling(backend):
    """fp16 logits, upstream gradient 65536 (a GradScaler's): the in-place gradient is as exact as rounding
    65536 * dL/dlogits to float16 once (what the out-of-place path gives), with no extra entries flushed to 0."""
    skip_unavailable(backend)
    inputs = logits_inputs(dtype=torch.float16, vocab=3001)
    logits, labels, rewards, kwargs = inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"]
    grads = []
    for inplace in (False, True):
        leaf = logits.detach().clone().requires_grad_()
        x = leaf * 1.0
        x.retain_grad()
        loss = gk.gvpo_loss(x, labels, rewards, backend=backend, inplace_backward=inplace, **kwargs)
        (loss * 65536.0).backward()
        grads.append(x.grad)
    want, got = grads
    assert (got == 0).sum() <= (want == 0).sum() + want.numel() // 1000
    assert rel_err(got, want) <= 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_after_inplace_backward_is_a_clear_error(backend):
    skip_unavailable(backend)
    inputs = logits_inputs()
    loss = gk.gvpo_loss(inputs["logits"] * 1.0, inputs["labels"], inputs["rewards"], backend=backend,
                        inplace_backward=True, **inputs["kwargs"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


# ----------------------------------------------------------------------------------------------------------------
# double and second backward


@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend, path):
    """create_graph=True would give a gradient with no graph (a gradient penalty silently 0): it raises."""
    skip_unavailable(backend)
    if path == "logits":
        inputs = logits_inputs()
        leaves = [inputs["logits"]]
        loss = gk.gvpo_loss(inputs["logits"], inputs["labels"], inputs["rewards"], backend=backend,
                            **inputs["kwargs"])
    else:
        inputs = linear_inputs()
        leaves = [inputs["hidden"], inputs["weight"]]
        loss = gk.linear_gvpo_loss(inputs["hidden"], inputs["weight"], inputs["labels"], inputs["rewards"],
                                   bias=inputs["bias"], backend=backend, **inputs["kwargs"])
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(loss, leaves, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_through_the_linear_path_is_a_clear_error(backend):
    """retain_graph=True and an upstream gradient of 2: the second backward says why it cannot run."""
    skip_unavailable(backend)
    inputs = linear_inputs()
    loss = gk.linear_gvpo_loss(inputs["hidden"], inputs["weight"], inputs["labels"], inputs["rewards"],
                               bias=inputs["bias"], backend=backend, **inputs["kwargs"])
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        (2 * loss).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_through_the_logits_path_works(backend):
    """The logits path recomputes from saved O(N) state, so retain_graph=True gives the same gradient twice."""
    skip_unavailable(backend)
    inputs = logits_inputs()
    logits = inputs["logits"]
    loss = gk.gvpo_loss(logits, inputs["labels"], inputs["rewards"], backend=backend, **inputs["kwargs"])
    (3 * loss).backward(retain_graph=True)
    first = logits.grad.clone()
    (3 * loss).backward()
    torch.testing.assert_close(logits.grad, 2 * first)


# ----------------------------------------------------------------------------------------------------------------
# empty calls


def _empty_cases():
    """(name, logits-path inputs): no sequence, sequences of no token, nothing scored (mask all False)."""
    vocab = 11
    return {
        "no-sequence": dict(logits=torch.randn(0, 5, vocab), labels=torch.zeros(0, 5, dtype=torch.int64),
                            rewards=torch.zeros(0), kwargs=dict(group_size=2)),
        "no-sequence-packed": dict(logits=torch.randn(0, vocab), labels=torch.zeros(0, dtype=torch.int64),
                                   rewards=torch.zeros(0), kwargs=dict(group_size=2, cu_seqlens=torch.zeros(1,
                                                                       dtype=torch.int64))),
        "no-token": dict(logits=torch.randn(4, 0, vocab), labels=torch.zeros(4, 0, dtype=torch.int64),
                         rewards=torch.randn(4), kwargs=dict(group_size=2)),
        "nothing-scored": dict(logits=torch.randn(4, 5, vocab), labels=torch.randint(0, vocab, (4, 5)),
                               rewards=torch.randn(4), kwargs=dict(group_size=2, mask=torch.zeros(4, 5,
                                                                   dtype=torch.bool))),
        "nothing-scored-packed": dict(logits=torch.randn(9, vocab), labels=torch.full((9,), -100),
                                      rewards=torch.randn(2), kwargs=dict(group_ids=torch.tensor([3, 3]),
                                                                          cu_seqlens=torch.tensor([0, 4, 9]))),
    }


def _on_device(case):
    move = lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {k: ({kk: move(vv) for kk, vv in v.items()} if isinstance(v, dict) else move(v)) for k, v in case.items()}


@pytest.mark.parametrize("name", list(_empty_cases()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_calls(backend, name):
    """No sequence, no token, nothing scored: the reference's loss (0, or the rewards' own spread, which no
    parameter can change), zero gradients, on both paths."""
    skip_unavailable(backend)
    case = _on_device(_empty_cases()[name])
    logits, labels, rewards, kwargs = case["logits"], case["labels"], case["rewards"], case["kwargs"]
    want = gk.reference.gvpo_loss(logits.double(), labels, rewards.double(), **kwargs)
    loss, grad, stats = run(gk.gvpo_loss, logits.requires_grad_(), labels, rewards, kwargs, backend=backend)
    assert torch.isfinite(loss) and abs(loss.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))
    assert (grad == 0).all() and all(s.shape == rewards.shape for s in stats[:4])

    hidden_size = 6
    hidden = torch.randn(*labels.shape, hidden_size, device=DEVICE, requires_grad=True)
    weight = torch.randn(logits.shape[-1], hidden_size, device=DEVICE, requires_grad=True)
    loss, grads, _ = run_linear(gk.linear_gvpo_loss, hidden, weight, None, labels, rewards, kwargs, backend=backend)
    assert abs(loss.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))
    assert all((g == 0).all() for g in grads if g is not None)


# ----------------------------------------------------------------------------------------------------------------
# the first call


def test_first_eager_call_imports_no_compile_machinery():
    """An eager caller does not pay for torch.compile: no sympy, no fake tensors after a forward and backward of
    both losses (the torch.library ops, which import them, run only under torch.compile)."""
    code = textwrap.dedent("""
        import sys, torch, gvpo_kernels as gk
        before = set(sys.modules)
        x = torch.randn(4, 3, 7, requires_grad=True)
        labels, rewards = torch.randint(0, 7, (4, 3)), torch.randn(4)
        gk.gvpo_loss(x, labels, rewards, group_size=2, backend="torch").backward()
        w = torch.randn(7, 3, requires_grad=True)
        gk.linear_gvpo_loss(x[..., :3], w, labels, rewards, group_size=2, backend="torch").backward()
        new = set(sys.modules) - before
        heavy = sorted(m for m in new if m.startswith(("sympy", "torch._subclasses", "torch._dynamo",
                                                         "torch._inductor", "torch.fx.experimental")))
        print(len(new), heavy)
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_paths_with_a_hidden_size_of_zero(backend, dtype):
    """H = 0: the logits are the bias alone; the loss, the token statistics and every gradient are the
    reference's (hidden and weight get empty gradients), no reshape error."""
    skip_unavailable(backend)
    gen = torch.Generator().manual_seed(3)
    labels, rewards = torch.randint(0, 5, (2, 3), generator=gen).to(DEVICE), torch.randn(2, generator=gen).to(DEVICE)
    ref = torch.randn(2, 3, generator=gen).to(DEVICE)
    bias = torch.randn(5, generator=gen).to(DEVICE, dtype)
    results = []
    for fn, kw in ((gk.reference, {}), (gk, dict(backend=backend))):
        h = torch.zeros(2, 3, 0, device=DEVICE, dtype=dtype, requires_grad=True)
        w = torch.zeros(5, 0, device=DEVICE, dtype=dtype, requires_grad=True)
        b = bias.clone().requires_grad_()
        loss = fn.linear_gvpo_loss(h, w, labels, rewards, bias=b, group_size=2, ref_logprobs=ref, **kw)
        lp, ent = fn.linear_token_logprobs(h, w, labels, bias=b, return_entropy=True, **kw)
        (loss + lp.sum() + ent.sum()).backward()
        assert h.grad.shape == h.shape and w.grad.shape == w.shape
        results.append((loss.detach(), lp.detach(), ent.detach(), b.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=2e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_cu_seqlens(backend):
    """cu_seqlens as a strided view (every other entry of a longer tensor): read with its strides on every backend,
    the same result as its contiguous copy."""
    skip_unavailable(backend)
    inputs = make_inputs(Case(layout="packed", groups=(2, 2), seq_len=7, vocab=33), DEVICE)
    cu = inputs["kwargs"]["cu_seqlens"]
    strided = torch.stack([cu, torch.zeros_like(cu)], dim=1)[:, 0]
    assert strided.stride(0) == 2
    results = []
    for offsets in (strided, cu.contiguous()):
        logits = inputs["logits"].detach().clone().requires_grad_()
        kwargs = dict(inputs["kwargs"], cu_seqlens=offsets)
        loss = gk.gvpo_loss(logits, inputs["labels"], inputs["rewards"], backend=backend, **kwargs)
        lp = gk.token_logprobs(logits, inputs["labels"], mask=kwargs["mask"], cu_seqlens=offsets, backend=backend)
        (loss + lp.sum()).backward()
        results.append((loss.detach(), lp.detach(), logits.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_functorch_transforms_are_refused_plainly(transform):
    """torch.func cannot see through the fused kernels: a plain error that says so, not PyTorch's "must override
    setup_context"; the reference works under torch.func."""
    inputs = logits_inputs()
    labels, rewards, kwargs = inputs["labels"], inputs["rewards"], inputs["kwargs"]
    logits = inputs["logits"].detach()

    def loss_of(fn):
        return lambda x: fn(x, labels, rewards, **kwargs)

    apply = (lambda f: torch.func.grad(f)(logits)) if transform == "grad" else \
        (lambda f: torch.func.vmap(f)(logits[None].expand(2, *logits.shape)))
    with pytest.raises(RuntimeError, match="do not support functorch transforms"):
        apply(loss_of(gk.gvpo_loss))
    with pytest.raises(RuntimeError, match="do not support functorch transforms"):
        apply(lambda x: gk.token_logprobs(x, labels).sum())
    if transform == "grad":  # the reference under torch.func, our loss under autograd: one gradient
        leaf = logits.clone().requires_grad_()
        (want,) = torch.autograd.grad(loss_of(gk.gvpo_loss)(leaf), leaf)
        torch.testing.assert_close(apply(loss_of(gk.reference.gvpo_loss)), want, rtol=1e-5, atol=1e-6)
