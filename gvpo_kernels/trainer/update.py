"""The update: anchor log-probs (and the policy's entropy), the GVPO loss on hidden states, and the optimizer steps
over micro-batches, on one process or many.

The loss never builds the (S, C, V) logits: the decoder runs without its head, its last hidden state is shifted
by one (hidden[t] predicts token t + 1) and cut to the completion, and ``linear_gvpo_loss`` takes it with
``lm_head.weight`` and the model's logit transform (soft-cap, scale: read from its config), so every log-prob is
one of the distribution the model samples from. Micro-batches hold whole groups, so each group is centred on all
of its k completions; the entropy bonus is rescaled per micro-batch so that each optimizer step's is the mean over
all of its scored tokens, whatever the micro-batches and ranks.
"""

from __future__ import annotations

import math

import torch

from ..functional import linear_gvpo_loss, linear_token_logprobs
from ..integrations.hf import logit_transform
from . import parallel
from .models import decoder_and_head
from .rollout import Rollout, sample


class Policy(torch.nn.Module):
    """The causal LM as DDP and FSDP wrap it. ``policy(task, ...)`` runs ``sample``, ``logprobs``
    (:func:`token_logprobs`) or ``loss`` (:func:`gvpo_loss`) on ``policy.model``: the loss takes the head's weight
    outside the model's own forward, and DDP / FSDP only see what happens inside the forward of the module they
    wrap, so every use of the weights goes through this one."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, task: str, *args, **kwargs):
        return {"sample": sample, "logprobs": token_logprobs, "loss": gvpo_loss}[task](self.model, *args, **kwargs)


def completion_hidden(model, rollout: Rollout) -> torch.Tensor:
    """(S, C, H): the decoder's last hidden state at the positions that predict each completion token."""
    decoder, _ = decoder_and_head(model)
    position_ids = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = decoder(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=position_ids,
                  use_cache=False)
    return out.last_hidden_state[:, rollout.prompt_len - 1:-1]


def loss_dtype(hidden: torch.Tensor, head: torch.nn.Linear) -> torch.dtype:
    """The dtype the loss takes hidden state and head weight in: the autocast dtype when autocast is on (autocast
    leaves the head's weight float32, and the loss refuses mismatched dtypes), else the weight's."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else head.weight.dtype


@torch.no_grad()
def token_logprobs(model, rollout: Rollout, temperature: float, return_entropy: bool = False,
                   backend: str = "auto"):
    """(S, C) float32 log-probs of each completion token under ``model`` at ``temperature``, 0 where unscored;
    with ``return_entropy``, also the (S, C) float32 entropy of the model's distribution at each of those
    positions (at the same temperature; 0 where unscored).

    ``gk.linear_token_logprobs`` on the hidden states and the head, as the loss takes them (:func:`loss_dtype`),
    with the model's logit transform (:func:`logit_transform` of its config: the log-probs are those of the
    model's own logits), so the logits are never built and the products are summed in float32 (plain bf16
    logits would be off by ~0.1 nat per token); the entropy comes from the same pass.
    """
    _, head = decoder_and_head(model)
    transform = logit_transform(model.config)
    hidden = completion_hidden(model, rollout)
    dtype = loss_dtype(hidden, head)
    bias = None if head.bias is None else head.bias.to(dtype)
    return linear_token_logprobs(hidden.to(dtype), head.weight.to(dtype), rollout.completion_ids, bias=bias,
                                 mask=rollout.completion_mask, temperature=temperature, softcap=transform.softcap,
                                 logit_scale=transform.logit_scale, return_entropy=return_entropy, backend=backend)


def gvpo_loss(model, rollout: Rollout, *, beta: float, temperature: float, backend: str = "auto",
              entropy_coef: float = 0.0):
    """(loss, GVPOStats) of ``rollout`` (rewards and anchor set) with ``linear_gvpo_loss`` and the model's logit
    transform: the mean over its groups of GVPO's loss, minus ``entropy_coef`` times the mean entropy over its
    scored tokens."""
    _, head = decoder_and_head(model)
    transform = logit_transform(model.config)
    hidden = completion_hidden(model, rollout)
    dtype = loss_dtype(hidden, head)
    bias = None if head.bias is None else head.bias.to(dtype)
    labels = rollout.completion_ids.masked_fill(~rollout.completion_mask, -100)
    k = rollout.group_size  # groups of different sizes (a demonstration in some) go by group ids
    groups = {"group_size": k} if k is not None else {"group_ids": rollout.group_ids()}
    return linear_gvpo_loss(hidden.to(dtype), head.weight.to(dtype), labels, rollout.rewards, bias=bias,
                            mask=rollout.completion_mask, ref_logprobs=rollout.anchor, beta=beta,
                            temperature=temperature, softcap=transform.softcap, logit_scale=transform.logit_scale,
                            entropy_coef=entropy_coef, backend=backend, return_stats=True, **groups)


def entropy_coefs(rollout: Rollout, steps: list[list[tuple[int, int]]], entropy_coef: float,
                  world: parallel.World) -> dict[int, float]:
    """The entropy coefficient each micro-batch's loss gets (by its first group), so that each optimizer step
    (``steps``: its micro-batches' group ranges) minimises GVPO's mean over its groups minus ``entropy_coef``
    times the mean entropy over its scored tokens on every rank.

    A micro-batch's loss is weighted by its share of the step's groups and its bonus is a mean over its own
    tokens, and the ranks' gradients are averaged; so micro-batch b of n_b of the step's N tokens (all ranks)
    gets ``entropy_coef * W * n_b * G / (N * g_b)`` (G, g_b: the rank's groups in the step, in the micro-batch).
    One micro-batch on one rank gets ``entropy_coef`` itself. One sum over ranks (of the steps' token counts)."""
    counts = [[int(rollout.groups(start, stop).completion_mask.sum()) for start, stop in step] for step in steps]
    totals = parallel.all_sum([float(sum(c)) for c in counts], world, rollout.input_ids.device)
    coefs = {}
    for step, step_counts, total in zip(steps, counts, totals):
        step_groups = sum(stop - start for start, stop in step)
        for (start, stop), count in zip(step, step_counts):
            coefs[start] = entropy_coef * ((world.size * count * step_groups) /
                                           (max(1, round(total)) * (stop - start)))
    return coefs


def optimizer_steps_per_rollout(num_groups: int, micro_batch_groups: int | None, grad_accum: int,
                                update_epochs: int) -> int:
    """How many optimizer steps one rollout step makes (``num_groups``: the groups of one rank)."""
    micro_batches = math.ceil(num_groups / (micro_batch_groups or num_groups))
    return update_epochs * math.ceil(micro_batches / grad_accum)


def update(policy, optimizer, scheduler, rollout: Rollout, *, beta: float, temperature: float, backend: str,
           update_epochs: int, micro_batch_groups: int | None, grad_accum: int, max_grad_norm: float,
           autocast, world: parallel.World = parallel.World(), before_step=None, entropy_coef: float = 0.0) -> dict:
    """Train ``policy`` (a :class:`Policy`, or DDP / FSDP of one) on ``rollout`` (rewards and anchor set; with
    several ranks, this rank's groups, as many on every rank): ``update_epochs`` passes, each cut into
    micro-batches of ``micro_batch_groups`` whole groups, ``grad_accum`` micro-batches per optimizer step (each
    micro-batch's loss weighted by its share of the step's groups, so the step minimises the mean over its groups;
    gradients are averaged over ranks on the last micro-batch only, which with equal shares makes it the mean over
    every rank's groups).

    ``before_step()`` is called before each optimizer step (the lagged sampler keeps the weights it is about to
    change). ``entropy_coef``: each optimizer step's loss also subtracts it times the mean policy entropy over the
    step's scored tokens on every rank (:func:`entropy_coefs`).

    Returns means over the step and every rank: loss, implicit_reward (r_i), kl (s_i - a_i), grad_seq_abs
    (|dL/ds_i| of the loss each optimizer step minimises) and grad_norm (before clipping); with an entropy bonus,
    gvpo_loss and entropy_bonus, the loss's two parts (loss = gvpo_loss - entropy_bonus); this rank's
    entropy_sum, the sum over the scored tokens of its members sampled at this step (``rollout.sampled()``) of
    the policy's entropy in the first pass (``GVPOStats.entropy``, from the loss's own pass over the head); and
    optimizer_steps, how many it made.
    """
    num_groups = rollout.num_groups
    size = micro_batch_groups or num_groups
    micro = [(g, min(g + size, num_groups)) for g in range(0, num_groups, size)]
    steps = [micro[first:first + grad_accum] for first in range(0, len(micro), grad_accum)]
    coefs = entropy_coefs(rollout, steps, entropy_coef, world) if entropy_coef else {}
    params = [p for p in policy.parameters() if p.requires_grad]
    losses, norms, implicit, grad_seq, parts = [], [], [], [], []
    entropy_sum = 0.0
    policy.train()
    for epoch in range(update_epochs):
        for chunk in steps:
            step_groups = sum(stop - start for start, stop in chunk)
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_parts = 0.0, [0.0, 0.0]
            for i, (start, stop) in enumerate(chunk):
                weight = (stop - start) / step_groups
                part = rollout.groups(start, stop)
                bonus = {"entropy_coef": coefs[start]} if coefs else {}
                with parallel.gradient_sync(policy, i == len(chunk) - 1):
                    with autocast:
                        loss, stats = policy("loss", part, beta=beta, temperature=temperature, backend=backend,
                                             **bonus)
                    (loss * weight).backward()
                step_loss += loss.item() * weight
                if coefs:
                    step_parts[0] += stats.gvpo_loss.item() * weight
                    step_parts[1] += stats.entropy_bonus.item() * weight
                if epoch == 0:
                    entropy_sum += (stats.entropy * part.completion_mask.sum(1) * part.sampled()).sum().item()
                implicit.append(stats.implicit_reward.detach())
                grad_seq.append(stats.grad_seq_logprob.abs() * weight)
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
            if before_step is not None:
                before_step()
            optimizer.step()
            scheduler.step()
            losses.append(step_loss)
            parts.append(step_parts)
            norms.append(parallel.full(norm).item())
    implicit, grad_seq = torch.cat(implicit), torch.cat(grad_seq)
    loss_sum, implicit_sum, grad_seq_sum, count = parallel.all_sum(
        [sum(losses) / len(losses), implicit.sum().item(), grad_seq.sum().item() / world.size, implicit.numel()],
        world, implicit.device)
    out = {"loss": loss_sum / world.size, "grad_norm": sum(norms) / len(norms),
           "implicit_reward": implicit_sum / count, "kl": implicit_sum / beta / count,
           "grad_seq_abs": grad_seq_sum / count, "entropy_sum": entropy_sum, "optimizer_steps": len(norms)}
    if coefs:
        gvpo_sum, bonus_sum = parallel.all_sum([sum(p[0] for p in parts) / len(parts),
                                                sum(p[1] for p in parts) / len(parts)], world, implicit.device)
        out.update(gvpo_loss=gvpo_sum / world.size, entropy_bonus=bonus_sum / world.size)
    return out
