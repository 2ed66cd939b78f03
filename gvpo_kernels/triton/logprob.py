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

Entropy (ENTROPY, a constexpr: off, the kernels are the log-prob-only ones), for token_logprobs(return_entropy=True):
the forward keeps one more running sum per lane, A = sum exp2(y - m) (y - m) with y = x / T in log2 units
(rescaled with the sum when the max grows: A <- e (A + (m - m') L)), so that H = log L - A / L after the lanes are
merged, in the same pass as the log-sum-exp and without cancelling lse against E[z] on peaked rows. The backward
writes c_lp (onehot - p) + c_ent p (lse - z - H) = p (a + b log p) + onehot c_lp with the row's a = -c_ent H - c_lp
and b = -c_ent, from per-token coefficients c_lp, c_ent (already / T) instead of dL/ds. Logits of -inf (p = 0) add
exactly 0 to A and to the gradient: every p log p term is e * max(d, -FLT_MAX) (``_xlogx_term``), never 0 * -inf.

Rows are addressed through a (B', T', V) view: token n is (n // T', n % T'), so padded logits sliced along T
(``logits[:, :-1]``) are read in place. Offsets are int64 (N x V passes 2^31 at 16k tokens x 152k vocabulary).
Loads and stores are 16 bytes wide: the row strides are specialised (Triton keys an int only on == 1 and on
divisibility by 16, so this adds at most a few variants and never recompiles for a new N or T), which tells the
compiler that a row starts 16-byte aligned when V is a multiple of 8 (bf16) or 4 (fp32). T' (``seq_len``) is not
specialised: it only divides.

Each launcher is a pure plan (:func:`forward_plan`, :func:`backward_plan`, :func:`stats_backward_plan`: shapes,
dtypes, device -> Plan) and :func:`~.plan.launch`; tests/aot.py compiles the same plans for nine NVIDIA and AMD
targets without a GPU.
"""

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..layout import Layout
from .plan import Device, Plan, check_flat, device_of, launch, row_options

MAX_WARPS = 8
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
FWD_VECTORS, BWD_VECTORS = 1, 2  # 16-byte vectors per thread per row block (the forward also prefetches one block)


@triton.jit
def _xlogx_term(e, d):
    """e * d for e = exp2(d) (or exp(d)): the term of a sum of p log p, exactly 0 where d = -inf (never 0 * -inf)."""
    return e * tl.maximum(d, -FLT_MAX)


@triton.jit(do_not_specialize=["seq_len"])
def token_logprob_fwd_kernel(
    # pointers
    x_ptr,  # (B', T', V) logits, last dim contiguous
    target_ptr,  # (N,) int64, -1 for rows that are not scored, >= V for labels outside this vocabulary slice
    logprob_ptr,  # (N,) float32 out
    lse_ptr,  # (N,) float32 out
    entropy_ptr,  # (N,) float32 out with ENTROPY: entropy of softmax(x / T); else unused
    # sizes and strides
    vocab_size,
    seq_len,
    stride_x_b,
    stride_x_t,
    # scalars
    inv_temperature,
    # meta-parameters
    BLOCK_V: tl.constexpr,
    ENTROPY: tl.constexpr,
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
        if ENTROPY:
            acc_ent = tl.zeros([BLOCK_V], tl.float32)  # per-lane sum of exp2(x * scale - m) * (x * scale - m), <= 0
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
            if ENTROPY:  # q = e |d|, 0 where x = -inf; the new max m' = x: A <- e (A + (m - m') L) = A e - L q
                b_q = b_e * tl.minimum(tl.abs(d), FLT_MAX)  # (and x adds 0), else A += e d = -q
                acc_ent = tl.where(d > 0, acc_ent * b_e - acc * b_q, acc_ent - b_q)
            acc = tl.where(d > 0, acc * b_e + 1.0, acc + b_e)
            m = tl.maximum(m, b_xs)
            if (label_col >= start) & (label_col < start + BLOCK_V):  # once per row: the block holding the label
                label_logit = tl.sum(tl.where(cols == label_col, b_x, 0.0), axis=0) * inv_temperature
            cols = ahead
            b_cur = b_ahead
        m_row = tl.max(m, axis=0)
        lane_scale = tl.exp2(m - m_row)
        sum_exp = tl.sum(acc * lane_scale, axis=0)
        lse = (m_row + tl.log2(sum_exp)) * LN2
        tl.store(logprob_ptr + row, label_logit - lse)
        tl.store(lse_ptr + row, lse)
        if ENTROPY:  # lanes merged at m_row; H = log L - A / L, back from log2 to natural units
            lane_ent = lane_scale * acc_ent + _xlogx_term(lane_scale, m - m_row) * acc
            tl.store(entropy_ptr + row, (tl.log2(sum_exp) - tl.sum(lane_ent, axis=0) / sum_exp) * LN2)
    else:
        tl.store(logprob_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if ENTROPY:
            tl.store(entropy_ptr + row, 0.0)


@triton.jit(do_not_specialize=["seq_len"])
def token_logprob_bwd_kernel(
    # pointers
    x_ptr,  # (B', T', V) logits
    target_ptr,  # (N,) int64, -1 for rows that are not scored
    token_seq_ptr,  # (N,) int64 sequence of each token; unused with ENTROPY
    lse_ptr,  # (N,) float32 from the forward
    grad_seq_ptr,  # (S,) float32 dL/ds; with ENTROPY (N,) float32 c_lp per token (already / T)
    grad_loss_ptr,  # () float32 upstream gradient of the loss; unused with ENTROPY
    entropy_ptr,  # with ENTROPY: (N,) float32 H from the forward; else unused
    coef_ent_ptr,  # with ENTROPY: (N,) float32 c_ent per token (already / T); else unused
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
    ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row - b * seq_len
    x_row = x_ptr + b * stride_x_b + t * stride_x_t
    dx_row = dx_ptr + b * stride_dx_b + t * stride_dx_t
    target = tl.load(target_ptr + row)
    if ENTROPY:  # d(c_lp logprob + c_ent H)/dz = c_lp (onehot - p) + c_ent p (lse - z - H) = p (a + b log p) + ...
        coef = tl.where(target >= 0, tl.load(grad_seq_ptr + row), 0.0)
        coef_ent = tl.where(target >= 0, tl.load(coef_ent_ptr + row), 0.0)
        active = (coef != 0.0) | (coef_ent != 0.0)
        ent_a = -coef_ent * tl.load(entropy_ptr + row) - coef  # ... + onehot c_lp, with log p in log2 units
        ent_b = -coef_ent * LN2
    else:
        coef = tl.load(grad_seq_ptr + tl.load(token_seq_ptr + row)) * tl.load(grad_loss_ptr) * inv_temperature
        coef = tl.where(target >= 0, coef, 0.0)
        active = coef != 0.0
    if active:
        scale = inv_temperature * LOG2E
        shift = tl.load(lse_ptr + row) * LOG2E  # p = exp2(x * scale - shift): one fma and one exp2 per logit
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + offs
            in_row = cols < vocab_size
            b_x = tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32)
            b_log2p = b_x * scale - shift
            b_p = tl.exp2(b_log2p)
            # c * (onehot - p); the label's lane is found by an int32 compare against the block's offsets
            onehot = tl.where(offs == (target - start).to(tl.int32), coef, 0.0)
            if ENTROPY:
                b_dx = onehot + b_p * ent_a + _xlogx_term(b_p, b_log2p) * ent_b
            else:
                b_dx = onehot - coef * b_p
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


def forward_plan(rows, target, token_logprob, lse, temperature: float, device: Device, token_entropy=None) -> Plan:
    """The forward launch: rows (B', T', V) logits, target (N,) int64; writes token_logprob and lse, (N,) float32,
    and, when given, token_entropy (N,) float32 (the ENTROPY variant).

    Reads shapes, strides and dtypes only (works on meta tensors); of ``device``, :func:`block_params` reads the
    warp width and compile options."""
    _check_rows("rows", rows)
    num_b, seq_len, vocab_size = rows.shape
    check_flat("target", target, torch.int64)
    outs = (("token_logprob", token_logprob), ("lse", lse)) + ((("token_entropy", token_entropy),)
                                                              if token_entropy is not None else ())
    for name, out in outs:
        check_flat(name, out, torch.float32)
    if target.numel() != num_b * seq_len or any(out.numel() != target.numel() for _, out in outs):
        raise ValueError(f"target, {', '.join(name for name, _ in outs)} must hold one element per row "
                         f"({num_b * seq_len})")
    entropy = token_entropy is not None
    return Plan(
        token_logprob_fwd_kernel, (target.numel(),),
        (rows, target, token_logprob, lse, token_entropy if entropy else lse, vocab_size, seq_len, rows.stride(0),
         rows.stride(1), 1.0 / temperature),
        dict(block_params(vocab_size, rows.element_size(), FWD_VECTORS, device), ENTROPY=entropy),
        label=f"token_fwd{'_entropy' if entropy else ''} V={vocab_size} {_dtype_name(rows.dtype)}",
    )


def _check_out(rows, out) -> None:
    _check_rows("rows", rows)
    _check_rows("out", out)
    if tuple(out.shape) != tuple(rows.shape):
        raise ValueError(f"out must have the shape of rows {tuple(rows.shape)}, got {tuple(out.shape)}")


def _backward_launch(rows, target, per_token, temperature: float, out, entropy: bool, device: Device) -> Plan:
    """The backward kernel's launch; per_token: its token_seq, lse, grad_seq, grad_loss, entropy, coef_ent
    pointers, in that order (those a variant does not read are any tensor)."""
    num_b, seq_len, vocab_size = rows.shape
    return Plan(
        token_logprob_bwd_kernel, (target.numel(),),
        (rows, target, *per_token, out, vocab_size, seq_len, rows.stride(0), rows.stride(1), out.stride(0),
         out.stride(1), 1.0 / temperature),
        dict(block_params(vocab_size, rows.element_size(), BWD_VECTORS, device), ENTROPY=entropy),
        label=f"token_bwd{'_entropy' if entropy else ''} V={vocab_size} {_dtype_name(rows.dtype)}",
    )


def backward_plan(rows, lay: Layout, lse, grad_seq_logprob, grad_loss, temperature: float, out,
                  device: Device) -> Plan:
    """The backward launch: rows (B', T', V) logits, lay.target / lay.token_seq (N,) int64, lse (N,) float32,
    grad_seq_logprob (S,) float32, grad_loss () float32; writes dL/dlogits into out (B', T', V), rows' shape (it
    may be rows itself). Reads shapes, strides and dtypes only."""
    _check_out(rows, out)
    check_flat("target", lay.target, torch.int64)
    check_flat("token_seq", lay.token_seq, torch.int64)
    check_flat("lse", lse, torch.float32)
    check_flat("grad_seq_logprob", grad_seq_logprob, torch.float32)
    check_flat("grad_loss", grad_loss, torch.float32)
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must hold one element, got shape {tuple(grad_loss.shape)}")
    return _backward_launch(rows, lay.target, (lay.token_seq, lse, grad_seq_logprob, grad_loss, lse, lse),
                            temperature, out, entropy=False, device=device)


def stats_backward_plan(rows, target, lse, token_entropy, coef_logprob, coef_entropy, temperature: float, out,
                        device: Device) -> Plan:
    """The token statistics' backward (the ENTROPY variant): rows (B', T', V) logits, target (N,) int64, lse and
    token_entropy (N,) float32 from the forward, coef_logprob / coef_entropy (N,) float32 (already / T); writes
    d(sum c_lp logprob + c_ent entropy)/dlogits into out (B', T', V), rows' shape. Reads shapes, strides and dtypes
    only."""
    _check_out(rows, out)
    check_flat("target", target, torch.int64)
    per_token = (("lse", lse), ("token_entropy", token_entropy), ("coef_logprob", coef_logprob),
                 ("coef_entropy", coef_entropy))
    for name, tensor in per_token:
        check_flat(name, tensor, torch.float32)
    if target.numel() != rows.shape[0] * rows.shape[1] or any(t.numel() != target.numel() for _, t in per_token):
        raise ValueError(f"target, lse, token_entropy, coef_logprob and coef_entropy must hold one element per row "
                         f"({rows.shape[0] * rows.shape[1]})")
    return _backward_launch(rows, target, (target, lse, coef_logprob, lse, token_entropy, coef_entropy),
                            temperature, out, entropy=True, device=device)


# ----------------------------------------------------------------------------------------------------------------
# launchers


def _per_token_outputs(target, device, count: int):
    return [empty(target.shape, dtype=torch.float32, device=device) for _ in range(count)]


def token_forward(rows: torch.Tensor, target: torch.Tensor, temperature: float):
    """rows (B', T', V), target (N,) -> token log-prob (N,) float32 (0 where target < 0), lse (N,) float32."""
    token_logprob, lse = _per_token_outputs(target, rows.device, 2)
    launch(forward_plan(rows, target, token_logprob, lse, temperature, device_of(rows.device)))
    return token_logprob, lse


def token_backward(rows, lay: Layout, lse, grad_seq_logprob, grad_loss, temperature: float, out):
    """Write grad_loss * dL/ds[seq(n)] / T * (onehot - softmax(rows[n] / T)) into out (B', T', V)."""
    grad_loss = grad_loss.float().contiguous()
    launch(backward_plan(rows, lay, lse, grad_seq_logprob, grad_loss, temperature, out, device_of(rows.device)))


def token_stats_forward(rows: torch.Tensor, target: torch.Tensor, temperature: float):
    """rows (B', T', V) logits (any float dtype), target (N,) int64 (-1: not scored) -> token_logprob, lse,
    token_entropy, each (N,) float32: log softmax(rows[n] / T)[target], its log-sum-exp and the entropy of
    softmax(rows[n] / T), all from one pass over the row; token_logprob and token_entropy are 0 where not scored.

    >>> lp, lse, ent = token_stats_forward(logits.view(1, n, v), target, 1.0)   # doctest: +SKIP
    """
    token_logprob, lse, token_entropy = _per_token_outputs(target, rows.device, 3)
    launch(forward_plan(rows, target, token_logprob, lse, temperature, device_of(rows.device), token_entropy))
    return token_logprob, lse, token_entropy


def token_stats_backward(rows, target, lse, token_entropy, coef_logprob, coef_entropy, temperature: float, out):
    """Write out[n, v] = c_lp[n] (onehot - p_v) + c_ent[n] p_v (lse_n - z_v - H_n) into out (B', T', V), rows'
    shape and dtype, with z = rows / T, p = softmax(z); coef_logprob, coef_entropy (N,) float32, already / T and 0
    where target < 0 (rows not scored get zeros, their logits unread); lse, token_entropy (N,) float32 from
    :func:`token_stats_forward`."""
    launch(stats_backward_plan(rows, target, lse, token_entropy, coef_logprob, coef_entropy, temperature, out,
                               device_of(rows.device)))
