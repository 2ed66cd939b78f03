"""The rollout: G prompts -> k sampled completions each, as one padded batch the update can consume; and the same
batch built from groups of any origin (replayed, with a demonstration), for off-policy GVPO.

Layout of a batch of S sequences in G groups (groups are consecutive rows; group g has sizes[g] members; a
sampled batch has k per group, row i * k + j being completion j of prompt i):

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

# where a member of a group came from (Rollout.source)
SAMPLED, REPLAYED, DEMO = 0, 1, 2


@dataclass
class Rollout:
    """One step's samples.

    input_ids:       (S, P + C) int64, left-padded prompts then right-padded completions
    attention_mask:  (S, P + C) int64, 1 on real tokens
    completion_mask: (S, C) bool, the scored tokens: each completion up to and including its first EOS
    prompt_len:      P
    sizes:           members of each group, in row order (sum = S); a sampled batch: (k,) * G
    rewards:         (S,) float32, set after scoring
    anchor:          (S, C) float32 per-token anchor log-probs, set before the update
    source:          (S,) int64, where each member came from: SAMPLED (this step, by the sampler), REPLAYED (from
                     the replay buffer) or DEMO (a demonstration); None = all SAMPLED
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_len: int
    sizes: tuple[int, ...]
    rewards: Optional[torch.Tensor] = None
    anchor: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None

    @property
    def completion_ids(self) -> torch.Tensor:
        """(S, C) int64."""
        return self.input_ids[:, self.prompt_len:]

    @property
    def num_groups(self) -> int:
        return len(self.sizes)

    @property
    def group_size(self) -> Optional[int]:
        """The members per group when every group has as many, else None (the loss then takes group_ids)."""
        return self.sizes[0] if self.sizes and all(n == self.sizes[0] for n in self.sizes) else None

    def group_ids(self) -> torch.Tensor:
        """(S,) int64: the group of each row."""
        return torch.repeat_interleave(torch.arange(len(self.sizes), device=self.input_ids.device),
                                       torch.tensor(self.sizes, device=self.input_ids.device))

    def sampled(self) -> torch.Tensor:
        """(S,) bool: the members sampled at this step (not replayed, not demonstrations)."""
        if self.source is None:
            return torch.ones(self.input_ids.shape[0], dtype=torch.bool, device=self.input_ids.device)
        return self.source == SAMPLED

    def groups(self, first: int, stop: int) -> "Rollout":
        """The rows of groups first .. stop - 1 (whole groups only)."""
        rows = slice(sum(self.sizes[:first]), sum(self.sizes[:stop]))
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return replace(self, input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
                       completion_mask=self.completion_mask[rows], sizes=self.sizes[first:stop],
                       rewards=pick(self.rewards), anchor=pick(self.anchor), source=pick(self.source))


@dataclass
class Group:
    """One group as token lists, independent of any batch's padding: what the replay buffer keeps and what
    :func:`collate` puts together.

    prompt:      the prompt's token ids
    completions: each member's scored token ids (up to and including its EOS when it stopped)
    rewards:     each member's reward
    source:      each member's origin (SAMPLED, REPLAYED, DEMO)
    step:        the rollout step (0-based) the group was sampled at
    """

    prompt: list[int]
    completions: list[list[int]]
    rewards: list[float]
    source: list[int]
    step: int

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "completions": self.completions, "rewards": self.rewards,
                "source": self.source, "step": self.step}


def split_groups(rollout: Rollout, step: int) -> list[Group]:
    """The groups of a scored rollout, as token lists (padding dropped)."""
    prompt_mask = rollout.attention_mask[:, :rollout.prompt_len].bool().cpu()
    ids, mask = rollout.input_ids.cpu(), rollout.completion_mask.cpu()
    rewards = rollout.rewards.cpu().tolist()
    source = [SAMPLED] * len(rewards) if rollout.source is None else rollout.source.cpu().tolist()
    groups, row = [], 0
    for size in rollout.sizes:
        members = range(row, row + size)
        groups.append(Group(prompt=ids[row, :rollout.prompt_len][prompt_mask[row]].tolist(),
                            completions=[ids[i, rollout.prompt_len:][mask[i]].tolist() for i in members],
                            rewards=[rewards[i] for i in members], source=[source[i] for i in members], step=step))
        row += size
    return groups


def collate(groups: list[Group], pad_id: int, device) -> Rollout:
    """One batch of ``groups`` in the layout above (prompts left-padded, completions right-padded), rewards and
    sources set, anchor not."""
    width = max(len(g.prompt) for g in groups)
    length = max(len(c) for g in groups for c in g.completions)
    ids, attention, scored = [], [], []
    for g in groups:
        for c in g.completions:
            ids.append([pad_id] * (width - len(g.prompt)) + g.prompt + c + [pad_id] * (length - len(c)))
            attention.append([0] * (width - len(g.prompt)) + [1] * (len(g.prompt) + len(c)) + [0] * (length - len(c)))
            scored.append([True] * len(c) + [False] * (length - len(c)))
    return Rollout(torch.tensor(ids, device=device), torch.tensor(attention, device=device),
                   torch.tensor(scored, device=device), width, tuple(len(g.completions) for g in groups),
                   rewards=torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32, device=device),
                   source=torch.tensor([s for g in groups for s in g.source], dtype=torch.int64, device=device))


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
    return Rollout(input_ids, attention_mask, completion_mask, prompt_len, (k,) * ids.shape[0])


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """The text of each completion (its scored tokens, special tokens dropped)."""
    return [tokenizer.decode(ids[keep].tolist(), skip_special_tokens=True)
            for ids, keep in zip(rollout.completion_ids, rollout.completion_mask)]
