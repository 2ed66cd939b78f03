"""GVPO across ranks: groups whose sequences sit on several ranks, and a vocabulary split over ranks.

Both losses take ``group_process_group=`` and ``vocab_process_group=``; when either is given they run ops' own
eager autograd.Functions with this module's stage (:class:`RanksStage`), torch.distributed carrying small tensors:

- group_process_group (data parallel): each rank passes its own sequences with *global* group ids. The group sums
  (count, sum of r - R and of its square: 3 G float64) are all-reduced; every rank gets the global loss and, for its
  sequences, the gradient one process holding every sequence would give them (DDP/FSDP average gradients: scale
  the loss by the world size to step with it). The entropy bonus's mean is over every rank's scored tokens.
- vocab_process_group (tensor-parallel LM head): rank r holds a contiguous slice of the vocabulary (its rows of the
  weight, or its columns of the logits), the same global labels on every rank. One all-gather of 4 float32 per
  token (the slice's normaliser (shift, log_sum), its part of the label's log-prob and a flag of which slice holds
  the label; a 5th with entropies) gives every rank the whole normaliser; a slice of -inf logits adds nothing.

A first exchange of a few int64 carries an error flag (a rank whose input failed its checks stops every rank, none
waits) and a code of every option but the backend (ranks that disagree, on return_stats say, all raise). Nothing
per vocabulary entry or N x V crosses the network. Eager mode only (no torch.compile, no inplace_backward); the
bytes per call and the math: docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import torch
import torch.distributed as dist

from . import torch_impl
from .backend import GroupStats, LogitSpec, TokenStats
from .layout import Layout
from .ops.common import Call, Data, Options, Stage, build_layout
from .ops.linear import _LinearLoss
from .ops.logits import _LogitsLoss
from .ops.select import select_backend

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
    local_vocab: int  # this rank's vocabulary slice size


# ----------------------------------------------------------------------------------------------------------------
# entry points (functional.py routes here when a process group is given)


def gvpo_loss(logits, data: Data, opts: Options, group_process_group, vocab_process_group, problem=None):
    """loss, seq_logprob, implicit_reward, grad_seq_logprob, seq_entropy ((S,) with opts.entropy, else (0,)) of the
    logits path across ranks. ``problem``: an error the caller found, raised after the first exchange."""
    call = _prepare(logits.shape[-1], logits.device, data, opts, group_process_group, vocab_process_group, problem)
    return _LogitsLoss.apply(logits, call)


def linear_gvpo_loss(hidden, weight, bias, data: Data, opts: Options, group_process_group, vocab_process_group):
    """The same for the linear path."""
    call = _prepare(weight.shape[0], hidden.device, data, opts, group_process_group, vocab_process_group)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    return _LinearLoss.apply(hidden, weight, bias, call, needs)


def _prepare(local_vocab: int, device, data: Data, opts: Options, group_pg, vocab_pg, problem=None) -> Call:
    """Check the input on every rank, exchanging an error flag with the first collective of each process group,
    so that a bad input on one rank raises on all of them instead of leaving the others waiting. The same
    exchange compares what the ranks must agree on: the settings (every option but the backend) on both groups,
    and on the vocabulary group the tokens themselves (a fingerprint of labels, mask, rewards, anchor and groups).

    Every exchanged tensor lives on ``device`` (the input's), as NCCL needs for CUDA and gloo accepts.

    Returns the Call: the backend for ``opts.backend`` on ``device``, the Layout, with targets local to this rank's
    vocabulary slice (>= local_vocab for a label in another slice), and the stage across ranks. ``problem``: an
    error the caller already found, raised after the exchanges like any other.
    """
    impl = None
    try:
        impl = select_backend(opts.backend, device)
    except RuntimeError as exc:  # a backend that cannot run on this rank
        problem = problem or exc
    group_ids = data.group_ids
    if problem is None and group_pg is not None and group_ids is None:
        problem = ValueError("group_process_group needs group_ids: the global group id of each local sequence")
    settings = _code(tuple(_float_bits(v) if isinstance(v, float) else v
                           for v in dataclasses.replace(opts, backend="").args()))
    vocab_offset, vocab_total = 0, local_vocab
    if vocab_pg is not None:
        tokens = _code(tuple(_fingerprint(t) for t in data))
        everyone = _all_gather_ints([local_vocab, problem is not None, settings, tokens], vocab_pg, device)
        if problem is None and any(flag for _, flag, _, _ in everyone):
            problem = InputError("another rank of vocab_process_group failed its input checks (see its error)")
        if problem is None and len({(s, t) for _, _, s, t in everyone}) > 1:
            problem = ValueError("the ranks of vocab_process_group passed different labels, mask, rewards, "
                                 "ref_logprobs, groups or settings (beta, temperature, reduction, return_stats, "
                                 "...): every rank of a vocabulary split passes the same tokens and options, and "
                                 "only its own slice of the vocabulary")
        vocab_offset = sum(size for size, *_ in everyone[: dist.get_rank(vocab_pg)])
        vocab_total = sum(size for size, *_ in everyone)
    lay = None
    if problem is None:
        try:
            lay = build_layout(vocab_total, data, opts)
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
            problem = ValueError("the ranks of group_process_group passed different settings (beta, temperature, "
                                 "reduction, ignore_index, return_stats, ...)")
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
    ranks = Ranks(group_pg=group_pg, vocab_pg=vocab_pg, group_index=group_index, num_groups=num_groups,
                  reduction_mean=opts.reduction == "mean", local_vocab=local_vocab)
    return Call(opts, lay, impl, RanksStage(impl, lay, opts, ranks))


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


def combine_vocab_slices(stats: TokenStats, target, local_vocab: int, spec: LogitSpec, group) -> TokenStats:
    """This rank's token statistics over its vocabulary slice -> the same over the whole vocabulary.

    ``target`` is local: -1 not scored, >= local_vocab for a label in another slice. Each slice sends its normaliser
    (shift_r, log_sum_r), its part of the label's log-prob, (y_label - shift_r) s, with a flag of whether it holds
    the label, and its entropy H_r. The whole: shift = the largest shift of the slices with any mass (log_sum_r >
    -inf), log_sum = log sum_r exp((shift_r - shift) s + log_sum_r); the label's log-prob from the slice holding it;
    and with w_r = exp(lse_r - lse) each slice's share of the mass, H = sum_r w_r (H_r + lse - lse_r), a sum of
    non-negative terms over the slices with mass. A slice whose logits are all -inf adds nothing (no inf - inf or
    0 * inf anywhere).
    """
    scored = target >= 0
    owned = scored & (target < local_vocab)
    shift_r, log_sum_r = stats.norm
    has_mass = log_sum_r > float("-inf")
    label_part = torch.where(owned & has_mass, stats.logprob + log_sum_r, float("-inf"))
    rows = [shift_r, log_sum_r, label_part, owned.float()] + ([] if stats.entropy is None else [stats.entropy])
    local = torch.stack(rows)
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, local, group=group)
    stacked = torch.stack(everyone)  # (world, 4 or 5, N)
    shifts, log_sums, label_parts, owners = stacked[:, :4].unbind(1)  # each (world, N)
    mass = log_sums > float("-inf")
    shift = torch.where(mass, shifts, float("-inf")).max(dim=0).values
    shift = torch.where(shift == float("-inf"), 0.0, shift)
    moved = (shifts - shift) * spec.s  # each slice's shift relative to the whole's, in z units
    lse_r = torch.where(mass, moved + log_sums, float("-inf"))  # each slice's lse minus the whole's shift s
    log_sum = torch.logsumexp(lse_r, dim=0)
    owner = owners > 0
    label = torch.where(owner, torch.where(owner & mass, label_parts + moved, float("-inf")), 0.0).sum(dim=0)
    zero = torch.zeros_like(log_sum)
    logprob = torch.where(scored, label - log_sum, zero)
    norm = torch.stack([torch.where(scored, shift, zero), torch.where(scored, log_sum, zero)])
    entropy = None
    if stats.entropy is not None:
        entropies = stacked[:, 4]
        gap = lse_r - log_sum  # log w_r <= 0; -inf for a slice without mass
        share = torch.exp(gap)
        entropy = torch.where(scored, torch.where(mass, share * (entropies - gap), 0.0).sum(dim=0), zero)
    return TokenStats(logprob, norm, entropy)


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
    return GroupStats((loss * scale).float(), seq_logprob, implicit_reward, grad_seq_logprob.float())


class RanksStage(Stage):
    """The stage across ranks (ops.common.Stage's call): the vocabulary slices combined first, then the group
    stage over the ranks of the group process group (or this process's). Collectives inside: the GEMM schedule
    calls it once, on every rank alike."""

    local = False

    def __init__(self, impl, lay: Layout, opts: Options, ranks: Ranks):
        super().__init__(impl, lay, opts)
        self.ranks = ranks

    def scored_entropy(self, token_entropy):
        """The count of scored tokens and the sum of their entropies over every rank of the group split (the
        vocabulary ranks hold the same tokens): the bonus is the mean over the whole call, as one process gets."""
        sums = super().scored_entropy(token_entropy)
        if self.ranks.group_pg is not None:
            dist.all_reduce(sums, group=self.ranks.group_pg)
        return sums

    def group(self, stats: TokenStats) -> tuple[TokenStats, GroupStats]:
        if self.ranks.vocab_pg is not None:
            stats = combine_vocab_slices(stats, self.lay.target, self.ranks.local_vocab, self.opts.spec,
                                         self.ranks.vocab_pg)
        if self.ranks.group_pg is not None:
            return stats, group_stage_across_ranks(stats.logprob, self.lay, self.opts.beta, self.ranks)
        return stats, self.impl.group_stage(stats.logprob, self.lay, self.opts.beta)
