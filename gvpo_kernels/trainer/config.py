"""TrainConfig: every setting of a GVPO run, its default and its help text (the CLI is generated from it).

The defaults are the embedded demo: a tiny Llama-style model and a tokenizer built in code, the built-in
"add" task, 600 steps that finish in about 30 s on two CPU cores. For a real model, set at least ``model``,
``data``, ``lr``, ``max_new_tokens`` and ``prompts_per_step`` (see the trainer's README for a recipe).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Optional

ANCHORS = ("old", "ref")
BACKENDS = ("auto", "triton", "cpu", "torch")
# beta and temperature reach the loss, which takes them as normal float32 numbers with a finite reciprocal
FLOAT32_TINY, FLOAT32_MAX = 2.0**-126, 2.0**126
# entropy_coef reaches the loss rescaled per micro-batch (update.py), by at most ranks x groups: far below float32's max
ENTROPY_COEF_MAX = 2.0**64
SEED_MAX = 2**63 - 1  # torch.manual_seed takes a 64-bit integer; the ranks' seeds are derived below 2**63


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """One GVPO run. Field names are the CLI flags (``prompts_per_step`` -> ``--prompts-per-step``)."""

    # what to train, on what
    model: Optional[str] = _opt(None, "Hugging Face model name or local path of a causal LM; default: the tiny "
                                      "built-in model (no download)")
    data: Optional[str] = _opt(None, "JSONL file, one object per line with 'prompt', 'answer' and any extra fields "
                                     "(passed to the reward); default: the built-in task")
    reward: str = _opt("last_number", "reward: a built-in (exact_match, last_number, boxed) or 'module:function' "
                                      "taking (prompts, completions, **row) and returning one float per completion")
    output_dir: str = _opt("out/gvpo-tiny", "where metrics.jsonl, the plot, samples and checkpoints go; a directory "
                                            "holding an earlier run needs --resume or --overwrite")
    chat_template: bool = _opt(True, "wrap each prompt in the tokenizer's chat template when it has one")

    # rollout
    steps: int = _opt(600, "rollout steps (each: sample, score, update)")
    prompts_per_step: int = _opt(16, "prompts sampled per step (groups per step), over all ranks together; a "
                                     "multiple of the number of processes")
    k: int = _opt(8, "completions sampled per prompt (the group size)")
    max_new_tokens: int = _opt(3, "longest completion, in tokens; sampling also stops at EOS")
    temperature: float = _opt(1.0, "sampling temperature; the loss uses the same one")
    top_p: float = _opt(1.0, "nucleus sampling threshold (1 = off)")

    # update
    beta: float = _opt(0.1, "GVPO implicit-reward scale, the KL coefficient, > 0 (the paper's recipe: 0.1)")
    entropy_coef: float = _opt(0.0, "entropy bonus: the loss becomes GVPO's minus this times the mean entropy (nats, "
                                    "at the sampling temperature) of the policy's next-token distribution over each "
                                    "optimizer step's scored tokens; > 0 keeps the policy from collapsing, < 0 "
                                    "sharpens it (0 = off)")
    anchor: str = _opt("old", "anchor log-probs: 'old' = the policy before this step's update (the paper's recipe), "
                              "'ref' = a frozen copy of the initial model", choices=ANCHORS)
    update_epochs: int = _opt(1, "passes over each step's samples")
    micro_batch_groups: Optional[int] = _opt(None, "groups per forward/backward (memory knob; default: all the "
                                                   "step's groups at once)")
    grad_accum: int = _opt(1, "micro-batches whose gradients are summed before one optimizer step")
    lr: float = _opt(1e-3, "peak learning rate of AdamW (the paper's recipe for 7B models: 1e-6)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_steps: int = _opt(10, "optimizer steps of linear warmup, then cosine decay to min_lr_ratio * lr")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of lr")
    max_grad_norm: float = _opt(1.0, "gradient clipping threshold (0 = off)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward (less memory, ~30% slower)")
    backend: str = _opt("auto", "linear_gvpo_loss backend", choices=BACKENDS)
    fsdp: bool = _opt(False, "with several processes (torchrun), shard the model with FSDP2 (fully_shard per "
                             "decoder layer) instead of DDP: for a model whose weights, gradients and AdamW state do "
                             "not fit one device")

    # off-policy samples: GVPO's loss needs no importance weight (see the trainer's README)
    replay_groups: int = _opt(0, "groups drawn each step from the replay buffer of earlier steps' groups and trained "
                                 "with the fresh ones (rewards as scored then, anchor computed now), over all ranks; "
                                 "a multiple of the number of processes (0 = off)")
    replay_size: Optional[int] = _opt(None, "replay buffer capacity in groups, first in first out, over all ranks; "
                                            "default: 4 steps' groups (4 * prompts_per_step)")
    demos: bool = _opt(False, "add each data row's 'demonstration' (a completion text; the built-in task has one) to "
                              "its group as one more member, scored by the reward and anchored like the others")
    rollout_lag: int = _opt(0, "sample with the policy as it was this many optimizer updates ago (an asynchronous "
                               "rollout engine's staleness), while the anchor and update are as configured; keeps "
                               "that many weight snapshots in host memory and a second copy of the model on the "
                               "device (0 = off)")

    # machine
    seed: int = _opt(0, "seed of the model's initialisation, the prompt order and the sampling")
    device: Optional[str] = _opt(None, "torch device; default: cuda when available, else cpu")
    threads: Optional[int] = _opt(None, "CPU threads for torch; default: 1 for the built-in tiny model (its ops are "
                                        "too small to split, and extra threads only wait on busy cores), else "
                                        "torch's default")
    bf16: Optional[bool] = _opt(None, "bf16 autocast for rollout and update; default: on with CUDA, off on the CPU")
    attn_implementation: Optional[str] = _opt(None, "attention kernel; default: flash_attention_2 when CUDA and "
                                                    "flash_attn are available, else sdpa")

    # output
    save_every: int = _opt(0, "save a checkpoint every this many steps (0 = only at the end)")
    resume: Optional[str] = _opt(None, "continue from a checkpoint directory, or 'latest' for the newest "
                                       "checkpoint-* in output_dir")
    overwrite: bool = _opt(False, "delete an earlier run's files in output_dir (metrics, samples, plot, "
                                  "checkpoints) and start afresh")
    num_samples: int = _opt(6, "prompts whose completions are printed before and after training")
    progress: bool = _opt(True, "show a progress bar")
    plot: bool = _opt(True, "write metrics.png (reward and loss over steps) at the end")

    def __post_init__(self):
        check(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def replay_capacity(self) -> int:
        """The replay buffer's capacity in groups, over all ranks."""
        return self.replay_size if self.replay_size is not None else 4 * self.prompts_per_step


# -------------------------------------------------------------------------------------------- the checks
# (name, lowest, highest, why): every int setting; None = unbounded on that side. An Optional one may be None.
INT_RANGES = (
    ("steps", 1, None, ""), ("prompts_per_step", 1, None, ""),
    ("k", 2, None, " (a group of one has no gradient)"), ("max_new_tokens", 1, None, ""),
    ("update_epochs", 1, None, ""), ("micro_batch_groups", 1, None, ""), ("grad_accum", 1, None, ""),
    ("warmup_steps", 0, None, ""), ("seed", 0, SEED_MAX, ""), ("threads", 1, None, ""),
    ("save_every", 0, None, " (0 = only at the end)"), ("num_samples", 0, None, ""),
    ("replay_groups", 0, None, " (0 = off)"), ("replay_size", 1, None, ""), ("rollout_lag", 0, None, " (0 = off)"),
)
# (name, lowest, highest, lowest excluded, why): every float setting, each also finite
FLOAT_RANGES = (
    ("lr", 0.0, None, False, ""), ("weight_decay", 0.0, None, False, ""),
    ("min_lr_ratio", 0.0, 1.0, False, " (the final learning rate as a fraction of lr)"),
    ("max_grad_norm", 0.0, None, False, " (0 = no clipping)"),
    ("beta", FLOAT32_TINY, FLOAT32_MAX, False, " (GVPO's KL coefficient, computed in float32: a negative one trains "
                                               "away from the reward, 0 gives no gradient)"),
    ("temperature", FLOAT32_TINY, FLOAT32_MAX, False, " (the logits are divided by it, in float32)"),
    ("entropy_coef", -ENTROPY_COEF_MAX, ENTROPY_COEF_MAX, False, " (the entropy bonus's coefficient; 0 = off)"),
    ("top_p", 0.0, 1.0, True, " (1 = off)"),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _interval(low, high, open_low: bool) -> str:
    if high is None:
        return f"{'>' if open_low else '>='} {low:g}" if isinstance(low, float) else f">= {low}"
    return f"in {'(' if open_low else '['}{low:g}, {high:g}]"


def check(cfg: TrainConfig) -> None:
    """TypeError / ValueError naming the setting (as its flag) for the first one that cannot work: a wrong type,
    a number that is not finite or out of its range, an unknown choice, or settings that exclude each other.
    What needs the file system or the device (data, reward, model path, output dir, device) is checked by
    checks.prepare, still before any model loads."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value, hint = getattr(cfg, f.name), hints[f.name]
        optional = type(None) in typing.get_args(hint)
        kind = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        if value is None and optional:
            continue
        ok = {bool: isinstance(value, bool), int: isinstance(value, numbers.Integral) and not isinstance(value, bool),
              float: isinstance(value, numbers.Real) and not isinstance(value, bool), str: isinstance(value, str)}[kind]
        if not ok:
            raise TypeError(f"{_flag(f.name)} must be {'an' if kind is int else 'a'} {kind.__name__}"
                            f"{' or None' if optional else ''}, got {type(value).__name__} {value!r}")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ValueError(f"{_flag(f.name)} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
    for name, low, high, why in INT_RANGES:
        value = getattr(cfg, name)
        if value is not None and not (low <= value and (high is None or value <= high)):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{_flag(name)} must be {bound}{why}, got {value}")
    for name, low, high, open_low, why in FLOAT_RANGES:
        value = getattr(cfg, name)
        try:
            as_float = float(value)
        except OverflowError:  # an int too large for a float
            as_float = math.inf
        if not math.isfinite(as_float):
            raise ValueError(f"{_flag(name)} must be a finite number{why}, got {value}")
        if low > 0 and as_float <= 0:
            raise ValueError(f"{_flag(name)} must be > 0{why}, got {value}")
        if as_float < low or (open_low and as_float == low) or (high is not None and as_float > high):
            raise ValueError(f"{_flag(name)} must be {_interval(low, high, open_low)}{why}, got {value}")
    for name in ("output_dir", "reward"):
        if not getattr(cfg, name).strip():
            raise ValueError(f"{_flag(name)} must not be empty")
    if cfg.resume is not None and not cfg.resume.strip():
        raise ValueError("--resume must name a checkpoint directory or 'latest', got ''")
    if cfg.replay_size is not None and cfg.replay_groups == 0:
        raise ValueError(f"--replay-size {cfg.replay_size} without --replay-groups: nothing is drawn from the buffer")
    if cfg.replay_groups > cfg.replay_capacity:
        raise ValueError(f"--replay-groups {cfg.replay_groups} is more than the buffer holds (--replay-size "
                         f"{cfg.replay_capacity}{'' if cfg.replay_size else ', the default'})")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume continues the run in output_dir, "
                         "overwrite deletes it")
