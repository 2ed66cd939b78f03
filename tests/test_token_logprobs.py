"""gk.token_logprobs and gk.linear_token_logprobs against the float64 oracle: log-probs, entropy and their
gradients (under random upstream gradients), on every backend, over the layouts and options of the losses."""

import pytest
import torch
from helpers.cases import SLACK, Case, assert_within_pytorch_error, make_inputs, one_factor, rel_err
from conftest import DEVICE
from helpers.memory import LargestTensor

import gvpo_kernels as gk
from gvpo_kernels import cpu

CASES = [c for c in one_factor(Case(groups=(3, 2), seq_len=17, vocab=257))
         if c.anchor and c.reduction == "mean" and c.beta == 0.1 and c.groups != (1,) and c.entropy_coef == 0]
LINEAR_CASES = [c.replace(hidden_size=16, bias=c.layout == "packed") for c in CASES if c.vocab != 1]
BACKENDS = ["torch", "cpu", "triton"]


def skip_unavailable(backend):
    if backend == "cpu" and (DEVICE.type != "cpu" or cpu.unavailable_reason() is not None):
        pytest.skip("the C++ kernels run on CPU tensors, once built")


def stats_kwargs(inputs):
    kw = inputs["kwargs"]
    return {k: kw[k] for k in ("mask", "cu_seqlens", "temperature", "softcap", "logit_scale") if k in kw}


def call(fn, leaves, labels, kwargs, entropy, upstream, dtype=None, **extra):
    """Outputs and the gradients at fresh leaves for sum(upstream_lp * logprob + upstream_ent * entropy)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in leaves]
    args = leaves[:1] if len(leaves) == 1 else leaves[:2]
    bias = {} if len(leaves) == 1 else dict(bias=leaves[2])
    out = fn(*args, labels, return_entropy=entropy, **bias, **kwargs, **extra)
    outs = list(out) if entropy else [out]
    total = sum((o * u.to(o.dtype)).sum() for o, u in zip(outs, upstream))
    total.backward()
    return [o.detach() for o in outs], [None if t is None else t.grad for t in leaves]


def check(case, backend, entropy):
    inputs = make_inputs(case, DEVICE)
    labels, kwargs = inputs["labels"], stats_kwargs(inputs)
    if case.hidden_size:
        fused, oracle_fn = gk.linear_token_logprobs, gk.reference.linear_token_logprobs
        leaves = [inputs["hidden"], inputs["weight"], inputs["bias"]]
    else:
        fused, oracle_fn = gk.token_logprobs, gk.reference.token_logprobs
        leaves = [inputs["logits"]]
    gen = torch.Generator().manual_seed(7)
    upstream = [torch.randn(labels.shape, generator=gen).to(DEVICE) for _ in range(2 if entropy else 1)]
    oracle = call(oracle_fn, leaves, labels, kwargs, entropy, upstream, torch.float64)
    baseline = call(oracle_fn, leaves, labels, kwargs, entropy, upstream)
    got = call(fused, leaves, labels, kwargs, entropy, upstream, backend=backend)

    for out in got[0]:
        assert out.dtype == torch.float32 and out.shape == labels.shape
    scored = labels != -100
    if kwargs.get("mask") is not None:
        scored &= kwargs["mask"]
    for out in got[0]:
        assert (out[~scored] == 0).all(), "unscored positions must hold 0"
    names = ["logprob", "entropy"][: len(got[0])] + ["grad"] * len(leaves)
    assert_within_pytorch_error(names, got[0] + got[1], baseline[0] + baseline[1], oracle[0] + oracle[1],
                                SLACK[case.dtype])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs(case, backend):
    skip_unavailable(backend)
    check(case, backend, entropy=False)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs(case, backend):
    skip_unavailable(backend)
    check(case, backend, entropy=False)


@pytest.mark.parametrize("case", CASES + LINEAR_CASES, ids=lambda c: ("linear-" if c.hidden_size else "") + c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_and_entropy(case, backend):
    skip_unavailable(backend)
    check(case, backend, entropy=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_with_minus_inf_columns(backend):
    skip_unavailable(backend)
    """Vocabulary masking: -inf columns have p = 0 and add nothing to the entropy or its gradient."""
    inputs = make_inputs(Case(groups=(2, 2), seq_len=5, vocab=50, mask="none"), DEVICE)
    logits = inputs["logits"].detach().clone()
    logits[..., 25:] = float("-inf")
    labels = inputs["labels"] % 25
    upstream = [torch.randn(labels.shape, device=DEVICE) for _ in range(2)]
    (lp, ent), (grad,) = call(gk.token_logprobs, [logits], labels, {}, True, upstream, backend=backend)
    (lp64, ent64), (grad64,) = call(gk.reference.token_logprobs, [logits], labels, {}, True, upstream,
                                    torch.float64)
    assert torch.isfinite(ent).all() and torch.isfinite(grad).all() and (grad[..., 25:] == 0).all()
    assert rel_err(lp, lp64) < 1e-5 and rel_err(ent, ent64) < 1e-5 and rel_err(grad, grad64) < 1e-5


def test_every_backend_implements_the_contract():
    """Every registered backend provides each member of gvpo_kernels.backend.Backend, with its parameters, and its
    linear work each member of LinearWork: the contract is code, checked, not prose probed with hasattr."""
    import inspect

    from gvpo_kernels import backend as contract

    members = {name: inspect.signature(fn) for name, fn in vars(contract.Backend).items()
               if callable(fn) and not name.startswith("_")}
    work_members = [name for name in vars(contract.LinearWork) if not name.startswith("_")]
    assert set(members) >= {"token_forward", "token_backward", "group_stage", "linear_work", "unavailable_reason"}
    for name in contract.names():
        if contract.unavailable_reason(name, DEVICE) is not None:
            continue
        impl = contract.get(name)
        assert impl.name == name
        for member, signature in members.items():
            got = inspect.signature(getattr(impl, member))
            want = [p for p in signature.parameters if p != "self"]
            assert list(got.parameters)[:len(want)] == want, (name, member, got)
        work = impl.linear_work(torch.zeros(1, 2, 3, device=DEVICE), torch.zeros(5, 3, device=DEVICE), None,
                                torch.zeros(2, dtype=torch.int64, device=DEVICE), contract.LogitSpec(),
                                (True, True, False), False)
        for member in work_members:
            assert hasattr(work, member), (name, member)


def test_log_probs_match_the_loss_statistics():
    """The sum of a sequence's token log-probs is the loss's s_i: one function, two entry points."""
    inputs = make_inputs(Case(groups=(3, 3), seq_len=9, vocab=101, layout="packed"), DEVICE)
    kwargs = stats_kwargs(inputs)
    lp = gk.token_logprobs(inputs["logits"].detach(), inputs["labels"], **kwargs)
    _, stats = gk.gvpo_loss(inputs["logits"].detach(), inputs["labels"], inputs["rewards"], return_stats=True,
                            **inputs["kwargs"])
    cu = kwargs["cu_seqlens"].tolist()
    sums = torch.stack([lp[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
    torch.testing.assert_close(sums, stats.seq_logprob, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_never_allocates_tokens_times_vocabulary(backend, entropy, monkeypatch):
    """Forward and backward at N and 4N tokens: the largest tensor any op creates is the same, one chunk (as
    tests/test_linear.py checks for the loss, with the same chunk sizes)."""
    from gvpo_kernels import torch_impl
    from gvpo_kernels.triton import linear as triton_linear

    skip_unavailable(backend)
    vocab, hidden_size = 2048, 16
    monkeypatch.setattr(torch_impl, "CHUNK_BYTES", 4 * vocab * 32)
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * vocab * 32)
    monkeypatch.setattr(cpu, "CHUNK_HIDDEN_BYTES", 1)
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 4 * 64 * 16)
    monkeypatch.setattr(triton_linear, "CHUNK_BYTES", 1)
    largest = []
    for seq_len in (32, 128):
        inputs = make_inputs(Case(hidden_size=hidden_size, vocab=vocab, groups=(4,), seq_len=seq_len), DEVICE)
        with LargestTensor() as mode:
            out = gk.linear_token_logprobs(inputs["hidden"], inputs["weight"], inputs["labels"],
                                           return_entropy=entropy, backend=backend)
            (out[0].sum() + out[1].sum() if entropy else out.sum()).backward()
        largest.append(mode.largest)
        # one float32 chunk of 64 rows at most (d_weight, V x H, is smaller here); nothing is N x V
        assert mode.largest <= 64 * vocab * 4 < inputs["labels"].numel() * vocab * 4
    assert largest[0] == largest[1]


@pytest.mark.parametrize("bad, error, name", [
    (dict(labels=torch.full((2, 3), 5)), ValueError, "labels"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap="30"), TypeError, "softcap"),
    (dict(logit_scale=-1.0), ValueError, "logit_scale"),
    (dict(logit_scale=1e30, temperature=1e-30), ValueError, "logit_scale / temperature"),
    (dict(return_entropy="yes"), TypeError, "return_entropy"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(cu_seqlens=torch.tensor([0, 6])), ValueError, "cu_seqlens"),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("fn", [gk.token_logprobs, gk.reference.token_logprobs], ids=["fused", "reference"])
def test_bad_input_is_named(fn, bad, error, name):
    args = dict(logits=torch.randn(2, 3, 5), labels=torch.zeros(2, 3, dtype=torch.int64))
    args.update(bad)
    with pytest.raises(error, match=name):
        fn(args.pop("logits"), args.pop("labels"), **args)
