"""The chunked pure-PyTorch backend: the fused algorithm in torch ops, for any device (the fallback).

It walks the tokens in chunks and never holds more than one chunk of logits in float32 (plus the temporaries of
one torch op on that chunk), so its working memory is O(CHUNK_BYTES + N + S) whatever N and V are; the linear
path adds, when the weight is not float32 itself, a float32 copy of the head and a float32 accumulator for the
weight gradient, (V, H) each. The
functions below are the backend interface that :mod:`gvpo_kernels.functional` drives:

    token_forward(rows, target, temperature)             -> token_logprob (N,), lse (N,)
    group_stage(token_logprob, lay, beta)                -> loss (), seq_logprob (S,), implicit_reward (S,),
                                                            grad_seq_logprob (S,)
    token_backward(rows, lay, lse, grad_seq_logprob, grad_loss, temperature, out)
                                                         writes dL/dlogits into out (B', T', V)
    linear_forward(rows, weight, bias, target, temperature)  -> token_logprob (N,), lse (N,)
    linear_backward(rows, weight, bias, lay, lse, grad_seq_logprob, grad_loss, temperature)
                                                         -> d_hidden (B', T', H), d_weight (V, H), d_bias (V,)

and, for the token statistics with entropy (every backend has them; ops.py computes the coefficients, the
upstream gradients / T, 0 where not scored):

    token_stats_forward(rows, target, temperature)       -> token_logprob, lse, token_entropy (N,)
    token_stats_backward(rows, target, lse, token_entropy, coef_logprob, coef_entropy, temperature, out)
    linear_token_stats_forward(rows, weight, bias, target, temperature)   -> as token_stats_forward
    linear_token_stats_backward(rows, weight, bias, target, lse, token_entropy, coef_logprob, coef_entropy,
                                temperature)             -> d_hidden, d_weight, d_bias

``rows`` is the (B', T', D) view of the logits (D = V) or hidden states (D = H) from
:func:`gvpo_kernels.layout.as_rows`: flat token n is row (n // T', n % T').

The linear backward recomputes each chunk's logits (the coefficients dL/ds need every sequence of a group, so
they are known only after the whole forward): four GEMMs in all, logits twice, then d_hidden and d_weight.
"""

from __future__ import annotations

import torch

from ._alloc import empty
from .layout import Layout

CHUNK_BYTES = 64 << 20  # float32 bytes of logits per chunk


def _chunks(rows: torch.Tensor, vocab: int):
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


def _logprob(z: torch.Tensor, target: torch.Tensor):
    """z (r, V) float32 logits / T, target (r,) -> (target's logit - lse) (r,), lse (r,).

    target -1: not scored, 0 out; target >= V: scored, but its label lies outside these V columns (a vocabulary
    slice held by another rank), so the label's logit counts as 0 and the result is -lse.
    """
    vocab = z.shape[1]
    lse = torch.logsumexp(z, dim=-1)
    label_logit = z.gather(1, target.clamp(0, vocab - 1).unsqueeze(1)).squeeze(1)
    label_logit = torch.where(target < vocab, label_logit, torch.zeros_like(label_logit))
    return torch.where(target >= 0, label_logit - lse, torch.zeros_like(lse)), lse


def _softmax_grad_(z: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, target: torch.Tensor):
    """Turn z (r, V) float32 logits / T into coef * (onehot(target) - softmax(z)), in place (no onehot where
    target >= V); rows with coef == 0 become zeros even where their logits are garbage (padding)."""
    vocab = z.shape[1]
    c = coef.unsqueeze(1)
    z.sub_(lse.unsqueeze(1)).exp_().mul_(-c)
    z.scatter_add_(1, target.clamp(0, vocab - 1).unsqueeze(1), torch.where(target.unsqueeze(1) < vocab, c, 0.0))
    return z.masked_fill_(c == 0, 0.0)


def _token_coef(lay: Layout, grad_seq_logprob, grad_loss, temperature: float):
    """(N,) float32: grad_loss * dL/ds of each token's sequence / T, 0 for tokens that are not scored."""
    coef = grad_seq_logprob[lay.token_seq] * (grad_loss.float() / temperature)
    return torch.where(lay.target >= 0, coef, torch.zeros_like(coef))


def token_forward(rows: torch.Tensor, target: torch.Tensor, temperature: float):
    """Per-token log-prob of the target (0 where target < 0) and log-sum-exp of logits / temperature."""
    vocab = rows.shape[-1]
    token_logprob = empty(target.shape, dtype=torch.float32, device=rows.device)
    lse = empty(target.shape, dtype=torch.float32, device=rows.device)
    for start, index in _chunks(rows, vocab):
        z = rows[index].reshape(-1, vocab).float()  # may be the input itself: not modified in place
        if temperature != 1.0:
            z = z / temperature
        end = start + z.shape[0]
        token_logprob[start:end], lse[start:end] = _logprob(z, target[start:end])
    return token_logprob, lse


def sequence_stats(token_logprob: torch.Tensor, lay: Layout, beta: float):
    """(S,) s_i, the sum of each sequence's token log-probs, and r_i = beta * (s_i - a_i) (a_i = s_i on-policy)."""
    seq_logprob = token_logprob.new_zeros(lay.num_seqs).index_add_(0, lay.token_seq, token_logprob)
    if lay.token_ref is None:
        seq_ref = seq_logprob
    else:
        seq_ref = token_logprob.new_zeros(lay.num_seqs).index_add_(0, lay.token_seq, lay.token_ref)
    return seq_logprob, beta * (seq_logprob - seq_ref)


def group_stage(token_logprob: torch.Tensor, lay: Layout, beta: float):
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
    return loss, seq_logprob, implicit_reward, grad_seq_logprob


def token_backward(rows, lay: Layout, lse, grad_seq_logprob, grad_loss, temperature: float, out):
    """out[n] = grad_loss * dL/ds[seq(n)] / temperature * (onehot(target[n]) - softmax(rows[n] / temperature)).

    Rows that are not scored get zeros. ``out`` may be ``rows`` itself (inplace_backward).
    """
    vocab = rows.shape[-1]
    coef = _token_coef(lay, grad_seq_logprob, grad_loss, temperature)
    for start, index in _chunks(rows, vocab):
        x = rows[index]
        z = x.reshape(-1, vocab).to(torch.float32, copy=True)
        end = start + z.shape[0]
        if temperature != 1.0:
            z.div_(temperature)
        _softmax_grad_(z, lse[start:end], coef[start:end], lay.target[start:end])
        out[index].copy_(z.view(x.shape))


def _linear_logits(h: torch.Tensor, weight32, bias32, temperature: float) -> torch.Tensor:
    """(r, H) hidden -> (r, V) float32 logits / T from a float32 head, a fresh tensor (safe to modify in place).

    The product runs in float32 whatever the input dtype, as the Triton tiles do: bf16 logits would be off by
    ~1e-2 per token."""
    z = torch.nn.functional.linear(h.float(), weight32, bias32)
    return z.div_(temperature) if temperature != 1.0 else z


def _float32_head(weight, bias):
    """The head in float32: the weight itself when it is float32, else one (V, H) float32 copy per call."""
    return weight.float(), None if bias is None else bias.float()


def linear_forward(rows: torch.Tensor, weight, bias, target: torch.Tensor, temperature: float):
    """rows (B', T', H) hidden, weight (V, H) -> token log-prob (N,), lse (N,), one chunk of logits at a time."""
    hidden_size, vocab = rows.shape[-1], weight.shape[0]
    weight32, bias32 = _float32_head(weight, bias)
    token_logprob = empty(target.shape, dtype=torch.float32, device=rows.device)
    lse = empty(target.shape, dtype=torch.float32, device=rows.device)
    for start, index in _chunks(rows, vocab):
        z = _linear_logits(rows[index].reshape(-1, hidden_size), weight32, bias32, temperature)
        end = start + z.shape[0]
        token_logprob[start:end], lse[start:end] = _logprob(z, target[start:end])
    return token_logprob, lse


def linear_backward(rows, weight, bias, lay: Layout, lse, grad_seq_logprob, grad_loss, temperature: float):
    """d_hidden (B', T', H) in the hidden dtype, d_weight (V, H) and d_bias (V,) in the weight dtype.

    Per chunk: recompute the logits, turn them into dL/dlogits in place, then d_hidden = dlogits @ W and
    d_weight += dlogits^T @ h, all in float32 and accumulated in float32 across chunks.
    """
    coef = _token_coef(lay, grad_seq_logprob, grad_loss, temperature)
    return _linear_contract(rows, weight, bias, temperature,
                            lambda z, a, b: _softmax_grad_(z, lse[a:b], coef[a:b], lay.target[a:b]))


def _linear_contract(rows, weight, bias, temperature: float, chunk_grad):
    """d_hidden, d_weight, d_bias of logits = rows @ W.T + b, chunk by chunk: ``chunk_grad(z, start, end)`` turns a
    chunk's float32 logits / T, z (r, V), into their gradient (with the 1/T) in place and returns it."""
    hidden_size, vocab = rows.shape[-1], weight.shape[0]
    weight32, bias32 = _float32_head(weight, bias)
    d_hidden = empty(rows.shape, dtype=rows.dtype, device=rows.device)
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if bias is not None else None
    for start, index in _chunks(rows, vocab):
        x = rows[index]
        h = x.reshape(-1, hidden_size).float()
        grad = chunk_grad(_linear_logits(h, weight32, bias32, temperature), start, start + h.shape[0])
        d_hidden[index] = (grad @ weight32).view(x.shape)
        d_weight.addmm_(grad.T, h)
        if d_bias is not None:
            d_bias += grad.sum(0)
    return d_hidden, d_weight.to(weight.dtype), None if d_bias is None else d_bias.to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------------
# token statistics with entropy (gvpo_kernels.token_logprobs(..., return_entropy=True))


def _entropy(z: torch.Tensor, lse: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """z (r, V) float32 logits / T -> (r,) entropy of softmax(z), sum_v p_v (lse - z_v); 0 where target < 0.
    Columns of -inf (p = 0) add 0."""
    d = lse.unsqueeze(1) - z
    p = torch.exp(-d)
    h = torch.where(p > 0, p * d, 0.0).sum(1)
    return torch.where(target >= 0, h, torch.zeros_like(h))


def _token_stats_grad_(z, lse, entropy, coef_logprob, coef_entropy, target):
    """Turn z (r, V) float32 logits / T into d(sum c_lp * logprob + c_ent * entropy)/dz in place:
    c_lp * (onehot - p) + c_ent * p * (lse - z - H) (the entropy's gradient is -p (log p + H)); rows not scored
    (target < 0) become zeros. The 1/T of dz/dlogits is in the coefficients."""
    d = lse.unsqueeze(1) - z
    p = z.sub_(lse.unsqueeze(1)).exp_()  # in place: z becomes softmax(z)
    ent_term = torch.where(p > 0, p * (d - entropy.unsqueeze(1)), 0.0) * coef_entropy.unsqueeze(1)
    p.mul_(-coef_logprob.unsqueeze(1)).add_(ent_term)
    vocab = p.shape[1]
    p.scatter_add_(1, target.clamp(0, vocab - 1).unsqueeze(1), coef_logprob.unsqueeze(1))
    return p.masked_fill_((target < 0).unsqueeze(1), 0.0)


def token_stats_forward(rows: torch.Tensor, target: torch.Tensor, temperature: float):
    """-> token_logprob, lse, entropy (N,) float32 of logits / T, in one pass over chunks of rows."""
    vocab = rows.shape[-1]
    outs = [empty(target.shape, dtype=torch.float32, device=rows.device) for _ in range(3)]
    for start, index in _chunks(rows, vocab):
        z = rows[index].reshape(-1, vocab).float()
        if temperature != 1.0:
            z = z / temperature
        end = start + z.shape[0]
        outs[0][start:end], outs[1][start:end] = _logprob(z, target[start:end])
        outs[2][start:end] = _entropy(z, outs[1][start:end], target[start:end])
    return tuple(outs)


def token_stats_backward(rows, target, lse, entropy, coef_logprob, coef_entropy, temperature: float, out):
    """out (B', T', V) = d(sum_n c_lp[n] T logprob[n] + c_ent[n] T entropy[n]) / dlogits, chunk by chunk; the
    coefficients (N,) float32 are the upstream gradients / T, 0 where not scored."""
    vocab = rows.shape[-1]
    for start, index in _chunks(rows, vocab):
        x = rows[index]
        z = x.reshape(-1, vocab).to(torch.float32, copy=True)
        if temperature != 1.0:
            z.div_(temperature)
        end = start + z.shape[0]
        grad = _token_stats_grad_(z, lse[start:end], entropy[start:end], coef_logprob[start:end],
                                  coef_entropy[start:end], target[start:end])
        out[index].copy_(grad.view(x.shape))


def linear_token_stats_forward(rows, weight, bias, target: torch.Tensor, temperature: float):
    """rows (B', T', H), weight (V, H) -> token_logprob, lse, entropy (N,) float32, one chunk of logits at a time."""
    hidden_size, vocab = rows.shape[-1], weight.shape[0]
    weight32, bias32 = _float32_head(weight, bias)
    outs = [empty(target.shape, dtype=torch.float32, device=rows.device) for _ in range(3)]
    for start, index in _chunks(rows, vocab):
        z = _linear_logits(rows[index].reshape(-1, hidden_size), weight32, bias32, temperature)
        end = start + z.shape[0]
        outs[0][start:end], outs[1][start:end] = _logprob(z, target[start:end])
        outs[2][start:end] = _entropy(z, outs[1][start:end], target[start:end])
    return tuple(outs)


def linear_token_stats_backward(rows, weight, bias, target, lse, entropy, coef_logprob, coef_entropy,
                                temperature: float):
    """d_hidden (B', T', H), d_weight (V, H), d_bias (V,) of the same sum as :func:`token_stats_backward`: each
    chunk's logits recomputed, turned into their gradient in place, contracted in float32."""
    return _linear_contract(rows, weight, bias, temperature, lambda z, a, b: _token_stats_grad_(
        z, lse[a:b], entropy[a:b], coef_logprob[a:b], coef_entropy[a:b], target[a:b]))
