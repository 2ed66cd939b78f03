"""linear_gvpo_loss on the CPU against eager PyTorch and PyTorch's native chunked linear_cross_entropy (issue 4).

    python bench/cpu_linear.py                 # the issue's shape; writes bench/results/cpu_linear.{json,md}
    python bench/cpu_linear.py --quick         # a small shape, to check that the script runs

Shape (the issue's): N = 1024 tokens as 16 sequences of 64 in groups of 8, H = 256, V = 32768, float32; loss
plus the gradients of hidden and weight (no bias). Every token is scored and each has an anchor log-prob
(``ref_logprobs``), as in a training step; ``ours on-policy`` drops the anchor (its three-GEMM schedule).

Each provider runs in its own fresh processes (this script with ``--provider NAME``):

* time: the inputs, a warm-up call (loss + backward), then 5 timed calls; their median. glibc's default malloc.
  ``--rounds`` (3) such processes per provider, the providers taking turns; the figure is the median of the
  rounds' medians (a 2-core machine shared with other work slows whatever runs during a busy spell).
* memory: a warm-up call, then the peak RSS growth (VmHWM, reset through /proc/self/clear_refs) of one call over
  the RSS before it, gradients set to None first so that they count, with MALLOC_MMAP_THRESHOLD_ set so that
  freed buffers go back to the system instead of hiding growth. "working" is that growth minus the gradients
  themselves (N x H + V x H floats).

The floor is the GEMMs that the computation cannot avoid, timed in their own processes the same way: the logits
(N x H x V), d_hidden (N x V x H) and d_weight (V x N x H), three with no anchor; with one, four (the logits a
second time, once the per-sequence coefficients are known: see gvpo_kernels/cpu.py). Every GVPO provider's loss
and gradients are compared with eager's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gvpo_kernels as gk  # noqa: E402

SHAPE = dict(num_seqs=16, seq_len=64, hidden=256, vocab=32768, group_size=8)
QUICK = dict(num_seqs=8, seq_len=32, hidden=64, vocab=4096, group_size=4)
BETA = 0.1
REPS = 5
NATIVE_CHUNKS = (128, 256, 512)


# ----------------------------------------------------------------------------------------------------------------
# inputs and providers (each returns a closure computing the loss; the caller runs backward)


def make_inputs(shape: dict, seed: int = 0) -> dict:
    """hidden (B, T, H) and weight (V, H) float32 requiring grad; labels (B, T); rewards (B,); ref (B, T)."""
    gen = torch.Generator().manual_seed(seed)
    b, t, h, v = shape["num_seqs"], shape["seq_len"], shape["hidden"], shape["vocab"]
    return dict(
        hidden=torch.randn(b, t, h, generator=gen).requires_grad_(),
        weight=(torch.randn(v, h, generator=gen) * (2.0 / math.sqrt(h))).requires_grad_(),
        labels=torch.randint(0, v, (b, t), generator=gen),
        rewards=torch.randn(b, generator=gen),
        ref=-math.log(v) + 0.5 * torch.randn(b, t, generator=gen),
    )


def gvpo_from_token_logprobs(token_logprob, ref, rewards, group_size: int):
    """GVPO by hand from per-token log-probs (B, T): sums, implicit rewards, centring, Bessel, mean over groups."""
    r = (BETA * (token_logprob.sum(1) - ref.sum(1))).view(-1, group_size)
    big_r = rewards.view(-1, group_size)
    diff = (r - r.mean(1, keepdim=True)) - (big_r - big_r.mean(1, keepdim=True))
    return (diff.square().sum(1) / (2 * max(group_size - 1, 1))).mean()


def eager(x, shape):
    def loss():
        logprobs = torch.log_softmax((x["hidden"] @ x["weight"].T).float(), dim=-1)
        token_logprob = logprobs.gather(-1, x["labels"].unsqueeze(-1)).squeeze(-1)
        return gvpo_from_token_logprobs(token_logprob, x["ref"], x["rewards"], shape["group_size"])
    return loss


def compiled(x, shape):
    return torch.compile(eager(x, shape))


def native(chunk):
    def build(x, shape):
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk)

        def loss():
            h = x["hidden"].reshape(-1, shape["hidden"])
            ce = torch.nn.functional.linear_cross_entropy(h, x["weight"], x["labels"].reshape(-1),
                                                          reduction="none", options=options)
            return gvpo_from_token_logprobs(-ce.view_as(x["labels"]), x["ref"], x["rewards"], shape["group_size"])
        return loss
    return build


def ours(anchored: bool):
    def build(x, shape):
        gk.cpu.unavailable_reason()  # load (or build) the extension before anything is measured

        def loss():
            return gk.linear_gvpo_loss(x["hidden"], x["weight"], x["labels"], x["rewards"],
                                       group_size=shape["group_size"], ref_logprobs=x["ref"] if anchored else None,
                                       beta=BETA, backend="auto")
        return loss
    return build


def floor(num_gemms: int):
    """The unavoidable GEMMs alone, on preallocated outputs: logits (N, V), d_hidden (N, H), d_weight (V, H)."""
    def build(x, shape):
        h = x["hidden"].detach().reshape(-1, shape["hidden"])
        w = x["weight"].detach()
        logits = torch.empty(h.shape[0], w.shape[0])
        d_hidden, d_weight = torch.empty_like(h), torch.empty_like(w)

        def run():
            for _ in range(num_gemms - 2):
                torch.mm(h, w.T, out=logits)
            torch.mm(logits, w, out=d_hidden)
            torch.mm(logits.T, h, out=d_weight)
        return run
    return build


PROVIDERS = {
    "floor: 3 GEMMs": floor(3),
    "floor: 4 GEMMs": floor(4),
    "eager": eager,
    "torch.compile": compiled,
    **{f"native chunk {c}": native(c) for c in NATIVE_CHUNKS},
    "ours": ours(anchored=True),
    "ours on-policy": ours(anchored=False),
}


# ----------------------------------------------------------------------------------------------------------------
# one provider, in this process


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _call(fn, x, is_floor: bool):
    if is_floor:
        fn()
        return None
    x["hidden"].grad = x["weight"].grad = None
    loss = fn()
    loss.backward()
    return loss


def measure(name: str, shape: dict, mode: str) -> dict:
    """mode "time": median ms of REPS calls after a warm-up; mode "memory": peak RSS growth of one call."""
    x = make_inputs(shape)
    is_floor = name.startswith("floor")
    torch.mm(torch.randn(64, 64), torch.randn(64, 64))  # the thread pool and MKL, before any baseline
    fn = PROVIDERS[name](x, shape)
    loss = _call(fn, x, is_floor)  # warm-up: compilation, the extension, first-touch of buffers
    out = dict(provider=name, mode=mode)
    if mode == "time":
        times = []
        for _ in range(REPS):
            start = time.perf_counter()
            _call(fn, x, is_floor)
            times.append(1e3 * (time.perf_counter() - start))
        out.update(times_ms=times, median_ms=statistics.median(times))
    else:
        x["hidden"].grad = x["weight"].grad = None
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kb("VmRSS")
        loss = _call(fn, x, is_floor)
        out["peak_growth_mib"] = (_status_kb("VmHWM") - before) / 1024
        if loss is not None:
            out["loss"] = float(loss)
            out["grads"] = {k: x[k].grad.double().norm().item() for k in ("hidden", "weight")}
            out["grad_checks"] = {k: x[k].grad.double().sum().item() for k in ("hidden", "weight")}
    return out


def in_fresh_process(name: str, shape: dict, mode: str) -> dict:
    env = dict(os.environ)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)
    cmd = [sys.executable, __file__, "--provider", name, "--mode", mode, "--shape", json.dumps(shape)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return dict(provider=name, mode=mode, error=(proc.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------------------------------------------
# the report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small shape, to check that the script runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the JSON and table")
    parser.add_argument("--rounds", type=int, default=3, help="fresh timing processes per provider, taking turns")
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.provider:
        print("RESULT " + json.dumps(measure(args.provider, json.loads(args.shape), args.mode)), flush=True)
        return

    shape = QUICK if args.quick else SHAPE
    rows = {name: in_fresh_process(name, shape, "memory") for name in PROVIDERS}
    for round_ in range(args.rounds):  # providers take turns, so that a busy spell of the machine hits them all
        for name in PROVIDERS:
            timing = in_fresh_process(name, shape, "time")
            if "error" in timing:
                rows[name]["error"] = timing["error"]
                continue
            rows[name].setdefault("round_medians_ms", []).append(timing["median_ms"])
            rows[name].setdefault("times_ms", []).extend(timing["times_ms"])
            print(f"round {round_ + 1}: {name:20s} {timing['median_ms']:9.1f} ms", flush=True)
    for row in rows.values():
        row.pop("mode", None)
        if "round_medians_ms" in row:
            row["median_ms"] = statistics.median(row["round_medians_ms"])
    report = summarise(rows, shape, " ".join([Path(sys.executable).name, *sys.argv]), args.rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "cpu_linear_quick" if args.quick else "cpu_linear"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(report) + "\n")
    print(markdown(report))


def summarise(rows: dict, shape: dict, command: str, rounds: int) -> dict:
    n = shape["num_seqs"] * shape["seq_len"]
    grad_mib = (n + shape["vocab"]) * shape["hidden"] * 4 / 2**20
    eager_row = rows["eager"]
    for name, row in rows.items():
        if name.startswith("floor") or "error" in row:
            continue
        row["working_mib"] = row["peak_growth_mib"] - grad_mib  # (its warm-up call and an untimed call)
        row["x_floor3"] = row["median_ms"] / rows["floor: 3 GEMMs"]["median_ms"]
        row["x_floor4"] = row["median_ms"] / rows["floor: 4 GEMMs"]["median_ms"]
        row["x_eager_time"] = row["median_ms"] / eager_row["median_ms"]
        row["eager_working_over_this"] = eager_row["working_mib"] / max(row["working_mib"], 1e-9) \
            if "working_mib" in eager_row else None
        if name != "ours on-policy":  # same inputs and loss as eager (on-policy is another loss)
            row["loss_rel_err"] = abs(row["loss"] - eager_row["loss"]) / abs(eager_row["loss"])
            row["grad_rel_err"] = max(abs(row["grads"][k] - eager_row["grads"][k]) / eager_row["grads"][k]
                                      for k in ("hidden", "weight"))
    natives = [k for k in rows if k.startswith("native") and "median_ms" in rows[k]]
    return dict(
        date=datetime.date.today().isoformat(), command=command, shape=shape, tokens=n, dtype="float32",
        cpu=_cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
        gradients_mib=grad_mib, chunk_bytes=gk.cpu.CHUNK_BYTES, rounds=rounds, note="2-core machine shared with other work while measured: timings are noisy",
        best_native=min(natives, key=lambda k: rows[k]["median_ms"]) if natives else None,
        providers=rows,
    )


def markdown(report: dict) -> str:
    s = report["shape"]
    lines = [
        f"linear_gvpo_loss, CPU: N = {report['tokens']} ({s['num_seqs']} x {s['seq_len']}, groups of "
        f"{s['group_size']}), H = {s['hidden']}, V = {s['vocab']}, float32, loss + d_hidden + d_weight. "
        f"{report['cpu']}, {report['threads']} threads, torch {report['torch']}, {report['date']}.",
        f"Command: `{report['command']}`. Median of {report['rounds']} fresh processes' medians of {REPS} calls. "
        f"{report['note']}.",
        "",
        "| provider | median ms | x 3-GEMM floor | x 4-GEMM floor | x eager | peak RSS growth MiB | working MiB |"
        " eager working / this | loss rel. err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def num(value, fmt):
        return "–" if value is None else format(value, fmt)

    for name, row in report["providers"].items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} | | | | | | | |")
            continue
        lines.append(f"| {name} | {row['median_ms']:.0f} | {num(row.get('x_floor3'), '.2f')} | "
                     f"{num(row.get('x_floor4'), '.2f')} | "
                     f"{num(row.get('x_eager_time'), '.2f')} | {row['peak_growth_mib']:.0f} | "
                     f"{num(row.get('working_mib'), '.0f')} | {num(row.get('eager_working_over_this'), '.1f')} | "
                     f"{num(row.get('loss_rel_err'), '.1e')} |")
    lines.append("")
    group_mib = s["group_size"] * s["seq_len"] * s["vocab"] * 4 / 2**20
    schedule = "three" if group_mib * 2**20 <= report["chunk_bytes"] else "four"
    lines.append(f"Gradients themselves: {report['gradients_mib']:.0f} MiB (working = growth minus them). `ours` "
                 f"runs {schedule} GEMMs (anchored; a group's logits are {group_mib:.0f} MiB, a chunk at most "
                 f"{report['chunk_bytes'] / 2**20:.0f} MiB), `ours on-policy` three.")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
