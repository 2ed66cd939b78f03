"""What a run can check before it loads a model: the data, the reward, the backend, the number of processes, the
output directory and, on resume, that the checkpoint's run had the same schedule. Each failure is one
:class:`ConfigError` whose message is the whole story (gvpo-train prints it as one line and exits 2).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import checkpoint
from .config import TrainConfig
from .data import load_rows
from .parallel import World
from .rewards import check_fields, load_reward

# settings that, changed on resume, would make the learning-rate schedule jump
SCHEDULE = ("steps", "lr", "warmup_steps", "min_lr_ratio")
# settings that do not change what the run computes
COSMETIC = {"resume", "overwrite", "output_dir", "fsdp", "progress", "plot", "num_samples", "save_every", "threads",
            "device"}
# what a run writes into output_dir (all of it goes with --overwrite)
RUN_FILES = ("metrics.jsonl", "metrics.png", "samples.txt", "config.json")
# the task defaults of TrainConfig, which are the tiny demo's: (default, how the warning names it)
DEMO = {"data": (None, "the built-in addition task (no --data)"), "lr": (1e-3, "--lr 1e-3"),
        "max_new_tokens": (3, "--max-new-tokens 3")}


class ConfigError(ValueError):
    """A setting that cannot work, found before anything was loaded or written."""


@dataclass
class Plan:
    """What the checks found: the data rows, the reward function, the checkpoint to resume from."""

    rows: list[dict]
    reward_fn: Callable
    resume_from: Optional[Path]


def prepare(cfg: TrainConfig, world: World, device: torch.device) -> Plan:
    """Check ``cfg`` for ``world`` on ``device``; ConfigError on the first problem. Warns (once, on rank 0) when
    ``--model`` runs with the tiny demo's task defaults."""
    if cfg.prompts_per_step % world.size:
        raise ConfigError(f"prompts_per_step: {cfg.prompts_per_step} prompts cannot be split evenly over "
                          f"{world.size} processes; use a multiple of {world.size}")
    if cfg.fsdp and world.size == 1:
        raise ConfigError("fsdp: shards the model over several processes; start them with torchrun "
                          "--nproc-per-node N (one process runs without it)")
    check_backend(cfg.backend, device)
    try:
        rows, reward_fn = load_rows(cfg.data), load_reward(cfg.reward)
        check_fields(reward_fn, cfg.reward, rows)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    resume_from = check_resume(cfg) if cfg.resume else check_fresh(cfg)
    if cfg.model is not None and world.main:
        kept = [text for name, (value, text) in DEMO.items() if getattr(cfg, name) == value]
        if kept:
            warnings.warn(f"--model {cfg.model}: {', '.join(kept)}: the tiny demo's defaults; a pretrained model "
                          "usually wants --data, --lr 1e-6 and --max-new-tokens of a few hundred (see the trainer's "
                          "README)", stacklevel=2)
    return Plan(rows, reward_fn, resume_from)


def check_backend(backend: str, device: torch.device) -> None:
    """A backend named on the command line that cannot run on ``device`` is refused now, not at step 1."""
    reason = None
    if backend == "triton":
        from ..triton import unavailable_reason

        reason = unavailable_reason(device)
    elif backend == "cpu":
        from .. import cpu

        reason = (f"the run's device is {device.type}, and it runs on CPU tensors" if device.type != "cpu"
                  else cpu.unavailable_reason())
    if reason is not None:
        raise ConfigError(f"backend: {backend!r} cannot run: {reason} (--backend auto picks what runs)")


def previous_run(output_dir: str) -> list[str]:
    """The names of an earlier run's files and checkpoints in ``output_dir``."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name in RUN_FILES or re.fullmatch(r"checkpoint-\d+", p.name))


def check_fresh(cfg: TrainConfig) -> None:
    """A fresh run needs an output_dir without an earlier run in it (or --overwrite, which deletes that run)."""
    found = previous_run(cfg.output_dir)
    if found and not cfg.overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ConfigError(f"output_dir: {cfg.output_dir!r} holds an earlier run ({shown}); pass --resume to "
                          "continue it, --overwrite to replace it, or another --output-dir")


def clear(output_dir: str) -> None:
    """Delete an earlier run's files (--overwrite); anything else in the directory stays."""
    for name in previous_run(output_dir):
        path = Path(output_dir) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_resume(cfg: TrainConfig) -> Path:
    """The checkpoint to resume from, once its run is known to have the same schedule and steps left to do."""
    try:
        path = checkpoint.find(cfg.resume, cfg.output_dir)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    run = json.loads((path / checkpoint.RUN_FILE).read_text()) if (path / checkpoint.RUN_FILE).is_file() else None
    if run is None:
        raise ConfigError(f"resume: {str(path)!r} has no {checkpoint.RUN_FILE} (written by an older version?)")
    before, step = run["config"], run["step"]
    changed = [name for name in SCHEDULE if before.get(name) != getattr(cfg, name)]
    if changed:
        said = ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)} (the checkpoint's run: {before.get(n)})"
                         for n in changed)
        raise ConfigError(f"resume: {said}: the learning-rate schedule would jump; resume with the run's own "
                          "values, or start a new run")
    if step >= cfg.steps:
        raise ConfigError(f"resume: {str(path)!r} has done all {cfg.steps} steps; nothing left to run")
    others = [name for name in cfg.to_dict() if name not in COSMETIC and name in before
              and before[name] != getattr(cfg, name)]
    if others:
        warnings.warn(f"resume: these settings differ from the checkpoint's run: "
                      f"{', '.join(f'{n} {before[n]!r} -> {getattr(cfg, n)!r}' for n in others)}", stacklevel=2)
    return path
