"""Benchmark the GVPO loss side by side with what users would pick instead, on the same inputs in one run.

    python bench/run.py [--device cpu|cuda] [--quick] [--out DIR] [--budget-s S] [--only NAME,...] [--paths ...]
                        [--models NAME,...] [--tokens N,...]

For every shape and every provider (bench/providers.py) it checks the loss and gradients against
gvpo_kernels.reference, then measures forward+backward time and peak memory (bench/measure.py), and relates the
time to the floor, a time no provider can beat on this device, measured in the same run:

* linear path (hidden, LM head -> loss): 6 N H V flops (the logits once, the d_hidden and d_weight GEMMs) at the
  peak matmul rate: the best rate in the run's dtype of a few GEMMs into preallocated outputs (the shape's three
  GEMMs; on the CPU also one-thread, cache-sized blocks of them, times the threads; a square GEMM);
* logits path (logits -> loss): 2 N V elements moved (each logit read once, each gradient element written
  once) at the peak bandwidth: the best of a read (sum), a copy and an in-place update over N V elements,
  counting bytes read plus bytes written.

It writes DIR/<device>-<date>.json (device, versions, shapes, dtypes, floors, every figure; rewritten after
each measurement, so an interrupted run keeps what it measured), DIR/<device>-<date>.md (the table printed at the
end) and DIR/<device>-<date>.png (time and peak memory per provider per shape). On the CPU each provider runs
in a fresh process of its own (its shapes one after the other); on CUDA all run in this process (peak memory
resets per measurement).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (ROOT, HERE) if p not in sys.path]

import torch  # noqa: E402

import gvpo_kernels as gk  # noqa: E402
import providers as P  # noqa: E402
import report  # noqa: E402

# (name, hidden size H, vocabulary V) of the LM heads the benchmark is about.
MODELS = [("qwen2.5-7b", 3584, 152064), ("llama-3-8b", 4096, 128256), ("qwen2.5-0.5b", 896, 151936)]
GROUP_SIZE = 8
CHECK_SEQS, CHECK_LEN = 16, 32  # the check runs on 2 groups of 8 sequences of at most 32 tokens

# Per device: dtype, tokens per sequence, token counts (full, quick), scale of H and V, and how long to measure.
SETTINGS = {
    "cuda": dict(dtype="bfloat16", seq_len=256, tokens=[4096, 16384, 32768], quick_tokens=[4096], scale=1,
                 models=MODELS, warmup=1, warmup_ms=50, rep_ms=300, quick_rep_ms=100),
    # 2 cores: the heads scaled down 8x in H and V (same V/H ratio), float32.
    "cpu": dict(dtype="float32", seq_len=64, tokens=[1024, 4096], quick_tokens=[1024], scale=8,
                models=MODELS, quick_models=["qwen2.5-7b", "qwen2.5-0.5b"], warmup=1, reps=7, max_time_s=20,
                quick_warmup=1, quick_reps=5, quick_max_time_s=8, timeout_s=600, quick_timeout_s=180),
}


def shapes_for(device: str, quick: bool, models: list[str] | None = None,
               tokens: list[int] | None = None) -> list[dict]:
    """The shapes of one run: every model head at every token count, for the linear and the logits path
    (``models`` / ``tokens``: these instead of the device's defaults)."""
    cfg = SETTINGS[device]
    tokens = tokens or (cfg["quick_tokens"] if quick else cfg["tokens"])
    names = models or (cfg.get("quick_models") if quick else None)
    out = []
    for path in ("linear", "logits"):
        for model, hidden, vocab in cfg["models"]:
            if names and model not in names:
                continue
            h, v = hidden // cfg["scale"], vocab // cfg["scale"]
            label = model if cfg["scale"] == 1 else f"{model}/{cfg['scale']}"
            for n in tokens:
                name = f"{label} {n // 1024}k" + (f" H{h}" if path == "linear" else "") + f" V{v}"
                out.append(dict(path=path, name=name, model=model, num_seqs=n // cfg["seq_len"],
                                seq_len=cfg["seq_len"], tokens=n, hidden=h, vocab=v))
    return out


# -- floors ------------------------------------------------------------------------------------------------------
#
# A floor is a time that no provider can beat on this device: the work every one of them must do, at the best rate
# this device reached in the run on plain kernels that do nothing else (best of several calls, into preallocated
# outputs, on the run's threads), the best over all such kernels, whichever shape gave it:
#   linear path: 6 N H V flops (the logits once, d_hidden and d_weight) at the peak matmul rate;
#   logits path: 2 N V elements (each logit read once, each gradient element written once) at the peak bandwidth.

SQUARE = {"cpu": 1024, "cuda": 8192}  # the square GEMM among the matmul-rate probes, per device
BLOCK_BYTES = 1 << 20  # CPU: a one-thread block GEMM's output, sized to stay in a core's L2 (as csrc/linear.cpp's)
BLOCK_TOKENS = 512  # CPU: the tokens (columns) of such a block
FLOOR_DEFINITION = {
    "linear": "6 N H V flops (logits once, d_hidden, d_weight) at the peak matmul rate: the best TFLOP/s of the "
              "GEMM probes (the shape's three GEMMs into preallocated outputs; on the CPU also one-thread blocks "
              "of them times the threads; a square GEMM)",
    "logits": "2 N V elements (read each logit once, write each gradient element once) at the peak bandwidth: "
              "the best GB/s (bytes read + written) of read (sum), copy and in-place update over N V elements",
}


def _best_ms(fn, device: str, reps: int, budget_s: float = 1.0) -> float:
    """The fastest time of one fn() in ms: do_bench's minimum on CUDA; on the CPU, after a warm-up call, the
    fastest of ``reps`` timings (fewer once ``budget_s`` has passed, at least 2) of enough back-to-back calls to
    last >= 10 ms, divided by their number."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=30 * reps, return_mode="min")
    start = time.perf_counter()
    fn()
    calls = max(1, math.ceil(0.01 / max(time.perf_counter() - start, 1e-6)))
    best, timings = float("inf"), 0
    while timings < reps and (timings < 2 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best, timings = min(best, (time.perf_counter() - t0) / calls), timings + 1
    return 1e3 * best


_BUFFERS = {}  # the CPU's bandwidth buffers, made once per size (drawing ~100 M random numbers takes a while there)


def bandwidth_gbps(numels: list[int], dtype: torch.dtype, device: str, reps: int) -> dict[str, float]:
    """GB/s (bytes read + bytes written) of three streaming kernels over each of ``numels`` elements of dtype:
    "read <n>" (a sum), "copy <n>" (into another buffer) and "update <n>" (negated in place)."""
    most = max(numels)
    if device == "cpu" and _BUFFERS.get("numel", 0) >= most:
        src, dst = _BUFFERS["src"], _BUFFERS["dst"]
    else:  # on CUDA made anew each time: GPU memory is for the measurements
        src = torch.randn(most, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        if device == "cpu":
            _BUFFERS.update(numel=most, src=src, dst=dst)
    out = {}
    for n in sorted(set(numels)):
        a, b, size = src[:n], dst[:n], n * src.element_size()
        label = f"{n / 1e6:.4g}M {str(dtype).removeprefix('torch.')}"
        for kind, fn, moved in (("read", a.sum, size), ("copy", lambda: b.copy_(a), 2 * size),
                                ("update", a.neg_, 2 * size)):
            out[f"{kind} {label}"] = moved / (_best_ms(fn, device, reps) * 1e-3) / 1e9
    return out


def _matmul_probes(shapes: list[dict], dtype: torch.dtype, device: str):
    """(name, flops, fn, kind) of each GEMM probe: per distinct (H, V) of the linear shapes, its three GEMMs on
    min(N, 4096) tokens into preallocated outputs, the forward's logits = hidden @ weight.T, d_hidden = g @ weight
    and d_weight = g.T @ hidden; on the CPU also one-thread block GEMMs of each (a block of the vocabulary x
    BLOCK_TOKENS tokens, its output in L2, as a kernel that gives each thread its own blocks runs them); and one
    square GEMM. kind: "shape", "block" (a one-thread probe: its rate counts times the run's threads) or
    "square"."""
    made = {}
    for s in shapes:
        if s["path"] != "linear":
            continue
        h, v, rows = s["hidden"], s["vocab"], min(s["tokens"], 4096)
        made.setdefault(f"H{h} V{v}", (h, v, rows))
    for key, (h, v, rows) in made.items():
        x = torch.randn(rows, h, device=device, dtype=dtype)
        w = torch.randn(v, h, device=device, dtype=dtype)
        z = torch.randn(rows, v, device=device, dtype=dtype)
        d_hidden, d_weight = torch.empty_like(x), torch.empty_like(w)
        flops = 2 * rows * h * v
        yield f"{key} logits", flops, _mm(x, w.T, z), "shape"
        yield f"{key} d_hidden", flops, _mm(z, w, d_hidden), "shape"
        yield f"{key} d_weight", flops, _mm(z.T, x, d_weight), "shape"
        if device == "cpu":
            r = min(rows, BLOCK_TOKENS)
            b = max(8, min(v, BLOCK_BYTES // (x.element_size() * r)))
            xb, wb = x[:r], w[:b]
            zb = torch.empty(b, r, dtype=dtype)
            db_h, db_w = torch.empty(r, h, dtype=dtype), torch.empty(b, h, dtype=dtype)
            flops = 2 * b * r * h
            yield f"{key} block logits", flops, _mm(wb, xb.T, zb), "block"
            yield f"{key} block d_hidden", flops, _mm(zb.T, wb, db_h), "block"
            yield f"{key} block d_weight", flops, _mm(zb, xb, db_w), "block"
    n = SQUARE[device]
    a, b, c = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
    yield f"square {n}", 2 * n**3, _mm(a, b, c), "square"


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor):
    return lambda: torch.mm(a, b, out=out)


def matmul_tflops(shapes: list[dict], dtype: torch.dtype, device: str, reps: int,
                  kinds=("shape", "block", "square")) -> dict[str, float]:
    """TFLOP/s of each GEMM probe of these kinds (see _matmul_probes) in dtype, on random data; a one-thread
    probe runs with torch.set_num_threads(1) and counts times the run's threads (no more than the cores would
    give together)."""
    threads = torch.get_num_threads()
    out = {}
    for name, flops, fn, kind in _matmul_probes(shapes, dtype, device):
        if kind not in kinds:
            continue
        if kind == "block":
            name = f"{name} x{threads} threads"
            torch.set_num_threads(1)
            try:
                ms = _best_ms(fn, device, reps)
            finally:
                torch.set_num_threads(threads)
            flops *= threads
        else:
            ms = _best_ms(fn, device, reps)
        out[name] = flops / (ms * 1e-3) / 1e12
    return out


def measure_floors(shapes: list[dict], device: str, dtype: torch.dtype, floors: dict | None = None,
                   reps: int = 7) -> dict:
    """Measure the bandwidth probes (if a logits shape is among ``shapes``) and the matmul probes (if a linear
    one is), keeping per probe the best of these and of the earlier measurements in ``floors``, and the peaks:
    {"gbps": {probe: GB/s}, "tflops": {probe: TFLOP/s}, "peak_gbps", "peak_gbps_probe", "peak_tflops",
    "peak_tflops_probe"}. run.py measures all at the start, then again (fewer repeats) whenever the next
    measurement is of other shapes (CPU: the other path; CUDA: the next shape), so that a moment of contention on
    a shared machine lowers no floor (on the CPU, where the one-thread blocks are faster, the whole shape's GEMMs
    only at the start: they take long)."""
    floors = floors or {"gbps": {}, "tflops": {}}
    measured = {}
    numels = [s["tokens"] * s["vocab"] for s in shapes if s["path"] == "logits"]
    if numels:
        measured["gbps"] = bandwidth_gbps(numels, dtype, device, reps)
    if any(s["path"] == "linear" for s in shapes):
        again = device == "cpu" and bool(floors["tflops"])
        kinds = ("block", "square") if again else ("shape", "block", "square")
        measured["tflops"] = matmul_tflops(shapes, dtype, device, reps, kinds)
    for unit, rates in measured.items():
        for probe, rate in rates.items():
            floors[unit][probe] = max(rate, floors[unit].get(probe, 0.0))
        best = max(floors[unit], key=floors[unit].get)
        floors[f"peak_{unit}"], floors[f"peak_{unit}_probe"] = floors[unit][best], best
    if device == "cuda":
        torch.cuda.empty_cache()  # give the measurements the whole GPU back
    return floors


def floor_ms(shape: dict, floors: dict, itemsize: int) -> float:
    """The shape's floor in ms (see FLOOR_DEFINITION); itemsize: bytes per element of the run's dtype."""
    n, v = shape["tokens"], shape["vocab"]
    if shape["path"] == "linear":
        return 6 * n * shape["hidden"] * v / (floors["peak_tflops"] * 1e12) * 1e3
    return 2 * n * v * itemsize / (floors["peak_gbps"] * 1e9) * 1e3


# -- running the tasks --------------------------------------------------------------------------------------------

def _placeholder(task: dict, status: str, reason: str) -> dict:
    return {"path": task["path"], "shape": task["shape"]["name"], "provider": task["provider"], "computes": "",
            "note": "", "status": status, "reason": reason}


def run_in_subprocess(tasks: list[dict], timeout_s: float, on_result) -> None:
    """bench/measure.py in one fresh process for one provider's tasks; on_result(result) as each one ends.

    Freed buffers go straight back to the system there (MALLOC_MMAP_THRESHOLD_), so that its RSS is honest."""
    import threading

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join(HERE, "measure.py"), json.dumps(tasks)]
    import tempfile

    err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker cannot block on it
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    done = 0
    try:
        for line in proc.stdout:
            if line.startswith("RESULT ") and done < len(tasks):
                on_result(json.loads(line[len("RESULT "):]))
                done += 1
        proc.wait()
        err.seek(0)
        stderr = err.read()
    finally:
        timed_out = not timer.is_alive() and proc.returncode not in (0, None)
        timer.cancel()
        err.close()
    if done < len(tasks):
        tail = " / ".join(stderr.strip().splitlines()[-3:])[:300]
        if timed_out:
            why = f"timed out after {timeout_s:.0f} s"
        elif proc.returncode in (-9, 137):
            why = "worker killed (out of memory?)"
        else:
            why = f"worker exit code {proc.returncode}: {tail}"
        for task in tasks[done:]:
            on_result(_placeholder(task, "failed", why))


def run_in_process(task: dict) -> dict:
    import gc

    import measure

    result = measure.measure(task)
    gc.collect()
    if task["device"] == "cuda":
        torch.cuda.empty_cache()
    return result


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "gvpo-kernels": gk.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        out["gvpo-kernels"] += f" ({commit})" if commit else ""
    except (OSError, subprocess.SubprocessError):
        pass
    for name in ("liger-kernel", "cut-cross-entropy", "matplotlib"):
        out[name] = P.package_version(name)
    return out


def add_derived(rows: list[dict], shapes: dict, floors: dict, itemsize: int) -> None:
    """floor_ms, x_floor (time / floor) and x_eager (eager's time / this time, on the same path and shape)."""
    for row in rows:
        shape = shapes[(row["path"], row["shape"])]
        row["floor_ms"] = floor_ms(shape, floors, itemsize)
        if row.get("time_ms") is not None:
            row["x_floor"] = row["time_ms"] / row["floor_ms"]
            eager = next((r for r in rows if r["path"] == row["path"] and r["shape"] == row["shape"]
                          and r["provider"] == "eager" and r.get("time_ms")), None)
            row["x_eager"] = eager["time_ms"] / row["time_ms"] if eager else None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes and repeats")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the JSON, table and PNG")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new measurement after this many seconds (the rest is reported as skipped)")
    parser.add_argument("--only", default=None, help="comma-separated provider names to run (default: all)")
    parser.add_argument("--paths", default="linear,logits", help="comma-separated paths: linear, logits")
    parser.add_argument("--models", default=None,
                        help="comma-separated model heads (default: the device's): " + ", ".join(m[0] for m in MODELS))
    parser.add_argument("--tokens", default=None,
                        help="comma-separated token counts, each a multiple of the device's sequence length "
                             "(default: the device's)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every measurement in this process, as on CUDA (always so on CUDA); on the CPU "
                             "this only tests the CUDA flow: its peak-RSS figures are not per provider")
    args = parser.parse_args(argv)
    args.models = args.models.split(",") if args.models else None
    unknown = sorted(set(args.models or []) - {m[0] for m in MODELS})
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(m[0] for m in MODELS)}")
    seq_len = SETTINGS[args.device]["seq_len"]
    try:
        args.tokens = [int(n) for n in args.tokens.split(",")] if args.tokens else None
    except ValueError:
        parser.error(f"--tokens: expected comma-separated integers, got {args.tokens!r}")
    if args.tokens and any(n <= 0 or n % seq_len for n in args.tokens):
        parser.error(f"--tokens: each must be a positive multiple of {seq_len} (the sequence length on "
                     f"{args.device}), got {args.tokens}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device, cfg = args.device, SETTINGS[args.device]
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch", file=sys.stderr)
        return 2
    paths = args.paths.split(",")
    shapes = [s for s in shapes_for(device, args.quick, args.models, args.tokens) if s["path"] in paths]
    only = set(args.only.split(",")) if args.only else None
    providers = [p for p in P.all_providers() if p.path in paths and (only is None or p.name in only)]
    dtype_name = cfg["dtype"]
    dtype = getattr(torch, dtype_name)
    date = datetime.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{device}-{date}")

    print(f"gvpo-kernels bench: {device_name(device)}, {dtype_name}, {len(shapes)} shapes x "
          f"{len(providers)} providers{' (quick)' if args.quick else ''}", flush=True)
    floors = measure_floors(shapes, device, dtype)
    print(f"floors: {report.floors_line(floors)}", flush=True)
    meta = {"date": date, "device": device, "device_name": device_name(device), "dtype": dtype_name,
            "group_size": GROUP_SIZE, "quick": args.quick, "versions": versions(), "floors": floors,
            "platform": platform.platform(), "check": {"seqs": CHECK_SEQS, "max_len": CHECK_LEN,
                                                       "tolerance": {dtype_name: _tolerance(dtype)}},
            "floor_definition": FLOOR_DEFINITION}
    data = {"meta": meta, "shapes": shapes, "results": []}
    by_key = {(s["path"], s["name"]): s for s in shapes}
    quick = args.quick

    def task_for(shape, provider):
        return dict(path=shape["path"], provider=provider.name, shape=shape, dtype=dtype_name, device=device,
                    group_size=GROUP_SIZE, check_seqs=CHECK_SEQS, check_len=min(shape["seq_len"], CHECK_LEN),
                    seed=0, warmup=cfg.get("quick_warmup" if quick else "warmup", cfg["warmup"]),
                    reps=cfg.get("quick_reps" if quick else "reps"), min_reps=2 if quick else 3,
                    max_time_s=cfg.get("quick_max_time_s" if quick else "max_time_s"),
                    warmup_ms=cfg.get("warmup_ms"), rep_ms=cfg.get("quick_rep_ms" if quick else "rep_ms"))

    def on_result(result):
        result["elapsed_s"] = round(time.perf_counter() - start, 1)
        data["results"].append(result)
        add_derived(data["results"], by_key, floors, dtype.itemsize)
        _progress(result, time.perf_counter() - start)
        data["meta"]["wall_s"] = time.perf_counter() - start
        _write_json(stem + ".json", data)

    # Smallest token counts first, both paths: a run stopped by its budget still covers every provider and path.
    tasks, skipped = [], []
    for shape in sorted(shapes, key=lambda s: s["tokens"]):
        for provider in (p for p in providers if p.path == shape["path"]):
            reason = provider.unavailable(device)
            (skipped if reason else tasks).append((task_for(shape, provider), provider, reason))
    for task, provider, reason in skipped:
        on_result(dict(_placeholder(task, "skipped", reason), computes=provider.computes, note=provider.note))
    if device == "cpu" and not args.in_process:  # one fresh process per provider and path, its shapes in order
        batches = {}
        for task, _, _ in tasks:
            batches.setdefault((task["path"], task["provider"]), []).append(task)
        # eager and this package's backends first (both paths), the alternatives after them: a run stopped by
        # its budget on a busy machine still has every backend and its baseline
        batches = sorted(batches.values(), key=lambda b: not (b[0]["provider"] == "eager"
                                                               or b[0]["provider"].startswith("gvpo-")))
    else:
        batches = [[task] for task, _, _ in tasks]
    last_shape = None
    for batch in batches:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            for task in batch:
                on_result(_placeholder(task, "skipped", f"time budget (--budget-s {args.budget_s:.0f}) ran out"))
            continue
        batch_shapes = [t["shape"] for t in batch]
        if batch_shapes != last_shape:  # the floors again, keeping the best (see measure_floors)
            measure_floors(batch_shapes, device, dtype, floors, reps=3)
            last_shape = batch_shapes
        if len(batch) > 1 or (device == "cpu" and not args.in_process):
            timeout = cfg["quick_timeout_s" if quick else "timeout_s"] * len(batch)
            run_in_subprocess(batch, timeout, on_result)
        else:
            on_result(run_in_process(batch[0]))
    table = report.markdown(data)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print("\n" + table)
    problem = report.plot(data, stem + ".png")
    print(problem or f"wrote {stem}.json, {stem}.md, {stem}.png", f"in {time.perf_counter() - start:.0f} s")
    return 0


def _tolerance(dtype):
    import measure

    return measure.TOLERANCE[dtype]


def _progress(r: dict, elapsed: float) -> None:
    figures = ""
    if r.get("time_ms") is not None:
        figures = f"{r['time_ms']:.3g} ms, {r['peak_mib']:.4g} MiB, x{r.get('x_floor', 0):.3g} floor"
    print(f"[{elapsed:6.0f} s] {r['path']:6} {r['shape']:32} {r['provider']:20} {r['status']:14} {figures} "
          f"{r['reason'] if r['status'] not in report.MEASURED else ''}", flush=True)


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
