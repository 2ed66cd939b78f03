"""Triton linear path: GVPO token statistics from hidden states and the LM head, logits never materialised.

Tiles. A tile of logits [BLOCK_N tokens, BLOCK_V vocabulary rows] is a tl.dot of hidden rows by weight rows,
accumulated in float32 over H in BLOCK_H steps (``_logits_tile``). In bf16/fp16 on a GPU the tile is 128 x 128 with
8 warps: on sm_90 wgmma on two warpgroups (64 tokens each), on sm_100 tcgen05, on sm_80-89 / sm_120 mma.sync, on
AMD CDNA mfma (depth, stages and compile options per device family: ``plan.linear_tiles``). Both operands are
loaded through cp.async by Triton's software pipeliner (num_stages): the hidden rows are gathered through an
index of scored rows, and what lets the pipeliner prefetch them is that the strides of hidden are *specialised*
(Triton keys an int argument only on == 1 and % 16, so a new N or T adds no variant), which keeps the %16
alignment fact of every row. Only the lengths (num_rows, seq_len) and the grid's split counts are not specialised.
fp32 inputs use IEEE fp32 dots (not TF32: fp32's tolerance is 1e-5), 64 x 64 x 32 tiles; fp64 is computed in fp32.

Tile order (L2). Every kernel over (token blocks x vocabulary) runs on a 1-D grid in *grouped* order: the
programs of one group share GROUP_N token blocks, the token block varying fastest. At Qwen2.5-7B shape on 132 SMs
the programs in flight hold 8 hidden strips (128 x 3584 bf16, 7 MB) and ~17 weight tiles (15 MB): both stay in
the 50 MB L2, so each hidden strip is read from HBM about once and each weight tile once per 8 token blocks.

Forward (``linear_logprob_fwd_kernel``): program (token block, split) walks its split of the vocabulary tile by
tile, folding each tile into a running max and sum of exponentials per token (online log-sum-exp) and picking the
label's logit out of the tile that holds it; three floats per token and split leave the kernel, a tiny merge
combines the splits. Splits: about SM-count / GROUP_N, so one group of programs fills the GPU. With STORE_EXP it
also writes, for the three-GEMM schedule, exp(logits / T - tile max) in the input dtype and each (token, tile)'s
max in float32: softmax = exp * exp(tile max - lse) is then exact to the input dtype's rounding, as dL/dlogits
in that dtype is anyway (a bf16 logit would not be: ~4% error in the softmax; float32 logits would cost twice the
bytes and twice the chunk memory).

Entropy (ENTROPY, a constexpr; off, the kernels are the log-prob-only ones). The forward keeps one more running
sum per token beside the online log-sum-exp, A = sum exp(z - m) (z - m) relative to the running max m (each tile's
own sum moved to the new max with the old one: e^d (A + d L)), so H = log L - A / L without cancelling lse against
E[z]; each split writes its A as a 4th partial, merged on the host with the others (``_LinearWork.forward``). On
sm_90 the tile's second row sum costs the forward 177-183 registers (plain: 153-155; no spills; the shared memory
already holds an SM to one CTA). The recomputing backward writes c_lp (onehot - p) + c_ent p (lse - z - H) =
onehot c_lp + p (a - c_ent log p), a = -c_ent H - c_lp, one chain per logit (128 registers, as the plain one);
``linear_token_stats_backward`` is the four-GEMM schedule with it. -inf logits (p = 0) add exactly 0 everywhere.

Backward, the GEMM schedule. d_hidden = G @ W and d_weight = G^T @ h with G = dL/dlogits = c (onehot - softmax).
A fully fused kernel would add each tile's contribution into d_hidden and d_weight with atomics moving
N H V / BLOCK_V floats (~10^11 at 16k tokens x 152k vocabulary); instead G is formed one chunk of scored rows at
a time (a buffer of at most CHUNK_BYTES: memory is bounded whatever N and V are) and contracted by cuBLAS:
  - three GEMMs when a chunk's coefficients dL/ds are known before its gradient pass. On-policy (no
    ref_logprobs) r_i = 0 whatever s_i is, so dL/ds_i = -beta/(k-1) (R_i - mean R) times the reduction's scale,
    known before any logit; with an anchor dL/ds needs every s of a group, so the chunks hold whole groups (the
    scored rows ordered by group) and each chunk's group stage runs right after its forward.
    ``linear_loss_and_grads`` runs, per chunk, the forward with STORE_EXP (GEMM 1), turns the stored
    exponentials into G in place (``linear_grad_from_exp_kernel``, memory-bound: 4 bytes per element), and the
    two cuBLAS GEMMs. A 1 GiB chunk holds 3530 tokens at V 152064: a group of 8 responses of 400 tokens fits;
  - four GEMMs otherwise (one group's scored rows exceed a chunk): the forward for the log-sum-exps, the group
    stage, then per chunk ``linear_logprob_bwd_kernel`` recomputes the logits tile and writes G, and the same two
    cuBLAS GEMMs (``linear_forward`` / ``linear_backward``, also what distributed.py drives).
Who does which GEMM: the logits GEMMs are Triton, because their epilogue (online log-sum-exp, label pick,
softmax-minus-onehot) is what keeps N x V out of memory; d_hidden (K = V) and d_weight (K = chunk tokens) are
plain GEMMs with no epilogue to fuse, where cuBLAS (wgmma, TMA, warp-specialised) is at or above Triton's best.
d_weight is accumulated in float32 across chunks (DESIGN section 4) *inside* the GEMM: cuBLAS
``addmm(acc, G^T, h, out_dtype=float32, out=acc)`` reads bf16 operands and adds in fp32 into the accumulator (no
d_weight-sized temporary, one read and one write of it per chunk); chunks of 1 GiB (3530 tokens at V 152064)
keep that traffic at 2 x 2.2 GB per chunk. Where a PyTorch lacks ``addmm(out_dtype=)`` the chunk's product goes
through a float32 temporary.

Estimate at Qwen2.5-7B (N 16384, H 3584, V 152064, bf16) on an H100 SXM (989 TFLOP/s dense bf16, 3.35 TB/s):
one GEMM of 2 N H V = 17.9 TFLOP takes 18.1 ms at peak, so the floor of 8 N H V is 72.2 ms. From the compiled
form (sm_90, Triton 3.9: wgmma on two warpgroups, both operands through cp.async, 4 stages, no spills, 153 / 139 /
127 registers for forward / forward storing / recomputing backward; no warp specialisation, so taken at ~70% of
peak for 128 x 128 tiles, ~60% for the storing forward's 128 x 64, ~80% for cuBLAS):
  three GEMMs (on-policy, or an anchor with groups that fit a chunk): forward storing 30 ms + its 5 GB of stores
    ~1 ms + G pass (10 GB) 3.3 ms + d_hidden 22.6 ms + d_weight 22.6 ms + 5 chunks x 4.4 GB of float32
    accumulator traffic 6.5 ms ~ 86 ms = 1.19x the floor (with an anchor, plus one group stage per chunk: us);
  four GEMMs (a group larger than a chunk): forward 25.8 ms + recomputing backward 26.8 ms + 22.6 + 22.6 + 6.5
    ~ 104 ms = 1.44x.
What would close the rest: a persistent, warp-specialised forward (TMA descriptors and a producer warpgroup,
128 x 256 tiles: ~80% of peak, -8 ms) once Triton 3.6 and 3.9 share that API; for the four-GEMM case, chunking G
along the vocabulary when N < V (each d_weight row written once by one GEMM with K = N: -6.5 ms); and d_hidden
fused into the recomputing kernel's epilogue where H is small enough for its accumulator to stay on chip.

Triton's interpreter multiplies the raw bits of bfloat16 dot operands (triton-lang/triton#11584, "not supported
yet"), so on the CPU bfloat16 tiles are upcast to fp32 first: the interpreter tests check everything but the bf16
tl.dot itself, which tests/test_gpu.py covers on a GPU.

Every launcher is a pure plan function (``*_plan``: tensors, which may be meta tensors, and a plan.Device ->
plan.Plan; reads no tensor values) and a ``launch`` of it; tests/aot_linear.py compiles the same plans.
"""

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..layout import Layout
from ..torch_impl import _token_coef
from .group import group_stage
from .plan import Device, Plan, device_of, dot_precision, launch, linear_tiles

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
def _logits_tile(h_rows, w_ptr, bias_ptr, offs_v, in_rows, in_vocab, hidden_size, stride_w_v, stride_bias_v,
                 inv_temperature, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """[BLOCK_N, BLOCK_V] float32 tile of (hidden @ weight.T + bias) / T, accumulated over H in BLOCK_H steps."""
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
    return acc * inv_temperature


@triton.jit
def _label_logits(h_rows, w_ptr, bias_ptr, label_col, in_rows, hidden_size, stride_w_v, stride_bias_v,
                  inv_temperature, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """(BLOCK_N,) float32 (hidden . weight[label] + bias[label]) / T of each row, 0 where label_col is -1."""
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
    return tl.where(has, label * inv_temperature, 0.0)


@triton.jit
def _xlogx_term(e, d):
    """e * d for e = exp(d): a term of a sum of p log p, exactly 0 where d = -inf (never 0 * -inf = NaN)."""
    return e * tl.maximum(d, -FLT_MAX)


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
    max_ptr,  # (SPLITS, M) float32 out: running max of logits / T
    sumexp_ptr,  # (SPLITS, M) float32 out: sum of exp(logits / T - max)
    label_ptr,  # (SPLITS, M) float32 out: the target's logit / T (0 in splits that do not hold it)
    ent_ptr,  # (SPLITS, M) float32 out with ENTROPY: sum of exp(logits / T - max) (logits / T - max), <= 0
    exp_ptr,  # (M, V) out with STORE_EXP, input dtype: exp(logits / T - tile max); else unused
    tile_max_ptr,  # (M, cdiv(V, BLOCK_V)) float32 out with STORE_EXP: each tile's max (0 for a tile of -inf)
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
    inv_temperature,
    num_splits,
    blocks_per_split,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    STORE_EXP: tl.constexpr,
    ENTROPY: tl.constexpr,
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
        acc_ent = tl.zeros([BLOCK_N], tl.float32)  # sum of exp(z - m) (z - m) of the tiles so far, relative to m
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, vocab_size)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        in_vocab = offs_v < vocab_size
        b_z = _logits_tile(h_rows, w_ptr, bias_ptr, offs_v, in_rows, in_vocab, hidden_size, stride_w_v,
                           stride_bias_v, inv_temperature, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V,
                           BLOCK_H)
        b_z = tl.where(in_vocab[None, :], b_z, float("-inf"))
        tile_max = tl.max(b_z, axis=1)
        tile_safe = tl.where(tile_max == float("-inf"), 0.0, tile_max)  # a tile of -inf logits must not give NaN
        b_e = tl.exp(b_z - tile_safe[:, None])
        m_new = tl.maximum(m, tile_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if ENTROPY:  # both partials (the sums so far, the tile's) moved to the new max: e^d (A + d L)
            # two sums, not one tl.reduce of both: as many registers, and the interpreter runs a combine_fn slowly
            tile_ent = tl.sum(_xlogx_term(b_e, b_z - tile_safe[:, None]), axis=1)
            tile_sum = tl.sum(b_e, axis=1)
            alpha, beta = tl.exp(m - m_safe), tl.exp(tile_safe - m_safe)
            acc_ent = (alpha * acc_ent + _xlogx_term(alpha, m - m_safe) * acc_exp + beta * tile_ent
                       + _xlogx_term(beta, tile_safe - m_safe) * tile_sum)
            acc_exp = acc_exp * alpha + tile_sum * beta
        else:
            acc_exp = acc_exp * tl.exp(m - m_safe) + tl.sum(b_e, axis=1) * tl.exp(tile_safe - m_safe)
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
                              inv_temperature, HAS_BIAS, BLOCK_N, BLOCK_H)
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
    lse_ptr,  # (N,) float32 log-sum-exp of logits / T from the forward
    coef_ptr,  # (N,) float32 grad_loss * dL/ds[seq] / T per token (with ENTROPY: c_lp, the log-prob's)
    entropy_ptr,  # (N,) float32 with ENTROPY: the entropy from the forward; else unused
    coef_ent_ptr,  # (N,) float32 with ENTROPY: c_ent, the entropy's coefficient / T; else unused
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
    inv_temperature,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    ENTROPY: tl.constexpr,
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
    h_rows, label_col, token = _hidden_rows(h_ptr, rows_ptr, target_ptr, offs_n, in_rows, vocab_size, seq_len,
                                            stride_h_b, stride_h_t)
    lse = tl.load(lse_ptr + token, mask=in_rows, other=0.0)
    coef = tl.load(coef_ptr + token, mask=in_rows, other=0.0)
    if ENTROPY:
        coef_ent = tl.load(coef_ent_ptr + token, mask=in_rows, other=0.0)
        ent_a = -coef_ent * tl.load(entropy_ptr + token, mask=in_rows, other=0.0) - coef

    b_z = _logits_tile(h_rows, w_ptr, bias_ptr, offs_v, in_rows, in_vocab, hidden_size, stride_w_v, stride_bias_v,
                       inv_temperature, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    b_p = tl.exp(b_z - lse[:, None])
    if ENTROPY:  # c_lp (onehot - p) + c_ent p (lse - z - H) = onehot c_lp + p (a - c_ent log p), a = -c_ent H - c_lp
        b_g = (tl.where(offs_v[None, :] == label_col[:, None], coef[:, None], 0.0)
               + b_p * (ent_a[:, None] - coef_ent[:, None] * tl.maximum(b_z - lse[:, None], LOG_P_FLOOR)))
    else:
        b_g = coef[:, None] * (tl.where(offs_v[None, :] == label_col[:, None], 1.0, 0.0) - b_p)
    g_tile = g_ptr + offs_n[:, None] * stride_g_n + offs_v[None, :]
    tl.store(g_tile, b_g.to(g_ptr.dtype.element_ty), mask=in_rows[:, None] & in_vocab[None, :])


@triton.jit(do_not_specialize=["num_rows"])
def linear_grad_from_exp_kernel(
    # pointers
    e_ptr,  # (M_c, V) in: exp(logits / T - tile max) from the forward; out: dL/dlogits, same dtype, in place
    tile_max_ptr,  # (M_c, cdiv(V, BLOCK_V)) float32
    target_ptr,  # (M_c,) int64 targets of the chunk's rows
    lse_ptr,  # (M_c,) float32
    coef_ptr,  # (M_c,) float32 dL/ds[seq] / T
    # sizes and strides
    num_rows,
    vocab_size,
    stride_e_n,
    stride_tm_n,
    # meta-parameters
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
    scale = tl.exp(tl.load(tile_max_ptr + offs_n * stride_tm_n + pid_v, mask=in_rows, other=0.0)
                   - tl.load(lse_ptr + offs_n, mask=in_rows, other=0.0))
    coef = tl.load(coef_ptr + offs_n, mask=in_rows, other=0.0)
    e_tile = e_ptr + offs_n[:, None] * stride_e_n + offs_v[None, :]
    b_p = tl.load(e_tile, mask=mask, other=0.0).to(tl.float32) * scale[:, None]
    b_g = coef[:, None] * (tl.where(offs_v[None, :] == label_col[:, None], 1.0, 0.0) - b_p)
    tl.store(e_tile, b_g.to(e_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# plans: shapes, dtypes and the device -> launches (no tensor values read; meta tensors work)


def tile_config(dtype: torch.dtype, hidden_size: int, device: Device, store: bool = False) -> dict:
    """The meta-parameters of the logits tiles: block sizes, warps and stages from the dtype, H and the device
    (never from N; :func:`.plan.linear_tiles` says which family of devices gets which, and why), dot precision
    (:func:`.plan.dot_precision`). ``store``: the forward that also writes the exponentials (128 x 64 tiles, whose
    stores would otherwise take the registers past 168 on sm_90)."""
    wide = dtype in (torch.float32, torch.float64)
    upcast = dtype == torch.float64 or (dtype == torch.bfloat16 and device.interpreter)
    return dict(UPCAST=upcast, DOT_PRECISION=dot_precision(wide, device), GROUP_N=GROUP_N,
                **linear_tiles(4 if wide else 2, hidden_size, device, store))


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


def forward_plan(rows, weight, bias, scored, target, parts, temperature: float, device: Device, exp=None,
                 tile_max=None) -> Plan:
    """The forward over the scored rows ``scored`` (M,) int64 of rows (B', T', H) x weight (V, H).

    parts: (3, splits, M) float32 out (splits from :func:`num_splits`): each split's max, sum of exponentials and
    label logit; (4, splits, M) for the ENTROPY variant, whose 4th is the split's sum of exp(z - max) (z - max).
    exp (M, V) in the input dtype and tile_max (M, cdiv(V, BLOCK_V)) float32 to store the exponentials
    (three-GEMM schedule), or None.
    """
    store = exp is not None
    if parts.dim() != 3 or parts.shape[0] not in (3, 4):
        raise ValueError(f"parts must be (3, splits, M), or (4, splits, M) with entropy, got {tuple(parts.shape)}")
    entropy = parts.shape[0] == 4
    config = tile_config(rows.dtype, weight.shape[1], device, store)
    num_rows, splits = scored.shape[0], parts.shape[1]
    pointers, sizes = _operand_args(rows, weight, bias)
    vocab_blocks = triton.cdiv(weight.shape[0], config["BLOCK_V"])
    if store:
        _check_chunk(exp)
    grid = (triton.cdiv(num_rows, config["BLOCK_N"]) * splits,)
    args = (*pointers, scored, target, parts[0], parts[1], parts[2], parts[3] if entropy else parts,
            exp if store else parts, tile_max if store else parts, num_rows, *sizes, exp.stride(0) if store else 0,
            tile_max.stride(0) if store else 0, 1.0 / temperature, splits, triton.cdiv(vocab_blocks, splits))
    meta = dict(HAS_BIAS=bias is not None, STORE_EXP=store, ENTROPY=entropy, **config)
    name = "linear_fwd" + ("_store" if store else "") + ("_entropy" if entropy else "")
    return Plan(linear_logprob_fwd_kernel, grid, args, meta, _label(name, rows, weight, bias, config))


def backward_plan(rows, weight, bias, chunk, target, lse, coef, grad, temperature: float, device: Device,
                  token_entropy=None, coef_entropy=None) -> Plan:
    """dL/dlogits of the scored rows ``chunk`` (M_c,) into grad (M_c, V), logits recomputed (four-GEMM schedule).

    target, lse, coef: (N,) per token (int64, float32: lse from the forward, coef = dL/ds[seq] / T). With
    token_entropy and coef_entropy ((N,) float32: the forward's entropy, its coefficient / T; the ENTROPY
    variant) the gradient of sum coef * logprob + coef_entropy * entropy instead."""
    config = tile_config(rows.dtype, weight.shape[1], device)
    num_rows = chunk.shape[0]
    pointers, sizes = _operand_args(rows, weight, bias)
    _check_chunk(grad)
    entropy = token_entropy is not None
    if entropy != (coef_entropy is not None):
        raise ValueError("token_entropy and coef_entropy go together (the entropy's gradient needs both)")
    grid = (triton.cdiv(num_rows, config["BLOCK_N"]) * triton.cdiv(weight.shape[0], config["BLOCK_V"]),)
    args = (*pointers, chunk, target, lse, coef, token_entropy if entropy else lse,
            coef_entropy if entropy else coef, grad, num_rows, *sizes, grad.stride(0), 1.0 / temperature)
    return Plan(linear_logprob_bwd_kernel, grid, args, dict(HAS_BIAS=bias is not None, ENTROPY=entropy, **config),
                _label("linear_bwd" + ("_entropy" if entropy else ""), rows, weight, bias, config))


def grad_from_exp_plan(exp, tile_max, target, lse, coef, block_v: int, device: Device = None) -> Plan:
    """exp (M_c, V) from forward_plan(exp=...) -> dL/dlogits in place; target, lse, coef (M_c,) of its rows.
    ``block_v``: the BLOCK_V of that forward (tile_max holds one float per row and BLOCK_V columns). 128 threads
    (4 warps; 2 of AMD CDNA's 64 threads), so that each moves 16 bytes of a 16 x 64 bf16 tile."""
    num_rows, vocab_size = exp.shape
    _check_chunk(exp)
    grid = (triton.cdiv(num_rows, GRAD_BLOCK_N), triton.cdiv(vocab_size, block_v))
    num_warps = 128 // (32 if device is None else device.warp_size)
    return Plan(linear_grad_from_exp_kernel, grid,
                (exp, tile_max, target, lse, coef, num_rows, vocab_size, exp.stride(0), tile_max.stride(0)),
                dict(BLOCK_N=GRAD_BLOCK_N, BLOCK_V=block_v, num_warps=num_warps),
                f"linear_grad_from_exp V={vocab_size} {_dtype_name(exp.dtype)}")


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _label(name, rows, weight, bias, config):
    vocab_size, hidden_size = weight.shape
    tile = f"{config['BLOCK_N']}x{config['BLOCK_V']}x{config['BLOCK_H']} w{config['num_warps']} s{config['num_stages']}"
    return (f"{name} H={hidden_size} V={vocab_size} {_dtype_name(rows.dtype)}{' bias' if bias is not None else ''}"
            f" tile={tile}")


# ----------------------------------------------------------------------------------------------------------------
# the backend interface


def _scored_forward(rows, weight, bias, target, temperature: float, entropy: bool):
    """token log-prob, lse (and entropy) (N,) float32 of every token, 0 where not scored."""
    work = _LinearWork(rows, weight, bias, target, temperature)
    outs = [torch.zeros(target.shape, dtype=torch.float32, device=rows.device) for _ in range(3 if entropy else 2)]
    if work.scored.numel():
        for out, value in zip(outs, work.forward(work.scored, entropy=entropy)):
            out[work.scored] = value
    return tuple(outs)


def linear_forward(rows: torch.Tensor, weight: torch.Tensor, bias, target: torch.Tensor, temperature: float):
    """rows (B', T', H) hidden, weight (V, H) -> token log-prob (N,), lse (N,), float32; 0 where not scored."""
    return _scored_forward(rows, weight, bias, target, temperature, entropy=False)


def linear_token_stats_forward(rows: torch.Tensor, weight: torch.Tensor, bias, target: torch.Tensor,
                               temperature: float):
    """rows (B', T', H) hidden, weight (V, H), bias (V,) or None, target (N,) int64 (-1: not scored) ->
    token_logprob, lse, token_entropy (N,) float32 of softmax((rows @ weight.T + bias) / T), from one pass over
    the logits tiles (the entropy's running sum beside the log-sum-exp's), nothing N x V allocated;
    token_logprob and token_entropy are 0 where not scored."""
    return _scored_forward(rows, weight, bias, target, temperature, entropy=True)


def _recomputed_grads(work, target, lse, coef, token_entropy=None, coef_entropy=None):
    """The four-GEMM gradient pass: per chunk, the logits recomputed into dL/dlogits (with the entropy's term when
    given), then contracted into work's gradients."""
    for chunk in work.chunks():
        grad = work.chunk_buffer(chunk.numel())
        launch(backward_plan(work.rows, work.weight, work.bias, chunk, target, lse, coef, grad, work.temperature,
                             work.device, token_entropy, coef_entropy))
        work.add_grads(chunk, grad)
    return work.grads()


def linear_backward(rows, weight, bias, lay: Layout, lse, grad_seq_logprob, grad_loss, temperature: float,
                    needs=(True, True, True)):
    """d_hidden (B', T', H) in the hidden dtype, d_weight (V, H) and d_bias (V,) in the weight dtype: the gradient
    pass of the four-GEMM schedule (logits recomputed, lse from the forward); zeros where nothing is scored.
    ``needs`` (hidden, weight, bias): the gradients to compute (None for the others: a frozen head skips a GEMM)."""
    work = _LinearWork(rows, weight, bias, lay.target, temperature, (needs[0], needs[1], needs[2] and bias is not None))
    return _recomputed_grads(work, lay.target, lse, _token_coef(lay, grad_seq_logprob, grad_loss, temperature))


def linear_token_stats_backward(rows, weight, bias, target, lse, token_entropy, coef_logprob, coef_entropy,
                                temperature: float):
    """The gradient of sum_n c_lp[n] logprob[n] + c_ent[n] entropy[n] through the head: d_hidden (B', T', H) in
    the hidden dtype, d_weight (V, H) and d_bias (V,) (None without a bias) in the weight dtype, accumulated in
    float32; zeros where nothing is scored. lse, token_entropy (N,) float32 from
    :func:`linear_token_stats_forward`; coef_logprob, coef_entropy (N,) float32, already / T, 0 where not
    scored. Logits recomputed chunk by chunk: dz = p (a - b z) + onehot c_lp, a = c_ent (lse - H) - c_lp,
    b = c_ent."""
    work = _LinearWork(rows, weight, bias, target, temperature, (True, True, bias is not None))
    return _recomputed_grads(work, target, lse, coef_logprob, token_entropy, coef_entropy)


def linear_loss_and_grads(rows, weight, bias, lay: Layout, beta: float, temperature: float, needs,
                          entropy: bool = False):
    """The linear path's loss and statistics and, for grad_loss = 1, the gradients that ``needs`` asks for.

    Args:
        rows: (B', T', H) hidden states (``layout.as_rows``); weight (V, H); bias (V,) or None.
        needs: (hidden, weight, bias) booleans; gradients not asked for are None (and their GEMMs skipped).
        entropy: also return each token's entropy, from the forward's pass (one more running sum, no extra GEMM).

    Returns:
        loss (), seq_logprob (S,), implicit_reward (S,), grad_seq_logprob (S,) float32, d_hidden (B', T', H) in the
        hidden dtype, d_weight (V, H) and d_bias (V,) in the weight dtype (accumulated in float32), or None; with
        ``entropy``, then token_entropy (N,) float32 (0 where not scored).

    Three GEMMs whenever the coefficients dL/ds of a chunk's rows are known before its gradient pass: on-policy
    (no ref_logprobs: dL/ds does not depend on s) in any chunks, and with an anchor in chunks of whole groups
    (each chunk's group stage runs right after its forward). Four otherwise: when a single group's scored rows
    exceed a chunk (forward, group stage, then :func:`linear_backward`); see the module docstring.
    """
    needs = (needs[0], needs[1], needs[2] and bias is not None)
    work = _LinearWork(rows, weight, bias, lay.target, temperature, needs)
    on_policy = lay.token_ref is None
    chunks = (work.chunks() if on_policy else work.group_chunks(lay)) if any(needs) else None
    extra = ()  # (token_entropy,) with entropy
    if chunks is None:
        token_logprob, lse, *extra = _scored_forward(rows, weight, bias, lay.target, temperature, entropy)
        loss, *stats = group_stage(token_logprob, lay, beta)
        if not any(needs):
            return loss, *stats, None, None, None, *extra
        ones = torch.ones((), dtype=torch.float32, device=rows.device)
        return (loss, *stats, *linear_backward(rows, weight, bias, lay, lse, stats[2], ones, temperature, needs),
                *extra)

    token_logprob = torch.zeros(lay.num_tokens, dtype=torch.float32, device=rows.device)
    if entropy:
        extra = (torch.zeros(lay.num_tokens, dtype=torch.float32, device=rows.device),)
    ones = torch.ones((), dtype=torch.float32, device=rows.device)

    def coefficients():
        """Every token's dL/ds / T; right for the groups whose rows are all in token_logprob already."""
        return _token_coef(lay, group_stage(token_logprob, lay, beta)[3], ones, temperature)

    coef = coefficients() if on_policy else None  # on-policy r = 0 whatever s is
    for chunk in chunks:
        exp = work.chunk_buffer(chunk.numel())
        tile_max = work.tile_max_buffer(chunk.numel())
        token_logprob[chunk], lse, *chunk_entropy = work.forward(chunk, exp, tile_max, entropy)
        if entropy:
            extra[0][chunk] = chunk_entropy[0]
        chunk_coef = (coef if on_policy else coefficients())[chunk]  # anchored: this chunk's groups are whole
        launch(grad_from_exp_plan(exp, tile_max, lay.target[chunk], lse, chunk_coef, work.store_config["BLOCK_V"],
                                  work.device))
        work.add_grads(chunk, exp)
    return (*group_stage(token_logprob, lay, beta), *work.grads(), *extra)


class _LinearWork:
    """One linear call: the scored rows, their chunks and buffers, the launches over a chunk, and the float32
    gradient accumulators (allocated only for the gradients in ``needs``)."""

    def __init__(self, rows, weight, bias, target, temperature: float, needs=(False, False, False)):
        self.rows, self.bias, self.temperature = rows, bias, temperature
        self.weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        self.target = target
        self.device = device_of(rows.device)
        self.config = tile_config(rows.dtype, weight.shape[1], self.device)
        self.store_config = tile_config(rows.dtype, weight.shape[1], self.device, store=True)
        self.scored = (target >= 0).nonzero().squeeze(1)
        self.flat_hidden = rows.reshape(-1, rows.shape[-1])
        self._buffers = {}
        f32 = dict(dtype=torch.float32, device=rows.device)
        self.d_hidden = torch.zeros(self.flat_hidden.shape, dtype=rows.dtype, device=rows.device) if needs[0] else None
        self.d_weight = torch.zeros(weight.shape, **f32) if needs[1] else None
        self.d_bias = torch.zeros(weight.shape[0], **f32) if needs[2] else None

    def chunk_rows(self) -> int:
        """Rows per chunk: a chunk buffer of at most CHUNK_BYTES (at least BLOCK_N rows)."""
        vocab_size, block = self.weight.shape[0], self.config["BLOCK_N"]
        return max(block, CHUNK_BYTES // (vocab_size * self.rows.element_size()) // block * block)

    def chunks(self):
        """Slices of the scored rows, each of at most chunk_rows()."""
        step = self.chunk_rows()
        return [self.scored[lo:lo + step] for lo in range(0, self.scored.numel(), step)]

    def group_chunks(self, lay: Layout):
        """The scored rows ordered by group and cut into chunks of whole groups, each of at most chunk_rows(); None
        when one group's scored rows alone exceed that (one host sync for the per-group counts)."""
        group_of = lay.seq_group[lay.token_seq[self.scored]]
        rows = self.scored[torch.argsort(group_of, stable=True)]
        counts = torch.bincount(group_of, minlength=lay.num_groups).tolist()
        step = self.chunk_rows()
        if max(counts, default=0) > step:
            return None
        chunks, start, size = [], 0, 0
        for count in counts:
            if size + count > step:
                chunks.append(rows[start:start + size])
                start, size = start + size, 0
            size += count
        if size:
            chunks.append(rows[start:start + size])
        return chunks

    def _buffer(self, name, num_rows, cols, dtype):
        """A (num_rows, cols) view of one buffer per name, reused by every chunk (allocated for the first)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < num_rows * cols:
            buf = self._buffers[name] = empty((num_rows * cols,), dtype=dtype, device=self.rows.device)
        return buf[: num_rows * cols].view(num_rows, cols)

    def chunk_buffer(self, num_rows):
        return self._buffer("chunk", num_rows, self.weight.shape[0], self.rows.dtype)

    def tile_max_buffer(self, num_rows):
        return self._buffer("tile_max", num_rows, triton.cdiv(self.weight.shape[0], self.store_config["BLOCK_V"]),
                            torch.float32)

    def forward(self, rows_index, exp=None, tile_max=None, entropy=False):
        """token log-prob, lse (and with ``entropy`` the entropy) (M,) float32 of the scored rows rows_index (M,),
        storing exponentials if given. The splits' partials merge at their common max M: L = sum e^(m_i - M) L_i,
        A = sum e^(m_i - M) (A_i + (m_i - M) L_i), lse = M + log L, H = log L - A / L."""
        config = self.config if exp is None else self.store_config
        splits = num_splits(rows_index.numel(), self.weight.shape[0], config, self.device)
        parts = empty((4 if entropy else 3, splits, rows_index.numel()), dtype=torch.float32,
                      device=self.rows.device)
        launch(forward_plan(self.rows, self.weight, self.bias, rows_index, self.target, parts, self.temperature,
                            self.device, exp, tile_max))
        split_max, split_sumexp, split_label = parts[:3]
        top = split_max.max(dim=0).values
        shift = split_max - top
        weights = torch.exp(shift)
        sum_exp = (split_sumexp * weights).sum(dim=0)
        lse = top + torch.log(sum_exp)
        if not entropy:
            return split_label.sum(dim=0) - lse, lse
        # (m_i - M) L_i is 0, never -inf * 0, for a split of -inf logits only
        ent_sum = (weights * (parts[3] + shift.clamp(min=torch.finfo(torch.float32).min) * split_sumexp)).sum(dim=0)
        return split_label.sum(dim=0) - lse, lse, torch.log(sum_exp) - ent_sum / sum_exp

    def add_grads(self, chunk, grad):
        """Contract the chunk's dL/dlogits grad (M_c, V) into the gradients asked for (cuBLAS)."""
        if self.d_hidden is not None:
            self.d_hidden.index_copy_(0, chunk, grad @ self.weight)
        if self.d_weight is not None:
            _add_matmul_(self.d_weight, grad.T, self.flat_hidden.index_select(0, chunk))
        if self.d_bias is not None:
            self.d_bias += grad.sum(dim=0, dtype=torch.float32)

    def grads(self):
        """d_hidden (B', T', H), d_weight (V, H), d_bias (V,) in their final dtypes, None where not computed."""
        d_hidden = None if self.d_hidden is None else self.d_hidden.view(self.rows.shape)
        d_weight = None if self.d_weight is None else self.d_weight.to(self.weight.dtype)
        d_bias = None if self.d_bias is None else self.d_bias.to(self.weight.dtype)
        return d_hidden, d_weight, d_bias


_MIXED_ADDMM = [True]  # False once this PyTorch has shown it lacks addmm(out_dtype=)


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, accumulated in float32 inside the GEMM where the inputs allow it."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        if _MIXED_ADDMM[0]:
            try:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # bf16 operands, fp32 C read and written
                return
            except (TypeError, RuntimeError):
                _MIXED_ADDMM[0] = False
        try:
            acc += torch.mm(a, b, out_dtype=torch.float32)  # an older PyTorch: one float32 temporary per chunk
            return
        except TypeError:  # older still (torch < 2.8 has no out_dtype): float32 copies of the operands
            pass
    acc.addmm_(a.float(), b.float())
