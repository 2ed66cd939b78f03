"""Why stale rollouts (--rollout-lag) learn less on the built-in task: at every step of a run, also sample the current
policy on the step's prompts (on a forked random stream, so the run is the same as without this) and compare it
with what the lagged sampler gave the update.

    .venv/bin/python scripts/offpolicy_diagnose.py                # lag 4 and lag 16 at seed 1, and the lr check
    .venv/bin/python scripts/offpolicy_diagnose.py --runs lag-4:1 --steps 300 --no-lr-check --out /tmp/d

Per step it records: the sampler's reward (metrics' reward_mean), the current policy's reward on the same prompts
(k samples each), the share of the current policy's completions that the sampler did not produce at all in the
last L + 1 steps ("unseen"), and the most frequent completions of each. Then (unless --no-lr-check) it trains
on-policy and lag 16 at a quarter of the learning rate, to see whether the gap is the staleness measured in how far
the policy moves during L updates. Writes diagnose.json and diagnose.png to --out (default
bench/results/offpolicy/).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gvpo_kernels.trainer import TrainConfig, loop, train  # noqa: E402


def traced_run(lag: int, seed: int, steps: int, out: Path, **overrides) -> list[dict]:
    """Train with --rollout-lag ``lag`` (0 = on-policy) and trace the current policy beside the sampler."""
    trace = []
    recent = collections.deque(maxlen=lag + 1)  # the sampler's completions of the last lag + 1 steps
    real_step, real_rollout = loop.Trainer.step, loop.Trainer.rollout

    def rollout(self, rows, sampler=None):  # what the step's sampler gave (the step's only rollout)
        batch, completions = real_rollout(self, rows, sampler)
        self.last_completions = completions
        return batch, completions

    def step(self, index):
        rows = self.my_rows(loop.step_rows(self.rows, index, self.cfg.prompts_per_step, self.cfg.seed))
        with torch.random.fork_rng(devices=[]):  # the current policy's own samples; the run's RNG is untouched
            torch.manual_seed(10_000 + index)
            own_batch, own = real_rollout(self, rows, self.policy)
        record = real_step(self, index)
        prompts = [r["prompt"] for r in rows for _ in range(self.cfg.k)]
        recent.append(set(zip(prompts, self.last_completions)))
        seen = set().union(*recent)
        trace.append({"step": index + 1, "sampler_reward": record["reward_mean"],
                      "policy_reward": own_batch.rewards.mean().item(),
                      "unseen": sum((p, c) not in seen for p, c in zip(prompts, own)) / len(own),
                      "sampler_top": collections.Counter(self.last_completions).most_common(3),
                      "policy_top": collections.Counter(own).most_common(3)})
        return record

    loop.Trainer.step, loop.Trainer.rollout = step, rollout
    try:
        train(TrainConfig(output_dir=str(out), seed=seed, steps=steps, rollout_lag=lag, overwrite=True,
                          progress=False, plot=False, num_samples=0, **overrides))
    finally:
        loop.Trainer.step, loop.Trainer.rollout = real_step, real_rollout
    return trace


def run_cli(args: list[str]) -> list[float]:
    """A plain run in its own process; its per-step sampled reward."""
    out = Path(args[args.index("--output-dir") + 1])
    subprocess.run([sys.executable, "-m", "gvpo_kernels.trainer", "--overwrite", "--no-progress", "--no-plot",
                    "--num-samples", "0", *args], cwd=ROOT, check=True, capture_output=True)
    return [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def smooth(values, window=20):
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["lag-4:1", "lag-16:1"], help="MODE:SEED, MODE lag-L")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--no-lr-check", dest="lr_check", action="store_false")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "offpolicy"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    work = out / "diagnose-runs"
    start = time.perf_counter()
    result = {"command": " ".join(["scripts/offpolicy_diagnose.py", *(argv or sys.argv[1:])]), "traces": {},
              "lr_check": {}}
    for spec in args.runs:
        mode, seed = spec.split(":")
        lag = int(mode.split("-")[1])
        trace = traced_run(lag, int(seed), args.steps, work / spec.replace(":", "-seed"))
        result["traces"][spec] = trace
        worst = min(range(len(trace)), key=lambda i: sum(t["policy_reward"] for t in trace[i:i + 10]))
        print(f"{spec}: last 10% sampler {sum(t['sampler_reward'] for t in trace[-60:]) / 60:.3f}, policy "
              f"{sum(t['policy_reward'] for t in trace[-60:]) / 60:.3f}; worst 10 steps from {worst + 1}: "
              f"policy {trace[worst]['policy_top']}, sampler {trace[worst]['sampler_top']}", flush=True)
    if args.lr_check:
        for name, extra in (("on-policy, lr 2.5e-4", []), ("lag-16, lr 2.5e-4", ["--rollout-lag", "16"])):
            rewards = run_cli(["--output-dir", str(work / name.replace(", ", "-")), "--seed", "1", "--lr", "2.5e-4",
                               "--steps", str(args.steps), *extra])
            result["lr_check"][name] = rewards
            print(f"{name}: last 10% {sum(rewards[-60:]) / 60:.3f}", flush=True)
    result["wall_s"] = time.perf_counter() - start
    (out / "diagnose.json").write_text(json.dumps(result) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(result["traces"]) + bool(result["lr_check"])
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.2 * panels), sharex=True, squeeze=False)
    for ax, (spec, trace) in zip(axes[:, 0], result["traces"].items()):
        steps = [t["step"] for t in trace]
        ax.plot(steps, smooth([t["sampler_reward"] for t in trace]), label="reward of the lagged sampler")
        ax.plot(steps, smooth([t["policy_reward"] for t in trace]), label="reward of the current policy")
        ax.plot(steps, smooth([t["unseen"] for t in trace]), label="current policy's completions the sampler "
                                                                    "never gave", linestyle=":")
        ax.set_title(f"{spec.split(':')[0]}, seed {spec.split(':')[1]} (20-step moving averages)")
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
    if result["lr_check"]:
        ax = axes[-1, 0]
        for name, rewards in result["lr_check"].items():
            ax.plot(range(1, len(rewards) + 1), smooth(rewards), label=name)
        ax.set_title("a quarter of the learning rate, seed 1: sampled reward")
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel("optimizer update")
    fig.tight_layout()
    fig.savefig(out / "diagnose.png", dpi=110)
    print(f"{result['wall_s']:.0f} s; {out / 'diagnose.json'}, {out / 'diagnose.png'}")


if __name__ == "__main__":
    main()
