"""Checkpoints: ``OUTPUT_DIR/checkpoint-STEP/`` holds the model and tokenizer (``save_pretrained``, so any
``--model`` or ``from_pretrained`` call can load it) and ``trainer_state.pt`` (steps done, optimizer, scheduler,
RNG states, config), which is what ``--resume`` needs to continue exactly where the run stopped."""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch
from transformers.utils import logging

STATE_FILE = "trainer_state.pt"


def save(output_dir: str, step: int, model, tokenizer, optimizer, scheduler, config: dict) -> Path:
    """Write ``checkpoint-{step}`` (``step`` rollout steps done) and return its path."""
    path = Path(output_dir) / f"checkpoint-{step}"
    bar_was_on = logging.is_progress_bar_enabled()
    if bar_was_on:
        logging.disable_progress_bar()  # transformers' "Writing model shards" bar would break the training bar
    try:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    finally:
        if bar_was_on:
            logging.enable_progress_bar()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng, "config": config}, path / STATE_FILE)
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


def restore(path: Path, optimizer, scheduler) -> int:
    """Load optimizer, scheduler and RNG states from checkpoint ``path``; return the number of steps done.
    (The model weights are loaded from the same directory with ``from_pretrained``.)"""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])
