"""What the benchmarks share (bench/README.md says what each one measures): the model heads and shapes, random
inputs, the GVPO math a user writes around a per-token cross-entropy, the check's error and tolerance, timing and
peak memory, a fresh process per measurement, a run (its floors from floors.py, its JSON, its budget), the
machine's facts, command-line options and markdown tables."""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch

import gvpo_kernels as gk

from .floors import floors_line, measure_floors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")

# (name, hidden size H, vocabulary V, paths). liger-ref is Liger-Kernel's published shape for its fused linear
# cross-entropy (8192 tokens there), run only when named (--models / --shapes).
MODELS = [("qwen2.5-7b", 3584, 152064, ("linear", "logits")), ("llama-3-8b", 4096, 128256, ("linear", "logits")),
          ("qwen2.5-0.5b", 896, 151936, ("linear", "logits")), ("liger-ref", 4096, 131072, ("linear",))]
DEFAULT_MODELS = ["qwen2.5-7b", "llama-3-8b", "qwen2.5-0.5b"]
GROUP_SIZE = 8
CHECK_SEQS, CHECK_LEN = 16, 32  # the check runs on 2 groups of 8 sequences of at most 32 tokens
BETA = 0.1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest accepted relative error against the reference, per input dtype. float32: rounding plus TF32 (Triton's
# default for a float32 tl.dot on the GPU, about 3e-4). bfloat16: logits rounded to 8 bits of mantissa by
# whichever matmul produced them shift each token's log-prob by ~1e-2; a real bug is off by O(1).
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
# Per device: dtype, tokens per sequence, token counts (full, quick), scale of H and V, and how long to measure.
SETTINGS = {
    "cuda": dict(dtype="bfloat16", seq_len=256, tokens=[4096, 16384, 32768], quick_tokens=[4096], scale=1,
                 models=DEFAULT_MODELS, warmup=1, warmup_ms=50, rep_ms=300, quick_rep_ms=100),
    # 2 cores: the heads scaled down 8x in H and V (same V/H ratio), float32.
    "cpu": dict(dtype="float32", seq_len=64, tokens=[1024, 4096], quick_tokens=[1024], scale=8,
                models=DEFAULT_MODELS, quick_models=["qwen2.5-7b", "qwen2.5-0.5b"], warmup=1, reps=7,
                max_time_s=20, quick_warmup=1, quick_reps=5, quick_max_time_s=8, timeout_s=600, quick_timeout_s=180),
}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers go back to the system: peak RSS cannot hide growth


def shapes_for(device: str, pairs: list[tuple[str, int]]) -> list[dict]:
    """The shapes of (model, tokens) pairs, on the linear and the logits path, in the device's scale."""
    cfg, out = SETTINGS[device], []
    for path in ("linear", "logits"):
        for model, hidden, vocab, paths in MODELS:
            for n in [n for m, n in pairs if m == model and path in paths]:
                h, v = hidden // cfg["scale"], vocab // cfg["scale"]
                label = model if cfg["scale"] == 1 else f"{model}/{cfg['scale']}"
                name = f"{label} {n // 1024}k" + (f" H{h}" if path == "linear" else "") + f" V{v}"
                out.append(dict(path=path, name=name, model=model, num_seqs=n // cfg["seq_len"],
                                seq_len=cfg["seq_len"], tokens=n, hidden=h, vocab=v))
    return out


# -- inputs and the GVPO math ------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """One shape's tensors, on one device. path "linear": hidden (B, T, H) and weight (V, H) in the run's dtype,
    requiring grad; path "logits": logits (B, T, V) requiring grad. labels (B, T) int64 in [0, V); rewards (B,)
    float32; ref_logprobs (B, T) float32 (the anchor's log-probs); groups of group_size consecutive sequences."""

    path: str
    labels: torch.Tensor
    rewards: torch.Tensor
    ref_logprobs: torch.Tensor
    group_size: int
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def leaves(self) -> list[torch.Tensor]:
        """The tensors whose gradients the loss produces, in a fixed order."""
        return [self.hidden, self.weight] if self.path == "linear" else [self.logits]

    @property
    def vocab(self) -> int:
        return self.weight.shape[0] if self.path == "linear" else self.logits.shape[-1]


def make_inputs(path: str, num_seqs: int, seq_len: int, vocab: int, hidden_size: int, dtype: torch.dtype,
                device: str, group_size: int = GROUP_SIZE, seed: int = 0) -> Inputs:
    """Random inputs of one shape, logits with a standard deviation of about 2; N(0, 1) rewards per sequence; the
    anchor's log-probs those of a uniform policy plus noise (implicit rewards neither zero nor constant)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):  # drawn in dtype (no float32 temporary of the size of the logits)
        return torch.randn(*shape, device=device, generator=gen, dtype=dtype).mul_(scale).requires_grad_()

    labels = torch.randint(0, vocab, (num_seqs, seq_len), device=device, generator=gen)
    rewards = torch.randn(num_seqs, device=device, generator=gen)
    ref = -math.log(vocab) + 0.5 * torch.randn(num_seqs, seq_len, device=device, generator=gen)
    common = dict(labels=labels, rewards=rewards, ref_logprobs=ref, group_size=group_size)
    if path == "linear":
        return Inputs("linear", hidden=randn(num_seqs, seq_len, hidden_size),
                      weight=randn(vocab, hidden_size, scale=2.0 / math.sqrt(hidden_size)), **common)
    return Inputs("logits", logits=randn(num_seqs, seq_len, vocab, scale=2.0), **common)


def gvpo_from_token_logprobs(token_logprob: torch.Tensor, ref_logprobs: torch.Tensor, rewards: torch.Tensor,
                             group_size: int, beta: float = BETA) -> torch.Tensor:
    """The GVPO loss from per-token log-probs (B, T) float32, as a user writes it around a fused cross-entropy:
    sequence sums, implicit rewards, centring within groups of consecutive sequences, the Bessel factor
    1 / (k - 1), mean over groups. ref_logprobs (B, T), rewards (B,)."""
    k = group_size
    r = (beta * (token_logprob.sum(dim=1) - ref_logprobs.sum(dim=1))).view(-1, k)
    big_r = rewards.view(-1, k)
    diff = (r - r.mean(dim=1, keepdim=True)) - (big_r - big_r.mean(dim=1, keepdim=True))
    return ((diff**2).sum(dim=1) / (2 * max(k - 1, 1))).mean()


def rel_err(got: torch.Tensor | None, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64; inf for a missing or misshapen tensor."""
    if got is None or got.shape != ref.shape:
        return float("inf")
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def verdict(errors: dict, tol: float) -> dict:
    """{"status": "ok" | "mismatch", "errors", "reason"}: mismatch when the largest error is over tol (or NaN)."""
    name = max(errors, key=errors.get)
    bad = not errors[name] <= tol
    return {"status": "mismatch" if bad else "ok", "errors": errors,
            "reason": f"{name} off by {errors[name]:.2e} (> {tol:g}): not timed" if bad else ""}


# -- time and memory ---------------------------------------------------------------------------------------------

def summary(times: list[float]) -> dict:
    """{"median", "p20", "p80" (ms), "reps"} of timings in ms."""
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"median": statistics.median(times), "p20": q[0], "p80": q[3], "reps": len(times)}


def time_ms(call, task: dict, first: float | None = None) -> dict:
    """summary() of call()'s time. CUDA: triton.testing.do_bench (L2 flushed between calls; reps None). CPU:
    time.perf_counter over up to task["reps"] calls (``first``, a call already timed, counts as one), fewer once
    task["max_time_s"] have passed, at least task["min_reps"]."""
    if task["device"] == "cuda":
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(call, warmup=task["warmup_ms"], rep=task["rep_ms"], quantiles=[0.2, 0.5, 0.8])
        return {"median": p50, "p20": p20, "p80": p80, "reps": None}
    times = [] if first is None else [first]
    start = time.perf_counter()
    while len(times) < task["reps"] and (len(times) < task["min_reps"] or time.perf_counter() - start
                                         < task["max_time_s"]):
        t0 = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - t0))
    return summary(times)


def proc_mib(key: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) / 1024


def reset_peak_rss() -> float:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return that RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_mib("VmRSS")


def peak_memory_mib(call, device: str, leaves: list[torch.Tensor]) -> tuple[float, float]:
    """The peak memory of one call() above what was allocated before it, in MiB, the leaves' gradients released
    first (so that the fresh ones count), and the call's time in ms. CUDA: max_memory_allocated over
    memory_allocated before; CPU: peak RSS growth (VmHWM) over the RSS before."""
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = reset_peak_rss()
    t0 = time.perf_counter()
    call()
    sync(device)
    ms = 1e3 * (time.perf_counter() - t0)
    if device == "cuda":
        return (torch.cuda.max_memory_allocated() - before) / 2**20, ms
    return proc_mib("VmHWM") - before, ms


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


# -- fresh processes ---------------------------------------------------------------------------------------------

def run_fresh(bench: str, spec, count: int, timeout_s: float, on_result, env: dict | None = None) -> str | None:
    """``python -m bench <bench> --worker <spec as JSON>`` in a fresh process with MALLOC_ENV (its peak RSS is
    honest): on_result(result) for each line "RESULT <json>" it prints, up to ``count``; None, or why fewer came."""
    env = dict(os.environ, **MALLOC_ENV, PYTHONUNBUFFERED="1", **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker cannot block on it
    proc = subprocess.Popen([sys.executable, "-m", "bench", bench, "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=err, text=True)
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    done = 0
    try:
        for line in proc.stdout:
            if line.startswith("RESULT ") and done < count:
                on_result(json.loads(line[len("RESULT "):]))
                done += 1
        proc.wait()
    finally:
        timed_out = not timer.is_alive() and proc.returncode not in (0, None)
        timer.cancel()
        err.seek(0)
        tail = " / ".join(err.read().strip().splitlines()[-3:])[:300]
        err.close()
    if done == count:
        return None
    if timed_out:
        return f"timed out after {timeout_s:.0f} s"
    if proc.returncode in (-9, 137):
        return "worker killed (out of memory?)"
    return f"worker exit code {proc.returncode}: {tail}"


def emit(result: dict) -> None:
    """A worker's answer to run_fresh."""
    print("RESULT " + json.dumps(result), flush=True)


# -- the machine, the run's options, the output ------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"


PEERS = ("liger-kernel", "cut-cross-entropy", "quack-kernels", "nvidia-cutlass-dsl", "matplotlib")


def versions(*names: str) -> dict:
    """Python, torch, triton, this package with its commit, and the named distributions."""
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    out = {"python": platform.python_version(), "torch": torch.__version__, "gvpo-kernels": gk.__version__,
           "triton": version("triton")}
    try:
        commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        out["gvpo-kernels"] += f" ({commit})" if commit else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return dict(out, **{name: version(name) for name in names})


def add_run_args(parser: argparse.ArgumentParser, out: str) -> None:
    """The options the loss and token-statistics benchmarks share."""
    models = ", ".join(m[0] for m in MODELS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes and repeats")
    parser.add_argument("--out", default=out, help="folder for the JSON and the table")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new measurement after this many seconds (the rest is reported as skipped)")
    parser.add_argument("--only", default=None, help="comma-separated providers (default: all)")
    parser.add_argument("--paths", default="linear,logits", help="comma-separated paths: linear, logits")
    parser.add_argument("--models", default=None, help=f"comma-separated model heads ({models}; default: the first "
                                                       "three)")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts, multiples of the device's "
                                                       "sequence length (256 on CUDA, 64 on the CPU)")
    parser.add_argument("--shapes", default=None, help="comma-separated MODEL:TOKENS pairs instead of --models x "
                                                       "--tokens, e.g. qwen2.5-7b:4096,liger-ref:8192")


def finish_run_args(parser: argparse.ArgumentParser, args, providers: list[str]):
    """Check the shared options: args.pairs, the (model, tokens) pairs of the run; args.only, a set or None."""
    cfg, quick = SETTINGS[args.device], args.quick
    try:
        args.pairs = [(m, int(n)) for m, n in (p.split(":") for p in args.shapes.split(","))] if args.shapes else [
            (m, n) for m in (args.models.split(",") if args.models else cfg.get("quick_models", cfg["models"])
                             if quick else cfg["models"])
            for n in ([int(n) for n in args.tokens.split(",")] if args.tokens else cfg["quick_tokens" if quick
                                                                                      else "tokens"])]
    except ValueError:
        parser.error("--shapes MODEL:TOKENS,... / --tokens N,...: expected integers")
    for option, given, allowed in (("--models/--shapes", {m for m, _ in args.pairs}, [m[0] for m in MODELS]),
                                   ("--paths", set(args.paths.split(",")), ("linear", "logits")),
                                   ("--only", set(args.only.split(",")) if args.only else set(), providers)):
        if given - set(allowed):
            parser.error(f"{option}: unknown {', '.join(sorted(given - set(allowed)))}; expected some of "
                         f"{', '.join(allowed)}")
    if any(n <= 0 or n % cfg["seq_len"] for _, n in args.pairs):
        parser.error(f"token counts must be positive multiples of {cfg['seq_len']} on {args.device}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    args.only = set(args.only.split(",")) if args.only else None
    return args


class Run:
    """One benchmark run: its shapes, its floors (measured at the start), its results JSON (rewritten after every
    result, so that a stopped run keeps what it measured: `python -m bench report` makes its table) and budget."""

    def __init__(self, args, title: str, floor_reps: int = 7, **meta):
        self.start, self.args, self.device, self.cfg = time.perf_counter(), args, args.device, SETTINGS[args.device]
        self.dtype = DTYPES[self.cfg["dtype"]]
        paths = args.paths.split(",")
        self.shapes = [s for s in shapes_for(args.device, args.pairs) if s["path"] in paths]
        self.by_key = {(s["path"], s["name"]): s for s in self.shapes}
        print(f"gvpo-kernels {title}: {device_name(args.device)}, {self.cfg['dtype']}, {len(self.shapes)} shapes"
              + (" (quick)" if args.quick else ""), flush=True)
        self.floors = measure_floors(self.shapes, args.device, self.dtype, reps=floor_reps)
        print(f"floors: {floors_line(self.floors)}", flush=True)
        os.makedirs(args.out, exist_ok=True)
        self.stem = os.path.join(args.out, f"{args.device}-{datetime.date.today().isoformat()}")
        meta = dict(date=datetime.date.today().isoformat(), device=args.device, device_name=device_name(args.device),
                    dtype=self.cfg["dtype"], quick=args.quick, floors=self.floors, platform=platform.platform(), **meta)
        self.data = {"meta": meta, "shapes": self.shapes, "results": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_budget(self) -> str | None:
        """Why no new measurement starts, or None."""
        budget = self.args.budget_s
        return f"time budget (--budget-s {budget:.0f}) ran out" if budget is not None and self.elapsed() > budget \
            else None

    def add(self, results: list[dict], derive) -> None:
        """Record results; derive(rows, shapes by (path, name), floors, itemsize) fills the derived figures."""
        self.data["results"] += results
        derive(self.data["results"], self.by_key, self.floors, self.dtype.itemsize)
        self.data["meta"]["wall_s"] = self.elapsed()
        write_json(self.stem + ".json", self.data)

    def finish(self, table: str, more: str = "") -> None:
        with open(self.stem + ".md", "w") as f:
            f.write(table)
        print(f"\n{table}\nwrote {self.stem}.json, {self.stem}.md{more} in {self.elapsed():.0f} s")


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def md_table(header: list[str], rows: list[list[str]], numeric_from: int) -> list[str]:
    """A markdown table, columns from ``numeric_from`` on right-aligned."""
    align = ["---"] * numeric_from + ["---:"] * (len(header) - numeric_from)
    return ["| " + " | ".join(r) + " |" for r in [header]] + ["|" + "|".join(align) + "|"] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def notes_and_skipped(rows: list[dict], measured: tuple, key=lambda r: r["path"]) -> dict:
    """(group, provider) -> "status: reason", for providers with no figures in any row of a group (a path) and
    one reason: listed under the table instead of row by row."""
    out = {}
    for group in dict.fromkeys(key(r) for r in rows):
        for provider in dict.fromkeys(r["provider"] for r in rows if key(r) == group):
            mine = [r for r in rows if key(r) == group and r["provider"] == provider]
            if all(r["status"] not in measured for r in mine) and len({r.get("reason") for r in mine}) == 1:
                out[(group, provider)] = f"{mine[0]['status']}: {mine[0].get('reason')}"
    return out


def footer(notes: list[str], hidden: dict) -> list[str]:
    """The lines under a table: numbered notes, then the providers that ran nowhere (notes_and_skipped)."""
    out = [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)] if notes else []
    if hidden:
        out += ["", "Not run on this device:"] + [f"- {p} ({path}): {why}" for (path, p), why in hidden.items()]
    return out
