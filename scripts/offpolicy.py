"""GVPO from other sampling distributions, on the built-in task: does the trainer still learn when the groups are
replayed, carry a demonstration, or were sampled by a stale policy? (the trainer's README has the
results and what they mean.)

    .venv/bin/python scripts/offpolicy.py                      # 5 modes x 3 seeds, 600 updates each, 2 at a time
    .venv/bin/python scripts/offpolicy.py --anchor ref --out bench/results/offpolicy/anchor-ref --no-keep
    .venv/bin/python scripts/offpolicy.py --modes on-policy lag-16 --seeds 0 --steps 100 --out /tmp/x   # a quick look

Each run is ``python -m gvpo_kernels.trainer`` with the default settings (the tiny model, the addition task, 16
prompts x 8 completions a step, one optimizer update a step, the "old" anchor unless --anchor ref) plus the
mode's flags:

    on-policy   nothing
    replay      --replay-groups 8 (half the step's groups) from the last 4 steps' groups (--replay-size 64)
    demos       --demos (each group gets the correct answer as a 9th member)
    lag-4       --rollout-lag 4 (sampled by the policy of 4 updates earlier)
    lag-16      --rollout-lag 16

Writes to --out (default bench/results/offpolicy/): results.json (settings, machine, per run: the per-step sampled
reward, the summary figures), results.md (the table) and rewards.png (the reward curves), and keeps each run's
directory under runs/ (metrics.jsonl, checkpoint) unless --no-keep. The table's figures per run:

    reward, last 10%    mean reward of the completions sampled in the last 10% of the steps (for lag-L, sampled by
                        the policy of L updates earlier)
    updates to 0.5      first update after which the 20-step moving average of the sampled reward is >= 0.5
    final policy        the final weights' mean reward on all 25 prompts x 32 samples at temperature 1 (the same
                        measure for every mode: the policy itself, whoever sampled its training data)
    wall time           seconds of the run's process (two runs share the two cores: compare within one table)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "on-policy": [],
    "replay": ["--replay-groups", "8", "--replay-size", "64"],
    "demos": ["--demos"],
    "lag-4": ["--rollout-lag", "4"],
    "lag-16": ["--rollout-lag", "16"],
}
WINDOW = 20  # steps of the moving average that "updates to 0.5" reads
EVAL_SAMPLES = 32


def run(mode: str, seed: int, steps: int, anchor: str, out: Path) -> dict:
    """One training run in its own process; its per-step rewards and wall time."""
    directory = out / "runs" / f"{mode}-seed{seed}"
    command = [sys.executable, "-m", "gvpo_kernels.trainer", "--output-dir", str(directory), "--seed", str(seed),
               "--steps", str(steps), "--anchor", anchor, "--overwrite", "--no-progress", "--no-plot",
               "--num-samples", "0", *MODES[mode]]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{mode} seed {seed} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    print(f"  {mode:10s} seed {seed}: {seconds:6.1f} s, last-10% reward "
          f"{sum(m['reward_mean'] for m in metrics[-max(1, steps // 10):]) / max(1, steps // 10):.3f}", flush=True)
    return {"mode": mode, "seed": seed, "command": command[1:], "wall_s": seconds, "dir": str(directory),
            "reward": [m["reward_mean"] for m in metrics], "train_s": sum(m["step_time"] for m in metrics),
            "entropy_last": metrics[-1]["entropy"], "sampler_lag_last": metrics[-1]["sampler_lag"],
            "groups_replayed_last": metrics[-1]["groups_replayed"], "members_demo_last": metrics[-1]["members_demo"]}


def evaluate(checkpoint: Path, seed: int = 1234) -> dict:
    """The final policy's mean reward on every prompt of the task, EVAL_SAMPLES samples each at temperature 1."""
    import torch

    from gvpo_kernels.trainer import tiny
    from gvpo_kernels.trainer.data import encode_prompts
    from gvpo_kernels.trainer.models import eos_ids, load_policy
    from gvpo_kernels.trainer.rewards import last_number
    from gvpo_kernels.trainer.rollout import decode_completions, sample

    model, tokenizer = load_policy(str(checkpoint), torch.device("cpu"), seed=0, attn_implementation=None)
    rows = tiny.task_rows()
    torch.manual_seed(seed)
    batch = sample(model, encode_prompts(tokenizer, [r["prompt"] for r in rows], True), k=EVAL_SAMPLES,
                   max_new_tokens=3, temperature=1.0, top_p=1.0, stop_ids=eos_ids(model, tokenizer),
                   pad_id=tokenizer.pad_token_id)
    rewards = last_number(None, decode_completions(tokenizer, batch),
                          [r["answer"] for r in rows for _ in range(EVAL_SAMPLES)])
    per_prompt = [sum(rewards[i * EVAL_SAMPLES:(i + 1) * EVAL_SAMPLES]) / EVAL_SAMPLES for i in range(len(rows))]
    return {"final_reward": sum(rewards) / len(rewards), "prompts_solved": sum(p >= 0.5 for p in per_prompt)}


def summary(result: dict) -> dict:
    reward = result["reward"]
    tenth = max(1, len(reward) // 10)
    smooth = [sum(reward[max(0, i - WINDOW + 1):i + 1]) / len(reward[max(0, i - WINDOW + 1):i + 1])
              for i in range(len(reward))]
    reached = next((i + 1 for i, r in enumerate(smooth) if r >= 0.5 and i + 1 >= WINDOW), None)
    return {"reward_first_10pct": sum(reward[:tenth]) / tenth, "reward_last_10pct": sum(reward[-tenth:]) / tenth,
            "updates_to_0.5": reached, "smooth": smooth}


def table(results: list[dict], modes: list[str]) -> str:
    def cell(values, digits=3):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        mean = sum(values) / len(values)
        each = ", ".join(f"{v:.{digits}f}" for v in values)
        return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ({each})"

    lines = ["| mode | reward, last 10% of steps | updates to 0.5 | final policy reward | prompts solved (of 25) "
             "| wall time, s |", "|---|---|---|---|---|---|"]
    for mode in modes:
        runs = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["seed"])
        reached = [r["updates_to_0.5"] for r in runs]
        reached_text = ", ".join("never" if v is None else str(v) for v in reached)
        lines.append(f"| {mode} | {cell([r['reward_last_10pct'] for r in runs])} | {reached_text} | "
                     f"{cell([r['final_reward'] for r in runs])} | "
                     f"{', '.join(str(r['prompts_solved']) for r in runs)} | "
                     f"{cell([r['wall_s'] for r in runs], 0)} |")
    return "\n".join(lines)


def plot(results: list[dict], modes: list[str], anchor: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, mode in enumerate(modes):
        runs = [r for r in results if r["mode"] == mode]
        color = f"C{i}"
        for r in runs:
            ax.plot(range(1, len(r["smooth"]) + 1), r["smooth"], color=color, alpha=0.25, linewidth=0.8)
        mean = [sum(values) / len(values) for values in zip(*(r["smooth"] for r in runs))]
        ax.plot(range(1, len(mean) + 1), mean, color=color, linewidth=2, label=f"{mode} (mean of {len(runs)} seeds)")
    ax.set_xlabel("optimizer update (= rollout step)")
    ax.set_ylabel(f"sampled reward, {WINDOW}-step moving average")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"GVPO on the built-in task, --anchor {anchor}: on-policy, replay, demos, stale rollouts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (the machine has 2 cores)")
    parser.add_argument("--anchor", default="old", choices=["old", "ref"], help="the runs' --anchor")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "offpolicy"))
    parser.add_argument("--no-keep", dest="keep", action="store_false", help="delete each run's directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    jobs = [(mode, seed) for seed in args.seeds for mode in args.modes]
    print(f"{len(jobs)} runs of {args.steps} steps, {args.jobs} at a time -> {out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run(*job, args.steps, args.anchor, out), jobs))
    for result in results:
        result.update(evaluate(Path(result["dir"]) / f"checkpoint-{args.steps}"))
        result.update(summary(result))
        if not args.keep:
            import shutil

            shutil.rmtree(result["dir"])
    total = time.perf_counter() - start
    text = table(results, args.modes)
    import torch

    meta = {"command": " ".join([Path(sys.executable).name, "scripts/offpolicy.py", *(argv or sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit.stdout.strip(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "jobs": args.jobs, "steps": args.steps,
            "seeds": args.seeds, "anchor": args.anchor, "modes": {m: MODES[m] for m in args.modes}, "wall_s": total,
            "eval_samples_per_prompt": EVAL_SAMPLES, "moving_average_window": WINDOW}
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1) + "\n")
    (out / "results.md").write_text(
        f"# Off-policy GVPO on the built-in task, --anchor {args.anchor}\n\n"
        f"`{meta['command']}` (commit {meta['commit']}, {meta['date']}, "
        f"torch {meta['torch']}, {meta['machine']}, {args.jobs} runs at a time, {total:.0f} s in all)\n\n"
        f"Each cell: the mean over seeds {', '.join(map(str, args.seeds))}, then each seed's figure.\n\n{text}\n")
    plot(results, args.modes, args.anchor, out / "rewards.png")
    print(text)
    print(f"{total:.0f} s; {out / 'results.json'}, {out / 'results.md'}, {out / 'rewards.png'}")


if __name__ == "__main__":
    main()
