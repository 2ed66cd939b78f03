"""Triton token stage: per-token log-prob (and entropy) by online log-sum-exp, and its backward by recomputing the
softmax; one program per token row, addressed through a (B', T', V) view (``logits[:, :-1]`` read in place).

Forward: each lane of a BLOCK_V block keeps its own running max m of y (the logit, soft-capped under SOFTCAP) and
sum of exp2((y - m) s log2 e), one exp per element (exp2(-|d|) rescales the sum when y is the new max, else is the
term added); with ENTROPY one more sum, A = sum e d, so that H = log L - A / L. Lanes merge once at the end; the
label's y comes from the block that holds it. Out go the log-prob and the row's normaliser (shift, log_sum)
(gvpo_kernels/backend.py), nothing N x V.

Backward: log p = (y - shift) s - log_sum, block by block, then dx = (c_lp (onehot - p) + c_ent p (-log p - H))
dy/dx from the per-token coefficients (backend.Coefs); rows whose coefficients are 0 get zeros unread. -inf logits
add exactly 0 everywhere (``xlogx_term``: never 0 * -inf). Offsets are int64; loads and stores 16 bytes wide (row
strides specialised; N and T' are not, so a new batch never recompiles). Each launcher is a pure plan
(:func:`forward_plan`, :func:`backward_plan`) and :func:`~.plan.launch`; tests/test_aot.py compiles the same plans
for nine NVIDIA and AMD targets without a GPU.
"""

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..backend import Coefs, LogitSpec, TokenStats
from .plan import Device, Plan, check_flat, device_of, launch, row_options

MAX_WARPS = 8
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
FWD_VECTORS, BWD_VECTORS = 1, 2  # 16-byte vectors per thread per row block (the forward also prefetches one block)


@triton.jit
def xlogx_term(e, d):
    """e * d for e = exp2(d) (or exp(d)): the term of a sum of p log p, exactly 0 where d = -inf (never 0 * -inf)."""
    return e * tl.maximum(d, -FLT_MAX)


@triton.jit
def tanh(x):
    """tanh in float32 on every target (Triton has no portable tanh): the odd Taylor polynomial of degree 15 where
    |x| < 0.5 (relative error < 1e-8), else sign(x) (1 - 2 / (exp(2 |x|) + 1)); |x| clamped at 20, where tanh is
    1 in float32 (no inf arithmetic in the branch not taken)."""
    x = tl.minimum(tl.maximum(x, -20.0), 20.0)
    a = tl.abs(x)
    u = x * x
    p = -0.00145583438705131826
    p = p * u + 0.00359212803657248102
    p = p * u - 0.00886323552990219656
    p = p * u + 0.02186948853615520282
    p = p * u - 0.05396825396825396826
    p = p * u + 0.13333333333333333333
    p = p * u - 0.33333333333333333333
    small = x + x * (u * p)
    large = 1.0 - 2.0 / (tl.exp2(a * (2.0 * LOG2E)) + 1.0)
    return tl.where(a < 0.5, small, tl.where(x < 0.0, -large, large))


@triton.jit
def soft_cap(x, cap, cap_scale):
    """y = cap tanh(x cap_scale) (gvpo_kernels.backend.LogitSpec)."""
    return cap * tanh(x * cap_scale)


@triton.jit
def soft_cap_grad(y, cap, cap_scale):
    """dy/dx at y = cap tanh(x cap_scale): cap cap_scale (1 - (y / cap)^2); 0 at y = -inf (a masked column)."""
    t = tl.minimum(tl.maximum(y / cap, -1.0), 1.0)
    return (cap * cap_scale) * (1.0 - t * t)


@triton.jit(do_not_specialize=["seq_len", "num_rows"])
def token_logprob_fwd_kernel(
    # pointers
    x_ptr,  # (B', T', V) logits, last dim contiguous
    target_ptr,  # (N,) int64, -1 for rows that are not scored, >= V for labels outside this vocabulary slice
    logprob_ptr,  # (N,) float32 out
    norm_ptr,  # (2, N) float32 out: shift, log_sum
    entropy_ptr,  # (N,) float32 out with ENTROPY: entropy of softmax(z); else unused
    # sizes and strides
    vocab_size,
    seq_len,
    num_rows,
    stride_x_b,
    stride_x_t,
    # scalars
    s,  # dz/dy: 1 / temperature (times the logit scale without a cap)
    cap,
    cap_scale,
    # meta-parameters
    BLOCK_V: tl.constexpr,
    ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    if target >= 0:
        b = row // seq_len
        x_row = x_ptr + b * stride_x_b + (row - b * seq_len) * stride_x_t
        s2 = s * LOG2E  # the running sums are in log2 units: exp2
        gap = 0.5 * FLT_MAX / tl.maximum(s2, 1.0)  # |y - m| clamped there: (y - m) s2 never overflows (same e)
        # per-lane running max of y; -FLT_MAX, not -inf, so that -inf logits give exp2(-inf) = 0, never NaN
        m = tl.full([BLOCK_V], -FLT_MAX, tl.float32)
        acc = tl.zeros([BLOCK_V], tl.float32)  # per-lane sum of exp2((y - m) s2)
        if ENTROPY:
            acc_ent = tl.zeros([BLOCK_V], tl.float32)  # per-lane sum of exp2(d) d, d = (y - m) s2 <= 0
        label_y = tl.zeros((), tl.float32)  # stays 0 when target >= V (the label is in another slice)
        label_col = tl.where(target < vocab_size, target, -1)
        cols = tl.arange(0, BLOCK_V)
        b_cur = tl.load(x_row + cols, mask=cols < vocab_size, other=float("-inf"))
        for start in range(0, vocab_size, BLOCK_V):
            # the next block's load is issued before this one is used: two blocks in flight per thread
            ahead = cols + BLOCK_V
            b_ahead = tl.load(x_row + ahead, mask=ahead < vocab_size, other=float("-inf"))
            b_y = b_cur.to(tl.float32)
            if SOFTCAP:  # the padding lanes stay -inf
                b_y = tl.where(cols < vocab_size, soft_cap(b_y, cap, cap_scale), float("-inf"))
            d = tl.minimum(b_y - m, gap) * s2
            # exp2(-|d|) is the factor that rescales the old sum when y is the new max (d > 0), else the term to add
            b_e = tl.exp2(-tl.abs(d))
            if ENTROPY:  # q = e |d|, 0 where y = -inf; the new max m' = y: A <- e (A + (m - m') L) = A e - L q
                b_q = b_e * tl.minimum(tl.abs(d), FLT_MAX)  # (and y adds 0), else A += e d = -q
                acc_ent = tl.where(d > 0, acc_ent * b_e - acc * b_q, acc_ent - b_q)
            acc = tl.where(d > 0, acc * b_e + 1.0, acc + b_e)
            m = tl.maximum(m, b_y)
            if (label_col >= start) & (label_col < start + BLOCK_V):  # once per row: the block holding the label
                label_y = tl.sum(tl.where(cols == label_col, b_y, 0.0), axis=0)
            cols = ahead
            b_cur = b_ahead
        m_row = tl.max(m, axis=0)
        lane_d = tl.maximum(m - m_row, -gap) * s2
        lane_scale = tl.exp2(lane_d)
        sum_exp = tl.sum(acc * lane_scale, axis=0)
        log_sum = tl.log2(sum_exp) * LN2
        shift = tl.where(sum_exp > 0, m_row, 0.0)  # 0 for a row of -inf logits (gvpo_kernels/backend.py)
        tl.store(logprob_ptr + row, (label_y - shift) * s - log_sum)
        tl.store(norm_ptr + row, shift)
        tl.store(norm_ptr + num_rows + row, log_sum)
        if ENTROPY:  # lanes merged at m_row; H = log L - A / L, back from log2 to natural units
            lane_ent = lane_scale * acc_ent + xlogx_term(lane_scale, lane_d) * acc
            tl.store(entropy_ptr + row, (tl.log2(sum_exp) - tl.sum(lane_ent, axis=0) / sum_exp) * LN2)
    else:
        tl.store(logprob_ptr + row, 0.0)
        tl.store(norm_ptr + row, 0.0)
        tl.store(norm_ptr + num_rows + row, 0.0)
        if ENTROPY:
            tl.store(entropy_ptr + row, 0.0)


@triton.jit(do_not_specialize=["seq_len", "num_rows"])
def token_logprob_bwd_kernel(
    # pointers
    x_ptr,  # (B', T', V) logits
    target_ptr,  # (N,) int64, -1 for rows that are not scored
    norm_ptr,  # (2, N) float32 from the forward
    coef_ptr,  # (N,) float32 c_lp
    entropy_ptr,  # with ENTROPY: (N,) float32 H from the forward; else unused
    coef_ent_ptr,  # with ENTROPY: (N,) float32 c_ent; else unused
    dx_ptr,  # (B', T', V) out, may alias x_ptr
    # sizes and strides
    vocab_size,
    seq_len,
    num_rows,
    stride_x_b,
    stride_x_t,
    stride_dx_b,
    stride_dx_t,
    # scalars
    s,
    cap,
    cap_scale,
    # meta-parameters
    BLOCK_V: tl.constexpr,
    ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row - b * seq_len
    x_row = x_ptr + b * stride_x_b + t * stride_x_t
    dx_row = dx_ptr + b * stride_dx_b + t * stride_dx_t
    target = tl.load(target_ptr + row)
    coef = tl.where(target >= 0, tl.load(coef_ptr + row), 0.0)
    if ENTROPY:  # c_lp (onehot - p) + c_ent p (-log p - H) = onehot c_lp + p (a + b log2 p)
        coef_ent = tl.where(target >= 0, tl.load(coef_ent_ptr + row), 0.0)
        active = (coef != 0.0) | (coef_ent != 0.0)
        ent_a = -coef_ent * tl.load(entropy_ptr + row) - coef
        ent_b = -coef_ent * LN2
    else:
        active = coef != 0.0
    if active:
        s2 = s * LOG2E
        shift = tl.load(norm_ptr + row)
        log_sum2 = tl.load(norm_ptr + num_rows + row) * LOG2E
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + offs
            in_row = cols < vocab_size
            b_y = tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32)
            if SOFTCAP:
                b_y = soft_cap(b_y, cap, cap_scale)
            b_log2p = (b_y - shift) * s2 - log_sum2
            b_p = tl.exp2(b_log2p)
            # the label's lane is found by an int32 compare against the block's offsets
            onehot = tl.where(offs == (target - start).to(tl.int32), coef, 0.0)
            if ENTROPY:
                b_dx = onehot + b_p * ent_a + xlogx_term(b_p, b_log2p) * ent_b
            else:
                b_dx = onehot - coef * b_p
            if SOFTCAP:
                b_dx = b_dx * soft_cap_grad(b_y, cap, cap_scale)
            tl.store(dx_row + cols, b_dx.to(dx_ptr.dtype.element_ty), mask=in_row)
    else:
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            zeros = tl.zeros([BLOCK_V], tl.float32)
            tl.store(dx_row + cols, zeros.to(dx_ptr.dtype.element_ty), mask=cols < vocab_size)


# ----------------------------------------------------------------------------------------------------------------
# plans


def block_params(vocab_size: int, itemsize: int, vectors: int, device: Device = None) -> dict:
    """BLOCK_V and num_warps from V and the logits' element size: ``vectors`` 16-byte vectors per thread at
    MAX_WARPS warps of 32 threads (forward: 2048 bf16 / 1024 fp32 logits a block, which keeps its per-lane state at
    64 / 48 registers; backward: 4096 / 2048), and fewer warps for a small V or wider warps (AMD CDNA's 64 threads:
    the same block and the same 16 bytes per thread on half the warps). Compile options from
    :func:`.plan.row_options` (sm_120's register cap)."""
    per_thread = vectors * max(1, 16 // itemsize)
    block_v = min(triton.next_power_of_2(vocab_size), MAX_WARPS * 32 * per_thread)
    warp_size = 32 if device is None else device.warp_size
    num_warps = max(1, min(MAX_WARPS, block_v // (warp_size * per_thread)))
    return dict(BLOCK_V=block_v, num_warps=num_warps, **(row_options(device, num_warps) if device else {}))


def _check_rows(name: str, rows: torch.Tensor) -> None:
    if rows.dim() != 3 or rows.stride(-1) != 1:
        raise ValueError(f"{name} must be a (B', T', V) view with a contiguous last dimension, got shape "
                         f"{tuple(rows.shape)} with strides {rows.stride()}")


def _dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def _spec_args(spec: LogitSpec) -> tuple:
    return spec.s, spec.cap, spec.cap_scale


def forward_plan(rows, target, out: TokenStats, spec: LogitSpec, device: Device) -> Plan:
    """The forward launch: rows (B', T', V) logits, target (N,) int64; writes out.logprob (N,), out.norm (2, N) and,
    when not None, out.entropy (N,), float32 (the ENTROPY variant).

    Reads shapes, strides and dtypes only (works on meta tensors); of ``device``, :func:`block_params` reads the
    warp width and compile options."""
    _check_rows("rows", rows)
    num_b, seq_len, vocab_size = rows.shape
    num_rows = target.numel()
    check_flat("target", target, torch.int64)
    _check_per_token(num_b * seq_len, target=target, logprob=out.logprob, entropy=out.entropy)
    _check_norm(out.norm, num_rows)
    entropy = out.entropy is not None
    return Plan(
        token_logprob_fwd_kernel, (num_rows,),
        (rows, target, out.logprob, out.norm, out.entropy if entropy else out.logprob, vocab_size, seq_len, num_rows,
         rows.stride(0), rows.stride(1), *_spec_args(spec)),
        dict(block_params(vocab_size, rows.element_size(), FWD_VECTORS, device), ENTROPY=entropy,
             SOFTCAP=spec.softcap is not None),
        label=f"token_fwd{_variant(entropy, spec)} V={vocab_size} {_dtype_name(rows.dtype)}",
    )


def backward_plan(rows, target, norm, coefs: Coefs, spec: LogitSpec, out, device: Device) -> Plan:
    """The backward launch: rows (B', T', V) logits, target (N,) int64, norm (2, N) float32 from the forward,
    coefs (backend.Coefs, (N,) float32 each); writes dx into out (B', T', V), rows' shape (it may be rows itself).
    Reads shapes, strides and dtypes only."""
    _check_rows("rows", rows)
    _check_rows("out", out)
    if tuple(out.shape) != tuple(rows.shape):
        raise ValueError(f"out must have the shape of rows {tuple(rows.shape)}, got {tuple(out.shape)}")
    num_b, seq_len, vocab_size = rows.shape
    num_rows = target.numel()
    check_flat("target", target, torch.int64)
    entropy = coefs.entropy is not None
    _check_per_token(num_b * seq_len, target=target, coef_logprob=coefs.logprob, coef_entropy=coefs.entropy,
                     token_entropy=coefs.token_entropy if entropy else None)
    _check_norm(norm, num_rows)
    per_token = (coefs.token_entropy, coefs.entropy) if entropy else (coefs.logprob, coefs.logprob)
    return Plan(
        token_logprob_bwd_kernel, (num_rows,),
        (rows, target, norm, coefs.logprob, *per_token, out, vocab_size, seq_len, num_rows, rows.stride(0),
         rows.stride(1), out.stride(0), out.stride(1), *_spec_args(spec)),
        dict(block_params(vocab_size, rows.element_size(), BWD_VECTORS, device), ENTROPY=entropy,
             SOFTCAP=spec.softcap is not None),
        label=f"token_bwd{_variant(entropy, spec)} V={vocab_size} {_dtype_name(rows.dtype)}",
    )


def _variant(entropy: bool, spec: LogitSpec) -> str:
    return ("_entropy" if entropy else "") + ("_softcap" if spec.softcap is not None else "")


def _check_per_token(num_rows: int, **tensors) -> None:
    """Each given tensor a contiguous (N,) one (int64 target, float32 the others) of one element per row."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        check_flat(name, tensor, torch.int64 if name == "target" else torch.float32)
        if tensor.numel() != num_rows:
            raise ValueError(f"{name} must hold one element per row ({num_rows}), got {tensor.numel()}")


def _check_norm(norm, num_rows: int) -> None:
    if norm.dtype != torch.float32 or tuple(norm.shape) != (2, num_rows) or not norm.is_contiguous():
        raise ValueError(f"norm must be a contiguous (2, {num_rows}) float32 tensor, got {norm.dtype} "
                         f"{tuple(norm.shape)} with strides {norm.stride()}")


# ----------------------------------------------------------------------------------------------------------------
# launchers (backend.Backend)


def token_forward(rows: torch.Tensor, target: torch.Tensor, spec: LogitSpec, entropy: bool) -> TokenStats:
    """rows (B', T', V) logits, target (N,) int64 (-1: not scored) -> TokenStats, one pass over each row."""
    f32 = dict(dtype=torch.float32, device=rows.device)
    out = TokenStats(empty(target.shape, **f32), empty((2, target.numel()), **f32),
                     empty(target.shape, **f32) if entropy else None)
    launch(forward_plan(rows, target, out, spec, device_of(rows.device)))
    return out


def token_backward(rows, target, norm, coefs: Coefs, spec: LogitSpec, out) -> None:
    """Write dx (backend.Coefs) into out (B', T', V), rows' shape; rows whose coefficients are 0 get zeros, their
    logits unread."""
    launch(backward_plan(rows, target, norm, coefs, spec, out, device_of(rows.device)))
