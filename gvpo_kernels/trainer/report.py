"""What the user sees: metrics.jsonl (one JSON object per step), the progress bar, sample completions, the plot.

Every field of a metrics line is in the trainer's README (its "metrics.jsonl" table), which this module writes.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from .checkpoint import write_synced


class MetricsLog:
    """Appends one line per step to ``path``; when resuming at ``start_step``, drops lines past it first (and a
    torn last line), rewriting the file atomically."""

    def __init__(self, path: Path, start_step: int):
        self.path = Path(path)
        kept = []
        if start_step > 0 and self.path.is_file():
            kept = [m for m in read_metrics(self.path) if m["step"] <= start_step]
        write_synced(self.path, "".join(json.dumps(m) + "\n" for m in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path) -> list[dict]:
    """Every step's line of a metrics.jsonl. A last line that is not complete JSON (a run killed while writing it)
    is dropped; ValueError naming the line for any other line that is not a JSON object with a "step"."""
    lines = [(number, line) for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1)
             if line.strip()]
    metrics = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}: line {number} is not a metrics record (a JSON object with a 'step')")
        metrics.append(record)
    return metrics


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def print_samples(title: str, prompts: list[str], completions: list[str], rewards: list[float], k: int) -> str:
    """Print (and return) the first completion of each prompt with its reward, and the group's mean reward."""
    lines = [title]
    for g, prompt in enumerate(prompts):
        group = rewards[g * k:(g + 1) * k]
        lines.append(f"  {prompt!r} -> {completions[g * k]!r}  reward {group[0]:.2f} "
                     f"(group of {k}: mean {sum(group) / k:.2f})")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(metrics: list[dict], path: Path) -> Path:
    """PNG of reward (mean, with a moving average), loss, entropy and KL to the anchor over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    reward = [m["reward_mean"] for m in metrics]
    window = max(1, len(metrics) // 20)
    smooth = [sum(reward[max(0, i - window + 1):i + 1]) / len(reward[max(0, i - window + 1):i + 1])
              for i in range(len(reward))]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    top.plot(steps, reward, alpha=0.35, label="reward (step mean)")
    top.plot(steps, smooth, label=f"moving average ({window} steps)")
    top.set_ylabel("reward")
    top.legend(loc="lower right")
    if "gvpo_loss" in metrics[-1]:  # --entropy-coef: the GVPO part and the loss minimised
        middle.plot(steps, [m.get("gvpo_loss", m["loss"]) for m in metrics], color="tab:red", label="GVPO loss")
        middle.plot(steps, [m["loss"] for m in metrics], color="tab:orange", label="loss = GVPO - entropy bonus")
        middle.legend(loc="upper right")
    else:
        middle.plot(steps, [m["loss"] for m in metrics], color="tab:red")
    middle.set_ylabel("GVPO loss")
    bottom.plot(steps, [m["entropy"] for m in metrics], color="tab:green", label="entropy (nats/token)")
    bottom.plot(steps, [m["kl"] for m in metrics], color="tab:purple", label="KL to anchor (s - a, nats/seq)")
    bottom.legend(loc="upper right")
    bottom.set_xlabel("step")
    fig.suptitle("GVPO training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
