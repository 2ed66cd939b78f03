"""Every bad input raises TypeError or ValueError naming the argument, from the fused entry and the oracle alike."""

import os

import pytest
import torch

import gvpo_kernels as gk

B, T, V = 4, 3, 7


def good():
    """Valid padded arguments; each test breaks one of them."""
    return dict(
        logits=torch.randn(B, T, V), labels=torch.randint(0, V, (B, T)), rewards=torch.randn(B), group_size=2,
    )


def good_packed():
    return dict(logits=torch.randn(6, V), labels=torch.randint(0, V, (6,)), rewards=torch.randn(2),
                group_size=2, cu_seqlens=torch.tensor([0, 2, 6]))


def call(fn, args):
    args = dict(args)
    return fn(args.pop("logits"), args.pop("labels"), args.pop("rewards"), **args)


def changed(base, **changes):
    args = base()
    args.update(changes)
    return {k: v for k, v in args.items() if v is not _DROP}


_DROP = object()
ERRORS = {
    "logits-not-tensor": (changed(good, logits=[[1.0]]), TypeError, "logits"),
    "logits-int": (changed(good, logits=torch.zeros(B, T, V, dtype=torch.int64)), TypeError, "logits"),
    "logits-1d": (changed(good, logits=torch.randn(V)), ValueError, "logits"),
    "logits-4d": (changed(good, logits=torch.randn(1, B, T, V)), ValueError, "logits"),
    "labels-float": (changed(good, labels=torch.zeros(B, T)), TypeError, "labels"),
    "labels-shape": (changed(good, labels=torch.zeros(B, T + 1, dtype=torch.int64)), ValueError, "labels"),
    "labels-out-of-range": (changed(good, labels=torch.full((B, T), V)), ValueError, "labels"),
    "labels-negative": (changed(good, labels=torch.full((B, T), -3)), ValueError, "labels"),
    "rewards-shape": (changed(good, rewards=torch.randn(B + 1)), ValueError, "rewards"),
    "rewards-int": (changed(good, rewards=torch.ones(B, dtype=torch.int64)), TypeError, "rewards"),
    "rewards-nan": (changed(good, rewards=torch.tensor([0.0, float("nan"), 1.0, 2.0])), ValueError, "rewards"),
    "rewards-inf": (changed(good, rewards=torch.tensor([0.0, float("inf"), 1.0, 2.0])), ValueError, "rewards"),
    "both-groupings": (changed(good, group_ids=torch.zeros(B, dtype=torch.int64)), ValueError, "group_size"),
    "no-grouping": (changed(good, group_size=_DROP), ValueError, "group_ids"),
    "group-size-indivisible": (changed(good, group_size=3), ValueError, "group_size"),
    "group-size-zero": (changed(good, group_size=0), ValueError, "group_size"),
    "group-size-float": (changed(good, group_size=2.0), TypeError, "group_size"),
    "group-ids-shape": (changed(good, group_size=_DROP, group_ids=torch.zeros(B - 1, dtype=torch.int64)),
                        ValueError, "group_ids"),
    "group-ids-float": (changed(good, group_size=_DROP, group_ids=torch.zeros(B)), TypeError, "group_ids"),
    "mask-shape": (changed(good, mask=torch.ones(B, T + 1, dtype=torch.bool)), ValueError, "mask"),
    "mask-values": (changed(good, mask=torch.full((B, T), 2)), ValueError, "mask"),
    "ref-shape": (changed(good, ref_logprobs=torch.zeros(B, T + 1)), ValueError, "ref_logprobs"),
    "ref-int": (changed(good, ref_logprobs=torch.zeros(B, T, dtype=torch.int64)), TypeError, "ref_logprobs"),
    "ref-nan-scored": (changed(good, ref_logprobs=torch.full((B, T), float("nan"))), ValueError, "ref_logprobs"),
    "cu-seqlens-on-padded": (changed(good, cu_seqlens=torch.tensor([0, 3, 6, 9, 12])), ValueError, "cu_seqlens"),
    "cu-seqlens-missing": (changed(good_packed, cu_seqlens=_DROP), ValueError, "cu_seqlens"),
    "cu-seqlens-start": (changed(good_packed, cu_seqlens=torch.tensor([1, 2, 6])), ValueError, "cu_seqlens"),
    "cu-seqlens-decreasing": (changed(good_packed, cu_seqlens=torch.tensor([0, 4, 3, 6]), rewards=torch.randn(3),
                                      group_size=1), ValueError, "cu_seqlens"),
    "cu-seqlens-end": (changed(good_packed, cu_seqlens=torch.tensor([0, 2, 5])), ValueError, "cu_seqlens"),
    "cu-seqlens-float": (changed(good_packed, cu_seqlens=torch.tensor([0.0, 2.0, 6.0])), TypeError, "cu_seqlens"),
    "cu-seqlens-2d": (changed(good_packed, cu_seqlens=torch.tensor([[0, 2, 6]])), ValueError, "cu_seqlens"),
    "rewards-packed-shape": (changed(good_packed, rewards=torch.randn(3)), ValueError, "rewards"),
    "labels-device": (changed(good, labels=torch.zeros(B, T, dtype=torch.int64, device="meta")), ValueError,
                      "labels"),
    "rewards-device": (changed(good, rewards=torch.zeros(B, device="meta")), ValueError, "rewards"),
    "mask-device": (changed(good, mask=torch.ones(B, T, dtype=torch.bool, device="meta")), ValueError, "mask"),
    "ref-device": (changed(good, ref_logprobs=torch.zeros(B, T, device="meta")), ValueError, "ref_logprobs"),
    "group-ids-device": (changed(good, group_size=_DROP, group_ids=torch.zeros(B, dtype=torch.int64,
                                                                                 device="meta")),
                         ValueError, "group_ids"),
    "cu-seqlens-device": (changed(good_packed, cu_seqlens=torch.tensor([0, 2, 6], device="meta")), ValueError,
                          "cu_seqlens"),
    "reduction": (changed(good, reduction="avg"), ValueError, "reduction"),
    "backend": (changed(good, backend="cuda"), ValueError, "backend"),
    "temperature-zero": (changed(good, temperature=0.0), ValueError, "temperature"),
    "temperature-negative": (changed(good, temperature=-1.0), ValueError, "temperature"),
    "temperature-inf": (changed(good, temperature=float("inf")), ValueError, "temperature"),
    "temperature-str": (changed(good, temperature="1"), TypeError, "temperature"),
    "beta-nan": (changed(good, beta=float("nan")), ValueError, "beta"),
    "beta-tensor": (changed(good, beta=torch.tensor(0.1)), TypeError, "beta"),
    "ignore-index-float": (changed(good, ignore_index=-100.0), TypeError, "ignore_index"),
}


@pytest.mark.parametrize("fn", [gk.gvpo_loss, gk.reference.gvpo_loss], ids=["fused", "reference"])
@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_is_named(name, fn):
    args, error, argument = ERRORS[name]
    with pytest.raises(error, match=argument):
        call(fn, args)


def test_unscored_labels_are_never_checked_as_token_ids():
    args = good()
    args["labels"][0, 0] = -100  # ignore_index
    args["labels"][1, 1] = V + 100
    args["mask"] = torch.ones(B, T, dtype=torch.bool)
    args["mask"][1, 1] = False
    call(gk.gvpo_loss, args)


def test_triton_backend_says_why_it_cannot_run(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("Triton runs here")
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        call(gk.gvpo_loss, changed(good, backend="triton"))


def test_cpu_backend_says_why_it_cannot_run(monkeypatch):
    """Where the C++ extension cannot be built (no compiler, say), backend='cpu' raises RuntimeError saying why."""
    from gvpo_kernels import cpu

    monkeypatch.setattr(cpu, "unavailable_reason", lambda: "the C++ CPU kernels (csrc/) cannot be built: no compiler")
    with pytest.raises(RuntimeError, match="csrc"):
        call(gk.gvpo_loss, changed(good, backend="cpu"))
