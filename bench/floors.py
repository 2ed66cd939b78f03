"""The floors: a time no provider can beat on this device, the work every one of them must do at the best rate this
device reached in the same run on plain kernels that do nothing else (best of several calls, into preallocated
outputs, on the run's threads), the best over all such kernels, whichever shape gave it:

    linear path: 6 N H V flops (the logits once, d_hidden and d_weight) at the peak matmul rate;
    logits path: 2 N V elements (each logit read once, each gradient element written once) at the peak bandwidth.
"""

from __future__ import annotations

import math
import time

import torch

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
    """GB/s (bytes read + written) of "read <n>" (a sum), "copy <n>" and "update <n>" (negated in place)."""
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


def _mm(a, b, out):
    return lambda: torch.mm(a, b, out=out)


def _matmul_probes(shapes: list[dict], dtype: torch.dtype, device: str):
    """(name, flops, fn, kind) of each GEMM probe: per (H, V) of the linear shapes, its three GEMMs on min(N, 4096)
    tokens (logits = hidden @ weight.T, d_hidden = g @ weight, d_weight = g.T @ hidden); on the CPU also one-thread
    blocks of each (a slice of the vocabulary x BLOCK_TOKENS tokens, the output in L2); a square GEMM. kind:
    "shape", "block" (its rate counts times the run's threads) or "square"."""
    made = {}
    for s in shapes:
        if s["path"] == "linear":
            made.setdefault(f"H{s['hidden']} V{s['vocab']}", (s["hidden"], s["vocab"], min(s["tokens"], 4096)))
    for key, (h, v, rows) in made.items():
        x = torch.randn(rows, h, device=device, dtype=dtype)
        w = torch.randn(v, h, device=device, dtype=dtype)
        z = torch.randn(rows, v, device=device, dtype=dtype)
        flops = 2 * rows * h * v
        yield f"{key} logits", flops, _mm(x, w.T, z), "shape"
        yield f"{key} d_hidden", flops, _mm(z, w, torch.empty_like(x)), "shape"
        yield f"{key} d_weight", flops, _mm(z.T, x, torch.empty_like(w)), "shape"
        if device == "cpu":
            r = min(rows, BLOCK_TOKENS)
            b = max(8, min(v, BLOCK_BYTES // (x.element_size() * r)))
            xb, wb, zb = x[:r], w[:b], torch.empty(b, r, dtype=dtype)
            flops = 2 * b * r * h
            yield f"{key} block logits", flops, _mm(wb, xb.T, zb), "block"
            yield f"{key} block d_hidden", flops, _mm(zb.T, wb, torch.empty(r, h, dtype=dtype)), "block"
            yield f"{key} block d_weight", flops, _mm(zb, xb, torch.empty(b, h, dtype=dtype)), "block"
    n = SQUARE[device]
    a, b, c = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
    yield f"square {n}", 2 * n**3, _mm(a, b, c), "square"


def matmul_tflops(shapes, dtype, device, reps, kinds=("shape", "block", "square")) -> dict[str, float]:
    """TFLOP/s of each GEMM probe of these kinds; a one-thread probe runs with torch.set_num_threads(1)."""
    threads = torch.get_num_threads()
    out = {}
    for name, flops, fn, kind in _matmul_probes(shapes, dtype, device):
        if kind not in kinds:
            continue
        if kind == "block":
            name, flops = f"{name} x{threads} threads", flops * threads
            torch.set_num_threads(1)
        try:
            ms = _best_ms(fn, device, reps)
        finally:
            torch.set_num_threads(threads)
        out[name] = flops / (ms * 1e-3) / 1e12
    return out


def measure_floors(shapes: list[dict], device: str, dtype: torch.dtype, floors: dict | None = None,
                   reps: int = 7) -> dict:
    """The bandwidth probes (for logits shapes) and the matmul probes (for linear ones), each keeping its best of
    these and the earlier measurements in ``floors``, and the peaks: {"gbps": {probe: GB/s}, "tflops": {...},
    "peak_gbps", "peak_gbps_probe", "peak_tflops", "peak_tflops_probe"}. Measured at a run's start and again
    (fewer repeats) before other shapes, so that a moment of contention lowers no floor (on the CPU, where the
    one-thread blocks are faster, the whole shape's GEMMs only at the start: they take long)."""
    floors = floors or {"gbps": {}, "tflops": {}}
    measured = {}
    numels = [s["tokens"] * s["vocab"] for s in shapes if s["path"] == "logits"]
    if numels:
        measured["gbps"] = bandwidth_gbps(numels, dtype, device, reps)
    if any(s["path"] == "linear" for s in shapes):
        again = device == "cpu" and bool(floors["tflops"])
        measured["tflops"] = matmul_tflops(shapes, dtype, device, reps,
                                           ("block", "square") if again else ("shape", "block", "square"))
    for unit, rates in measured.items():
        for probe, rate in rates.items():
            floors[unit][probe] = max(rate, floors[unit].get(probe, 0.0))
        best = max(floors[unit], key=floors[unit].get)
        floors[f"peak_{unit}"], floors[f"peak_{unit}_probe"] = floors[unit][best], best
    if device == "cuda":
        torch.cuda.empty_cache()  # the GPU's memory back to the measurements
    return floors


def floor_ms(shape: dict, floors: dict, itemsize: int) -> float:
    """The shape's floor in ms (FLOOR_DEFINITION); itemsize: bytes per element of the run's dtype."""
    n, v = shape["tokens"], shape["vocab"]
    if shape["path"] == "linear":
        return 6 * n * shape["hidden"] * v / (floors["peak_tflops"] * 1e12) * 1e3
    return 2 * n * v * itemsize / (floors["peak_gbps"] * 1e9) * 1e3


def floors_line(floors: dict) -> str:
    """The peak rates the floors use, each with the probe that reached it."""
    if "copy_gbps" in floors:  # a JSON from before the peaks (one copy bandwidth, a matmul rate per head)
        rates = ", ".join(f"{k}: {v['tflops']:.3g} TFLOP/s" for k, v in floors.get("matmul", {}).items())
        return f"copy {floors['copy_gbps']:.4g} GB/s (read + write); matmul {rates}"
    parts = [f"{floors[f'peak_{unit}']:.4g} {label}, {floors[f'peak_{unit}_probe']}"
             for unit, label in (("gbps", "GB/s (read + write)"), ("tflops", "TFLOP/s")) if f"peak_{unit}" in floors]
    return "; ".join(f"peak {part}" for part in parts) or "none measured"
