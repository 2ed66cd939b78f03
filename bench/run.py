"""Benchmark the GVPO loss side by side with what users would pick instead, on the same inputs in one run.

    python bench/run.py [--device cpu|cuda] [--quick] [--out DIR] [--budget-s S] [--only NAME,...] [--paths ...]

For every shape and every provider (bench/providers.py) it checks the loss and gradients against
gvpo_kernels.reference, then measures forward+backward time and peak memory (bench/measure.py), and relates the
time to the floor, measured in the same run:

* linear path (hidden, LM head -> loss): 8 N H V flops (the two logit GEMMs of a method that does not store the
  logits, plus the d_hidden and d_weight GEMMs) at the matmul rate of this device, measured on a GEMM of the
  shape's own (rows x H) @ (H x V) in the run's dtype;
* logits path (logits -> loss): 3 N V elements moved (read the logits twice, write the gradient once) at the
  copy bandwidth of this device (a large tensor copy, bytes read plus bytes written).

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


def shapes_for(device: str, quick: bool) -> list[dict]:
    """The shapes of one run: every model head at every token count, for the linear and the logits path."""
    cfg = SETTINGS[device]
    tokens = cfg["quick_tokens"] if quick else cfg["tokens"]
    names = cfg.get("quick_models") if quick else None
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

def _best_ms(fn, device: str, reps: int) -> float:
    """The fastest time of fn() in ms (a floor takes the best rate the device reaches): do_bench on CUDA,
    perf_counter after one warm-up call on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=30 * reps, return_mode="min")
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return min(times)


_COPY_BUFFERS = {}  # the CPU's copy buffers, made once (drawing 64 Mi random numbers takes a while there)


def copy_bandwidth_gbps(device: str, reps: int) -> float:
    """GB/s of a large tensor copy, counting the bytes read and the bytes written."""
    if device == "cuda":  # 2 GiB of bfloat16, made anew each time (GPU memory is for the measurements)
        src = torch.randn(1 << 30, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
    else:  # 256 MiB of float32
        if not _COPY_BUFFERS:
            _COPY_BUFFERS["src"] = torch.randn(64 << 20)
            _COPY_BUFFERS["dst"] = torch.empty_like(_COPY_BUFFERS["src"])
        src, dst = _COPY_BUFFERS["src"], _COPY_BUFFERS["dst"]
    ms = _best_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def matmul_tflops(rows: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, reps: int) -> float:
    """TFLOP/s of (rows x H) @ (H x V) in dtype, the GEMM shape of the linear path, on random data."""
    a = torch.randn(rows, hidden, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype)
    ms = _best_ms(lambda: a @ w.T, device, reps)
    return 2 * rows * hidden * vocab / (ms * 1e-3) / 1e12


def _gemms(shapes: list[dict]):
    """(key "H.. V..", rows, shape) of each distinct GEMM of the linear shapes."""
    seen = {}
    for s in shapes:
        if s["path"] == "linear":
            seen.setdefault((f"H{s['hidden']} V{s['vocab']}", min(s["tokens"], 4096)), s)
    return [(key, rows, s) for (key, rows), s in seen.items()]


def measure_floors(shapes: list[dict], device: str, dtype: torch.dtype, floors: dict | None = None,
                   reps: int = 7) -> dict:
    """Measure the copy bandwidth (if a logits shape is among ``shapes``) and the matmul rate of each (H, V) of
    the linear shapes, keeping the best of these and of the earlier measurements in ``floors``. run.py measures
    all at the start, then again (fewer repeats) before each provider on the CPU or each shape on CUDA, so that a
    moment of contention on a shared machine does not lower the floor of the whole run."""
    floors = floors or {"copy_gbps": 0.0, "matmul": {}}
    if any(s["path"] == "logits" for s in shapes):
        floors["copy_gbps"] = max(floors["copy_gbps"], copy_bandwidth_gbps(device, reps))
    for key, rows, s in _gemms(shapes):
        tflops = matmul_tflops(rows, s["hidden"], s["vocab"], dtype, device, reps)
        if tflops > floors["matmul"].get(key, {"tflops": 0.0})["tflops"]:
            floors["matmul"][key] = {"rows": rows, "tflops": tflops}
    if device == "cuda":
        torch.cuda.empty_cache()  # give the measurements the whole GPU back
    return floors


def floor_ms(shape: dict, floors: dict, itemsize: int) -> float:
    n, v = shape["tokens"], shape["vocab"]
    if shape["path"] == "linear":
        rate = floors["matmul"][f"H{shape['hidden']} V{v}"]["tflops"] * 1e12
        return 8 * n * shape["hidden"] * v / rate * 1e3
    return 3 * n * v * itemsize / (floors["copy_gbps"] * 1e9) * 1e3


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
    parser.add_argument("--in-process", action="store_true",
                        help="run every measurement in this process, as on CUDA (always so on CUDA); on the CPU "
                             "this only tests the CUDA flow: its peak-RSS figures are not per provider")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device, cfg = args.device, SETTINGS[args.device]
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch", file=sys.stderr)
        return 2
    paths = args.paths.split(",")
    shapes = [s for s in shapes_for(device, args.quick) if s["path"] in paths]
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
    print(f"floors: copy {floors['copy_gbps']:.1f} GB/s; matmul "
          + ", ".join(f"{k} {v['tflops']:.3g} TFLOP/s" for k, v in floors["matmul"].items()), flush=True)
    meta = {"date": date, "device": device, "device_name": device_name(device), "dtype": dtype_name,
            "group_size": GROUP_SIZE, "quick": args.quick, "versions": versions(), "floors": floors,
            "platform": platform.platform(), "check": {"seqs": CHECK_SEQS, "max_len": CHECK_LEN,
                                                       "tolerance": {dtype_name: _tolerance(dtype)}},
            "floor_definition": {"linear": "8 N H V flops at the measured matmul rate",
                                 "logits": "3 N V elements (read logits twice, write gradient once) at the measured "
                                           "copy bandwidth"}}
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
        batches = list(batches.values())
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
