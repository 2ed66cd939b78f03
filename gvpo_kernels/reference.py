"""The oracle: GVPO in plain PyTorch, written to be obviously correct rather than fast.

It materialises the full log-softmax, sums each sequence with a Python loop, centres each group with another, and
lets autograd produce every gradient. Math runs in float32, or in float64 when the logits are float64, which is
how the tests obtain their float64 ground truth. It shares only argument checking with the fused backends
(``layout.check_*`` and ``layout.build``, whose flattened output it ignores), never their math.
"""

from __future__ import annotations

import torch

from . import layout
from .layout import GVPOStats


def gvpo_loss(
    logits,
    labels,
    rewards,
    *,
    group_size=None,
    group_ids=None,
    mask=None,
    cu_seqlens=None,
    ref_logprobs=None,
    beta=0.1,
    temperature=1.0,
    softcap=None,
    logit_scale=1.0,
    entropy_coef=0.0,
    reduction="mean",
    ignore_index=-100,
    backend="auto",
    inplace_backward=False,
    return_stats=False,
):
    """Reference GVPO loss on logits; same signature and errors as :func:`gvpo_kernels.gvpo_loss`.

    ``backend`` and ``inplace_backward`` are checked and otherwise ignored.
    """
    layout.check_options(beta=beta, temperature=temperature, reduction=reduction, ignore_index=ignore_index,
                         backend=backend, softcap=softcap, logit_scale=logit_scale, entropy_coef=entropy_coef)
    layout.check_flag("inplace_backward", inplace_backward)
    layout.check_flag("return_stats", return_stats)
    vocab_size = layout.check_logits(logits, labels)
    layout.build(labels, rewards, vocab_size=vocab_size, group_size=group_size, group_ids=group_ids, mask=mask,
                 cu_seqlens=cu_seqlens, ref_logprobs=ref_logprobs, ignore_index=ignore_index, reduction=reduction)

    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logprobs = torch.log_softmax(transformed(logits.to(dtype), softcap, logit_scale) / temperature, dim=-1)

    scored, token_logprob = _scored_logprobs(logprobs, labels, mask, ignore_index)
    if ref_logprobs is None:
        token_ref = None
    else:
        token_ref = torch.where(scored, ref_logprobs.detach().to(dtype), torch.zeros_like(token_logprob))

    seq_logprob = _per_sequence_sums(token_logprob, cu_seqlens)
    seq_ref = seq_logprob.detach() if token_ref is None else _per_sequence_sums(token_ref, cu_seqlens)

    group = _GroupStage(seq_logprob, seq_ref, token_ref is not None, rewards, group_size, group_ids, beta, reduction)
    gvpo = group.loss()
    # the entropy bonus: entropy_coef times the mean token entropy over the scored tokens of the call
    bonus = entropy_coef * _token_entropy(logprobs)[scored].sum() / scored.sum().clamp(min=1)
    loss = gvpo - bonus
    if not return_stats:
        return loss

    stats = GVPOStats(
        seq_logprob=seq_logprob.detach().float(),
        implicit_reward=(beta * (seq_logprob - seq_ref)).detach().float(),
        grad_seq_logprob=group.grad_seq_logprob(),
        entropy=_mean_entropy(logprobs, scored, cu_seqlens).float(),
        gvpo_loss=gvpo.detach().float(),
        entropy_bonus=bonus.detach().float(),
    )
    return loss, stats


def transformed(logits, softcap, logit_scale):
    """The logits as the softmax sees them before the temperature: softcap * tanh(logits * logit_scale / softcap)
    with a soft-cap (Gemma-2's final_logit_softcapping), else logits * logit_scale (Cohere's logit_scale)."""
    if softcap is None:
        return logits * logit_scale
    return softcap * torch.tanh(logits * logit_scale / softcap)


def _token_entropy(logprobs):
    """-sum_v p_v log p_v of each position (-inf logits, p = 0, add 0 with a finite gradient)."""
    probs = logprobs.exp()
    return -(probs * logprobs.masked_fill(probs == 0, 0.0)).sum(-1)


def _mean_entropy(logprobs, scored, cu_seqlens):
    """(S,) mean over each sequence's scored tokens of -sum_v p_v log p_v (0 for a sequence with none)."""
    entropy = _token_entropy(logprobs.detach())
    count = _per_sequence_sums(scored.to(entropy.dtype), cu_seqlens)
    return _per_sequence_sums(torch.where(scored, entropy, torch.zeros_like(entropy)), cu_seqlens) / count.clamp(min=1)


def _scored_logprobs(logprobs, labels, mask, ignore_index):
    """-> scored (labels' shape, bool) and each scored label's log-prob, 0 where not scored."""
    scored = labels != ignore_index
    if mask is not None:
        scored = scored & mask.bool()
    safe_labels = torch.where(scored, labels, torch.zeros_like(labels)).long()
    token_logprob = logprobs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return scored, torch.where(scored, token_logprob, torch.zeros_like(token_logprob))


def _per_sequence_sums(token_values, cu_seqlens):
    """(B, T) padded -> sum over T; (N,) packed -> one sum per cu_seqlens segment."""
    if cu_seqlens is None:
        return token_values.sum(dim=1)
    bounds = cu_seqlens.tolist()
    sums = [token_values[start:end].sum() for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.stack(sums) if sums else token_values.new_zeros(0)


class _GroupStage:
    """GVPO of per-sequence log-prob sums (B,) against the anchor's sums seq_ref (B,) (``seq_logprob.detach()``
    when not ``anchored``), groups from group_size or group_ids, rewards (B,) in the sums' dtype."""

    def __init__(self, seq_logprob, seq_ref, anchored, rewards, group_size, group_ids, beta, reduction):
        if group_size is not None:
            group_ids = torch.arange(seq_logprob.numel(), device=seq_logprob.device) // group_size
        self.seq_logprob, self.seq_ref, self.anchored = seq_logprob, seq_ref, anchored
        self.args = (rewards.detach().to(seq_logprob.dtype), group_ids, beta, reduction)

    def loss(self):
        return _group_loss(self.seq_logprob, self.seq_ref, *self.args)

    def grad_seq_logprob(self):
        """d loss / d seq_logprob (float32); without an anchor the anchor moves with the policy, held detached."""
        with torch.enable_grad():
            s = self.seq_logprob.detach().requires_grad_()
            (grad,) = torch.autograd.grad(_group_loss(s, self.seq_ref if self.anchored else s.detach(), *self.args),
                                          s)
        return grad.float()


def _group_loss(seq_logprob, seq_ref, rewards, groups, beta, reduction):
    """sum_G 1 / (2 max(k-1, 1)) sum_{i in G} ((r_i - mean r) - (R_i - mean R))^2, then mean or sum over G."""
    implicit_reward = beta * (seq_logprob - seq_ref)
    group_losses = []
    for g in torch.unique(groups).tolist():
        members = (groups == g).nonzero().squeeze(1)
        r = implicit_reward[members]
        big_r = rewards[members]
        k = members.numel()
        diff = (r - r.mean()) - (big_r - big_r.mean())
        group_losses.append((diff**2).sum() / (2 * max(k - 1, 1)))
    if not group_losses:  # no sequence at all: nothing to learn from
        return seq_logprob.sum() * 0.0
    total = torch.stack(group_losses).sum()
    return total / len(group_losses) if reduction == "mean" else total


def linear_gvpo_loss(
    hidden,
    weight,
    labels,
    rewards,
    *,
    bias=None,
    group_size=None,
    group_ids=None,
    mask=None,
    cu_seqlens=None,
    ref_logprobs=None,
    beta=0.1,
    temperature=1.0,
    softcap=None,
    logit_scale=1.0,
    entropy_coef=0.0,
    reduction="mean",
    ignore_index=-100,
    backend="auto",
    return_stats=False,
):
    """Reference GVPO loss from hidden states and the LM head: materialise the logits, then :func:`gvpo_loss`.

    hidden (B, T, H) or (N, H); weight (V, H); bias (V,) or None. The matmul runs in float32 (float64 for
    float64 inputs); same keywords, errors and return value as :func:`gvpo_kernels.linear_gvpo_loss`.
    """
    layout.check_linear(hidden, weight, bias, labels)
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return gvpo_loss(logits, labels, rewards, group_size=group_size, group_ids=group_ids, mask=mask,
                     cu_seqlens=cu_seqlens, ref_logprobs=ref_logprobs, beta=beta, temperature=temperature,
                     softcap=softcap, logit_scale=logit_scale, entropy_coef=entropy_coef,
                     reduction=reduction, ignore_index=ignore_index, backend=backend, return_stats=return_stats)


def token_logprobs(logits, labels, *, temperature=1.0, softcap=None, logit_scale=1.0, mask=None, cu_seqlens=None,
                   ignore_index=-100, return_entropy=False, backend="auto"):
    """Reference per-token log-probs (and entropy) from the full log-softmax; same signature and errors as
    :func:`gvpo_kernels.token_logprobs`. float32 math and outputs (float64 for float64 logits)."""
    layout.check_options(beta=None, temperature=temperature, reduction="mean", ignore_index=ignore_index,
                         backend=backend, softcap=softcap, logit_scale=logit_scale)
    layout.check_flag("return_entropy", return_entropy)
    vocab_size = layout.check_logits(logits, labels)
    layout.token_targets(labels, vocab_size=vocab_size, mask=mask, cu_seqlens=cu_seqlens, ignore_index=ignore_index)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logprobs = torch.log_softmax(transformed(logits.to(dtype), softcap, logit_scale) / temperature, dim=-1)
    scored, token_logprob = _scored_logprobs(logprobs, labels, mask, ignore_index)
    if not return_entropy:
        return token_logprob
    entropy = _token_entropy(logprobs)
    return token_logprob, torch.where(scored, entropy, torch.zeros_like(entropy))


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, softcap=None, logit_scale=1.0,
                          mask=None, cu_seqlens=None, ignore_index=-100, return_entropy=False, backend="auto"):
    """Reference :func:`gvpo_kernels.linear_token_logprobs`: materialise the logits, then :func:`token_logprobs`."""
    layout.check_linear(hidden, weight, bias, labels)
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return token_logprobs(logits, labels, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                          mask=mask, cu_seqlens=cu_seqlens, ignore_index=ignore_index, return_entropy=return_entropy,
                          backend=backend)


def gvpo_loss_from_logprobs(token_logprobs, rewards, *, mask=None, group_size=None, group_ids=None, cu_seqlens=None,
                            ref_logprobs=None, beta=0.1, reduction="mean", return_stats=False):
    """Reference :func:`gvpo_kernels.gvpo_loss_from_logprobs` (no ``group_process_group``): mask, sum each
    sequence, centre each group, and let autograd give the gradient. float32 math (float64 for float64 log-probs);
    same errors; ``stats.entropy`` is ``zeros(0)``."""
    layout.check_options(beta=beta, temperature=1.0, reduction=reduction, ignore_index=-100, backend="torch")
    layout.check_flag("return_stats", return_stats)
    labels = layout.check_token_logprobs(token_logprobs, mask=mask, ref_logprobs=ref_logprobs, rewards=rewards,
                                         group_ids=group_ids, cu_seqlens=cu_seqlens)
    layout.build(labels, rewards, vocab_size=1, group_size=group_size, group_ids=group_ids, mask=mask,
                 cu_seqlens=cu_seqlens, ref_logprobs=ref_logprobs, reduction=reduction)

    dtype = torch.float64 if token_logprobs.dtype == torch.float64 else torch.float32
    scored = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    zero = torch.zeros((), dtype=dtype, device=token_logprobs.device)
    seq_logprob = _per_sequence_sums(torch.where(scored, token_logprobs.to(dtype), zero), cu_seqlens)
    if ref_logprobs is None:
        seq_ref = seq_logprob.detach()
    else:
        seq_ref = _per_sequence_sums(torch.where(scored, ref_logprobs.detach().to(dtype), zero), cu_seqlens)
    group = _GroupStage(seq_logprob, seq_ref, ref_logprobs is not None, rewards, group_size, group_ids, beta,
                        reduction)
    loss = group.loss()
    if not return_stats:
        return loss
    return loss, GVPOStats(seq_logprob=seq_logprob.detach().float(),
                           implicit_reward=(beta * (seq_logprob - seq_ref)).detach().float(),
                           grad_seq_logprob=group.grad_seq_logprob(),
                           entropy=torch.zeros(0, device=token_logprobs.device),
                           gvpo_loss=loss.detach().float(),
                           entropy_bonus=torch.zeros((), device=token_logprobs.device))
