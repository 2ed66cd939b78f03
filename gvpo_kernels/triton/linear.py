"""Triton linear path: GVPO token statistics from hidden states and the LM head, logits never materialised.

Forward, grid (token blocks, vocabulary splits): each program walks its split of the vocabulary in BLOCK_V
tiles; a tile of logits [BLOCK_N, BLOCK_V] is a tl.dot of hidden rows by weight rows accumulated in float32
over H, folded at once into a running max and sum of exponentials per token (online log-sum-exp), and the
label's logit is picked out of the tile that holds it. Each split writes three floats per token; a tiny merge
combines the splits. Splitting the vocabulary keeps the GPU busy when there are few tokens.

Only scored tokens are computed (prompt and padding rows are skipped entirely: in RL batches they are often
half the tokens), through an index of scored rows.

Backward, why this decomposition. d_hidden = G @ W and d_weight = G^T @ h with G = dL/dlogits. A fully fused
kernel must add each [BLOCK_N, BLOCK_V] tile's contribution into d_hidden and d_weight: with H in the thousands
neither accumulator fits in registers, so it would take atomics that move N * H * V / BLOCK_V floats (~10^11
at 16k tokens x 152k vocabulary), far more than the GEMMs themselves. Instead, for a chunk of scored tokens at a
time, one kernel recomputes each logits tile, forms G = c * (onehot - softmax) in registers and writes it in the
input dtype into a chunk buffer of at most CHUNK_BYTES (so memory stays bounded whatever N and V are); then two
GEMMs in PyTorch (cuBLAS, float32 accumulation) contract it: d_hidden for the chunk's rows, and d_weight added
into a float32 accumulator across chunks (DESIGN section 4). Four GEMMs in all: logits twice, d_hidden, d_weight.

fp32 inputs use IEEE fp32 dots (tl.dot would otherwise use TF32 on the GPU, far from fp32's 1e-5 tolerance);
fp64 inputs are computed in fp32. Triton's interpreter multiplies the raw bits of bfloat16 dot operands
(triton-lang/triton#11584, "not supported yet"), so on the CPU bfloat16 tiles are upcast to fp32 first: the
interpreter tests check everything but the bf16 tl.dot itself, which tests/test_gpu.py covers on a GPU.
"""

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..layout import Layout

CHUNK_BYTES = 512 << 20  # bytes of the dL/dlogits chunk buffer in the backward


@triton.jit(do_not_specialize=["num_rows", "seq_len", "stride_h_b", "stride_h_t"])
def linear_logprob_fwd_kernel(
    # pointers
    h_ptr,  # (B', T', H) hidden, last dim contiguous
    w_ptr,  # (V, H) weight, last dim contiguous
    bias_ptr,  # (V,) or unused
    rows_ptr,  # (M,) int64 flat token id of each scored row
    target_ptr,  # (N,) int64 target id per token (-1 not scored, >= V in another rank's vocabulary slice)
    max_ptr,  # (SPLITS, M) float32 out: running max of logits / T
    sumexp_ptr,  # (SPLITS, M) float32 out: sum of exp(logits / T - max)
    label_ptr,  # (SPLITS, M) float32 out: the target's logit / T (0 in splits that do not hold it)
    # sizes and strides
    num_rows,
    vocab_size,
    hidden_size,
    seq_len,
    stride_h_b,
    stride_h_t,
    stride_w_v,
    # scalars
    inv_temperature,
    blocks_per_split,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = offs_n < num_rows
    token = tl.load(rows_ptr + offs_n, mask=in_rows, other=0)
    target = tl.load(target_ptr + token, mask=in_rows, other=-1)
    b = token // seq_len
    h_rows = h_ptr + b * stride_h_b + (token - b * seq_len) * stride_h_t

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    acc_exp = tl.zeros([BLOCK_N], tl.float32)
    label = tl.zeros([BLOCK_N], tl.float32)
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, vocab_size)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        in_vocab = offs_v < vocab_size
        b_z = _logits_tile(h_rows, w_ptr, bias_ptr, offs_v, in_rows, in_vocab, hidden_size, stride_w_v,
                           inv_temperature, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        b_z = tl.where(in_vocab[None, :], b_z, float("-inf"))
        m_new = tl.maximum(m, tl.max(b_z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of -inf logits must not give NaN
        acc_exp = acc_exp * tl.exp(m - m_safe) + tl.sum(tl.exp(b_z - m_safe[:, None]), axis=1)
        m = m_new
        is_label = (offs_v[None, :] == target[:, None]) & in_vocab[None, :]  # target >= V: another rank's slice
        label += tl.sum(tl.where(is_label, b_z, 0.0), axis=1)

    out = split.to(tl.int64) * num_rows + offs_n
    tl.store(max_ptr + out, m, mask=in_rows)
    tl.store(sumexp_ptr + out, acc_exp, mask=in_rows)
    tl.store(label_ptr + out, label, mask=in_rows)


@triton.jit(do_not_specialize=["num_rows", "seq_len", "stride_h_b", "stride_h_t"])
def linear_logprob_bwd_kernel(
    # pointers
    h_ptr,  # (B', T', H) hidden
    w_ptr,  # (V, H) weight
    bias_ptr,  # (V,) or unused
    rows_ptr,  # (M_c,) int64 flat token id of each scored row of this chunk
    target_ptr,  # (N,) int64
    lse_ptr,  # (N,) float32 log-sum-exp of logits / T from the forward
    coef_ptr,  # (N,) float32 grad_loss * dL/ds[seq] / T per token
    g_ptr,  # (M_c, V) out: dL/dlogits of the chunk, in the input dtype
    # sizes and strides
    num_rows,
    vocab_size,
    hidden_size,
    seq_len,
    stride_h_b,
    stride_h_t,
    stride_w_v,
    stride_g_n,
    # scalars
    inv_temperature,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_rows = offs_n < num_rows
    in_vocab = offs_v < vocab_size
    token = tl.load(rows_ptr + offs_n, mask=in_rows, other=0)
    target = tl.load(target_ptr + token, mask=in_rows, other=-1)
    lse = tl.load(lse_ptr + token, mask=in_rows, other=0.0)
    coef = tl.load(coef_ptr + token, mask=in_rows, other=0.0)
    b = token // seq_len
    h_rows = h_ptr + b * stride_h_b + (token - b * seq_len) * stride_h_t

    b_z = _logits_tile(h_rows, w_ptr, bias_ptr, offs_v, in_rows, in_vocab, hidden_size, stride_w_v,
                       inv_temperature, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    b_p = tl.exp(b_z - lse[:, None])
    b_g = coef[:, None] * (tl.where(offs_v[None, :] == target[:, None], 1.0, 0.0) - b_p)
    g_tile = g_ptr + offs_n[:, None] * stride_g_n + offs_v[None, :]
    tl.store(g_tile, b_g.to(g_ptr.dtype.element_ty), mask=in_rows[:, None] & in_vocab[None, :])


@triton.jit
def _logits_tile(h_rows, w_ptr, bias_ptr, offs_v, in_rows, in_vocab, hidden_size, stride_w_v, inv_temperature,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
        acc += tl.load(bias_ptr + offs_v, mask=in_vocab, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temperature


def _meta(dtype: torch.dtype, hidden_size: int, device: torch.device):
    """Block sizes from the shapes (never from N), and the dot precision for the dtype."""
    wide = dtype in (torch.float32, torch.float64)
    block_h = max(16, min(32 if wide else 64, triton.next_power_of_2(hidden_size)))
    upcast = dtype == torch.float64 or (dtype == torch.bfloat16 and device.type == "cpu")
    return dict(UPCAST=upcast, DOT_PRECISION="ieee" if wide or upcast else "tf32",
                BLOCK_N=64, BLOCK_V=64 if wide else 128, BLOCK_H=block_h, num_warps=4 if wide else 8,
                num_stages=2 if wide else 3)


def _num_splits(token_blocks: int, vocab_blocks: int, device: torch.device) -> int:
    """Split the vocabulary until the grid has about two programs per streaming multiprocessor."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter: a few splits, so the merge is exercised
    return max(1, min(vocab_blocks, triton.cdiv(target, token_blocks)))


def _scored_rows(target: torch.Tensor) -> torch.Tensor:
    return (target >= 0).nonzero().squeeze(1)


def _common_args(rows: torch.Tensor, weight: torch.Tensor):
    num_b, seq_len, hidden_size = rows.shape
    return (weight.shape[0], hidden_size, seq_len, rows.stride(0), rows.stride(1), weight.stride(0))


def linear_forward(rows: torch.Tensor, weight: torch.Tensor, bias, target: torch.Tensor, temperature: float):
    """rows (B', T', H) hidden, weight (V, H) -> token log-prob (N,), lse (N,), float32; 0 where not scored."""
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    vocab_size, hidden_size = weight.shape
    meta = _meta(rows.dtype, hidden_size, rows.device)
    scored = _scored_rows(target)
    num_rows = scored.numel()
    token_blocks = triton.cdiv(num_rows, meta["BLOCK_N"])
    vocab_blocks = triton.cdiv(vocab_size, meta["BLOCK_V"])
    splits = _num_splits(token_blocks, vocab_blocks, rows.device)
    blocks_per_split = triton.cdiv(vocab_blocks, splits)
    splits = triton.cdiv(vocab_blocks, blocks_per_split)  # no empty split

    parts = empty((3, splits, num_rows), dtype=torch.float32, device=rows.device)
    if num_rows:
        linear_logprob_fwd_kernel[(token_blocks, splits)](
            rows, weight, bias if bias is not None else weight, scored, target, parts[0], parts[1], parts[2],
            num_rows, *_common_args(rows, weight),
            1.0 / temperature, blocks_per_split,
            HAS_BIAS=bias is not None, **meta,
        )
    split_max, split_sumexp, split_label = parts
    top = split_max.max(dim=0).values
    lse_scored = top + torch.log((split_sumexp * torch.exp(split_max - top)).sum(dim=0))
    token_logprob = torch.zeros(target.shape, dtype=torch.float32, device=rows.device)
    lse = torch.zeros(target.shape, dtype=torch.float32, device=rows.device)
    token_logprob[scored] = split_label.sum(dim=0) - lse_scored
    lse[scored] = lse_scored
    return token_logprob, lse


def linear_backward(rows, weight, bias, lay: Layout, lse, grad_seq_logprob, grad_loss, temperature: float):
    """d_hidden (B', T', H) in the hidden dtype, d_weight (V, H) and d_bias (V,) in the weight dtype."""
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    vocab_size, hidden_size = weight.shape
    meta = _meta(rows.dtype, hidden_size, rows.device)
    coef = grad_seq_logprob[lay.token_seq] * (grad_loss.float() / temperature)
    scored = _scored_rows(lay.target)
    flat_hidden = rows.reshape(-1, hidden_size)

    d_hidden = torch.zeros(flat_hidden.shape, dtype=rows.dtype, device=rows.device)
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    d_bias = torch.zeros(vocab_size, dtype=torch.float32, device=weight.device) if bias is not None else None
    chunk_rows = max(meta["BLOCK_N"], CHUNK_BYTES // (vocab_size * rows.element_size()))
    for start in range(0, scored.numel(), chunk_rows):
        chunk = scored[start : start + chunk_rows]
        grad = empty((chunk.numel(), vocab_size), dtype=rows.dtype, device=rows.device)
        grid = (triton.cdiv(chunk.numel(), meta["BLOCK_N"]), triton.cdiv(vocab_size, meta["BLOCK_V"]))
        linear_logprob_bwd_kernel[grid](
            rows, weight, bias if bias is not None else weight, chunk, lay.target, lse, coef, grad,
            chunk.numel(), *_common_args(rows, weight), grad.stride(0),
            1.0 / temperature,
            HAS_BIAS=bias is not None, **meta,
        )
        h = flat_hidden.index_select(0, chunk)
        d_hidden.index_copy_(0, chunk, grad @ weight)
        _add_matmul_(d_weight, grad.T, h)
        if d_bias is not None:
            d_bias += grad.sum(dim=0, dtype=torch.float32)
    return d_hidden.view(rows.shape), d_weight.to(weight.dtype), None if d_bias is None else d_bias.to(weight.dtype)


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, with a float32 result straight from the GEMM where the inputs allow it."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            acc += torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # PyTorch without mm(out_dtype=): one rounding to a.dtype per chunk
            acc += (a @ b).float()
    else:
        acc.addmm_(a.float(), b.float())
