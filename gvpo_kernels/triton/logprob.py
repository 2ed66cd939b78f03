"""Triton token stage: per-token log-prob by online log-sum-exp, and its backward by recomputing the softmax.

Forward, one program per token row: stream the row's V logits in BLOCK_V blocks, keeping a running max and a
running sum of exponentials (the online log-sum-exp), then read the target's logit once more. Only two floats
per token leave the kernel (log-prob and log-sum-exp); no softmax is ever stored.

Backward, one program per token row: recompute p = exp(x / T - lse) block by block and write
dL/dx = c * (onehot(target) - p), where c = grad_loss * dL/ds[seq] / T is the row's coefficient. Rows with
c == 0 (not scored, or in a group of one) are written with zeros without reading their logits.

Rows are addressed through a (B', T', V) view: token n is (n // T', n % T'), so padded logits sliced along T
(``logits[:, :-1]``) are read in place. Offsets are int64 (N x V passes 2^31 at 16k tokens x 152k vocabulary).
Sizes that vary from step to step (T', strides) are not specialised on, so a new N or T never recompiles.
"""

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..layout import Layout

MAX_BLOCK_V = 4096

_VARYING = ["seq_len", "stride_x_b", "stride_x_t", "stride_dx_b", "stride_dx_t"]


@triton.jit(do_not_specialize=_VARYING[:3])
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
        m = tl.full((), float("-inf"), tl.float32)  # running max of x / T
        acc = tl.zeros((), tl.float32)  # running sum of exp(x / T - m)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            b_x = tl.load(x_row + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
            b_x = b_x * inv_temperature
            m_new = tl.maximum(m, tl.max(b_x, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of -inf logits must not give NaN
            acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(b_x - m_safe), axis=0)
            m = m_new
        lse = m + tl.log(acc)
        # target >= V: scored, but the label lies in another rank's vocabulary slice (its logit counts as 0)
        label_logit = tl.load(x_row + target, mask=target < vocab_size, other=0.0).to(tl.float32) * inv_temperature
        tl.store(logprob_ptr + row, label_logit - lse)
        tl.store(lse_ptr + row, lse)
    else:
        tl.store(logprob_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)


@triton.jit(do_not_specialize=_VARYING)
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
        lse = tl.load(lse_ptr + row)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < vocab_size
            b_x = tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32)
            b_p = tl.exp(b_x * inv_temperature - lse)
            b_dx = tl.where(cols == target, coef - coef * b_p, -coef * b_p)
            tl.store(dx_row + cols, b_dx.to(dx_ptr.dtype.element_ty), mask=in_row)
    else:
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            zeros = tl.zeros([BLOCK_V], tl.float32)
            tl.store(dx_row + cols, zeros.to(dx_ptr.dtype.element_ty), mask=cols < vocab_size)


def _launch_params(vocab_size: int):
    block_v = min(triton.next_power_of_2(vocab_size), MAX_BLOCK_V)
    return dict(BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)


def token_forward(rows: torch.Tensor, target: torch.Tensor, temperature: float):
    """rows (B', T', V), target (N,) -> token log-prob (N,) float32 (0 where target < 0), lse (N,) float32."""
    num_b, seq_len, vocab_size = rows.shape
    token_logprob = empty(target.shape, dtype=torch.float32, device=rows.device)
    lse = empty(target.shape, dtype=torch.float32, device=rows.device)
    if target.numel():
        token_logprob_fwd_kernel[(target.numel(),)](
            rows, target, token_logprob, lse,
            vocab_size, seq_len, rows.stride(0), rows.stride(1),
            1.0 / temperature,
            **_launch_params(vocab_size),
        )
    return token_logprob, lse


def token_backward(rows, lay: Layout, lse, grad_seq_logprob, grad_loss, temperature: float, out):
    """Write grad_loss * dL/ds[seq(n)] / T * (onehot - softmax(rows[n] / T)) into out (B', T', V)."""
    num_b, seq_len, vocab_size = rows.shape
    if lay.num_tokens:
        token_logprob_bwd_kernel[(lay.num_tokens,)](
            rows, lay.target, lay.token_seq, lse, grad_seq_logprob, grad_loss.float().contiguous(), out,
            vocab_size, seq_len, rows.stride(0), rows.stride(1), out.stride(0), out.stride(1),
            1.0 / temperature,
            **_launch_params(vocab_size),
        )
