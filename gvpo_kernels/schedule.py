"""The linear path's GEMM schedule, one for every backend: which chunks of scored rows, in which order, with how
many GEMMs. A backend supplies the chunk kernels (:class:`gvpo_kernels.backend.LinearWork`); this module decides.

dL/dlogits of a token needs dL/ds of its sequence, which depends on its whole group's s. Three GEMMs (the chunk's
logits, kept from forward to backward, then d_hidden and d_weight) whenever a chunk's coefficients are known once
its forward is done:
  - on-policy (no anchor): r_i = 0 whatever s_i is, so dL/ds comes from the rewards alone, before any logit;
  - chunks of whole groups (the scored rows ordered by group): after a chunk's forward its groups' s are complete.
Four GEMMs otherwise (a group's scored rows exceed a chunk): the forward over every chunk, the group stage, then
the logits again, chunk by chunk, for the gradients. Memory stays bounded by one chunk whatever N and V are.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .backend import Coefs, Grads, GroupStats, LinearWork, TokenStats
from .layout import Layout

# stage(statistics of all N tokens) -> (the statistics, after any combining of vocabulary slices; the group stage's
# outputs; every token's coefficients for grad_loss = 1), exact for the groups whose tokens are all in already.
Stage = Callable[[TokenStats], "tuple[TokenStats, GroupStats, Coefs]"]


def _chunks(work: LinearWork, rows: Tensor, keep: bool) -> list:
    step = work.chunk_rows(keep)
    return [rows[lo:lo + step] for lo in range(0, rows.numel(), step)]


def _empty_stats(num_tokens: int, device, entropy: bool) -> TokenStats:
    f32 = dict(dtype=torch.float32, device=device)
    return TokenStats(torch.zeros(num_tokens, **f32), torch.zeros((2, num_tokens), **f32),
                      torch.zeros(num_tokens, **f32) if entropy else None)


def _put(stats: TokenStats, tokens: Tensor, part: TokenStats) -> None:
    stats.logprob[tokens] = part.logprob
    stats.norm[:, tokens] = part.norm
    if stats.entropy is not None:
        stats.entropy[tokens] = part.entropy


def _take(coefs: Coefs, tokens: Tensor) -> Coefs:
    return Coefs(*(None if c is None else c[tokens] for c in coefs))


def forward(work: LinearWork, num_tokens: int, entropy: bool) -> TokenStats:
    """The token statistics of all N tokens (0 where not scored), logits never kept."""
    stats = _empty_stats(num_tokens, work.scored.device, entropy)
    for tokens in _chunks(work, work.scored, keep=False):
        _put(stats, tokens, work.forward(tokens, keep=False))
    return stats


def backward(work: LinearWork, norm: Tensor, coefs: Coefs) -> Grads:
    """The gradients from the forward's norm (2, N) and every token's coefficients, the logits computed again."""
    for tokens in _chunks(work, work.scored, keep=False):
        work.backward(tokens, norm[:, tokens], _take(coefs, tokens), False)
    return work.grads()


def group_chunks(work: LinearWork, lay: Layout) -> list | None:
    """The scored rows ordered by group, cut into chunks of whole groups of at most chunk_rows(keep=True) rows;
    None when one group's scored rows exceed that (one host sync for the per-group counts)."""
    group_of = lay.seq_group[lay.token_seq[work.scored]]
    rows = work.scored[torch.argsort(group_of, stable=True)]
    counts = torch.bincount(group_of, minlength=lay.num_groups).tolist()
    most = work.chunk_rows(True)
    if max(counts, default=0) > most:
        return None
    chunks, start, size = [], 0, 0
    for count in counts:
        if size + count > most:
            chunks.append(rows[start:start + size])
            start, size = start + size, 0
        size += count
    if size:
        chunks.append(rows[start:start + size])
    return chunks


def loss_and_grads(work: LinearWork, lay: Layout, stage: Stage, needs, entropy: bool, local: bool = True):
    """The linear loss's forward and, for grad_loss = 1, the gradients ``needs`` asks for, with the fewest GEMMs.

    ``local``: the stage has no collective, so it may run once per chunk; otherwise (a process group: every rank
    must call it alike, and a vocabulary split needs the combined normaliser) the forward runs whole, then the
    stage once, then the gradients (four GEMMs).

    Returns (GroupStats, TokenStats of all N tokens, Grads); the gradients not asked for are None.
    """
    if not any(needs) or not local:
        stats, group, coefs = stage(forward(work, lay.num_tokens, entropy))
        grads = backward(work, stats.norm, coefs) if any(needs) else Grads(None, None, None)
        return group, stats, grads
    stats = _empty_stats(lay.num_tokens, work.scored.device, entropy)
    if lay.token_ref is None:  # on-policy: r = 0 whatever s is, so the coefficients come before any logit
        coefs = stage(stats)[2]
        chunks = _chunks(work, work.scored, keep=True)
    else:
        coefs, chunks = None, group_chunks(work, lay)
    if chunks is None:  # four GEMMs: a group's rows exceed a chunk
        stats, group, coefs = stage(forward(work, lay.num_tokens, entropy))
        return group, stats, backward(work, stats.norm, coefs)
    for tokens in chunks:  # three GEMMs
        part = work.forward(tokens, keep=True)
        _put(stats, tokens, part)
        chunk_coefs = _take(coefs if lay.token_ref is None else stage(stats)[2], tokens)
        if chunk_coefs.entropy is not None:
            chunk_coefs = chunk_coefs._replace(token_entropy=part.entropy)
        work.backward(tokens, part.norm, chunk_coefs, True)
    stats, group, _ = stage(stats)
    return group, stats, work.grads()
