"""Triton linear path: the token statistics from hidden states and the LM head, logits never materialised.

A tile of logits [BLOCK_N tokens, BLOCK_V vocabulary rows] is a tl.dot of hidden rows (gathered through an index
of scored rows) by weight rows, accumulated in float32 over H (``_logits_tile``), soft-capped under SOFTCAP; its
epilogue folds it into a running max and sum of exponentials per token (online log-sum-exp), and the label's y
comes from one dot per row. Kernels, in the order the GEMM schedule (gvpo_kernels/schedule.py) calls them:

    linear_logprob_fwd_kernel    forward over a split of the vocabulary (+ entropy's sum, + stored exponentials)
    linear_grad_from_exp_kernel  a kept chunk's stored exponentials -> dL/dlogits in place (three GEMMs)
    linear_logprob_bwd_kernel    logits recomputed -> dL/dlogits of a chunk (four GEMMs)

then cuBLAS contracts each chunk's dL/dlogits into d_hidden and d_weight (float32 accumulation inside the GEMM).
Each launcher is a pure plan (``*_plan``: tensors, which may be meta tensors, and a plan.Device -> plan.Plan);
tests/test_aot.py compiles the same plans ahead of time. Design notes, tile choices and the roofline estimates
(not measured on a GPU yet): docs/kernels.md.

Triton's interpreter multiplies the raw bits of bfloat16 dot operands (triton-lang/triton#11584), so on the CPU
bfloat16 tiles are upcast to fp32 first; tests/test_gpu.py covers the bf16 tl.dot on a GPU.
"""

import torch
import triton
import triton.language as tl

from ..backend import Coefs, LogitSpec
from .logprob import soft_cap, soft_cap_grad, xlogx_term
from .plan import Device, Plan, check_flat, dot_precision, linear_tiles

CHUNK_BYTES = 1 << 30  # bytes of the per-chunk buffer (dL/dlogits, or the stored exponentials) in the backward
GROUP_N = 8  # token blocks per group of the grouped tile order
GRAD_BLOCK_N = 16  # token rows per program of the elementwise G pass
FLT_MAX = tl.constexpr(3.4028234663852886e38)
LOG_P_FLOOR = tl.constexpr(-128.0)  # exp(-128) is 0 in float32: log p clamped there changes no p log p, only -inf

_LENGTHS = ["num_rows", "seq_len", "num_splits", "blocks_per_split"]  # vary per step: never specialised


@triton.jit
def _grouped(pid, num_rows, num_cols, GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program id -> (token block, column) in grouped order: GROUP_N token blocks per group, token fastest."""
    token_blocks = tl.cdiv(num_rows, BLOCK_N)
    width = GROUP_N * num_cols
    first = (pid // width) * GROUP_N
    size = tl.minimum(token_blocks - first, GROUP_N)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _logits_tile(h_rows, w_ptr, bias_ptr, offs_v, in_rows, in_vocab, hidden_size, stride_w_v, stride_bias_v, cap,
                 cap_scale, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """[BLOCK_N, BLOCK_V] float32 tile of y = hidden @ weight.T + bias (soft-capped under SOFTCAP), accumulated over
    H in BLOCK_H steps; columns outside the vocabulary are -inf."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    w_rows = w_ptr + offs_v.to(tl.int64) * stride_w_v
    for k0 in range(0, hidden_size, BLOCK_H):
        offs_h = k0 + tl.arange(0, BLOCK_H)
        in_h = offs_h < hidden_size
        b_h = tl.load(h_rows[:, None] + offs_h[None, :], mask=in_rows[:, None] & in_h[None, :], other=0.0)
        b_w = tl.load(w_rows[:, None] + offs_h[None, :], mask=in_vocab[:, None] & in_h[None, :], other=0.0)
        if UPCAST:
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        acc = tl.dot(b_h, tl.trans(b_w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v.to(tl.int64) * stride_bias_v, mask=in_vocab, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = soft_cap(acc, cap, cap_scale)
    return acc


@triton.jit
def _label_logits(h_rows, w_ptr, bias_ptr, label_col, in_rows, hidden_size, stride_w_v, stride_bias_v, cap, cap_scale,
                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """(BLOCK_N,) float32 y of each row's label (hidden . weight[label] + bias[label], soft-capped under SOFTCAP), 0
    where label_col is -1."""
    has = in_rows & (label_col >= 0)
    w_rows = w_ptr + tl.where(has, label_col, 0).to(tl.int64) * stride_w_v
    acc = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    for k0 in range(0, hidden_size, BLOCK_H):
        offs_h = k0 + tl.arange(0, BLOCK_H)
        mask = has[:, None] & (offs_h < hidden_size)[None, :]
        b_h = tl.load(h_rows[:, None] + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += b_h * tl.load(w_rows[:, None] + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    label = tl.sum(acc, axis=1)
    if HAS_BIAS:
        label += tl.load(bias_ptr + label_col.to(tl.int64) * stride_bias_v, mask=has, other=0.0).to(tl.float32)
    if SOFTCAP:
        label = soft_cap(label, cap, cap_scale)
    return tl.where(has, label, 0.0)


@triton.jit
def _hidden_rows(h_ptr, rows_ptr, target_ptr, offs_n, in_rows, vocab_size, seq_len, stride_h_b, stride_h_t):
    """For the scored rows offs_n (BLOCK_N,): pointers to their hidden rows (B', T', H), the int32 column of each
    label in this vocabulary (-1 where the label lies in another rank's slice: target >= V), and their token ids."""
    token = tl.load(rows_ptr + offs_n, mask=in_rows, other=0)
    target = tl.load(target_ptr + token, mask=in_rows, other=-1)
    label_col = tl.where(target < vocab_size, target, -1).to(tl.int32)  # int32 compares in the tile epilogue
    b = token // seq_len
    return h_ptr + b * stride_h_b + (token - b * seq_len) * stride_h_t, label_col, token


@triton.jit(do_not_specialize=_LENGTHS)
def linear_logprob_fwd_kernel(
    # pointers
    h_ptr,  # (B', T', H) hidden, last dim contiguous
    w_ptr,  # (V, H) weight, last dim contiguous
    bias_ptr,  # (V,) bias (any stride) or unused
    rows_ptr,  # (M,) int64 flat token id of each scored row
    target_ptr,  # (N,) int64 target id per token (-1 not scored, >= V in another rank's vocabulary slice)
    max_ptr,  # (SPLITS, M) float32 out: running max of y
    sumexp_ptr,  # (SPLITS, M) float32 out: sum of exp((y - max) s)
    label_ptr,  # (SPLITS, M) float32 out: the target's y (0 in splits that do not hold it)
    ent_ptr,  # (SPLITS, M) float32 out with ENTROPY: sum of exp(d) d, d = (y - max) s <= 0
    exp_ptr,  # (M, V) out with STORE_EXP, input dtype: exp((y - tile max) s); else unused
    tile_max_ptr,  # (M, cdiv(V, BLOCK_V)) float32 out with STORE_EXP: each tile's max y (0 for a tile of -inf)
    # sizes and strides
    num_rows,
    vocab_size,
    hidden_size,
    seq_len,
    stride_h_b,
    stride_h_t,
    stride_w_v,
    stride_bias_v,
    stride_e_n,
    stride_tm_n,
    # scalars
    s,
    cap,
    cap_scale,
    num_splits,
    blocks_per_split,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    STORE_EXP: tl.constexpr,
    ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n, split = _grouped(tl.program_id(0), num_rows, num_splits, GROUP_N, BLOCK_N)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = offs_n < num_rows
    h_rows, label_col, _ = _hidden_rows(h_ptr, rows_ptr, target_ptr, offs_n, in_rows, vocab_size, seq_len,
                                        stride_h_b, stride_h_t)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    acc_exp = tl.zeros([BLOCK_N], tl.float32)
    if ENTROPY:
        acc_ent = tl.zeros([BLOCK_N], tl.float32)  # sum of exp(d) d of the tiles so far, relative to m
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, vocab_size)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        in_vocab = offs_v < vocab_size
        b_y = _logits_tile(h_rows, w_ptr, bias_ptr, offs_v, in_rows, in_vocab, hidden_size, stride_w_v,
                           stride_bias_v, cap, cap_scale, HAS_BIAS, SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V,
                           BLOCK_H)
        b_y = tl.where(in_vocab[None, :], b_y, float("-inf"))
        tile_max = tl.max(b_y, axis=1)
        tile_safe = tl.where(tile_max == float("-inf"), 0.0, tile_max)  # a tile of -inf logits must not give NaN
        b_d = (b_y - tile_safe[:, None]) * s
        b_e = tl.exp(b_d)
        if ENTROPY:  # the tile's own A first, while b_d is live (then only b_e is): fewer registers
            # two sums, not one tl.reduce of both: as many registers, and the interpreter runs a combine_fn slowly
            tile_ent = tl.sum(xlogx_term(b_e, b_d), axis=1)
        tile_sum = tl.sum(b_e, axis=1)
        m_new = tl.maximum(m, tile_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d_old, d_tile = (m - m_safe) * s, (tile_safe - m_safe) * s
        alpha, beta = tl.exp(d_old), tl.exp(d_tile)
        if ENTROPY:  # both partials (the sums so far, the tile's) moved to the new max: e^d (A + d L)
            acc_ent = (alpha * acc_ent + xlogx_term(alpha, d_old) * acc_exp + beta * tile_ent
                       + xlogx_term(beta, d_tile) * tile_sum)
        acc_exp = acc_exp * alpha + tile_sum * beta
        m = m_new
        if STORE_EXP:  # int32 offsets: the chunk buffer holds fewer than 2^31 elements (forward_plan checks)
            offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            e_tile = exp_ptr + offs_c[:, None] * stride_e_n + offs_v[None, :]
            tl.store(e_tile, b_e.to(exp_ptr.dtype.element_ty), mask=in_rows[:, None] & in_vocab[None, :])
            tl.store(tile_max_ptr + offs_c * stride_tm_n + v0 // BLOCK_V, tile_safe, mask=in_rows)

    out = split.to(tl.int64) * num_rows + offs_n
    tl.store(max_ptr + out, m, mask=in_rows)
    tl.store(sumexp_ptr + out, acc_exp, mask=in_rows)
    if ENTROPY:
        tl.store(ent_ptr + out, acc_ent, mask=in_rows)
    if split == 0:  # the label's logit, as one dot per row (a pick from every tile would cost ~40 registers)
        label = _label_logits(h_rows, w_ptr, bias_ptr, label_col, in_rows, hidden_size, stride_w_v, stride_bias_v,
                              cap, cap_scale, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_H)
    else:
        label = tl.zeros([BLOCK_N], tl.float32)
    tl.store(label_ptr + out, label, mask=in_rows)


@triton.jit(do_not_specialize=_LENGTHS[:2])
def linear_logprob_bwd_kernel(
    # pointers
    h_ptr,  # (B', T', H) hidden
    w_ptr,  # (V, H) weight
    bias_ptr,  # (V,) bias (any stride) or unused
    rows_ptr,  # (M_c,) int64 flat token id of each scored row of this chunk
    target_ptr,  # (N,) int64
    norm_ptr,  # (2, M_c) float32 shift, log_sum of the chunk's rows, from the forward
    coef_ptr,  # (M_c,) float32 c_lp
    entropy_ptr,  # (M_c,) float32 with ENTROPY: the entropy from the forward; else unused
    coef_ent_ptr,  # (M_c,) float32 with ENTROPY: c_ent; else unused
    g_ptr,  # (M_c, V) out: dL/dlogits of the chunk, in the input dtype
    # sizes and strides
    num_rows,
    vocab_size,
    hidden_size,
    seq_len,
    stride_h_b,
    stride_h_t,
    stride_w_v,
    stride_bias_v,
    stride_g_n,
    # scalars
    s,
    cap,
    cap_scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n, pid_v = _grouped(tl.program_id(0), num_rows, tl.cdiv(vocab_size, BLOCK_V), GROUP_N, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # int32: the chunk holds fewer than 2^31 elements
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    in_rows = offs_n < num_rows
    in_vocab = offs_v < vocab_size
    h_rows, label_col, _ = _hidden_rows(h_ptr, rows_ptr, target_ptr, offs_n, in_rows, vocab_size, seq_len,
                                        stride_h_b, stride_h_t)
    shift = tl.load(norm_ptr + offs_n, mask=in_rows, other=float("inf"))  # rows past the chunk: p = 0
    log_sum = tl.load(norm_ptr + num_rows + offs_n, mask=in_rows, other=0.0)
    coef = tl.load(coef_ptr + offs_n, mask=in_rows, other=0.0)
    if ENTROPY:
        coef_ent = tl.load(coef_ent_ptr + offs_n, mask=in_rows, other=0.0)
        ent_a = -coef_ent * tl.load(entropy_ptr + offs_n, mask=in_rows, other=0.0) - coef

    b_y = _logits_tile(h_rows, w_ptr, bias_ptr, offs_v, in_rows, in_vocab, hidden_size, stride_w_v, stride_bias_v,
                       cap, cap_scale, HAS_BIAS, SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    b_logp = (b_y - shift[:, None]) * s - log_sum[:, None]
    b_p = tl.exp(b_logp)
    if ENTROPY:  # c_lp (onehot - p) + c_ent p (-log p - H) = onehot c_lp + p (a - c_ent log p), a = -c_ent H - c_lp
        b_g = (tl.where(offs_v[None, :] == label_col[:, None], coef[:, None], 0.0)
               + b_p * (ent_a[:, None] - coef_ent[:, None] * tl.maximum(b_logp, LOG_P_FLOOR)))
    else:
        b_g = coef[:, None] * (tl.where(offs_v[None, :] == label_col[:, None], 1.0, 0.0) - b_p)
    if SOFTCAP:
        b_g = b_g * soft_cap_grad(b_y, cap, cap_scale)
    g_tile = g_ptr + offs_n[:, None] * stride_g_n + offs_v[None, :]
    tl.store(g_tile, b_g.to(g_ptr.dtype.element_ty), mask=in_rows[:, None] & in_vocab[None, :])


@triton.jit(do_not_specialize=["num_rows"])
def linear_grad_from_exp_kernel(
    # pointers
    e_ptr,  # (M_c, V) in: exp((y - tile max) s) from the forward; out: dL/dlogits, same dtype, in place
    tile_max_ptr,  # (M_c, cdiv(V, BLOCK_V)) float32
    target_ptr,  # (M_c,) int64 targets of the chunk's rows
    norm_ptr,  # (2, M_c) float32 shift, log_sum
    coef_ptr,  # (M_c,) float32 c_lp
    entropy_ptr,  # (M_c,) float32 with ENTROPY: the entropy; else unused
    coef_ent_ptr,  # (M_c,) float32 with ENTROPY: c_ent; else unused
    # sizes and strides
    num_rows,
    vocab_size,
    stride_e_n,
    stride_tm_n,
    # scalars
    s,
    # meta-parameters
    ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # int32: fewer than 2^31 elements
    pid_v = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    in_rows = offs_n < num_rows
    mask = in_rows[:, None] & (offs_v < vocab_size)[None, :]
    target = tl.load(target_ptr + offs_n, mask=in_rows, other=-1)
    label_col = tl.where(target < vocab_size, target, -1).to(tl.int32)
    # p = e exp(log_scale): the tile's exponentials moved from the tile's max to the row's normaliser
    log_scale = ((tl.load(tile_max_ptr + offs_n * stride_tm_n + pid_v, mask=in_rows, other=0.0)
                  - tl.load(norm_ptr + offs_n, mask=in_rows, other=0.0)) * s
                 - tl.load(norm_ptr + num_rows + offs_n, mask=in_rows, other=0.0))
    coef = tl.load(coef_ptr + offs_n, mask=in_rows, other=0.0)
    e_tile = e_ptr + offs_n[:, None] * stride_e_n + offs_v[None, :]
    b_e = tl.load(e_tile, mask=mask, other=0.0).to(tl.float32)
    b_p = b_e * tl.exp(log_scale)[:, None]
    onehot = tl.where(offs_v[None, :] == label_col[:, None], 1.0, 0.0)
    if ENTROPY:  # c_lp (onehot - p) + c_ent p (-log p - H)
        coef_ent = tl.load(coef_ent_ptr + offs_n, mask=in_rows, other=0.0)
        h = tl.load(entropy_ptr + offs_n, mask=in_rows, other=0.0)
        b_logp = tl.log(b_e) + log_scale[:, None]
        b_g = (coef[:, None] * (onehot - b_p) - coef_ent[:, None] * (b_p * h[:, None]
                                                                      + xlogx_term(b_p, b_logp)))
    else:
        b_g = coef[:, None] * (onehot - b_p)
    tl.store(e_tile, b_g.to(e_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# plans: shapes, dtypes and the device -> launches (no tensor values read; meta tensors work)


def tile_config(dtype: torch.dtype, hidden_size: int, device: Device, store: bool = False,
                heavy: str = "") -> dict:
    """The meta-parameters of the logits tiles: block sizes, warps and stages from the dtype, H and the device
    (never from N; :func:`.plan.linear_tiles` says which family of devices gets which, and why), dot precision
    (:func:`.plan.dot_precision`). ``store``: the forward that also writes the exponentials (128 x 64 tiles, whose
    stores would otherwise take the registers past 168 on sm_90); ``heavy``: "forward" / "backward" for that kernel
    with an entropy term and a soft-cap in one epilogue (:func:`.plan.linear_tiles`)."""
    wide = dtype in (torch.float32, torch.float64)
    upcast = dtype == torch.float64 or (dtype == torch.bfloat16 and device.interpreter)
    return dict(UPCAST=upcast, DOT_PRECISION=dot_precision(wide, device), GROUP_N=GROUP_N,
                **linear_tiles(4 if wide else 2, hidden_size, device, store, heavy))


def num_splits(num_rows: int, vocab_size: int, config: dict, device: Device) -> int:
    """Vocabulary splits of the forward: one group of GROUP_N token blocks x splits fills the SMs (a few in the
    interpreter, so that the merge is exercised); never more than the vocabulary tiles, never 0."""
    token_blocks = max(1, triton.cdiv(num_rows, config["BLOCK_N"]))
    vocab_blocks = triton.cdiv(vocab_size, config["BLOCK_V"])
    target = 4 if device.interpreter else device.sm_count
    splits = max(1, min(vocab_blocks, triton.cdiv(target, min(token_blocks, GROUP_N))))
    return triton.cdiv(vocab_blocks, triton.cdiv(vocab_blocks, splits))  # no empty split


def _check_operands(rows, weight, bias):
    if rows.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("the linear kernels need hidden and weight with a contiguous last dimension")
    if bias is not None and bias.dim() != 1:
        raise ValueError(f"bias must be (V,), got shape {tuple(bias.shape)}")


def _check_chunk(buffer):
    if buffer.stride(-1) != 1 or buffer.shape[0] * buffer.stride(0) >= 2**31:
        raise ValueError("a chunk buffer must have a contiguous last dimension and fewer than 2^31 elements "
                         "(the kernels address it with int32 offsets)")


def _operand_args(rows, weight, bias):
    """hidden, weight, bias pointers, then V, H, T', hidden's strides, weight's stride, bias's stride."""
    _check_operands(rows, weight, bias)
    vocab_size, hidden_size = weight.shape
    return ((rows, weight, weight if bias is None else bias),
            (vocab_size, hidden_size, rows.shape[1], rows.stride(0), rows.stride(1), weight.stride(0),
             0 if bias is None else bias.stride(0)))


def _spec_args(spec: LogitSpec) -> tuple:
    return spec.s, spec.cap, spec.cap_scale


def forward_plan(rows, weight, bias, scored, target, parts, spec: LogitSpec, device: Device, exp=None,
                 tile_max=None) -> Plan:
    """The forward over the scored rows ``scored`` (M,) int64 of rows (B', T', H) x weight (V, H).

    parts: (3, splits, M) float32 out (splits from :func:`num_splits`): each split's max y, sum of exponentials and
    label y; (4, splits, M) for the ENTROPY variant, whose 4th is the split's sum of exp(d) d.
    exp (M, V) in the input dtype and tile_max (M, cdiv(V, BLOCK_V)) float32 to store the exponentials
    (three-GEMM schedule), or None.
    """
    store = exp is not None
    if parts.dim() != 3 or parts.shape[0] not in (3, 4):
        raise ValueError(f"parts must be (3, splits, M), or (4, splits, M) with entropy, got {tuple(parts.shape)}")
    entropy = parts.shape[0] == 4
    config = tile_config(rows.dtype, weight.shape[1], device, store, heavy("forward", entropy, spec))
    num_rows, splits = scored.shape[0], parts.shape[1]
    pointers, sizes = _operand_args(rows, weight, bias)
    vocab_blocks = triton.cdiv(weight.shape[0], config["BLOCK_V"])
    if store:
        _check_chunk(exp)
    grid = (triton.cdiv(num_rows, config["BLOCK_N"]) * splits,)
    args = (*pointers, scored, target, parts[0], parts[1], parts[2], parts[3] if entropy else parts,
            exp if store else parts, tile_max if store else parts, num_rows, *sizes, exp.stride(0) if store else 0,
            tile_max.stride(0) if store else 0, *_spec_args(spec), splits, triton.cdiv(vocab_blocks, splits))
    meta = dict(HAS_BIAS=bias is not None, STORE_EXP=store, ENTROPY=entropy, SOFTCAP=spec.softcap is not None,
                **config)
    name = "linear_fwd" + ("_store" if store else "") + _variant(entropy, spec)
    return Plan(linear_logprob_fwd_kernel, grid, args, meta, _label(name, rows, weight, bias, config))


def backward_plan(rows, weight, bias, chunk, target, norm, coefs: Coefs, grad, spec: LogitSpec,
                  device: Device) -> Plan:
    """dx of the scored rows ``chunk`` (M_c,) into grad (M_c, V), logits recomputed (four-GEMM schedule).

    target (N,) int64; norm (2, M_c) float32 from the forward, coefs (backend.Coefs, (M_c,) float32 each) of the
    chunk's rows; with coefs.entropy the ENTROPY variant."""
    entropy = coefs.entropy is not None
    config = tile_config(rows.dtype, weight.shape[1], device, heavy=heavy("backward", entropy, spec))
    num_rows = chunk.shape[0]
    pointers, sizes = _operand_args(rows, weight, bias)
    _check_chunk(grad)
    _check_rows_of(num_rows, norm, coefs)
    grid = (triton.cdiv(num_rows, config["BLOCK_N"]) * triton.cdiv(weight.shape[0], config["BLOCK_V"]),)
    per_token = (coefs.token_entropy, coefs.entropy) if entropy else (coefs.logprob, coefs.logprob)
    args = (*pointers, chunk, target, norm, coefs.logprob, *per_token, grad, num_rows, *sizes, grad.stride(0),
            *_spec_args(spec))
    meta = dict(HAS_BIAS=bias is not None, ENTROPY=entropy, SOFTCAP=spec.softcap is not None, **config)
    return Plan(linear_logprob_bwd_kernel, grid, args, meta,
                _label("linear_bwd" + _variant(entropy, spec), rows, weight, bias, config))


def grad_from_exp_plan(exp, tile_max, target, norm, coefs: Coefs, spec: LogitSpec, block_v: int,
                       device: Device = None) -> Plan:
    """exp (M_c, V) from forward_plan(exp=...) -> dx in place; target (M_c,) int64, norm (2, M_c), coefs of its
    rows. ``block_v``: the BLOCK_V of that forward (tile_max holds one float per row and BLOCK_V columns). No
    soft-cap variant: dy/dx needs y, which the exponentials do not keep (a capped call recomputes instead). 128
    threads (4 warps; 2 of AMD CDNA's 64 threads), so that each moves 16 bytes of a 16 x 64 bf16 tile."""
    num_rows, vocab_size = exp.shape
    _check_chunk(exp)
    _check_rows_of(num_rows, norm, coefs)
    entropy = coefs.entropy is not None
    grid = (triton.cdiv(num_rows, GRAD_BLOCK_N), triton.cdiv(vocab_size, block_v))
    per_token = (coefs.token_entropy, coefs.entropy) if entropy else (coefs.logprob, coefs.logprob)
    num_warps = 128 // (32 if device is None else device.warp_size)
    return Plan(linear_grad_from_exp_kernel, grid,
                (exp, tile_max, target, norm, coefs.logprob, *per_token, num_rows, vocab_size, exp.stride(0),
                 tile_max.stride(0), spec.s),
                dict(ENTROPY=entropy, BLOCK_N=GRAD_BLOCK_N, BLOCK_V=block_v, num_warps=num_warps),
                f"linear_grad_from_exp{_variant(entropy, spec)} V={vocab_size} {_dtype_name(exp.dtype)}")


def heavy(kernel: str, entropy: bool, spec: LogitSpec) -> str:
    """``kernel`` where its epilogue holds both an entropy term and a soft-cap (tile_config's ``heavy``), else ""."""
    return kernel if entropy and spec.softcap is not None else ""


def _variant(entropy: bool, spec: LogitSpec) -> str:
    return ("_entropy" if entropy else "") + ("_softcap" if spec.softcap is not None else "")


def _check_rows_of(num_rows: int, norm, coefs: Coefs) -> None:
    """norm (2, M_c) and each coefficient (M_c,): contiguous float32, read through raw pointers."""
    if norm.dtype != torch.float32 or tuple(norm.shape) != (2, num_rows) or not norm.is_contiguous():
        raise ValueError(f"norm must be a contiguous (2, {num_rows}) float32 tensor, got {tuple(norm.shape)}")
    for name, c in zip(Coefs._fields, coefs):
        if c is not None:
            check_flat(name, c, torch.float32)
            if c.numel() != num_rows:
                raise ValueError(f"{name} must hold one element per row ({num_rows}), got {c.numel()}")


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _label(name, rows, weight, bias, config):
    vocab_size, hidden_size = weight.shape
    tile = f"{config['BLOCK_N']}x{config['BLOCK_V']}x{config['BLOCK_H']} w{config['num_warps']} s{config['num_stages']}"
    return (f"{name} H={hidden_size} V={vocab_size} {_dtype_name(rows.dtype)}{' bias' if bias is not None else ''}"
            f" tile={tile}")
