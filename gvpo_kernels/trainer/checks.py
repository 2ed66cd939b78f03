"""What a run can check before it loads a model (TrainConfig itself checks each value's type and range): the
device, the model's path or name and its logit transform, the data, the reward, the backend, the number of
processes, the output directory and, on resume, that the checkpoint is complete and its run had the same schedule.
Each failure is one :class:`ConfigError` whose message is the whole story (gvpo-train prints it as one line and
exits 2).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..integrations.hf import LogitTransform, logit_transform
from ..layout import check_options
from . import checkpoint
from .config import TrainConfig
from .data import load_rows
from .parallel import World, rank_device
from .report import read_metrics
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


def device_for(cfg: TrainConfig, world: World) -> torch.device:
    """This rank's device for ``cfg.device`` (:func:`parallel.rank_device`), once it is known to exist: a device
    type torch knows, available, with that index; ConfigError otherwise."""
    name = cfg.device
    if name is not None:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise ConfigError(f"device: {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "meta":
            raise ConfigError(f"device: {name!r} holds no data (meta tensors have shapes only); use cpu or cuda")
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ConfigError(f"device: {name!r}: no CUDA device is visible (torch.cuda.is_available() is "
                                  "False); use --device cpu")
            if device.index is not None and device.index >= count:
                raise ConfigError(f"device: {name!r}: only {count} CUDA device(s) are visible (indices 0 to "
                                  f"{count - 1})")
        elif device.type != "cpu":
            module = getattr(torch, device.type, None)
            if not (module is not None and hasattr(module, "is_available") and module.is_available()):
                raise ConfigError(f"device: {name!r}: this torch has no available {device.type} device")
    return rank_device(name, world)


def prepare(cfg: TrainConfig, world: World, device: torch.device) -> Plan:
    """Check ``cfg`` for ``world`` on ``device``; ConfigError on the first problem. Warns (once, on rank 0) when
    ``--model`` runs with the tiny demo's task defaults, and when ``--resume latest`` skips an incomplete
    checkpoint."""
    if cfg.prompts_per_step % world.size:
        raise ConfigError(f"prompts_per_step: {cfg.prompts_per_step} prompts cannot be split evenly over "
                          f"{world.size} processes; use a multiple of {world.size}")
    if cfg.fsdp and world.size == 1:
        raise ConfigError("fsdp: shards the model over several processes; start them with torchrun "
                          "--nproc-per-node N (one process runs without it)")
    if cfg.replay_groups % world.size or cfg.replay_groups and cfg.replay_capacity % world.size:
        raise ConfigError(f"replay: --replay-groups {cfg.replay_groups} and --replay-size {cfg.replay_capacity} "
                          f"must be multiples of the {world.size} processes (each rank keeps and draws its share of "
                          "its own groups)")
    if cfg.rollout_lag and cfg.fsdp:
        raise ConfigError("rollout_lag: not with --fsdp (the lagged copy and its snapshots are whole models on "
                          "every rank, which a model that needs FSDP does not fit); use DDP, or an asynchronous "
                          "rollout engine (TRL, verl)")
    check_backend(cfg.backend, device)
    check_loss_options(cfg, check_model(cfg.model))
    try:
        rows, reward_fn = load_rows(cfg.data, cfg.demos), load_reward(cfg.reward)
        check_fields(reward_fn, cfg.reward, rows)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    if cfg.demos:
        check_demonstrations(rows, cfg.data)
    check_output_dir(cfg.output_dir)
    resume_from = check_resume(cfg, warn=world.main) if cfg.resume else check_fresh(cfg)
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


def check_loss_options(cfg: TrainConfig, transform: LogitTransform) -> None:
    """The loss's own checks of the options the run passes it (beta, temperature, the model's soft-cap and scale,
    entropy_coef, backend), together: a logit scale that takes ``logit_scale / temperature`` out of float32's range
    is refused now, not at step 1."""
    try:
        check_options(beta=cfg.beta, temperature=cfg.temperature, reduction="mean", ignore_index=-100,
                      backend=cfg.backend, softcap=transform.softcap, logit_scale=transform.logit_scale,
                      entropy_coef=cfg.entropy_coef)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {cfg.model!r}'s logits are {transform.describe()}, which with --temperature "
                          f"{cfg.temperature:g} the loss cannot take: {err}") from None


def check_model(name: Optional[str]) -> LogitTransform:
    """``--model`` names a saved causal LM: a directory with its config.json, or a Hugging Face Hub name whose
    config can be fetched (or is in the cache); its config must be one AutoModelForCausalLM loads, with a logit
    transform :func:`logit_transform` can read (a soft-cap, a scale, a divisor). Returns that transform (none for
    the built-in model). Reads the config only, never the weights; when the model loads,
    :func:`gvpo_kernels.trainer.models.check_logit_transform` checks that its logits are what the config says."""
    if name is None:
        return LogitTransform()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model: {name!r} is a file; expected a model directory (save_pretrained's, with a "
                              "config.json) or a Hugging Face model name")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model: {name!r} has no config.json: not a directory save_pretrained wrote")
    elif name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or not re.fullmatch(
            r"[\w.-]+(/[\w.-]+)?", name):
        raise ConfigError(f"model: no such directory {name!r} (and not a Hugging Face model name)")
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else name)
    except Exception as err:  # OSError (no such repo, no network), ValueError (unknown model type), ...
        text = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"model: cannot read the config of {name!r} ({type(err).__name__}: {text})") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"model: {name!r} is a {type(config).__name__}, which AutoModelForCausalLM does not load")
    try:
        return logit_transform(config)
    except ValueError as err:
        raise ConfigError(f"model: {name!r}: {err}; the trainer would score other log-probs than the model "
                          "samples") from None


def check_demonstrations(rows: list[dict], data: Optional[str]) -> None:
    """--demos needs a non-empty string 'demonstration' in at least one row, and nothing else there."""
    where = data or "the built-in task"
    found = 0
    for i, row in enumerate(rows):
        if "demonstration" in row:
            if not isinstance(row["demonstration"], str) or not row["demonstration"]:
                raise ConfigError(f"demos: {where}: row {i + 1}'s 'demonstration' must be a non-empty string, got "
                                  f"{row['demonstration']!r}")
            found += 1
    if not found:
        raise ConfigError(f"demos: no row of {where} has a 'demonstration' (a completion text) to add to its group")


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` is a directory this process can write in, or can be created (its nearest existing parent is
    a writable directory). Probes with an unnamed temporary file, which leaves nothing behind."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir: {output_dir!r} is a file, not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir: {output_dir!r} cannot be created: {str(existing)!r} is a file")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise ConfigError(f"output_dir: cannot write in {str(existing)!r} ({err.strerror or err})") from None


def previous_run(output_dir: str) -> list[str]:
    """The names of an earlier run's files and checkpoints in ``output_dir`` (and what an interrupted save left)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    leftovers = {f".{name}.tmp" for name in RUN_FILES}  # checkpoint.write_synced's, from a run killed in it
    return sorted(p.name for p in out.iterdir() if p.name in RUN_FILES or p.name in leftovers
                  or checkpoint.NAME.fullmatch(p.name) or checkpoint.LEFTOVER.fullmatch(p.name))


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


def check_resume(cfg: TrainConfig, warn: bool = True) -> Path:
    """The checkpoint to resume from (the newest complete one for 'latest'), once its run is known to have the
    same schedule and steps left to do, and output_dir's metrics.jsonl to be readable (a torn last line, from a run
    killed while writing it, is dropped)."""
    try:
        path = checkpoint.find(cfg.resume, cfg.output_dir, warn=warn)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    run = checkpoint.read_run(path)
    before, step = run["config"], run["step"]
    changed = [name for name in SCHEDULE if before.get(name) != getattr(cfg, name)]
    if changed:
        said = ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)} (the checkpoint's run: {before.get(n)})"
                         for n in changed)
        raise ConfigError(f"resume: {said}: the learning-rate schedule would jump; resume with the run's own "
                          "values, or start a new run")
    if step >= cfg.steps:
        raise ConfigError(f"resume: {str(path)!r} has done all {cfg.steps} steps; nothing left to run")
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    if metrics.is_file():
        try:
            read_metrics(metrics)
        except ValueError as err:
            raise ConfigError(f"resume: {err}") from None
    others = [name for name in cfg.to_dict() if name not in COSMETIC and name in before
              and before[name] != getattr(cfg, name)]
    if others:
        warnings.warn(f"resume: these settings differ from the checkpoint's run: "
                      f"{', '.join(f'{n} {before[n]!r} -> {getattr(cfg, n)!r}' for n in others)}", stacklevel=2)
    return path
