"""The bad arguments every GVPO loss entry point refuses alike (rewards, grouping, mask, anchor, packing, devices,
reduction, beta, flags), each as (arguments, error type, the argument's name the message must carry)."""

import torch

DROP = object()  # changed(..., name=DROP) leaves the argument out


def changed(base, **changes):
    """base() with ``changes`` applied (DROP removes one)."""
    args = base()
    args.update(changes)
    return {k: v for k, v in args.items() if v is not DROP}


def sequence_errors(good, good_packed, B: int, T: int) -> dict:
    """Rows from valid padded arguments good() (B = 4 sequences of T tokens, group_size 2) and valid packed ones
    good_packed() (2 sequences, 6 tokens, cu_seqlens [0, 2, 6], group_size 2)."""
    return {
        "rewards-shape": (changed(good, rewards=torch.randn(B + 1)), ValueError, "rewards"),
        "rewards-int": (changed(good, rewards=torch.ones(B, dtype=torch.int64)), TypeError, "rewards"),
        "rewards-nan": (changed(good, rewards=torch.tensor([0.0, float("nan"), 1.0, 2.0])), ValueError, "rewards"),
        "rewards-inf": (changed(good, rewards=torch.tensor([0.0, float("inf"), 1.0, 2.0])), ValueError, "rewards"),
        "both-groupings": (changed(good, group_ids=torch.zeros(B, dtype=torch.int64)), ValueError, "group_size"),
        "no-grouping": (changed(good, group_size=DROP), ValueError, "group_ids"),
        "group-size-indivisible": (changed(good, group_size=3), ValueError, "group_size"),
        "group-size-zero": (changed(good, group_size=0), ValueError, "group_size"),
        "group-size-float": (changed(good, group_size=2.0), TypeError, "group_size"),
        "group-size-bool": (changed(good, group_size=True), TypeError, "group_size"),
        "group-size-huge": (changed(good, group_size=2**70), ValueError, "group_size"),
        "group-ids-shape": (changed(good, group_size=DROP, group_ids=torch.zeros(B - 1, dtype=torch.int64)),
                            ValueError, "group_ids"),
        "group-ids-float": (changed(good, group_size=DROP, group_ids=torch.zeros(B)), TypeError, "group_ids"),
        "mask-shape": (changed(good, mask=torch.ones(B, T + 1, dtype=torch.bool)), ValueError, "mask"),
        "mask-values": (changed(good, mask=torch.full((B, T), 2)), ValueError, "mask"),
        "ref-shape": (changed(good, ref_logprobs=torch.zeros(B, T + 1)), ValueError, "ref_logprobs"),
        "ref-int": (changed(good, ref_logprobs=torch.zeros(B, T, dtype=torch.int64)), TypeError, "ref_logprobs"),
        "ref-nan-scored": (changed(good, ref_logprobs=torch.full((B, T), float("nan"))), ValueError, "ref_logprobs"),
        "cu-seqlens-on-padded": (changed(good, cu_seqlens=torch.tensor([0, 3, 6, 9, 12])), ValueError, "cu_seqlens"),
        "cu-seqlens-missing": (changed(good_packed, cu_seqlens=DROP), ValueError, "cu_seqlens"),
        "cu-seqlens-start": (changed(good_packed, cu_seqlens=torch.tensor([1, 2, 6])), ValueError, "cu_seqlens"),
        "cu-seqlens-decreasing": (changed(good_packed, cu_seqlens=torch.tensor([0, 4, 3, 6]), rewards=torch.randn(3),
                                          group_size=1), ValueError, "cu_seqlens"),
        "cu-seqlens-end": (changed(good_packed, cu_seqlens=torch.tensor([0, 2, 5])), ValueError, "cu_seqlens"),
        "cu-seqlens-float": (changed(good_packed, cu_seqlens=torch.tensor([0.0, 2.0, 6.0])), TypeError, "cu_seqlens"),
        "cu-seqlens-2d": (changed(good_packed, cu_seqlens=torch.tensor([[0, 2, 6]])), ValueError, "cu_seqlens"),
        "rewards-packed-shape": (changed(good_packed, rewards=torch.randn(3)), ValueError, "rewards"),
        "rewards-device": (changed(good, rewards=torch.zeros(B, device="meta")), ValueError, "rewards"),
        "mask-device": (changed(good, mask=torch.ones(B, T, dtype=torch.bool, device="meta")), ValueError, "mask"),
        "ref-device": (changed(good, ref_logprobs=torch.zeros(B, T, device="meta")), ValueError, "ref_logprobs"),
        "group-ids-device": (changed(good, group_size=DROP, group_ids=torch.zeros(B, dtype=torch.int64,
                                                                                     device="meta")),
                             ValueError, "group_ids"),
        "cu-seqlens-device": (changed(good_packed, cu_seqlens=torch.tensor([0, 2, 6], device="meta")), ValueError,
                              "cu_seqlens"),
        "reduction": (changed(good, reduction="avg"), ValueError, "reduction"),
        "beta-zero": (changed(good, beta=0.0), ValueError, "beta"),
        "beta-negative": (changed(good, beta=-0.1), ValueError, "beta"),
        "beta-nan": (changed(good, beta=float("nan")), ValueError, "beta"),
        "beta-tensor": (changed(good, beta=torch.tensor(0.1)), TypeError, "beta"),
        "beta-huge-int": (changed(good, beta=10**400), ValueError, "beta"),
        "beta-past-float32": (changed(good, beta=1e39), ValueError, "beta"),
        "beta-subnormal": (changed(good, beta=1e-40), ValueError, "beta"),
        "return-stats-str": (changed(good, return_stats="False"), TypeError, "return_stats"),
        "rewards-not-tensor": (changed(good, rewards=[1.0] * B), TypeError, "rewards"),
        "mask-not-tensor": (changed(good, mask=[[True] * T] * B), TypeError, "mask"),
        "return-stats-int": (changed(good, return_stats=1), TypeError, "return_stats"),
    }
