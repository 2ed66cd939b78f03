"""The chunked pure-PyTorch backend: the fused algorithm in torch ops, for any device (the fallback).

It walks the tokens in chunks and never holds more than one chunk of logits in float32 (plus the temporaries of
one torch op on that chunk), so its working memory is O(CHUNK_BYTES + N + S) whatever N and V are. The three
functions below are the backend interface that :mod:`gvpo_kernels.functional` drives:

    token_forward(rows, target, temperature)             -> token_logprob (N,), lse (N,)
    group_stage(token_logprob, lay, beta)                -> loss (), seq_logprob (S,), implicit_reward (S,),
                                                            grad_seq_logprob (S,)
    token_backward(rows, lay, lse, grad_seq_logprob, grad_loss, temperature, out)
                                                         writes dL/dlogits into out (B', T', V)

``rows`` is the (B', T', V) view of the logits from :func:`gvpo_kernels.layout.as_rows`: flat token n is row
(n // T', n % T').
"""

from __future__ import annotations

import torch

from ._alloc import empty
from .layout import Layout

CHUNK_BYTES = 64 << 20  # float32 bytes of logits per chunk


def _chunks(rows: torch.Tensor):
    """Yield (first flat token, index into rows) covering rows in order, each at most CHUNK_BYTES of float32.

    A chunk is part of one sequence row, or several whole rows when rows are short; indexing ``rows`` with it
    gives a (b, t, V) view, so the same chunk can be read from one tensor and written into another.
    """
    num_b, seq_len, vocab = rows.shape
    chunk_rows = max(1, CHUNK_BYTES // (4 * vocab))
    if seq_len == 0:
        return
    if seq_len >= chunk_rows:
        for b in range(num_b):
            for t in range(0, seq_len, chunk_rows):
                yield b * seq_len + t, (slice(b, b + 1), slice(t, min(t + chunk_rows, seq_len)))
    else:
        per_chunk = chunk_rows // seq_len
        for b in range(0, num_b, per_chunk):
            yield b * seq_len, (slice(b, min(b + per_chunk, num_b)), slice(None))


def token_forward(rows: torch.Tensor, target: torch.Tensor, temperature: float):
    """Per-token log-prob of the target (0 where target < 0) and log-sum-exp of logits / temperature."""
    vocab = rows.shape[-1]
    token_logprob = empty(target.shape, dtype=torch.float32, device=rows.device)
    lse = empty(target.shape, dtype=torch.float32, device=rows.device)
    for start, index in _chunks(rows):
        z = rows[index].reshape(-1, vocab).float()
        if temperature != 1.0:
            z = z / temperature
        end = start + z.shape[0]
        t = target[start:end]
        chunk_lse = torch.logsumexp(z, dim=-1)
        label_logit = z.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
        token_logprob[start:end] = torch.where(t >= 0, label_logit - chunk_lse, torch.zeros_like(chunk_lse))
        lse[start:end] = chunk_lse
    return token_logprob, lse


def group_stage(token_logprob: torch.Tensor, lay: Layout, beta: float):
    """Sequence sums, group centring and dL/ds (see DESIGN.md section 1) for S sequences in G groups."""
    num_seqs, num_groups = lay.num_seqs, lay.num_groups
    seq_logprob = token_logprob.new_zeros(num_seqs).index_add_(0, lay.token_seq, token_logprob)
    if lay.token_ref is None:
        seq_ref = seq_logprob
    else:
        seq_ref = token_logprob.new_zeros(num_seqs).index_add_(0, lay.token_seq, lay.token_ref)
    implicit_reward = beta * (seq_logprob - seq_ref)

    counts = (lay.group_ptr[1:] - lay.group_ptr[:-1]).float()

    def centred(values):
        group_sums = values.new_zeros(num_groups).index_add_(0, lay.seq_group, values)
        return values - (group_sums / counts)[lay.seq_group]

    diff = centred(implicit_reward) - centred(lay.rewards)
    bessel = (counts - 1).clamp_(min=1)[lay.seq_group]
    loss = (diff.square() / (2 * bessel)).sum() * lay.scale
    grad_seq_logprob = (beta * lay.scale) * diff / bessel
    return loss, seq_logprob, implicit_reward, grad_seq_logprob


def token_backward(rows, lay: Layout, lse, grad_seq_logprob, grad_loss, temperature: float, out):
    """out[n] = grad_loss * dL/ds[seq(n)] / temperature * (onehot(target[n]) - softmax(rows[n] / temperature)).

    Rows that are not scored get zeros. ``out`` may be ``rows`` itself (inplace_backward).
    """
    vocab = rows.shape[-1]
    coef = grad_seq_logprob[lay.token_seq] * (grad_loss.float() / temperature)
    coef = torch.where(lay.target >= 0, coef, torch.zeros_like(coef))
    for start, index in _chunks(rows):
        x = rows[index]
        grad = x.reshape(-1, vocab).to(torch.float32, copy=True)
        end = start + grad.shape[0]
        c, t = coef[start:end, None], lay.target[start:end, None]
        if temperature != 1.0:
            grad.div_(temperature)
        grad.sub_(lse[start:end, None]).exp_().mul_(-c)
        grad.scatter_add_(1, t.clamp(min=0), c)
        grad.masked_fill_(c == 0, 0.0)  # unscored rows: zeros even where their logits are garbage
        out[index].copy_(grad.view(x.shape))
