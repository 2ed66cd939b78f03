"""Triton group stage: per-sequence sums of token log-probs, group centring, and dL/ds, one program per group.

Program g loads its k members (a [BLOCK_K] vector, BLOCK_K = next power of two of the largest group), sums each
member's token log-probs (and anchor log-probs) over a [BLOCK_K, BLOCK_T] tile that walks the members' token
ranges in step, then centres the implicit and actual rewards within the group and writes, per member,

    s_i, r_i = beta * (s_i - a_i), dL/ds_i = beta * scale * d_i / max(k - 1, 1),   d_i = (r_i - mean r) - (R_i - mean R)

and the group's loss term scale * sum_i d_i^2 / (2 max(k - 1, 1)). Sums run in a fixed order: deterministic.
It knows nothing of vocabularies: its input is the (N,) per-token output of the token stage.

Every tensor is read through a raw pointer at ``ptr + i``: :func:`group_plan` refuses one that is not contiguous
(a strided rewards view such as ``table[:, 0]`` would otherwise be misread). The tile is [BLOCK_K, BLOCK_T] with
BLOCK_T shrinking as groups grow, so large groups do not spill.
"""

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..backend import GroupStats
from ..layout import Layout
from .plan import Device, Plan, check_flat, device_of, launch

MAX_BLOCK_T = 128
TILE = 1024  # elements of the [BLOCK_K, BLOCK_T] tile: 8 per thread at 4 warps


@triton.jit
def gvpo_group_fwd_kernel(
    # pointers
    token_logprob_ptr,  # (N,) float32
    token_ref_ptr,  # (N,) float32 anchor log-probs (unused when HAS_REF is false)
    cu_seqlens_ptr,  # (S + 1,) int64
    rewards_ptr,  # (S,) float32
    group_order_ptr,  # (S,) int64 sequences sorted by group
    group_ptr_ptr,  # (G + 1,) int64
    seq_logprob_ptr,  # (S,) float32 out
    implicit_reward_ptr,  # (S,) float32 out
    grad_seq_ptr,  # (S,) float32 out
    group_loss_ptr,  # (G,) float32 out
    # scalars
    beta,
    scale,
    # meta-parameters
    HAS_REF: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    first = tl.load(group_ptr_ptr + g)
    size = tl.load(group_ptr_ptr + g + 1) - first
    offs_k = tl.arange(0, BLOCK_K)
    in_group = offs_k < size
    seq = tl.load(group_order_ptr + first + offs_k, mask=in_group, other=0)
    start = tl.load(cu_seqlens_ptr + seq, mask=in_group, other=0)
    length = tl.load(cu_seqlens_ptr + seq + 1, mask=in_group, other=0) - start

    b_s = tl.zeros([BLOCK_K, BLOCK_T], tl.float32)
    b_a = tl.zeros([BLOCK_K, BLOCK_T], tl.float32)
    for t in range(0, tl.max(length, axis=0), BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T)
        in_seq = offs_t[None, :] < length[:, None]
        idx = start[:, None] + offs_t[None, :]
        b_s += tl.load(token_logprob_ptr + idx, mask=in_seq, other=0.0)
        if HAS_REF:
            b_a += tl.load(token_ref_ptr + idx, mask=in_seq, other=0.0)
    s = tl.sum(b_s, axis=1)
    if HAS_REF:
        a = tl.sum(b_a, axis=1)
    else:
        a = s  # on-policy: the anchor is s itself, detached
    r = beta * (s - a)
    big_r = tl.load(rewards_ptr + seq, mask=in_group, other=0.0)

    k = size.to(tl.float32)
    r_mean = tl.sum(tl.where(in_group, r, 0.0), axis=0) / k
    big_r_mean = tl.sum(big_r, axis=0) / k
    diff = tl.where(in_group, (r - r_mean) - (big_r - big_r_mean), 0.0)
    bessel = tl.maximum(k - 1.0, 1.0)

    tl.store(seq_logprob_ptr + seq, s, mask=in_group)
    tl.store(implicit_reward_ptr + seq, r, mask=in_group)
    tl.store(grad_seq_ptr + seq, beta * scale * diff / bessel, mask=in_group)
    tl.store(group_loss_ptr + g, scale * tl.sum(diff * diff, axis=0) / (2.0 * bessel))


def group_plan(token_logprob, lay: Layout, beta: float, seq_logprob, implicit_reward, grad_seq_logprob, group_loss,
               device: Device) -> Plan:
    """The launch: token_logprob (N,) float32 and the Layout's per-token and per-sequence tensors in; writes
    seq_logprob, implicit_reward, grad_seq_logprob (S,) and group_loss (G,), all float32. Reads shapes, strides and
    dtypes only (works on meta tensors); ``device`` is unused (the tile depends on the largest group alone)."""
    check_flat("token_logprob", token_logprob, torch.float32)
    if lay.token_ref is not None:
        check_flat("token_ref", lay.token_ref, torch.float32)
    for name in ("cu_seqlens", "group_order", "group_ptr"):
        check_flat(name, getattr(lay, name), torch.int64)
    check_flat("rewards", lay.rewards, torch.float32)
    outs = dict(seq_logprob=seq_logprob, implicit_reward=implicit_reward, grad_seq_logprob=grad_seq_logprob)
    for name, out in outs.items():
        check_flat(name, out, torch.float32)
        if out.numel() != lay.num_seqs:
            raise ValueError(f"{name} must hold one element per sequence ({lay.num_seqs}), got {out.numel()}")
    check_flat("group_loss", group_loss, torch.float32)
    has_ref = lay.token_ref is not None
    block_k = triton.next_power_of_2(lay.max_group_size)
    return Plan(
        gvpo_group_fwd_kernel, (lay.num_groups,),
        (token_logprob, lay.token_ref if has_ref else token_logprob, lay.cu_seqlens, lay.rewards,
         lay.group_order, lay.group_ptr, seq_logprob, implicit_reward, grad_seq_logprob, group_loss,
         float(beta), lay.scale),
        dict(HAS_REF=has_ref, BLOCK_K=block_k, BLOCK_T=max(1, min(MAX_BLOCK_T, TILE // block_k)), num_warps=4),
        label=f"group k<={lay.max_group_size} ref={has_ref}",
    )


def group_stage(token_logprob: torch.Tensor, lay: Layout, beta: float) -> GroupStats:
    """token log-probs (N,) -> loss (), s (S,), r (S,), dL/ds (S,), all float32."""
    device = token_logprob.device
    seq_logprob = empty((lay.num_seqs,), dtype=torch.float32, device=device)
    implicit_reward = empty((lay.num_seqs,), dtype=torch.float32, device=device)
    grad_seq_logprob = empty((lay.num_seqs,), dtype=torch.float32, device=device)
    group_loss = empty((lay.num_groups,), dtype=torch.float32, device=device)
    launch(group_plan(token_logprob, lay, beta, seq_logprob, implicit_reward, grad_seq_logprob, group_loss,
                      device_of(device)))
    return GroupStats(group_loss.sum(), seq_logprob, implicit_reward, grad_seq_logprob)
