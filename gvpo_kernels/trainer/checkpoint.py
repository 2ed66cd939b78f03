"""Checkpoints: ``OUTPUT_DIR/checkpoint-STEP/`` holds the model and tokenizer (``save_pretrained``, so any
``--model`` or ``from_pretrained`` call can load it), ``trainer_state.pt`` (steps done, the optimizer state keyed
by parameter name, every rank's RNG state, and the off-policy state: replay buffers, lagged weights) and
``run.json`` (steps done, the run's settings and the size of every other file, read by the checks before anything
is loaded). The state is whole, never sharded: a checkpoint written by any number of processes, with DDP or FSDP,
resumes on any number, exactly when the number is the same.

A checkpoint is written into ``checkpoint-STEP.partial/``, each file flushed to disk, ``run.json`` last, and
then renamed, so ``checkpoint-STEP/`` is complete or absent: a run killed or out of disk while saving leaves the
previous checkpoint as the newest. A checkpoint damaged afterwards (a file truncated or missing: its size is not
the one run.json recorded) is skipped by ``--resume latest``, which says so and takes the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from transformers.utils import logging

from . import parallel

STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered (FSDP) on rank 0, on the CPU
NAME = re.compile(r"checkpoint-(\d+)")
LEFTOVER = re.compile(r"checkpoint-\d+\.(partial|old)")  # what an interrupted save leaves; --overwrite removes it


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written (disk full, permissions) or read (damaged files)."""


def save(output_dir: str, step: int, policy, tokenizer, optimizer, config: dict, world: parallel.World,
         rank_state: Optional[dict] = None, state: Optional[dict] = None) -> Path:
    """Write ``checkpoint-{step}`` (``step`` rollout steps done) atomically and return its path. ``policy``: the
    update.Policy (sharded or not; not the DDP wrapper). ``rank_state``: this rank's own extra state (gathered
    from every rank, beside its RNG state); ``state``: extra state rank 0 holds for all. Every rank calls it;
    rank 0 writes. CheckpointError on every rank when the write fails (the partial directory is removed)."""
    out = Path(output_dir)
    path, partial = out / f"checkpoint-{step}", out / f"checkpoint-{step}.partial"
    model = policy.model
    weights = None
    if parallel.is_fsdp(policy):  # gather the shards; the names lose the Policy's "model." prefix
        weights = {name.removeprefix("model."): t for name, t in get_model_state_dict(policy, options=WHOLE).items()}
    optim = get_optimizer_state_dict(policy, optimizer, options=WHOLE)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    rngs = parallel.gather_objects(rng, world)
    ranks = parallel.gather_objects(rank_state, world) if rank_state is not None else None
    error = None
    if world.main:
        try:
            if partial.exists():
                shutil.rmtree(partial)
            _write(partial, model, weights, tokenizer,
                   {"step": step, "optimizer": optim, "rng": rngs, "config": config, "ranks": ranks,
                    "state": state},
                   {"step": step, "world_size": world.size, "config": config})
            _replace(partial, path)
        except OSError as err:
            shutil.rmtree(partial, ignore_errors=True)
            error = (f"checkpoint: could not write {str(path)!r} ({type(err).__name__}: {err}); "
                     f"{_newest_note(out)}")
    errors = parallel.gather_objects(error, world)  # every rank learns whether rank 0's write worked
    if errors[0] is not None:
        raise CheckpointError(errors[0])
    return path


def _write(path: Path, model, weights, tokenizer, state: dict, run: dict) -> None:
    """Everything of a checkpoint into ``path``, each file flushed to disk, run.json (with every other file's
    size) last."""
    bar_was_on = logging.is_progress_bar_enabled()
    if bar_was_on:
        logging.disable_progress_bar()  # transformers' "Writing model shards" bar would break the training bar
    try:
        model.save_pretrained(path, state_dict=weights)
        tokenizer.save_pretrained(path)
    finally:
        if bar_was_on:
            logging.enable_progress_bar()
    torch.save(state, path / STATE_FILE)
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        _fsync(file)
        files[file.relative_to(path).as_posix()] = file.stat().st_size
    write_synced(path / RUN_FILE, json.dumps({**run, "files": files}) + "\n")
    _fsync(path)


def _replace(partial: Path, path: Path) -> None:
    """Rename ``partial`` to ``path``; an existing ``path`` (an older, maybe damaged, save of the same step) is
    moved aside first and removed after."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
    partial.rename(path)
    _fsync(path.parent)
    if old.exists():
        shutil.rmtree(old)


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: into a file beside it, flushed to disk, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def problem(path: Path) -> Optional[str]:
    """Why checkpoint directory ``path`` cannot be resumed from (a missing, truncated or unreadable file), or None
    when it is complete. Reads run.json and the files' sizes only (no weights)."""
    run_file = path / RUN_FILE
    if not run_file.is_file():
        return f"it has no {RUN_FILE} (a save that was interrupted, or one by an older version)"
    try:
        run = json.loads(run_file.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"its {RUN_FILE} is not valid JSON (truncated?)"
    if (not isinstance(run, dict) or not isinstance(run.get("step"), int) or not isinstance(run.get("config"), dict)
            or not isinstance(run.get("files", {}), dict)):
        return f"its {RUN_FILE} lacks the step or the run's settings"
    match = NAME.fullmatch(path.name)
    if match and int(match.group(1)) != run["step"]:
        return f"its {RUN_FILE} says step {run['step']}"
    if "files" not in run:  # written before run.json listed the files: the state file must at least be whole
        state = path / STATE_FILE
        if not state.is_file():
            return f"it has no {STATE_FILE}"
        if not zipfile.is_zipfile(state):
            return f"its {STATE_FILE} is truncated"
        return None
    for name, size in run["files"].items():
        file = path / name
        if not file.is_file():
            return f"its {name} is missing"
        if file.stat().st_size != size:
            return f"its {name} has {file.stat().st_size} bytes, {size} when it was written (truncated?)"
    return None


def read_run(path: Path) -> dict:
    """run.json of a checkpoint that :func:`problem` found complete."""
    return json.loads((path / RUN_FILE).read_text())


def checkpoints(output_dir: str) -> list[Path]:
    """The checkpoint-N directories in ``output_dir``, newest (highest N) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)), reverse=True)


def find(resume: str, output_dir: str, warn: bool = True) -> Path:
    """The checkpoint directory ``resume`` names: a path (which must be complete), or 'latest' = the newest
    complete checkpoint-N in ``output_dir``; each newer one that is not complete is skipped with a warning that
    says why. FileNotFoundError (one line) when there is none."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"resume: {resume!r} is not a directory")
        reason = problem(path)
        if reason is not None:
            raise FileNotFoundError(f"resume: {resume!r} is not a complete checkpoint: {reason}")
        return path
    skipped = []
    for path in checkpoints(output_dir):
        reason = problem(path)
        if reason is None:
            if skipped and warn:
                warnings.warn(f"resume: skipped {'; '.join(skipped)}; resuming from {path.name}", stacklevel=2)
            return path
        skipped.append(f"{path.name} ({reason})")
    said = f" (skipped {'; '.join(skipped)})" if skipped else ""
    raise FileNotFoundError(f"resume: no complete checkpoint-* directory in {output_dir!r}{said}")


def _newest_note(out: Path) -> str:
    for path in checkpoints(str(out)):
        if problem(path) is None:
            return f"the newest complete checkpoint is {str(path)!r}"
    return "no complete checkpoint exists yet"


def load_state(path: Path) -> dict:
    """trainer_state.pt of checkpoint ``path``; CheckpointError (one line) when it cannot be read."""
    file = path / STATE_FILE
    if not zipfile.is_zipfile(file):
        raise CheckpointError(f"resume: cannot read {str(file)!r}: damaged (not the zip archive torch.save writes)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged zip, a pickle error: whatever it is, the file is unusable
        raise CheckpointError(f"resume: cannot read {str(path / STATE_FILE)!r} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None


def restore(path: Path, policy, optimizer, world: parallel.World, seed: int, state: Optional[dict] = None) -> int:
    """Load the optimizer and this rank's RNG states from checkpoint ``path`` (``state``: its trainer_state.pt,
    already read); return the number of steps done. (The model weights are loaded from the same directory with
    ``from_pretrained``.) A rank the checkpoint's run did not have starts a fresh RNG stream derived from
    (seed, rank, step)."""
    state = load_state(path) if state is None else state
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
