"""The Triton linear path's own pieces in the interpreter: the three-GEMM schedule (on-policy, and with an anchor
in chunks of whole groups) against the four-GEMM one and the float64 oracle, strided and stride-0 biases, nothing scored, and chunk buffers that do not grow with N.

(tests/test_linear.py checks the public loss on every backend; these call gvpo_kernels.triton.linear directly.)
"""

import pytest
import torch
from cases import Case, make_inputs, rel_err, SLACK
from conftest import DEVICE
from test_linear import LargestTensor

import gvpo_kernels as gk
from gvpo_kernels import layout
from gvpo_kernels.triton import linear

pytestmark = pytest.mark.skipif(DEVICE.type == "cpu" and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton runs on the CPU only in its interpreter")


def _call(inputs, bias, *, schedule, beta=0.1, temperature=1.0):
    """loss, s, r, dL/ds, d_hidden, d_weight, d_bias from linear_loss_and_grads (three GEMMs on-policy) or from
    linear_forward + group stage + linear_backward (four GEMMs)."""
    kwargs = {k: v for k, v in inputs["kwargs"].items() if k in ("mask", "group_size", "group_ids", "cu_seqlens",
                                                                 "ref_logprobs")}
    hidden, weight = inputs["hidden"].detach(), inputs["weight"].detach()
    lay = layout.build(inputs["labels"], inputs["rewards"], vocab_size=weight.shape[0], **kwargs)
    rows = layout.as_rows(hidden)
    needs = (True, True, bias is not None)
    if schedule == "three":
        return linear.linear_loss_and_grads(rows, weight, bias, lay, beta, temperature, needs)
    token_logprob, lse = linear.linear_forward(rows, weight, bias, lay.target, temperature)
    loss, *stats = linear.group_stage(token_logprob, lay, beta)
    grads = linear.linear_backward(rows, weight, bias, lay, lse, stats[2], torch.ones(()), temperature)
    return (loss, *stats, *grads)


def _oracle(inputs, bias, temperature=1.0):
    leaves = [t.detach().double().requires_grad_() for t in (inputs["hidden"], inputs["weight"])]
    b = None if bias is None else bias.detach().double().requires_grad_()
    kwargs = {k: v for k, v in inputs["kwargs"].items() if k not in ("beta", "temperature")}
    loss = gk.reference.linear_gvpo_loss(*leaves, inputs["labels"], inputs["rewards"].double(), bias=b, beta=0.1,
                                         temperature=temperature, **kwargs)
    loss.backward()
    return loss, leaves[0].grad, leaves[1].grad, None if b is None else b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_three_gemms_equal_four_gemms_and_the_oracle(dtype, monkeypatch):
    """On-policy: the three-GEMM schedule (stored exponentials, G formed in place) against the oracle, in chunks
    of one BLOCK_N of rows, with a bias, a temperature and unscored tokens."""
    monkeypatch.setattr(linear, "CHUNK_BYTES", 1)
    case = Case(hidden_size=32, vocab=333, seq_len=70, groups=(3, 2), anchor=False, bias=True, dtype=dtype,
                temperature=0.7)
    inputs = make_inputs(case, DEVICE)
    bias = inputs["bias"].detach()
    three = _call(inputs, bias, schedule="three", temperature=0.7)
    four = _call(inputs, bias, schedule="four", temperature=0.7)
    oracle = _oracle(inputs, bias, temperature=0.7)
    for name, got, other, want in zip(["loss", "d_hidden", "d_weight", "d_bias"], [three[0], *three[4:]],
                                      [four[0], *four[4:]], oracle):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) <= rel_err(other, want) + SLACK[dtype], name
    for got, other in zip(three[1:4], four[1:4]):
        torch.testing.assert_close(got, other)


@pytest.mark.parametrize("rows_per_chunk", [64, 128, 64 * 40], ids=["group-too-big", "whole-groups", "one-chunk"])
def test_three_gemms_with_an_anchor_in_chunks_of_whole_groups(rows_per_chunk, monkeypatch):
    """With an anchor, chunks of whole groups (shuffled group ids, sizes 1-3) run three GEMMs, each chunk's group
    stage right after its forward; a group larger than a chunk falls back to four. Both equal the four-GEMM
    schedule and the oracle."""
    inputs = make_inputs(Case(hidden_size=16, vocab=130, seq_len=40, groups=(2, 3, 1, 2), shuffled=True,
                              bias=True, temperature=0.7), DEVICE)
    monkeypatch.setattr(linear, "CHUNK_BYTES", rows_per_chunk * 130 * 4)
    bias = inputs["bias"].detach()
    calls = []
    grad_from_exp = linear.grad_from_exp_plan
    monkeypatch.setattr(linear, "grad_from_exp_plan", lambda *a, **k: calls.append(1) or grad_from_exp(*a, **k))
    three = _call(inputs, bias, schedule="three", temperature=0.7)
    assert bool(calls) == (rows_per_chunk != 64), "three GEMMs exactly when every group fits a chunk"
    four = _call(inputs, bias, schedule="four", temperature=0.7)
    oracle = _oracle(inputs, bias, temperature=0.7)
    for name, got, other, want in zip(["loss", "d_hidden", "d_weight", "d_bias"], [three[0], *three[4:]],
                                      [four[0], *four[4:]], oracle):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) <= rel_err(other, want) + SLACK[torch.float32], name
    for got, other in zip(three[1:4], four[1:4]):
        torch.testing.assert_close(got, other)


@pytest.mark.parametrize("schedule", ["three", "four"])
@pytest.mark.parametrize("kind", ["strided", "stride0"])
def test_bias_with_any_stride(kind, schedule, monkeypatch):
    """A strided bias (every other element of a longer tensor) and an expanded one (stride 0) give what their
    contiguous copies give, on both schedules."""
    monkeypatch.setattr(linear, "CHUNK_BYTES", 1)
    inputs = make_inputs(Case(hidden_size=16, vocab=203, seq_len=40, groups=(2, 2), anchor=schedule == "four"),
                         DEVICE)
    vocab = inputs["weight"].shape[0]
    bias = torch.randn(2 * vocab)[::2] if kind == "strided" else torch.randn(1).expand(vocab)
    got = _call(inputs, bias, schedule=schedule)
    want = _call(inputs, bias.contiguous(), schedule=schedule)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("schedule", ["three", "four"])
def test_nothing_scored_gives_zero_gradients(schedule):
    """No scored token: no launch over zero rows (it divided by zero), the loss the oracle gives, zero gradients."""
    inputs = make_inputs(Case(hidden_size=16, vocab=65, seq_len=5, groups=(2,), anchor=schedule == "four",
                              bias=True), DEVICE)
    inputs["kwargs"]["mask"] = torch.zeros_like(inputs["labels"], dtype=torch.bool)
    got = _call(inputs, inputs["bias"].detach(), schedule=schedule)
    torch.testing.assert_close(got[0], _oracle(inputs, inputs["bias"])[0].float())
    for grad in got[4:]:
        assert grad is not None and not grad.isnan().any() and (grad == 0).all()


def test_three_gemm_buffers_do_not_grow_with_tokens(monkeypatch):
    """The three-GEMM schedule at N and 4N tokens: the largest tensor is the same, one chunk of BLOCK_N rows."""
    monkeypatch.setattr(linear, "CHUNK_BYTES", 1)
    vocab, largest = 256, []
    for seq_len in (32, 128):
        inputs = make_inputs(Case(hidden_size=16, vocab=vocab, seq_len=seq_len, groups=(4,), anchor=False), DEVICE)
        with LargestTensor() as mode:
            _call(inputs, None, schedule="three")
        largest.append(mode.largest)
    block_n = linear.tile_config(torch.float32, 16, linear.device_of(DEVICE))["BLOCK_N"]
    assert largest[0] == largest[1] <= block_n * vocab * 4 < 4 * 64 * vocab * 4


@pytest.mark.parametrize("anchor", [False, True], ids=["three", "four"])
def test_gradients_not_asked_for_are_not_computed(anchor):
    """needs = (hidden only): d_weight and d_bias are None (their GEMMs skipped), d_hidden as with all three."""
    inputs = make_inputs(Case(hidden_size=16, vocab=130, seq_len=20, groups=(2, 2), anchor=anchor, bias=True),
                         DEVICE)
    kwargs = {k: v for k, v in inputs["kwargs"].items() if k in ("mask", "group_size", "ref_logprobs")}
    lay = layout.build(inputs["labels"], inputs["rewards"], vocab_size=130, **kwargs)
    args = (layout.as_rows(inputs["hidden"].detach()), inputs["weight"].detach(), inputs["bias"].detach(), lay, 0.1,
            1.0)
    some = linear.linear_loss_and_grads(*args, (True, False, False))
    every = linear.linear_loss_and_grads(*args, (True, True, True))
    assert some[5] is None and some[6] is None and every[5] is not None and every[6] is not None
    torch.testing.assert_close(some[4], every[4])
