"""Every bad input raises TypeError or ValueError naming the argument, from the fused entry and the oracle alike."""

import os

import pytest
import torch

import gvpo_kernels as gk
from helpers.bad_inputs import changed, sequence_errors

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


ERRORS = {
    "logits-not-tensor": (changed(good, logits=[[1.0]]), TypeError, "logits"),
    "logits-int": (changed(good, logits=torch.zeros(B, T, V, dtype=torch.int64)), TypeError, "logits"),
    "logits-1d": (changed(good, logits=torch.randn(V)), ValueError, "logits"),
    "logits-4d": (changed(good, logits=torch.randn(1, B, T, V)), ValueError, "logits"),
    "labels-float": (changed(good, labels=torch.zeros(B, T)), TypeError, "labels"),
    "labels-shape": (changed(good, labels=torch.zeros(B, T + 1, dtype=torch.int64)), ValueError, "labels"),
    "labels-out-of-range": (changed(good, labels=torch.full((B, T), V)), ValueError, "labels"),
    "labels-negative": (changed(good, labels=torch.full((B, T), -3)), ValueError, "labels"),
    "labels-device": (changed(good, labels=torch.zeros(B, T, dtype=torch.int64, device="meta")), ValueError,
                      "labels"),
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
    "ignore-index-float": (changed(good, ignore_index=-100.0), TypeError, "ignore_index"),
    # numbers no kernel can hold, and flags that are not bools; beta <= 0 trains away from the reward
    "temperature-huge-int": (changed(good, temperature=10**400), ValueError, "temperature"),
    "temperature-denormal": (changed(good, temperature=1e-320), ValueError, "temperature"),
    "ignore-index-huge": (changed(good, ignore_index=2**70), ValueError, "ignore_index"),
    "inplace-backward-str": (changed(good, inplace_backward="no"), TypeError, "inplace_backward"),
    "inplace-backward-int": (changed(good, inplace_backward=1), TypeError, "inplace_backward"),
    **sequence_errors(good, good_packed, B, T),
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
