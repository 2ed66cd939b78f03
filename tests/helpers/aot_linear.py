"""The linear path's launches for the ahead-of-time compile test (tests/test_aot.py), and what their code must have.

    linear_plans(device) -> [Plan]        every kernel of gvpo_kernels/triton/linear.py as its launchers plan it for
                                          Qwen2.5-7B (H 3584, V 152064) and Llama-3-8B (H 4096, V 128256), bf16,
                                          N 16384 (hidden[:, :-1] of 16 x 1025), with and without a bias, on meta
                                          tensors: forward, forward storing exponentials (three GEMMs), the
                                          recomputing backward (four GEMMs), each also as its ENTROPY variant
                                          (labels "..._entropy"), the forward and backward as their SOFTCAP
                                          variants ("..._softcap"), and the elementwise G pass (and its ENTROPY
                                          variant, an entropy bonus)
    check(label, target, props)           AssertionError unless the compiled kernel has what a near-floor GEMM needs

``props`` is what tests/helpers/aot.py's compile_plan returns; the keys read here: regs, spill_st / spill_ld / scratch,
cp_async, tma, ld16 / ld8 (global loads by width). ``device`` is the Device that the target's GPU reports
(plan.device_for), so the plans are the ones a user of that GPU gets.
"""

import torch
import triton

from gvpo_kernels.backend import Coefs, LogitSpec
from gvpo_kernels.triton import linear
from gvpo_kernels.triton.plan import Device

N_TOKENS = 16384
SHAPES = ((3584, 152064), (4096, 128256))  # (H, V)
MAX_REGISTERS = 168  # three warpgroups' worth: room for a second CTA's warps on sm_90 (checked there only)
# The forwards with entropy reduce two sums per tile row (exponentials, and p log p terms), which costs sm_90 about
# 15-30 registers more than the plain forward (176-184 with Triton 3.9, no spills); their shared memory (96 / 128 KB)
# already holds an SM to one CTA of 8 warps, so that changes no occupancy. Their own bound, and no spills:
MAX_REGISTERS_ENTROPY_FORWARD = 192
# The soft-capped variants (Gemma-2) evaluate tanh over the whole tile in the epilogue (both branches of a
# branch-free tanh live at once): 128-240 registers on sm_90 with Triton 3.9, no spills. Every linear kernel's
# shared memory (96-128 KB of 227 KB) already holds an SM to one CTA of 8 warps, whose 256 threads may take up to
# 255 registers each: no occupancy is lost. Their bound is that, with no spills (checked for every kernel).
MAX_REGISTERS_SOFTCAP = 255
MIN_TOKENS_PER_TILE = 128


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def linear_plans(device: Device) -> list:
    """The plans of every linear kernel at real shapes (see the module docstring), labelled by kernel and shape."""
    plans = []
    f32, i64, bf16 = torch.float32, torch.int64, torch.bfloat16
    for hidden_size, vocab in SHAPES:
        rows = _meta((16, 1025, hidden_size), bf16)[:, :-1]  # hidden[:, :-1]: strided along T, read in place
        weight = _meta((vocab, hidden_size), bf16)
        config = linear.tile_config(bf16, hidden_size, device)
        store = linear.tile_config(bf16, hidden_size, device, store=True)
        scored, target = _meta((N_TOKENS,), i64), _meta((N_TOKENS,), i64)
        splits = linear.num_splits(N_TOKENS, vocab, config, device)
        chunk_rows = linear.CHUNK_BYTES // (vocab * 2) // config["BLOCK_N"] * config["BLOCK_N"]
        chunk = _meta((chunk_rows,), i64)
        norm = _meta((2, chunk_rows), f32)
        per_row = [_meta((chunk_rows,), f32) for _ in range(3)]
        exp = _meta((chunk_rows, vocab), bf16)
        tile_max = _meta((chunk_rows, triton.cdiv(vocab, store["BLOCK_V"])), f32)
        chunk_splits = linear.num_splits(chunk_rows, vocab, store, device)
        for bias in (None, _meta((vocab,), bf16)):
            for stats in (3, 4):  # 4: the ENTROPY variants (one more partial sum per split)
                parts = _meta((stats, splits, N_TOKENS), f32)
                chunk_parts = _meta((stats, chunk_splits, chunk_rows), f32)
                for spec in (LogitSpec(), LogitSpec(1.0, 30.0)):  # and the SOFTCAP variants (Gemma-2)
                    plans.append(linear.forward_plan(rows, weight, bias, scored, target, parts, spec, device))
                plans.append(linear.forward_plan(rows, weight, bias, chunk, target, chunk_parts, LogitSpec(), device,
                                                 exp, tile_max))
            for coefs in (Coefs(per_row[0]), Coefs(*per_row)):  # the loss's; with an entropy term
                for spec in (LogitSpec(), LogitSpec(1.0, 30.0)):
                    plans.append(linear.backward_plan(rows, weight, bias, chunk, target, norm, coefs, exp, spec,
                                                      device))
        for coefs in (Coefs(per_row[0]), Coefs(*per_row)):
            plans.append(linear.grad_from_exp_plan(exp, tile_max, _meta((chunk_rows,), i64), norm, coefs, LogitSpec(),
                                                   store["BLOCK_V"], device))
    return plans


def _tile(label: str) -> dict:
    """The tile of a label "... tile=128x128x64 w8 s4": tokens, vocab, hidden, warps, stages."""
    shape, warps, stages = label.split("tile=")[1].split()[:3]
    tokens, vocab, hidden = (int(x) for x in shape.split("x"))
    return dict(tokens=tokens, vocab=vocab, hidden=hidden, warps=int(warps[1:]), stages=int(stages[1:]))


def check(label: str, target: str, props: dict) -> None:
    """Raise AssertionError unless the compiled linear kernel ``label`` (bf16) for ``target`` ("sm_90", "gfx942")
    has no spills and tiles of >= 128 tokens, and, on NVIDIA, both operands loaded asynchronously (TMA, or as many
    16-byte cp.async as the stages of both tiles need); on sm_90 at most MAX_REGISTERS registers
    (MAX_REGISTERS_ENTROPY_FORWARD for the forwards with entropy: wgmma's accumulators live in registers, and a
    second CTA's warps need room). The elementwise G pass: no spills and 16-byte loads. (That a tile uses the
    target's tensor cores is tests/test_aot.py's own check, from aot.MMA.)"""
    spills = (props.get("spill_st") or 0) + (props.get("spill_ld") or 0) + (props.get("scratch") or 0)
    assert spills == 0, f"{label} {target}: {spills} bytes of spills"
    if label.startswith("linear_grad_from_exp"):
        assert props["ld16"] > 0, f"{label} {target}: no 16-byte loads ({props['ld16']}/{props['ld8']})"
        return
    tile = _tile(label)
    assert tile["tokens"] >= MIN_TOKENS_PER_TILE, f"{label}: tiles of fewer than {MIN_TOKENS_PER_TILE} tokens"
    if target.startswith("sm_"):
        # Both operands through the pipeline: per stage, each thread issues one 16-byte copy per 8 bf16 of either
        # tile. (AMD: Triton's stream pipeliner prefetches through registers; nothing of the kind to count.)
        per_stage = (tile["tokens"] + tile["vocab"]) * tile["hidden"] * 2 // 16 // (32 * tile["warps"])
        asynchronous = props.get("cp_async", 0) + props.get("tma", 0)
        assert props.get("tma", 0) or asynchronous >= tile["stages"] * per_stage, (
            f"{label} {target}: {asynchronous} cp.async, fewer than {tile['stages']} stages x {per_stage} copies "
            "per stage of both operands: an operand is loaded synchronously")
    if target == "sm_90":
        kernel = label.split()[0]
        entropy_forward = kernel.startswith("linear_fwd") and "_entropy" in kernel
        limit = (MAX_REGISTERS_SOFTCAP if kernel.endswith("_softcap")
                 else MAX_REGISTERS_ENTROPY_FORWARD if entropy_forward else MAX_REGISTERS)
        assert props["regs"] <= limit, f"{label} {target}: {props['regs']} registers > {limit}"
