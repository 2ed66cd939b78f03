"""GVPO across ranks: groups whose sequences sit on several ranks, and a vocabulary split over ranks.

Both losses take ``group_process_group=`` and ``vocab_process_group=``; when either is given they run here, on
the same backend functions as a single process, with torch.distributed carrying only small tensors:

group_process_group (data parallel): each rank passes its own sequences and their *global* group ids (any
    int64). Centring needs, per group, the count k, the sum of x_i = r_i - R_i and the sum of x_i^2 over every
    rank. One all-reduce (MAX) of five int64: the largest id and the most distinct ids on a rank; an error flag,
    so that a rank whose input failed its checks stops every rank instead of leaving them waiting; a code of the
    settings and its negation, so that ranks that disagree on beta, temperature or reduction all raise. Then an
    all-gather of each rank's distinct ids (U int64 per rank, U the most on a rank), which numbers the G groups
    of the call 0..G-1 on every rank alike, and one all-reduce (SUM) of 3 G float64. Then d_i = x_i - mean_G x,
    sum_G d^2 = sum x^2 - k mean^2, and every rank returns the global loss (reduction "mean" over the global
    number of groups) and, for its own sequences, exactly the gradient that one process holding every sequence
    would give them. Note that DDP/FSDP *average* gradients over ranks: multiply
    the loss by the data-parallel world size (or sum the gradients) to step with the single-process gradient.

vocab_process_group (tensor-parallel LM head): rank r holds a contiguous slice of the vocabulary, after the slices
    of ranks 0..r-1 (uneven slices are fine): its rows of the LM head weight (and bias), or its columns of the
    logits. Labels are global ids, the same tokens on every rank. One all-gather of four int64 per rank (slice size,
    error flag, a code of the settings and a fingerprint of the tokens: labels, mask, rewards, anchor, groups;
    ranks that disagree all raise), one all-gather of 2 float32 per token (the slice's log-sum-exp and the
    label's logit, 0 where the label lies in another slice); every rank then has the full log-sum-exp and log-prob
    of every token. Each rank gets the gradient of its own weight slice (and logits columns) exactly as the
    unsplit head gives it, and its slice's contribution to the hidden-state gradient: sum those over the
    vocabulary group (as Megatron's column-parallel input region does in its backward) for the unsplit d_hidden.

Per call, each rank sends 40 + 8 U + 24 G bytes for groups spread over ranks, and 32 + 8 N bytes (N: tokens)
for a vocabulary split: nothing per vocabulary entry, nothing N x V, no per-token data for groups. Eager mode only
(no torch.compile, no inplace_backward).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import torch
import torch.distributed as dist

from . import layout, ops, torch_impl
from ._alloc import empty
from .layout import Layout

class InputError(RuntimeError):
    """Raised on every rank when another rank's input failed its checks (that rank raises the check's own error)."""


@dataclasses.dataclass(frozen=True)
class Ranks:
    """How one call is spread over ranks: its process groups and what the first exchange agreed."""

    group_pg: object  # the data-parallel process group, or None
    vocab_pg: object  # the vocabulary (tensor-parallel) process group, or None
    group_index: torch.Tensor | None  # (S,) int64: each local sequence's group, numbered 0..num_groups-1 over all
    num_groups: int  # ranks of group_pg (the distinct global group ids, sorted); 0 without group_pg
    reduction_mean: bool


# ----------------------------------------------------------------------------------------------------------------
# entry points (functional.py routes here when a process group is given)


def gvpo_loss(logits, labels, rewards, *, backend, group_process_group, vocab_process_group, inplace_backward,
              beta, temperature, entropy=False, **build_args):
    """loss, seq_logprob, implicit_reward, grad_seq_logprob, seq_entropy ((S,) with ``entropy``, else (0,)) of the
    logits path across ranks."""
    problem = None
    if inplace_backward:
        problem = ValueError("inplace_backward is not supported together with a process group")
    impl, lay, ranks = _prepare(logits.shape[-1], logits.device, backend, labels, rewards, group_process_group,
                                vocab_process_group, beta, temperature, build_args, problem)
    stats_impl = ops.entropy_backend(impl, backend, "token_stats_forward", True) if entropy else None
    return _LogitsAcrossRanks.apply(logits, impl, stats_impl, lay, ranks, float(beta), float(temperature))


def linear_gvpo_loss(hidden, weight, bias, labels, rewards, *, backend, group_process_group, vocab_process_group,
                     beta, temperature, entropy=False, **build_args):
    """loss, seq_logprob, implicit_reward, grad_seq_logprob, seq_entropy of the linear path across ranks."""
    impl, lay, ranks = _prepare(weight.shape[0], hidden.device, backend, labels, rewards, group_process_group,
                                vocab_process_group, beta, temperature, build_args)
    stats_impl = ops.entropy_backend(impl, backend, "linear_token_stats_forward", True) if entropy else None
    return _LinearAcrossRanks.apply(hidden, weight, bias, impl, stats_impl, lay, ranks, float(beta),
                                    float(temperature))


def _prepare(local_vocab: int, device, backend: str, labels, rewards, group_pg, vocab_pg, beta, temperature,
             build_args, problem=None):
    """Check the input on every rank, exchanging an error flag with the first collective of each process group,
    so that a bad input on one rank raises on all of them instead of leaving the others waiting. The same
    exchange compares what the ranks must agree on: the settings (beta, temperature, reduction) on both groups,
    and on the vocabulary group the tokens themselves (a fingerprint of labels, mask, rewards, anchor and groups).

    Every exchanged tensor lives on ``device`` (the input's), as NCCL needs for CUDA and gloo accepts.

    ``problem``: an error the caller already found, raised after the exchanges like any other.

    Returns the backend for ``backend`` on ``device`` (ops.select_backend), the Layout, with targets local to this
    rank's vocabulary slice (>= local_vocab for a label in another slice), and the :class:`Ranks` of the call.
    """
    impl = None
    try:
        impl = ops.select_backend(backend, device)
    except RuntimeError as exc:  # a backend that cannot run on this rank
        problem = problem or exc
    group_ids = build_args["group_ids"]
    if problem is None and group_pg is not None and group_ids is None:
        problem = ValueError("group_process_group needs group_ids: the global group id of each local sequence")
    settings = _code((_float_bits(beta), _float_bits(temperature), build_args["reduction"], build_args["ignore_index"]))
    vocab_offset, vocab_total = 0, local_vocab
    if vocab_pg is not None:
        tokens = _code(tuple(_fingerprint(build_args[k]) for k in ("group_ids", "mask", "cu_seqlens", "ref_logprobs"))
                      + (_fingerprint(labels), _fingerprint(rewards), build_args["group_size"]))
        everyone = _all_gather_ints([local_vocab, problem is not None, settings, tokens], vocab_pg, device)
        if problem is None and any(flag for _, flag, _, _ in everyone):
            problem = InputError("another rank of vocab_process_group failed its input checks (see its error)")
        if problem is None and len({(s, t) for _, _, s, t in everyone}) > 1:
            problem = ValueError("the ranks of vocab_process_group passed different labels, mask, rewards, "
                                 "ref_logprobs, groups or settings: every rank of a vocabulary split passes the "
                                 "same tokens and options, and only its own slice of the vocabulary")
        vocab_offset = sum(size for size, *_ in everyone[: dist.get_rank(vocab_pg)])
        vocab_total = sum(size for size, *_ in everyone)
    lay = None
    if problem is None:
        try:
            lay = layout.build(labels, rewards, vocab_size=vocab_total, **build_args)
        except (ValueError, TypeError) as exc:
            problem = exc
    group_index, num_groups = torch.zeros(0, dtype=torch.int64, device=device), 0
    if group_pg is not None:
        local_ids = group_index if lay is None else group_ids.to(torch.int64).unique()
        local_max = int(local_ids[-1]) if local_ids.numel() else torch.iinfo(torch.int64).min
        # MAX of (v, -v) over the ranks gives (max v, -min v): equal settings iff max == min
        state = torch.tensor([local_max, local_ids.numel(), problem is not None, settings, -settings],
                             dtype=torch.int64, device=device)
        dist.all_reduce(state, op=dist.ReduceOp.MAX, group=group_pg)
        largest_id, most_ids, flagged, most, least = state.tolist()
        if problem is None and flagged:
            problem = InputError("another rank of group_process_group failed its input checks (see its error)")
        if problem is None and most != -least:
            problem = ValueError("the ranks of group_process_group passed different beta, temperature, reduction "
                                 "or ignore_index")
        if problem is None and most_ids:
            # every rank's distinct ids, padded to one length with the largest id (which some rank holds)
            padded = torch.cat([local_ids, local_ids.new_full((most_ids - local_ids.numel(),), largest_id)])
            everyone = [torch.empty_like(padded) for _ in range(dist.get_world_size(group_pg))]
            dist.all_gather(everyone, padded, group=group_pg)
            all_ids = torch.cat(everyone).unique()  # sorted
            num_groups = all_ids.numel()
            group_index = torch.searchsorted(all_ids, group_ids.to(torch.int64))
    if problem is not None:
        raise problem
    if vocab_pg is not None:
        target = lay.target
        owned = (target >= vocab_offset) & (target < vocab_offset + local_vocab)
        local = torch.where(owned, target - vocab_offset, torch.full_like(target, local_vocab))
        lay = dataclasses.replace(lay, target=torch.where(target >= 0, local, target))
    ranks = Ranks(group_pg=group_pg, vocab_pg=vocab_pg,
                  group_index=group_index, num_groups=num_groups, reduction_mean=build_args["reduction"] == "mean")
    return impl, lay, ranks


def _code(parts) -> int:
    """A 56-bit integer from ``parts`` (numbers, strings, tuples), the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=7).digest(), "little")


def _float_bits(value) -> int:
    try:
        return struct.unpack("<q", struct.pack("<d", float(value)))[0]
    except (TypeError, ValueError):
        return _code(repr(value))


def _fingerprint(value) -> int:
    """A number equal on ranks holding equal tensors (the same values in the same shape), for the check above."""
    if not isinstance(value, torch.Tensor):
        return _code(repr(value))
    flat = value.detach().reshape(-1).double()
    weights = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device).remainder_(1021).add_(1)
    return _code((tuple(value.shape), _float_bits(torch.nan_to_num(flat).dot(weights).item())))


def _all_gather_ints(values, group, device):
    mine = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [tuple(t.tolist()) for t in everyone]


# ----------------------------------------------------------------------------------------------------------------
# the two exchanges of the math


def combine_vocab_slices(token_logprob, lse, token_entropy, target, group):
    """Per-token (label logit - lse, lse, entropy or None) of this rank's slice -> the same over the whole
    vocabulary.

    ``target`` is local: -1 not scored, >= V_local for a label in another slice (whose logit this slice counts as
    0, so that summing the label logits over the slices gives the label's own). The entropy of the whole
    softmax from the slices' (lse_r, H_r): with w_r = exp(lse_r - lse) the slice's share of the mass,
    H = sum_r w_r (H_r + lse - lse_r), a sum of non-negative terms (sum_r w_r = 1).
    """
    scored = target >= 0
    zero = torch.zeros_like(lse)
    label_logit = torch.where(scored, token_logprob + lse, zero)
    local = torch.stack([lse, label_logit] + ([] if token_entropy is None else [token_entropy]))
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, local, group=group)
    stacked = torch.stack(everyone)  # (world, 2 or 3, N)
    full_lse = torch.logsumexp(stacked[:, 0], dim=0)
    full_label = stacked[:, 1].sum(dim=0)
    full_entropy = None
    if token_entropy is not None:
        share = torch.exp(stacked[:, 0] - full_lse)
        full_entropy = torch.where(scored, (share * (stacked[:, 2] + full_lse - stacked[:, 0])).sum(0), zero)
    return torch.where(scored, full_label - full_lse, zero), full_lse, full_entropy


def group_stage_across_ranks(token_logprob, lay: Layout, beta: float, ranks: Ranks):
    """The group stage when a group's sequences sit on several ranks: the global loss, and for the local sequences
    s, r and dL/ds as one process holding every sequence would compute them (float64 for the group sums)."""
    seq_logprob, implicit_reward = torch_impl.sequence_stats(token_logprob, lay, beta)
    x = (implicit_reward - lay.rewards).double()

    ids = ranks.group_index
    sums = x.new_zeros(3, ranks.num_groups)
    sums[0].index_add_(0, ids, torch.ones_like(x))
    sums[1].index_add_(0, ids, x)
    sums[2].index_add_(0, ids, x * x)
    dist.all_reduce(sums, group=ranks.group_pg)
    count, total, squares = sums
    present = count > 0
    mean = total / count.clamp(min=1)
    bessel = (count - 1).clamp(min=1)
    loss = ((squares - count * mean * mean).clamp(min=0) / (2 * bessel)).sum()
    scale = 1.0 / max(int(present.sum()), 1) if ranks.reduction_mean else 1.0
    grad_seq_logprob = (beta * scale) * (x - mean[ids]) / bessel[ids]
    return (loss * scale).float(), seq_logprob, implicit_reward, grad_seq_logprob.float()


def _token_stats(impl, lay: Layout, ranks: Ranks, beta: float, token_logprob, lse, token_entropy):
    """Token stage outputs of this rank -> the full-vocabulary ones, then the group stage (across ranks or not):
    (loss, seq_logprob, implicit_reward, grad_seq_logprob, seq_entropy), lse."""
    if ranks.vocab_pg is not None:
        token_logprob, lse, token_entropy = combine_vocab_slices(token_logprob, lse, token_entropy, lay.target,
                                                                 ranks.vocab_pg)
    if ranks.group_pg is not None:
        stats = group_stage_across_ranks(token_logprob, lay, beta, ranks)
    else:
        stats = impl.group_stage(token_logprob, lay, beta)
    return (*stats, ops._seq_entropy(token_entropy, lay)), lse


class _LogitsAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, impl, stats_impl, lay, ranks, beta, temperature):
        """``stats_impl``: the backend whose token_stats_forward also gives the entropy, or None for none."""
        rows = layout.as_rows(logits)
        token_logprob, lse, token_entropy = ops.token_pass(stats_impl or impl, rows, lay.target, temperature,
                                                           stats_impl is not None)
        (loss, *stats), lse = _token_stats(impl, lay, ranks, beta, token_logprob, lse, token_entropy)
        ctx.mark_non_differentiable(*stats)
        ctx.impl, ctx.lay, ctx.temperature, ctx.shape = impl, lay, temperature, logits.shape
        ctx.save_for_backward(rows, lse, stats[2])
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        ops.no_double_backward("gvpo_loss")
        rows, lse, grad_seq = ctx.saved_tensors
        grad = empty(rows.shape, dtype=rows.dtype, device=rows.device)
        ctx.impl.token_backward(rows, ctx.lay, lse, grad_seq, grad_loss, ctx.temperature, out=grad)
        return grad.reshape(ctx.shape), None, None, None, None, None, None


class _LinearAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, impl, stats_impl, lay, ranks, beta, temperature):
        rows = layout.as_rows(hidden)
        weight, bias = ops.head_for_kernels(weight, bias)
        token_logprob, lse, token_entropy = ops.linear_token_pass(stats_impl or impl, rows, weight, bias, lay.target,
                                                                  temperature, stats_impl is not None)
        (loss, *stats), lse = _token_stats(impl, lay, ranks, beta, token_logprob, lse, token_entropy)
        ctx.mark_non_differentiable(*stats)
        ctx.impl, ctx.lay, ctx.temperature, ctx.shape = impl, lay, temperature, hidden.shape
        ctx.save_for_backward(rows, weight, bias, lse, stats[2])
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        ops.no_double_backward("linear_gvpo_loss")
        rows, weight, bias, lse, grad_seq = ctx.saved_tensors
        d_hidden, d_weight, d_bias = ctx.impl.linear_backward(rows, weight, bias, ctx.lay, lse, grad_seq, grad_loss,
                                                              ctx.temperature)
        return d_hidden.reshape(ctx.shape), d_weight, d_bias, None, None, None, None, None, None
