"""TrainConfig: every setting of a GVPO run, its default and its help text (the CLI is generated from it).

The defaults are the embedded demo: a tiny Llama-style model and a tokenizer built in code, the built-in
"add" task, 600 steps that finish in about 30 s on two CPU cores. For a real model, set at least ``model``,
``data``, ``lr``, ``max_new_tokens`` and ``prompts_per_step`` (see the trainer's README for a recipe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

ANCHORS = ("old", "ref")


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
    backend: str = _opt("auto", "linear_gvpo_loss backend", choices=("auto", "triton", "cpu", "torch"))
    fsdp: bool = _opt(False, "with several processes (torchrun), shard the model with FSDP2 (fully_shard per "
                             "decoder layer) instead of DDP: for a model whose weights, gradients and AdamW state do "
                             "not fit one device")

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
        positive = ("steps", "prompts_per_step", "k", "max_new_tokens", "update_epochs", "grad_accum")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch_groups", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError(f"k must be >= 2 (a group of one has no gradient), got {self.k}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (GVPO's KL coefficient; a negative one trains away from the "
                             f"reward, 0 gives no gradient), got {self.beta}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run in output_dir, "
                             "overwrite deletes it")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        for name in ("lr", "weight_decay", "min_lr_ratio", "max_grad_norm", "warmup_steps", "save_every",
                     "num_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
