"""Off-policy samples: the replay buffer (``--replay-groups``), demonstrations (``--demos``) and the lagged sampler
(``--rollout-lag``). GVPO's loss takes groups from any sampling distribution without an importance weight (the
trainer's README says why), so each of these only changes which groups reach the update.

What each rank holds (torchrun): its own replay buffer of its own groups (``replay_size / W`` of them) and draws
``replay_groups / W`` from it, so every rank trains on as many groups as the others (the gradient average stays
the mean over all groups); the demonstrations of its own rows; and, for the lag, the same weight snapshots as every
other rank (DDP keeps the weights equal on every rank). A checkpoint holds every rank's buffer and one copy of the
snapshots, so a run resumes exactly on as many processes; on another number the buffer's groups are dealt out
again (newest kept), so the draws differ from the run's.
"""

from __future__ import annotations

import copy
import random
from collections import deque

import torch

from .rollout import DEMO, REPLAYED, SAMPLED, Group

# ------------------------------------------------------------------------------------------- replay


class ReplayBuffer:
    """First in, first out: the last ``capacity`` groups this rank sampled. ``draw`` picks without replacement,
    from a random stream that is a function of (seed, rank, step) alone, so resuming needs only the contents."""

    def __init__(self, capacity: int, draw: int, seed: int, rank: int):
        self.groups: deque[Group] = deque(maxlen=capacity)
        self.count, self.seed, self.rank = draw, seed, rank

    def draw(self, step: int) -> list[Group]:
        """Up to ``count`` groups of earlier steps (all of them while the buffer holds fewer), each member marked
        REPLAYED; the buffer keeps them."""
        rng = random.Random(f"{self.seed}:replay:rank{self.rank}:step{step}")
        picks = rng.sample(range(len(self.groups)), min(self.count, len(self.groups)))
        return [Group(g.prompt, g.completions, g.rewards, [REPLAYED] * len(g.completions), g.step)
                for g in (self.groups[i] for i in picks)]

    def push(self, groups: list[Group]) -> None:
        """Add this step's sampled groups (their sampled members only), dropping the oldest past capacity."""
        for g in groups:
            keep = [i for i, s in enumerate(g.source) if s == SAMPLED]
            self.groups.append(Group(g.prompt, [g.completions[i] for i in keep], [g.rewards[i] for i in keep],
                                     [SAMPLED] * len(keep), g.step))

    def state(self) -> list[dict]:
        return [g.to_dict() for g in self.groups]

    def load(self, per_rank: list, rank: int, world_size: int) -> None:
        """Restore from a checkpoint's ``per_rank`` buffers (one list per rank of the run that wrote it): this
        rank's own on the same world size; otherwise all groups, oldest first, dealt out round robin after the
        oldest are dropped to leave a multiple of ``world_size`` (every rank then holds as many)."""
        if len(per_rank) == world_size:
            mine = per_rank[rank]
        else:
            everything = sorted(((g["step"], r, i, g) for r, groups in enumerate(per_rank)
                                 for i, g in enumerate(groups or [])), key=lambda x: x[:3])
            everything = everything[len(everything) % world_size:]
            mine = [g for j, (*_, g) in enumerate(everything) if j % world_size == rank]
        self.groups.clear()
        for g in mine:
            self.groups.append(Group(**g))


# ------------------------------------------------------------------------------------------- demonstrations


def demonstration_tokens(tokenizer, text: str, stop_id: int) -> list[int]:
    """A demonstration as the policy would write it: its tokens (no special tokens added) then ``stop_id``, the
    first of the model's EOS ids (for a chat model, its end-of-turn token)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [stop_id]


def add_demonstrations(groups: list[Group], rows: list[dict], demos: list[list[int]], rewards: list[float]) -> None:
    """Append one DEMO member to each group whose row has a demonstration (``demos`` and ``rewards``: one per such
    row, in order)."""
    it = iter(zip(demos, rewards))
    for group, row in zip(groups, rows):
        if "demonstration" in row:
            tokens, reward = next(it)
            group.completions.append(tokens)
            group.rewards.append(reward)
            group.source.append(DEMO)


# ------------------------------------------------------------------------------------------- lagged sampler


class LaggedSampler:
    """The policy as it was ``lag`` optimizer updates ago, for sampling.

    ``push()`` is called before each optimizer step and keeps a host copy of the trainable weights it is about
    to change; with t updates done, the oldest of the (at most ``lag``) copies is the policy after update
    t - lag (after update 0, the initial weights, while t < lag). ``model()`` loads it into a second copy of the
    model (no gradients) and returns that copy: lag * (weights) of host memory, one more model on the device.
    """

    def __init__(self, model: torch.nn.Module, lag: int):
        self.policy = model
        self.copy = copy.deepcopy(model).eval().requires_grad_(False)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.snapshots: deque[list[torch.Tensor]] = deque(maxlen=lag)
        self.updates = 0  # optimizer updates of the policy so far

    def push(self) -> None:
        params = dict(self.policy.named_parameters())
        self.snapshots.append([params[n].detach().to("cpu", copy=True) for n in self.names])
        self.updates += 1

    @property
    def lag(self) -> int:
        """Optimizer updates between the weights ``model()`` samples with and the policy's."""
        return len(self.snapshots)

    @torch.no_grad()
    def model(self) -> torch.nn.Module:
        if not self.snapshots:
            return self.policy
        params = dict(self.copy.named_parameters())
        for name, value in zip(self.names, self.snapshots[0]):
            params[name].copy_(value)
        return self.copy

    def state(self) -> dict:
        return {"updates": self.updates, "names": self.names,
                "snapshots": [dict(zip(self.names, s)) for s in self.snapshots]}

    def load(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.snapshots.clear()
        for snapshot in state["snapshots"][-self.snapshots.maxlen:]:
            self.snapshots.append([snapshot[n] for n in self.names])
