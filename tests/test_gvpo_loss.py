"""Every backend against the float64 oracle: loss, logits gradient and per-sequence stats.

The grid changes one factor of the base case at a time, then adds combinations and a seeded random sample, so
that each layout, group structure, vocabulary, length, mask, anchor, temperature, reduction, beta, dtype,
ignore_index pattern, non-contiguous input and inplace_backward runs on every backend.
"""


import pytest
import torch
from helpers.cases import Case, check_against_oracle, make_inputs, run
from helpers.grids import CASES
from conftest import DEVICE

import gvpo_kernels as gk
from gvpo_kernels import cpu



@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_against_the_oracle(backend, case, small_chunks):
    """Every backend (tests/conftest.py's one list) on the grid; the torch backend in chunks of 7 rows."""
    small_chunks(case.vocab)
    check_against_oracle(case, backend, DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_agree_with_each_other_exactly_enough(backend):
    """Default chunking, a larger case: the backend matches the reference in fp32 to ~1e-6 relative."""
    inputs = make_inputs(Case(layout="packed", groups=(3, 5), seq_len=200, vocab=1000, temperature=0.9), DEVICE)
    got = run(gk.gvpo_loss, inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"],
              backend=backend)
    want = run(gk.reference.gvpo_loss, inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"])
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)


def test_zero_length_sequence_in_packed_input():
    """cu_seqlens may repeat an offset: that sequence has s = 0 and still takes part in its group's centring."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 17, generator=gen, requires_grad=True)
    labels = torch.randint(0, 17, (10,), generator=gen)
    kwargs = dict(cu_seqlens=torch.tensor([0, 4, 4, 10]), group_ids=torch.tensor([0, 0, 0]),
                  ref_logprobs=-torch.rand(10, generator=gen))
    rewards = torch.tensor([1.0, 0.0, 0.5])
    want = run(gk.reference.gvpo_loss, logits, labels, rewards, kwargs)
    for backend in ["torch", "triton"]:
        got = run(gk.gvpo_loss, logits, labels, rewards, kwargs, backend=backend)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
        assert got[2].seq_logprob[1] == 0


def test_upstream_gradient_scales_the_logits_gradient():
    """loss * 3 backpropagates 3x the gradient, also when the gradient was written in place."""
    for inplace in [False, True]:
        inputs = make_inputs(Case(groups=(3,), seq_len=5, vocab=11), DEVICE)
        expected = run(gk.reference.gvpo_loss, inputs["logits"].detach().clone().requires_grad_(),
                       inputs["labels"], inputs["rewards"], inputs["kwargs"])[1]
        logits = inputs["logits"]
        loss = gk.gvpo_loss(logits.clone(), inputs["labels"], inputs["rewards"], inplace_backward=inplace,
                            **inputs["kwargs"])
        (3 * loss).backward()
        torch.testing.assert_close(logits.grad, 3 * expected)


def test_inplace_backward_without_grad_leaves_logits_alone():
    inputs = make_inputs(Case(groups=(2,), seq_len=4, vocab=9), DEVICE)
    logits = inputs["logits"].detach()
    before = logits.clone()
    gk.gvpo_loss(logits, inputs["labels"], inputs["rewards"], inplace_backward=True, **inputs["kwargs"])
    torch.testing.assert_close(logits, before, rtol=0, atol=0)


def test_non_contiguous_vocabulary_dimension():
    """Logits whose last dimension is strided (a transposed tensor) are handled, not misread."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 13, 6, generator=gen).transpose(1, 2).requires_grad_()  # (4, 6, 13), stride(-1) = 6
    labels = torch.randint(0, 13, (4, 6), generator=gen)
    rewards = torch.randn(4, generator=gen)
    want = run(gk.reference.gvpo_loss, logits, labels, rewards, dict(group_size=2))
    for backend in ["torch", "triton"]:
        got = run(gk.gvpo_loss, logits, labels, rewards, dict(group_size=2), backend=backend)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


def test_module_matches_function():
    inputs = make_inputs(Case(groups=(2, 2), seq_len=6, vocab=19, temperature=0.8), DEVICE)
    kwargs = dict(inputs["kwargs"])
    options = {k: kwargs.pop(k) for k in ["temperature", "reduction", "beta"]}
    module = gk.GVPOLoss(**options, backend="torch")
    assert "beta=0.1" in repr(module)
    got = module(inputs["logits"], inputs["labels"], inputs["rewards"], **kwargs)
    want = gk.gvpo_loss(inputs["logits"], inputs["labels"], inputs["rewards"], **options, **kwargs)
    torch.testing.assert_close(got, want)


def test_auto_backend_runs_on_this_device():
    inputs = make_inputs(Case(groups=(2,), seq_len=3, vocab=5), DEVICE)
    got = run(gk.gvpo_loss, inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"])
    want = run(gk.reference.gvpo_loss, inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"])
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_garbage_logits_at_unscored_positions_do_not_leak(backend):
    """NaN and inf logits at padding positions leave the loss finite and their gradient exactly zero."""
    if backend == "cpu" and cpu.unavailable_reason() is not None:
        pytest.skip(cpu.unavailable_reason())
    inputs = make_inputs(Case(groups=(2, 2), seq_len=6, vocab=23), torch.device("cpu") if backend == "cpu" else DEVICE)
    logits, mask = inputs["logits"].detach().clone(), inputs["kwargs"]["mask"]
    want = run(gk.reference.gvpo_loss, logits.clone().requires_grad_(), inputs["labels"], inputs["rewards"],
               inputs["kwargs"])
    logits[~mask] = torch.where(torch.rand_like(logits[~mask]) < 0.5, float("nan"), float("inf"))
    got = run(gk.gvpo_loss, logits.requires_grad_(), inputs["labels"], inputs["rewards"], inputs["kwargs"],
              backend=backend)
    torch.testing.assert_close(got[0], want[0])
    assert (got[1][~mask] == 0).all()
    torch.testing.assert_close(got[1][mask], want[1][mask])


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_token_stage_writes_every_output(backend, entropy):
    """Every element of the token stage's outputs is written, scored or not (they start as NaN here)."""
    from gvpo_kernels import layout
    from gvpo_kernels.backend import LogitSpec
    from gvpo_kernels.functional import select_backend

    inputs = make_inputs(Case(groups=(2,), seq_len=9, vocab=31, mask="empty"), DEVICE)
    lay = layout.build(inputs["labels"], inputs["rewards"], vocab_size=31, **{
        k: v for k, v in inputs["kwargs"].items() if k in ("mask", "group_size", "ref_logprobs")})
    stats = select_backend(backend, DEVICE).token_forward(layout.as_rows(inputs["logits"].detach()), lay.target,
                                                          LogitSpec(), entropy)
    assert all(torch.isfinite(t).all() for t in stats if t is not None)
    assert (stats.entropy is not None) == entropy
    assert (stats.logprob[lay.target < 0] == 0).all() and (stats.norm[:, lay.target < 0] == 0).all()
