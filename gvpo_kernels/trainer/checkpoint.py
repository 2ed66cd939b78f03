"""Checkpoints: ``OUTPUT_DIR/checkpoint-STEP/`` holds the model and tokenizer (``save_pretrained``, so any
``--model`` or ``from_pretrained`` call can load it), ``trainer_state.pt`` (steps done, the optimizer state keyed
by parameter name, every rank's RNG state) and ``run.json`` (steps done and the run's settings, read by the
checks before anything is loaded). The state is whole, never sharded: a checkpoint written by any number of
processes, with DDP or FSDP, resumes on any number, exactly when the number is the same."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from transformers.utils import logging

from . import parallel

STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered (FSDP) on rank 0, on the CPU


def save(output_dir: str, step: int, policy, tokenizer, optimizer, config: dict, world: parallel.World) -> Path:
    """Write ``checkpoint-{step}`` (``step`` rollout steps done) and return its path. ``policy``: the
    update.Policy (sharded or not; not the DDP wrapper). Every rank calls it; rank 0 writes."""
    path = Path(output_dir) / f"checkpoint-{step}"
    model = policy.model
    weights = None
    if parallel.is_fsdp(policy):  # gather the shards; the names lose the Policy's "model." prefix
        weights = {name.removeprefix("model."): t for name, t in get_model_state_dict(policy, options=WHOLE).items()}
    optim = get_optimizer_state_dict(policy, optimizer, options=WHOLE)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    rngs = parallel.gather_objects(rng, world)
    if world.main:
        bar_was_on = logging.is_progress_bar_enabled()
        if bar_was_on:
            logging.disable_progress_bar()  # transformers' "Writing model shards" bar would break the training bar
        try:
            model.save_pretrained(path, state_dict=weights)
            tokenizer.save_pretrained(path)
        finally:
            if bar_was_on:
                logging.enable_progress_bar()
        torch.save({"step": step, "optimizer": optim, "rng": rngs, "config": config}, path / STATE_FILE)
        (path / RUN_FILE).write_text(json.dumps({"step": step, "world_size": world.size, "config": config}) + "\n")
    parallel.barrier(world)
    return path


def find(resume: str, output_dir: str) -> Path:
    """The checkpoint directory ``resume`` names: a path, or 'latest' = the highest checkpoint-N in output_dir."""
    if resume == "latest":
        found = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
        if not found:
            raise FileNotFoundError(f"resume: no checkpoint-* directory in {output_dir!r}")
        return max(found, key=lambda p: int(p.name.split("-")[1]))
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume: {resume!r} is not a checkpoint directory (no {STATE_FILE})")
    return path


def restore(path: Path, policy, optimizer, world: parallel.World, seed: int) -> int:
    """Load the optimizer and this rank's RNG states from checkpoint ``path``; return the number of steps done.
    (The model weights are loaded from the same directory with ``from_pretrained``.) A rank the checkpoint's run
    did not have starts a fresh RNG stream derived from (seed, rank, step)."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(policy, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    step = int(state["step"])
    if world.rank < len(state["rng"]):
        rng = state["rng"][world.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        torch.manual_seed(parallel.rank_seed(seed, world.rank, step))
    return step
