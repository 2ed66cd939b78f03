"""linear_gvpo_loss on every backend against the float64 oracle: loss, d_hidden, d_weight, d_bias, stats.

The same one-factor-at-a-time grid as the logits path (without inplace_backward, which the linear path has no
use for), plus hidden sizes 16, 64, 96, a bias, and vocabularies that are not multiples of any block size.
"""

import pytest
import torch
from helpers.cases import Case, check_linear_against_oracle, make_inputs
from helpers.grids import LINEAR_CASES
from helpers.memory import LargestTensor
from conftest import DEVICE

import gvpo_kernels as gk
from gvpo_kernels import cpu, ops, torch_impl
from gvpo_kernels.ops import linear as ops_linear
from gvpo_kernels.ops.common import prepare
from gvpo_kernels.triton import linear as triton_linear

@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.id)
def test_against_the_oracle(backend, case, small_chunks_of):
    """Every backend (tests/conftest.py's one list) on the grid, in small chunks (torch: a few rows; C++: blocks of
    7 vocabulary rows per thread; Triton: chunks of BLOCK_N rows, the forward over several vocabulary splits);
    tests/test_cpu.py runs the C++ backend under three more chunkings."""
    small_chunks_of(backend)
    check_linear_against_oracle(case, backend, DEVICE)


@pytest.mark.parametrize("entropy", [False, True], ids=["loss", "loss-and-entropy"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_no_tensor_grows_with_tokens_times_vocabulary(backend, entropy, monkeypatch):
    """The forward and the gradients at N and 4N tokens: the largest tensor any op creates is the same, bounded by
    one float32 chunk of 32 token rows (torch), 64 (Triton's backward buffer) or one thread's d_hidden
    accumulator (cpu), far below N x V.

    The backend's stages run directly under the mode: through gk.linear_gvpo_loss it would see only the custom op
    (whose implementation runs below the mode), not the tensors its implementation creates."""
    if backend == "cpu" and (DEVICE.type != "cpu" or cpu.unavailable_reason() is not None):
        pytest.skip("the C++ kernels run on CPU tensors, once built")
    vocab, hidden_size = 2048, 16
    monkeypatch.setattr(torch_impl, "CHUNK_BYTES", 4 * vocab * 32)
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * vocab * 32)
    monkeypatch.setattr(cpu, "CHUNK_HIDDEN_BYTES", 1)  # chunks of 64 tokens when the logits are not kept
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 4 * 64 * 16)  # blocks of 16 vocabulary rows
    monkeypatch.setattr(triton_linear, "CHUNK_BYTES", 1)
    largest = []
    for seq_len in (32, 128):
        inputs = make_inputs(Case(hidden_size=hidden_size, vocab=vocab, groups=(4,), seq_len=seq_len), DEVICE)
        kwargs = inputs["kwargs"]
        data = ops.Data(inputs["labels"], inputs["rewards"], mask=kwargs["mask"], ref_logprobs=kwargs["ref_logprobs"])
        opts = ops.Options(group_size=kwargs["group_size"], backend=backend, entropy=entropy)
        call = prepare(vocab, DEVICE, data, opts)
        with LargestTensor() as mode:
            ops_linear.forward(inputs["hidden"].detach(), inputs["weight"].detach(), None, call, (True, True, False))
        largest.append(mode.largest)
        num_tokens = inputs["labels"].numel()
        assert mode.largest <= 64 * vocab * 4 < num_tokens * vocab * 4
    assert largest[0] == largest[1]


def test_linear_matches_logits_path():
    """linear_gvpo_loss(h, W, b) equals gvpo_loss(h @ W.T + b): the two entry points compute one function."""
    inputs = make_inputs(Case(hidden_size=32, bias=True, groups=(3, 3), seq_len=8, vocab=101), DEVICE)
    h, w, b = (inputs[k].detach() for k in ("hidden", "weight", "bias"))
    logits = (h @ w.T + b).requires_grad_()
    a = gk.gvpo_loss(logits, inputs["labels"], inputs["rewards"], backend="torch", **inputs["kwargs"])
    c = gk.linear_gvpo_loss(h, w, inputs["labels"], inputs["rewards"], bias=b, backend="torch",
                            **inputs["kwargs"])
    torch.testing.assert_close(a, c)


def test_module_matches_function():
    inputs = make_inputs(Case(hidden_size=16, groups=(2, 2), seq_len=5, vocab=33), DEVICE)
    args = (inputs["hidden"], inputs["weight"], inputs["labels"], inputs["rewards"])
    module = gk.LinearGVPOLoss(beta=0.1, backend="torch")
    assert "beta=0.1" in repr(module)
    kwargs = {k: v for k, v in inputs["kwargs"].items() if k not in ("beta", "temperature", "reduction")}
    torch.testing.assert_close(module(*args, **kwargs), gk.linear_gvpo_loss(*args, **kwargs))


@pytest.mark.parametrize("bad, error, name", [
    (dict(hidden=torch.zeros(4, 3, 8, dtype=torch.int64)), TypeError, "hidden"),
    (dict(hidden=torch.zeros(8)), ValueError, "hidden"),
    (dict(weight=torch.zeros(11, 9)), ValueError, "weight"),
    (dict(weight=torch.zeros(11, 8, 1)), ValueError, "weight"),
    (dict(weight=torch.zeros(11, 8, dtype=torch.float64)), TypeError, "weight"),
    (dict(bias=torch.zeros(10)), ValueError, "bias"),
    (dict(bias=torch.zeros(11, dtype=torch.float64)), TypeError, "bias"),
    (dict(bias=torch.zeros(11, device="meta")), ValueError, "bias"),
    (dict(weight=torch.zeros(11, 8, device="meta")), ValueError, "weight"),
    (dict(labels=torch.zeros(4, 2, dtype=torch.int64)), ValueError, "labels"),
    (dict(labels=torch.full((4, 3), 11)), ValueError, "labels"),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("fn", [gk.linear_gvpo_loss, gk.reference.linear_gvpo_loss], ids=["fused", "reference"])
def test_bad_input_is_named(bad, error, name, fn):
    args = dict(hidden=torch.randn(4, 3, 8), weight=torch.randn(11, 8), bias=None,
                labels=torch.randint(0, 11, (4, 3)), rewards=torch.randn(4))
    args.update(bad)
    with pytest.raises(error, match=name):
        fn(args.pop("hidden"), args.pop("weight"), args.pop("labels"), args.pop("rewards"), group_size=2, **args)
