"""The rollout: G prompts -> k sampled completions each, as one padded batch the update can consume.

Layout of a batch of S = G * k sequences (row i * k + j is completion j of prompt i, so groups are consecutive):

    input_ids   [ pad pad <prompt tokens> | <completion tokens> EOS pad pad ]     (S, P + C)
                  left-padded to P          right-padded to C

Position ids count only real tokens (as ``generate`` does), so the update's forward sees exactly the sampled
context. The completion mask keeps the completion tokens up to and including the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from transformers import GenerationConfig


@dataclass
class Rollout:
    """One step's samples.

    input_ids:       (S, P + C) int64, left-padded prompts then right-padded completions
    attention_mask:  (S, P + C) int64, 1 on real tokens
    completion_mask: (S, C) bool, the scored tokens: each completion up to and including its first EOS
    prompt_len:      P
    group_size:      k; rows g * k .. g * k + k - 1 share a prompt
    rewards:         (S,) float32, set after scoring
    anchor:          (S, C) float32 per-token anchor log-probs, set before the update
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_len: int
    group_size: int
    rewards: Optional[torch.Tensor] = None
    anchor: Optional[torch.Tensor] = None

    @property
    def completion_ids(self) -> torch.Tensor:
        """(S, C) int64."""
        return self.input_ids[:, self.prompt_len:]

    @property
    def num_groups(self) -> int:
        return self.input_ids.shape[0] // self.group_size

    def groups(self, first: int, stop: int) -> "Rollout":
        """The rows of groups first .. stop - 1 (whole groups only)."""
        rows = slice(first * self.group_size, stop * self.group_size)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return replace(self, input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
                       completion_mask=self.completion_mask[rows], rewards=pick(self.rewards),
                       anchor=pick(self.anchor))


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (G, P): the prompts right-aligned, padding on the left."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    return ids, mask


@torch.no_grad()
def sample(model, prompt_ids: list[list[int]], *, k: int, max_new_tokens: int, temperature: float, top_p: float,
           stop_ids: list[int], pad_id: int, synced_gpus: bool = False) -> Rollout:
    """k completions per prompt with ``model.generate``: pure temperature / top-p sampling (top_k off, no
    repetition penalty), stopping at any of ``stop_ids`` or after ``max_new_tokens``. Uses the global torch RNG.
    ``synced_gpus``: keep running forward passes until every rank is done (a sharded model's forward is a
    collective)."""
    ids, mask = left_pad(prompt_ids, pad_id, model.device)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                              repetition_penalty=1.0, max_new_tokens=max_new_tokens, num_return_sequences=k,
                              eos_token_id=stop_ids, pad_token_id=pad_id)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=synced_gpus)
    model.train(was_training)

    prompt_len = ids.shape[1]
    completion = out[:, prompt_len:]
    is_stop = torch.isin(completion, torch.tensor(stop_ids, device=completion.device))
    after_stop = (is_stop.long().cumsum(1) - is_stop.long()) > 0
    completion_mask = ~after_stop
    input_ids = torch.cat([ids.repeat_interleave(k, 0), completion.masked_fill(after_stop, pad_id)], 1)
    attention_mask = torch.cat([mask.repeat_interleave(k, 0), completion_mask.long()], 1)
    return Rollout(input_ids, attention_mask, completion_mask, prompt_len, k)


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """The text of each completion (its scored tokens, special tokens dropped)."""
    return [tokenizer.decode(ids[keep].tolist(), skip_special_tokens=True)
            for ids, keep in zip(rollout.completion_ids, rollout.completion_mask)]
