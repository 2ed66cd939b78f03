"""The chunked pure-PyTorch backend: the fused algorithm in torch ops, for any device (the fallback).

It implements :class:`gvpo_kernels.backend.Backend`. It walks the tokens in chunks and never holds more than one
chunk of logits in float32 (plus the temporaries of a few torch ops on that chunk), so its working memory is
O(CHUNK_BYTES + N + S) whatever N and V are; the linear path adds, when the weight is not float32 itself, a
float32 copy of the head and a float32 accumulator for the weight gradient, (V, H) each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._alloc import empty
from .backend import Coefs, Grads, GroupStats, LogitSpec, TokenStats
from . import layout
from .layout import Layout

name = "torch"
CHUNK_BYTES = 64 << 20  # float32 bytes of logits per chunk


def unavailable_reason(device: torch.device):
    """None: torch ops run wherever torch does."""
    return None


def _chunks(rows: Tensor, vocab: int):
    """Yield (first flat token, index into rows) covering rows in order, each with at most CHUNK_BYTES of
    float32 logits.

    A chunk is part of one sequence row, or several whole rows when rows are short; indexing ``rows`` with it
    gives a (b, t, D) view, so the same chunk can be read from one tensor and written into another.
    """
    num_b, seq_len, _ = rows.shape
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


# ----------------------------------------------------------------------------------------------------------------
# one chunk of rows: statistics and gradient


def _row_stats(x: Tensor, target: Tensor, spec: LogitSpec, entropy: bool, consume: bool = False) -> TokenStats:
    """x (r, V) float32 raw logits, target (r,) -> the rows' TokenStats; ``consume``: x may be overwritten.

    d = (y - shift) s, L = sum exp(d), A = sum exp(d) d (<= 0): log p = d - log L and H = log L - A / L, a sum of
    two non-negative terms (no cancellation on peaked rows). -inf logits add exactly 0 to L and A.
    """
    vocab = x.shape[1]
    y = spec.transform(x)
    top = y.amax(dim=1) if vocab else y.new_zeros(y.shape[0])
    shift = torch.where(top == float("-inf"), 0.0, top)
    d = torch.sub(y, shift.unsqueeze(1), out=y if consume or y is not x else None)
    if spec.s != 1.0:
        d.mul_(spec.s)
    label_d = d.gather(1, target.clamp(0, vocab - 1).unsqueeze(1)).squeeze(1)
    label_d = torch.where(target < vocab, label_d, -shift * spec.s)  # another slice's label: its logit counts as 0
    token_entropy = None
    if entropy:
        e = torch.exp(d)
        sum_exp = e.sum(dim=1)
        weighted = e.mul_(d).nan_to_num_(nan=0.0).sum(dim=1)  # e d is NaN only where e = 0, d = -inf: adds 0
        log_sum = torch.log(sum_exp)
        token_entropy = log_sum - weighted / sum_exp
    else:  # what torch.logsumexp does inside, on d, whose maximum is 0: exp in place (d is never the caller's
        log_sum = torch.log(d.exp_().sum(dim=1))  # input unless it may be consumed), sum, log
    scored = target >= 0
    zero = torch.zeros_like(log_sum)
    logprob = torch.where(scored, label_d - log_sum, zero)
    norm = torch.stack([torch.where(scored, shift, zero), torch.where(scored, log_sum, zero)])
    if entropy:
        token_entropy = torch.where(scored, token_entropy, zero)
    return TokenStats(logprob, norm, token_entropy)


def _grad_rows_(x: Tensor, target: Tensor, norm: Tensor, coefs: Coefs, spec: LogitSpec) -> Tensor:
    """Turn x (r, V) float32 raw logits, which it consumes, into dx (see backend.Coefs) and return it (x itself, or
    a tensor of its shape with a soft-cap); rows whose coefficients are all 0 become zeros even where their logits
    are garbage (padding)."""
    vocab = x.shape[1]
    y = spec.transform(x)
    dy_dx = spec.dy_dx(y) if spec.softcap is not None else None
    log_p = y.sub_(norm[0].unsqueeze(1))
    if spec.s != 1.0:
        log_p.mul_(spec.s)
    log_p.sub_(norm[1].unsqueeze(1))  # in place: y (x without a soft-cap) becomes log p
    c_lp = coefs.logprob.unsqueeze(1)
    active = c_lp != 0
    if coefs.entropy is not None:
        c_ent = coefs.entropy.unsqueeze(1)
        active = active | (c_ent != 0)
        p = torch.exp(log_p)
        # -c_ent p (log p + H) - c_lp p; p (log p + H) is NaN only where p = 0 (log p = -inf): 0 there
        g = log_p.add_(coefs.token_entropy.unsqueeze(1)).mul_(p).nan_to_num_(nan=0.0).mul_(-c_ent)
        g.sub_(p.mul_(c_lp))
    else:
        g = log_p.exp_().mul_(-c_lp)
    g.scatter_add_(1, target.clamp(0, vocab - 1).unsqueeze(1), torch.where((target < vocab).unsqueeze(1), c_lp, 0.0))
    if dy_dx is not None:
        g.mul_(dy_dx)
    return g.masked_fill_(~active, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# the logits path


def token_forward(rows: Tensor, target: Tensor, spec: LogitSpec, entropy: bool) -> TokenStats:
    """rows (B', T', V) logits, target (N,) -> TokenStats, one chunk of rows at a time."""
    vocab = rows.shape[-1]
    f32 = dict(dtype=torch.float32, device=rows.device)
    out = TokenStats(empty(target.shape, **f32), empty((2, target.numel()), **f32),
                     empty(target.shape, **f32) if entropy else None)
    for start, index in _chunks(rows, vocab):
        x = rows[index].reshape(-1, vocab).float()  # may be the input itself: then not modified
        end = start + x.shape[0]
        own = x.untyped_storage().data_ptr() != rows.untyped_storage().data_ptr()
        part = _row_stats(x, target[start:end], spec, entropy, consume=own)
        out.logprob[start:end], out.norm[:, start:end] = part.logprob, part.norm
        if entropy:
            out.entropy[start:end] = part.entropy
    return out


def token_backward(rows: Tensor, target: Tensor, norm: Tensor, coefs: Coefs, spec: LogitSpec, out: Tensor) -> None:
    """Write dx into out (B', T', V), which may be rows itself."""
    vocab = rows.shape[-1]
    for start, index in _chunks(rows, vocab):
        x = rows[index]
        z = x.reshape(-1, vocab).to(torch.float32, copy=True)
        end = start + z.shape[0]
        chunk_coefs = Coefs(*(None if c is None else c[start:end] for c in coefs))
        out[index].copy_(_grad_rows_(z, target[start:end], norm[:, start:end], chunk_coefs, spec).view(x.shape))


# ----------------------------------------------------------------------------------------------------------------
# the group stage


def sequence_stats(token_logprob: Tensor, lay: Layout, beta: float):
    """(S,) s_i, the sum of each sequence's token log-probs, and r_i = beta * (s_i - a_i) (a_i = s_i on-policy)."""
    seq_logprob = token_logprob.new_zeros(lay.num_seqs).index_add_(0, lay.token_seq, token_logprob)
    if lay.token_ref is None:
        seq_ref = seq_logprob
    else:
        seq_ref = token_logprob.new_zeros(lay.num_seqs).index_add_(0, lay.token_seq, lay.token_ref)
    return seq_logprob, beta * (seq_logprob - seq_ref)


def group_stage(token_logprob: Tensor, lay: Layout, beta: float) -> GroupStats:
    """Sequence sums, group centring and dL/ds (see DESIGN.md section 1) for S sequences in G groups."""
    num_groups = lay.num_groups
    seq_logprob, implicit_reward = sequence_stats(token_logprob, lay, beta)
    counts = (lay.group_ptr[1:] - lay.group_ptr[:-1]).float()

    def centred(values):
        group_sums = values.new_zeros(num_groups).index_add_(0, lay.seq_group, values)
        return values - (group_sums / counts)[lay.seq_group]

    diff = centred(implicit_reward) - centred(lay.rewards)
    bessel = (counts - 1).clamp_(min=1)[lay.seq_group]
    loss = (diff.square() / (2 * bessel)).sum() * lay.scale
    grad_seq_logprob = (beta * lay.scale) * diff / bessel
    return GroupStats(loss, seq_logprob, implicit_reward, grad_seq_logprob)


# ----------------------------------------------------------------------------------------------------------------
# the linear path: chunk kernels for the shared schedule


class _LinearWork:
    """One linear call on the torch backend (see backend.LinearWork): chunks of scored rows whose float32 logits
    come from one F.linear each (the same chunks, hence the same logits, in every pass)."""

    def __init__(self, rows, weight, bias, target, spec: LogitSpec, needs, entropy: bool):
        self.rows_shape, self.target, self.spec, self.entropy = rows.shape, target, spec, entropy
        self.weight_dtype = weight.dtype
        self.flat_hidden = layout.flat_rows(rows)
        self.weight32, self.bias32 = weight.float(), None if bias is None else bias.float()
        self.scored = (target >= 0).nonzero().squeeze(1)
        f32 = dict(dtype=torch.float32, device=rows.device)
        self.d_hidden = torch.zeros(self.flat_hidden.shape, dtype=rows.dtype, device=rows.device) if needs[0] else None
        self.d_weight = torch.zeros(weight.shape, **f32) if needs[1] else None
        self.d_bias = torch.zeros(weight.shape[0], **f32) if needs[2] and bias is not None else None
        self.kept = None

    def chunk_rows(self, keep: bool) -> int:
        return max(1, CHUNK_BYTES // (4 * self.weight32.shape[0]))

    def _logits(self, tokens):
        h = self.flat_hidden[tokens].float()
        return h, torch.nn.functional.linear(h, self.weight32, self.bias32)

    def forward(self, tokens, keep: bool) -> TokenStats:
        _, x = self._logits(tokens)
        self.kept = x if keep else None
        return _row_stats(x, self.target[tokens], self.spec, self.entropy, consume=not keep)

    def backward(self, tokens, norm, coefs: Coefs, kept: bool) -> None:
        h, x = self._logits(tokens) if not kept else (self.flat_hidden[tokens].float(), self.kept)
        g = _grad_rows_(x, self.target[tokens], norm, coefs, self.spec)
        self.kept = None
        if self.d_hidden is not None:
            self.d_hidden[tokens] = (g @ self.weight32).to(self.d_hidden.dtype)
        if self.d_weight is not None:
            self.d_weight.addmm_(g.T, h)
        if self.d_bias is not None:
            self.d_bias += g.sum(0)

    def grads(self) -> Grads:
        return Grads(None if self.d_hidden is None else self.d_hidden.view(self.rows_shape),
                     None if self.d_weight is None else self.d_weight.to(self.weight_dtype),
                     None if self.d_bias is None else self.d_bias.to(self.weight_dtype))


def linear_work(rows, weight, bias, target, spec: LogitSpec, needs, entropy: bool) -> _LinearWork:
    """rows (B', T', H) hidden, weight (V, H), bias (V,) or None: the chunk kernels of one linear call."""
    return _LinearWork(rows, weight, bias, target, spec, needs, entropy)
