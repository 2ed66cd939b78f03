"""Triton token stage: per-token log-prob by online log-sum-exp, and its backward by recomputing the softmax.

Forward, one program per token row: stream the row's V logits in BLOCK_V blocks. Each lane of the block keeps its
own running max m and sum of exponentials (an online log-sum-exp per lane, one exp per element: exp(-|x - m|)
either rescales the sum when x is the new max or is the term added), so no cross-warp reduction or barrier sits in
the loop; the lanes are combined once at the end. The label's logit is picked out of the block that holds it
during the same pass (no second read of the row). Only two floats per token leave the kernel (log-prob and
log-sum-exp); no softmax is ever stored.

Backward, one program per token row: recompute p = exp(x / T - lse) block by block and write
dL/dx = c * (onehot(target) - p), where c = grad_loss * dL/ds[seq] / T is the row's coefficient. Rows with
c == 0 (not scored, or in a group of one) are written with zeros without reading their logits.

Rows are addressed through a (B', T', V) view: token n is (n // T', n % T'), so padded logits sliced along T
(``logits[:, :-1]``) are read in place. Offsets are int64 (N x V passes 2^31 at 16k tokens x 152k vocabulary).
Loads and stores are 16 bytes wide: the row strides are specialised (Triton keys an int only on == 1 and on
divisibility by 16, so this adds at most a few variants and never recompiles for a new N or T), which tells the
compiler that a row starts 16-byte aligned when V is a multiple of 8 (bf16) or 4 (fp32). T' (``seq_len``) is not
specialised: it only divides.

Each launcher is a pure plan (:func:`forward_plan`, :func:`backward_plan`: shapes, dtypes, device -> Plan) and
:func:`~.plan.launch`; tests/aot.py compiles the same plans for sm_80 / sm_90 without a GPU.
"""

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..layout import Layout
from .plan import Device, Plan, check_flat, device_of, launch

MAX_WARPS = 8
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
FWD_VECTORS, BWD_VECTORS = 1, 2  # 16-byte vectors per thread per row block (the forward also prefetches one block)


@triton.jit(do_not_specialize=["seq_len"])
def token_logprob_fwd_kernel(
    # pointers
    x_ptr,  # (B', T', V) logits, last dim contiguous
    target_ptr,  # (N,) int64, -1 for rows that are not scored, >= V for labels outside this vocabulary slice
    logprob_ptr,  # (N,) float32 out
    lse_ptr,  # (N,) float32 out
    # sizes and strides
    vocab_size,
    seq_len,
    stride_x_b,
    stride_x_t,
    # scalars
    inv_temperature,
    # meta-parameters
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    if target >= 0:
        b = row // seq_len
        x_row = x_ptr + b * stride_x_b + (row - b * seq_len) * stride_x_t
        scale = inv_temperature * LOG2E  # the running state is in log2 units: exp2 needs no multiply
        # per-lane running max of x * scale; -FLT_MAX, not -inf, so that -inf logits give exp2(-inf) = 0, never NaN
        m = tl.full([BLOCK_V], -FLT_MAX, tl.float32)
        acc = tl.zeros([BLOCK_V], tl.float32)  # per-lane sum of exp2(x * scale - m)
        label_logit = tl.zeros((), tl.float32)  # stays 0 when target >= V (the label is in another slice)
        label_col = tl.where(target < vocab_size, target, -1)
        cols = tl.arange(0, BLOCK_V)
        b_cur = tl.load(x_row + cols, mask=cols < vocab_size, other=float("-inf"))
        for start in range(0, vocab_size, BLOCK_V):
            # the next block's load is issued before this one is used: two blocks in flight per thread
            ahead = cols + BLOCK_V
            b_ahead = tl.load(x_row + ahead, mask=ahead < vocab_size, other=float("-inf"))
            b_x = b_cur.to(tl.float32)
            b_xs = b_x * scale
            d = b_xs - m
            # exp2(-|d|) is the factor that rescales the old sum when x is the new max (d > 0), else the term to add
            b_e = tl.exp2(-tl.abs(d))
            acc = tl.where(d > 0, acc * b_e + 1.0, acc + b_e)
            m = tl.maximum(m, b_xs)
            if (label_col >= start) & (label_col < start + BLOCK_V):  # once per row: the block holding the label
                label_logit = tl.sum(tl.where(cols == label_col, b_x, 0.0), axis=0) * inv_temperature
            cols = ahead
            b_cur = b_ahead
        m_row = tl.max(m, axis=0)
        lse = (m_row + tl.log2(tl.sum(acc * tl.exp2(m - m_row), axis=0))) * LN2
        tl.store(logprob_ptr + row, label_logit - lse)
        tl.store(lse_ptr + row, lse)
    else:
        tl.store(logprob_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)


@triton.jit(do_not_specialize=["seq_len"])
def token_logprob_bwd_kernel(
    # pointers
    x_ptr,  # (B', T', V) logits
    target_ptr,  # (N,) int64, -1 for rows that are not scored
    token_seq_ptr,  # (N,) int64 sequence of each token
    lse_ptr,  # (N,) float32 from the forward
    grad_seq_ptr,  # (S,) float32 dL/ds
    grad_loss_ptr,  # () float32 upstream gradient of the loss
    dx_ptr,  # (B', T', V) out, may alias x_ptr
    # sizes and strides
    vocab_size,
    seq_len,
    stride_x_b,
    stride_x_t,
    stride_dx_b,
    stride_dx_t,
    # scalars
    inv_temperature,
    # meta-parameters
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row - b * seq_len
    x_row = x_ptr + b * stride_x_b + t * stride_x_t
    dx_row = dx_ptr + b * stride_dx_b + t * stride_dx_t
    target = tl.load(target_ptr + row)
    coef = tl.load(grad_seq_ptr + tl.load(token_seq_ptr + row)) * tl.load(grad_loss_ptr) * inv_temperature
    coef = tl.where(target >= 0, coef, 0.0)
    if coef != 0.0:
        scale = inv_temperature * LOG2E
        shift = tl.load(lse_ptr + row) * LOG2E  # p = exp2(x * scale - shift): one fma and one exp2 per logit
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + offs
            in_row = cols < vocab_size
            b_x = tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32)
            b_p = tl.exp2(b_x * scale - shift)
            # c * (onehot - p); the label's lane is found by an int32 compare against the block's offsets
            b_dx = tl.where(offs == (target - start).to(tl.int32), coef, 0.0) - coef * b_p
            tl.store(dx_row + cols, b_dx.to(dx_ptr.dtype.element_ty), mask=in_row)
    else:
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            zeros = tl.zeros([BLOCK_V], tl.float32)
            tl.store(dx_row + cols, zeros.to(dx_ptr.dtype.element_ty), mask=cols < vocab_size)


# ----------------------------------------------------------------------------------------------------------------
# plans


def block_params(vocab_size: int, itemsize: int, vectors: int) -> dict:
    """BLOCK_V and num_warps from V and the logits' element size: ``vectors`` 16-byte vectors per thread at
    MAX_WARPS warps (forward: 2048 bf16 / 1024 fp32 logits a block, which keeps its per-lane state at 64 / 48
    registers; backward: 4096 / 2048), and fewer warps for a small V."""
    per_thread = vectors * max(1, 16 // itemsize)
    block_v = min(triton.next_power_of_2(vocab_size), MAX_WARPS * 32 * per_thread)
    return dict(BLOCK_V=block_v, num_warps=max(1, min(MAX_WARPS, block_v // (32 * per_thread))))


def _check_rows(name: str, rows: torch.Tensor) -> None:
    if rows.dim() != 3 or rows.stride(-1) != 1:
        raise ValueError(f"{name} must be a (B', T', V) view with a contiguous last dimension, got shape "
                         f"{tuple(rows.shape)} with strides {rows.stride()}")


def forward_plan(rows, target, token_logprob, lse, temperature: float, device: Device) -> Plan:
    """The forward launch: rows (B', T', V) logits, target (N,) int64; writes token_logprob and lse, (N,) float32.

    Reads shapes, strides and dtypes only (works on meta tensors); ``device`` is unused (the choice depends on V
    and the dtype alone) but part of every plan's signature."""
    _check_rows("rows", rows)
    num_b, seq_len, vocab_size = rows.shape
    check_flat("target", target, torch.int64)
    for name, out in (("token_logprob", token_logprob), ("lse", lse)):
        check_flat(name, out, torch.float32)
    if target.numel() != num_b * seq_len or token_logprob.numel() != target.numel() or lse.numel() != target.numel():
        raise ValueError(f"target, token_logprob and lse must hold one element per row ({num_b * seq_len})")
    return Plan(
        token_logprob_fwd_kernel, (target.numel(),),
        (rows, target, token_logprob, lse, vocab_size, seq_len, rows.stride(0), rows.stride(1), 1.0 / temperature),
        block_params(vocab_size, rows.element_size(), FWD_VECTORS),
        label=f"token_fwd V={vocab_size} {str(rows.dtype).split('.')[-1]}",
    )


def backward_plan(rows, lay: Layout, lse, grad_seq_logprob, grad_loss, temperature: float, out,
                  device: Device) -> Plan:
    """The backward launch: rows (B', T', V) logits, lay.target / lay.token_seq (N,) int64, lse (N,) float32,
    grad_seq_logprob (S,) float32, grad_loss () float32; writes dL/dlogits into out (B', T', V), rows' shape (it
    may be rows itself). Reads shapes, strides and dtypes only."""
    _check_rows("rows", rows)
    _check_rows("out", out)
    if tuple(out.shape) != tuple(rows.shape):
        raise ValueError(f"out must have the shape of rows {tuple(rows.shape)}, got {tuple(out.shape)}")
    num_b, seq_len, vocab_size = rows.shape
    check_flat("target", lay.target, torch.int64)
    check_flat("token_seq", lay.token_seq, torch.int64)
    check_flat("lse", lse, torch.float32)
    check_flat("grad_seq_logprob", grad_seq_logprob, torch.float32)
    check_flat("grad_loss", grad_loss, torch.float32)
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must hold one element, got shape {tuple(grad_loss.shape)}")
    return Plan(
        token_logprob_bwd_kernel, (lay.num_tokens,),
        (rows, lay.target, lay.token_seq, lse, grad_seq_logprob, grad_loss, out,
         vocab_size, seq_len, rows.stride(0), rows.stride(1), out.stride(0), out.stride(1), 1.0 / temperature),
        block_params(vocab_size, rows.element_size(), BWD_VECTORS),
        label=f"token_bwd V={vocab_size} {str(rows.dtype).split('.')[-1]}",
    )


# ----------------------------------------------------------------------------------------------------------------
# launchers


def token_forward(rows: torch.Tensor, target: torch.Tensor, temperature: float):
    """rows (B', T', V), target (N,) -> token log-prob (N,) float32 (0 where target < 0), lse (N,) float32."""
    token_logprob = empty(target.shape, dtype=torch.float32, device=rows.device)
    lse = empty(target.shape, dtype=torch.float32, device=rows.device)
    launch(forward_plan(rows, target, token_logprob, lse, temperature, device_of(rows.device)))
    return token_logprob, lse


def token_backward(rows, lay: Layout, lse, grad_seq_logprob, grad_loss, temperature: float, out):
    """Write grad_loss * dL/ds[seq(n)] / T * (onehot - softmax(rows[n] / T)) into out (B', T', V)."""
    grad_loss = grad_loss.float().contiguous()
    launch(backward_plan(rows, lay, lse, grad_seq_logprob, grad_loss, temperature, out, device_of(rows.device)))
