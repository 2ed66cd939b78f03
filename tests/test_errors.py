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
    "softcap-zero": (changed(good, softcap=0.0), ValueError, "softcap"),
    "softcap-nan": (changed(good, softcap=float("nan")), ValueError, "softcap"),
    "softcap-str": (changed(good, softcap="30"), TypeError, "softcap"),
    "logit-scale-negative": (changed(good, logit_scale=-2.0), ValueError, "logit_scale"),
    "logit-scale-inf": (changed(good, logit_scale=float("inf")), ValueError, "logit_scale"),
    "logit-scale-over-temperature": (changed(good, logit_scale=1e30, temperature=1e-30), ValueError,
                                     "logit_scale / temperature"),
    "entropy-coef-inf": (changed(good, entropy_coef=float("inf")), ValueError, "entropy_coef"),
    "entropy-coef-huge-int": (changed(good, entropy_coef=10**400), ValueError, "entropy_coef"),
    "entropy-coef-str": (changed(good, entropy_coef="0.1"), TypeError, "entropy_coef"),
    "temperature-negative": (changed(good, temperature=-1.0), ValueError, "temperature"),
    "temperature-inf": (changed(good, temperature=float("inf")), ValueError, "temperature"),
    "temperature-str": (changed(good, temperature="1"), TypeError, "temperature"),
    "beta-nan": (changed(good, beta=float("nan")), ValueError, "beta"),
    "beta-tensor": (changed(good, beta=torch.tensor(0.1)), TypeError, "beta"),
    "ignore-index-float": (changed(good, ignore_index=-100.0), TypeError, "ignore_index"),
    # numbers no kernel can hold, and flags that are not bools; beta <= 0 trains away from the reward
    "beta-zero": (changed(good, beta=0.0), ValueError, "beta"),
    "beta-negative": (changed(good, beta=-0.1), ValueError, "beta"),
    "beta-huge-int": (changed(good, beta=10**400), ValueError, "beta"),
    "beta-past-float32": (changed(good, beta=1e39), ValueError, "beta"),
    "beta-subnormal": (changed(good, beta=1e-40), ValueError, "beta"),
    "temperature-huge-int": (changed(good, temperature=10**400), ValueError, "temperature"),
    "temperature-denormal": (changed(good, temperature=1e-320), ValueError, "temperature"),
    "group-size-huge": (changed(good, group_size=2**70), ValueError, "group_size"),
    "group-size-bool": (changed(good, group_size=True), TypeError, "group_size"),
    "ignore-index-huge": (changed(good, ignore_index=2**70), ValueError, "ignore_index"),
    "inplace-backward-str": (changed(good, inplace_backward="no"), TypeError, "inplace_backward"),
    "inplace-backward-int": (changed(good, inplace_backward=1), TypeError, "inplace_backward"),
    "return-stats-str": (changed(good, return_stats="False"), TypeError, "return_stats"),
}
FUSED_ONLY_ERRORS = {
    "group-process-group-str": (changed(good, group_process_group="world"), TypeError, "group_process_group"),
    "vocab-process-group-int": (changed(good, vocab_process_group=0), TypeError, "vocab_process_group"),
}


@pytest.mark.parametrize("fn", [gk.gvpo_loss, gk.reference.gvpo_loss], ids=["fused", "reference"])
@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_is_named(name, fn):
    args, error, argument = ERRORS[name]
    with pytest.raises(error, match=argument):
        call(fn, args)


@pytest.mark.parametrize("name", list(FUSED_ONLY_ERRORS))
def test_bad_process_group_is_named(name):
    args, error, argument = FUSED_ONLY_ERRORS[name]
    with pytest.raises(error, match=argument):
        call(gk.gvpo_loss, args)


@pytest.mark.parametrize("fn", [gk.linear_gvpo_loss, gk.reference.linear_gvpo_loss], ids=["fused", "reference"])
@pytest.mark.parametrize("beta", [0.0, -1.0, 10**400])
def test_linear_path_rejects_bad_beta(fn, beta):
    with pytest.raises(ValueError, match="beta"):
        fn(torch.randn(B, T, 5), torch.randn(V, 5), torch.randint(0, V, (B, T)), torch.randn(B), group_size=2,
           beta=beta)


def test_numpy_integers_are_ints():
    """group_size=np.int64(2) (a config read through numpy) keeps working, as does ignore_index=np.int32(-100)."""
    np = pytest.importorskip("numpy")
    args = changed(good, group_size=np.int64(2), ignore_index=np.int32(-100), inplace_backward=np.bool_(False))
    want = call(gk.gvpo_loss, dict(args, group_size=2, ignore_index=-100, inplace_backward=False))
    torch.testing.assert_close(call(gk.gvpo_loss, args), want)


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

    monkeypatch.setattr(cpu, "unavailable_reason",
                        lambda device=None: "the C++ CPU kernels (csrc/) cannot be built: no compiler")
    with pytest.raises(RuntimeError, match="csrc"):
        call(gk.gvpo_loss, changed(good, backend="cpu"))
