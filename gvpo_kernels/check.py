"""The self-check: every path of this package on this device against the float64 reference, and its speed
against this device's own floors.

    python -m gvpo_kernels.check [--device cpu|cuda] [--json PATH] [--full]      (or: gvpo-check ...)

Each row runs one path forward and backward through the public API with backend="auto", as a training step would:
the loss from logits and from hidden states + LM head, token log-probs with entropy from either; bf16 and fp32;
padded and packed; anchored and on-policy; a small shape (every combination) and a realistic one.

ok: every output is as close to the float64 reference as the test suite demands (PyTorch's own error at the input
dtype plus tests/helpers/cases.py's slack); err/tol is the worst output's error over its tolerance. ms: the median
forward+backward time; % of floor: the floor's time over it, the floor measured here in the same run (2 N V
elements at the copy bandwidth for the logits paths; 6 N H V flops at torch.mm's best rate at the path's GEMM
shapes for the linear ones). Peak memory: CUDA's max allocated, or on the CPU the growth of peak RSS. backend: what
backend="auto" picks here, and "-> torch" where a kernel could not compile or launch and the call fell back
(``ops.select.last_backend``). Exit status 1 when any row is not ok.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

import gvpo_kernels as gk
from gvpo_kernels import functional
from gvpo_kernels.ops.select import last_backend

# the test suite's tolerances (tests/cases.py): slack over PyTorch's own error, and the entropy's scale floor
SLACK = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
ENTROPY_FLOOR = 1e-3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PATHS = ("loss(logits)", "loss(hidden)", "logprobs+entropy(logits)", "logprobs+entropy(hidden)")
GROUP_SIZE = 4


@dataclass(frozen=True)
class Shape:
    """num_seqs sequences of up to seq_len tokens (packed: lengths in [seq_len / 2, seq_len]), in groups of
    GROUP_SIZE; vocabulary V, hidden size H (linear paths)."""

    name: str
    num_seqs: int
    seq_len: int
    vocab: int
    hidden: int

    def describe(self, layout: str) -> str:
        return f"{self.name} {self.num_seqs}x{self.seq_len} V={self.vocab} H={self.hidden} {layout}"


SHAPES = {
    # CPU: a realistic vocabulary (Llama-2's) at a size the 2-core CPU checks in seconds
    "cpu": (Shape("small", 8, 24, 1001, 64), Shape("realistic", 8, 48, 32000, 128)),
    # GPU: Qwen2.5-0.5B's LM head at 2048 tokens (the float64 reference needs ~10 GB at this shape)
    "cuda": (Shape("small", 8, 24, 1001, 64), Shape("realistic", 8, 256, 151936, 896)),
}


@dataclass
class Row:
    path: str
    dtype: str
    shape: str
    layout: str
    anchored: bool | None  # None: a path without an anchor (the log-probs)
    backend: str = ""
    ok: bool = False
    err_tol: float = math.nan  # the worst output's error / its tolerance
    worst: str = ""  # which output that was
    ms: float = math.nan
    floor_ms: float = math.nan
    pct_floor: float = math.nan
    peak_mib: float = math.nan
    tokens: int = 0
    note: str = ""
    errors: dict = field(default_factory=dict)  # output -> [error, tolerance]


# ----------------------------------------------------------------------------------------------------------------
# inputs


def make_inputs(shape: Shape, layout: str, dtype: torch.dtype, anchored: bool, linear: bool, device,
                seed: int = 0) -> dict:
    """Random inputs of one row: logits, or with ``linear`` hidden and weight, then labels, rewards, the keyword
    arguments (mask, group_size, cu_seqlens, ref_logprobs) and the log-prob paths' upstream gradients; every
    tensor on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "padded":
        lengths = [shape.seq_len] * shape.num_seqs
        tokens = (shape.num_seqs, shape.seq_len)
    else:
        lengths = torch.randint(max(1, shape.seq_len // 2), shape.seq_len + 1, (shape.num_seqs,),
                                generator=gen).tolist()
        tokens = (sum(lengths),)
    labels = torch.randint(0, shape.vocab, tokens, generator=gen)
    mask = torch.rand(tokens, generator=gen) < 0.8  # the response tokens
    rewards = torch.randn(shape.num_seqs, generator=gen)
    kwargs = dict(mask=mask, group_size=GROUP_SIZE)
    if anchored:
        kwargs["ref_logprobs"] = -5.0 * torch.rand(tokens, generator=gen)
    if layout == "packed":
        kwargs["cu_seqlens"] = torch.tensor([0] + lengths).cumsum(0)
    upstream = [torch.randn(tokens, generator=gen) for _ in range(2)]  # the log-prob paths' random combination

    def put(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    inputs = dict(labels=put(labels), rewards=put(rewards), kwargs={k: put(v) for k, v in kwargs.items()},
                  upstream=[put(u) for u in upstream])
    if linear:
        inputs["hidden"] = put(torch.randn(*tokens, shape.hidden, generator=gen).to(dtype))
        inputs["weight"] = put((torch.randn(shape.vocab, shape.hidden, generator=gen) / shape.hidden**0.5).to(dtype))
    else:
        inputs["logits"] = put((2.0 * torch.randn(*tokens, shape.vocab, generator=gen)).to(dtype))
    return inputs


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def run_path(path: str, inputs: dict, module, dtype=None, **extra):
    """One forward and backward of ``path`` with ``module`` (gvpo_kernels or gvpo_kernels.reference), on fresh
    leaves (cast to ``dtype`` if given) -> {output name: tensor}."""
    labels, kwargs = inputs["labels"], dict(inputs["kwargs"])
    linear = path.endswith("(hidden)")
    leaves = _leaves([inputs["hidden"], inputs["weight"]] if linear else [inputs["logits"]], dtype)
    names = ["d_hidden", "d_weight"] if linear else ["grad_logits"]
    if path.startswith("loss"):
        rewards = inputs["rewards"].to(torch.float64 if dtype == torch.float64 else torch.float32)
        fn = module.linear_gvpo_loss if linear else module.gvpo_loss
        loss, stats = fn(*leaves, labels, rewards, return_stats=True, **kwargs, **extra)
        loss.backward()
        outs = {"loss": loss.detach(), **dict(zip(stats._fields, stats))}
    else:
        kwargs.pop("group_size"), kwargs.pop("ref_logprobs", None)
        fn = module.linear_token_logprobs if linear else module.token_logprobs
        logprob, entropy = fn(*leaves, labels, return_entropy=True, **kwargs, **extra)
        up_lp, up_ent = inputs["upstream"]
        ((logprob * up_lp.to(logprob.dtype)).sum() + (entropy * up_ent.to(entropy.dtype)).sum()).backward()
        outs = {"logprob": logprob.detach(), "entropy": entropy.detach()}
    outs.update((name, leaf.grad) for name, leaf in zip(names, leaves))
    return outs


# ----------------------------------------------------------------------------------------------------------------
# comparison


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """|got - want| / |want| (norms over all elements, the scale at least ``floor`` per element), as the tests'."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = max(want.norm().item(), floor * want.numel() ** 0.5)
    diff = (got - want).norm().item()
    return diff / scale if scale > 0 else diff


def compare(got: dict, baseline: dict, oracle: dict, dtype: torch.dtype) -> dict:
    """{output: (error, tolerance)}: ours against the float64 oracle; the tolerance PyTorch's own error (the
    reference at the input dtype) plus the dtype's slack. A non-finite output gets an infinite error."""
    out = {}
    for name, want in oracle.items():
        if want is None or got.get(name) is None:
            continue
        floor = ENTROPY_FLOOR if "entropy" in name else 0.0
        finite = bool(torch.isfinite(got[name]).all())
        err = rel_err(got[name], want, floor) if finite else math.inf
        out[name] = (err, rel_err(baseline[name], want, floor) + SLACK[dtype])
    return out


# ----------------------------------------------------------------------------------------------------------------
# timing, floors, memory


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, reps: int, budget_s: float) -> float:
    """Median time of fn() in ms over up to ``reps`` calls (fewer once ``budget_s`` has passed, at least 3); the
    caller has warmed it up."""
    _sync(device)
    times, start = [], time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _best_ms(fn, device, reps: int = 5) -> float:
    fn()
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, 1e3 * (time.perf_counter() - t0))
    return best


class Floors:
    """This device's own rates, measured once per kind in this run: copy bandwidth (GB/s, bytes read + written)
    and the torch.mm rate (TFLOP/s, best of the three GEMMs of a linear shape in its dtype)."""

    def __init__(self, device):
        self.device = device
        self.copy_gbps = None
        self.mm_tflops = {}  # (tokens, H, V, dtype) -> TFLOP/s

    def copy(self) -> float:
        if self.copy_gbps is None:
            numel = (256 << 20 if self.device.type == "cuda" else 64 << 20) // 4
            src = torch.randn(numel, device=self.device)
            dst = torch.empty_like(src)
            self.copy_gbps = 2 * src.nbytes / (_best_ms(lambda: dst.copy_(src), self.device) * 1e-3) / 1e9
            del src, dst
        return self.copy_gbps

    def matmul(self, tokens: int, hidden: int, vocab: int, dtype) -> float:
        key = (tokens, hidden, vocab, dtype)
        if key not in self.mm_tflops:
            kw = dict(device=self.device, dtype=dtype)
            x, w = torch.randn(tokens, hidden, **kw), torch.randn(vocab, hidden, **kw)
            g = torch.randn(tokens, vocab, **kw)
            d_x, d_w = torch.empty_like(x), torch.empty_like(w)
            flops = 2 * tokens * hidden * vocab
            rates = [flops / (_best_ms(fn, self.device, 3) * 1e-3) / 1e12 for fn in (
                lambda: torch.mm(x, w.T, out=g), lambda: torch.mm(g, w, out=d_x), lambda: torch.mm(g.T, x, out=d_w))]
            self.mm_tflops[key] = max(rates)
            del x, w, g, d_x, d_w
        return self.mm_tflops[key]

    def floor_ms(self, path: str, tokens: int, shape: Shape, dtype) -> float:
        """The row's floor (module docstring), over all its tokens (scored or not: the kernels see them all)."""
        if path.endswith("(hidden)"):  # the rate at the shape's padded token count, whatever the layout; a 16-bit
            # GEMM may run in fp32 (this package's C++ kernels do): the better of the dtype's rate and fp32's
            size = (shape.num_seqs * shape.seq_len, shape.hidden, shape.vocab)
            rate = max(self.matmul(*size, dtype), self.matmul(*size, torch.float32))
            return 6 * tokens * shape.hidden * shape.vocab / (rate * 1e12) * 1e3
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * tokens * shape.vocab * itemsize / (self.copy() * 1e9) * 1e3


def _rss_kib(key: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_mib(fn, device) -> float:
    """Peak memory of one fn() call in MiB above what was in use before it (see the module docstring), or nan."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    except OSError:
        fn()
        return math.nan
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    return math.nan if before is None or peak is None else max(0, peak - before) / 1024


# ----------------------------------------------------------------------------------------------------------------
# rows


def backend_name(device) -> str:
    """What backend="auto" picks for tensors on ``device``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return functional.select_backend("auto", device).name


def plan_rows(full: bool) -> list:
    """(path, dtype name, shape index, layout, anchored) of every row (module docstring)."""
    rows = []
    for path in PATHS:
        anchors = (False, True) if path.startswith("loss") else (None,)
        for dtype in DTYPES:
            for layout in ("padded", "packed"):
                rows += [(path, dtype, 0, layout, a) for a in anchors]
    if full:
        return rows + [(p, d, 1, lay, a) for p, d, _, lay, a in rows]
    # the realistic shape: every path in both dtypes; the layouts and anchor modes alternate across them
    for i, path in enumerate(PATHS):
        for j, dtype in enumerate(DTYPES):
            layout = ("padded", "packed")[(i + j) % 2]
            rows.append((path, dtype, 1, layout, (j == 0) == (i == 0) if path.startswith("loss") else None))
    return rows


def check_row(path, dtype_name, shape: Shape, layout, anchored, device, floors: Floors, backend: str,
              reps: int, budget_s: float) -> Row:
    dtype = DTYPES[dtype_name]
    row = Row(path, dtype_name, shape.describe(layout), layout, anchored, backend=backend)
    inputs = make_inputs(shape, layout, dtype, bool(anchored), path.endswith("(hidden)"), device)
    row.tokens = inputs["labels"].numel()
    try:
        oracle = run_path(path, inputs, gk.reference, torch.float64)
        baseline = run_path(path, inputs, gk.reference)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        row.note = f"skipped: the float64 reference ran out of memory ({str(exc).splitlines()[0][:80]})"
        return row
    except Exception as exc:  # noqa: BLE001  (a failed row, not a crashed check)
        row.note = f"error in the reference: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return row
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = run_path(path, inputs, gk)
        except Exception as exc:  # noqa: BLE001  (reported as a failed row, with the error)
            row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            return row
    ran = last_backend()  # the backend of the call's backward, after any fallback (ops.select)
    fallbacks = [str(w.message) for w in caught if "backend" in str(w.message)]
    if fallbacks or ran != row.backend:
        row.backend += f" -> {ran}"
        row.note = (fallbacks or [""])[0][:200]
    errors = compare(got, baseline, oracle, dtype)
    row.errors = {k: [e, t] for k, (e, t) in errors.items()}
    worst = max(errors, key=lambda k: errors[k][0] / errors[k][1])
    row.worst, row.err_tol = worst, errors[worst][0] / errors[worst][1]
    row.ok = all(e <= t for e, t in errors.values())
    del oracle, baseline, got
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def step():
        run_path(path, inputs, gk)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row.peak_mib = peak_mib(step, device)  # also the warm-up of the timing
        row.ms = median_ms(step, device, reps, budget_s)
    row.floor_ms = floors.floor_ms(path, row.tokens, shape, dtype)
    row.pct_floor = 100 * row.floor_ms / row.ms
    return row


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows) -> str:
    head = (f"{'path':25s} {'dtype':5s} {'shape':40s} {'anchor':6s} {'backend':14s} {'ok':4s} {'err/tol':>7s} "
            f"{'ms':>9s} {'% floor':>7s} {'peak MiB':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        anchor = "-" if r.anchored is None else ("yes" if r.anchored else "no")
        status = "ok" if r.ok else ("skip" if r.note.startswith("skipped") else "FAIL")
        lines.append(f"{r.path:25s} {r.dtype:5s} {r.shape:40s} {anchor:6s} {r.backend:14s} {status:4s} "
                     f"{_fmt(r.err_tol, '7.3f')} {_fmt(r.ms, '9.2f')} {_fmt(r.pct_floor, '7.1f')} "
                     f"{_fmt(r.peak_mib, '8.1f')}" + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(device, full: bool = False, reps: int = 5, budget_s: float = 0.3, out=None) -> dict:
    """Check every row on ``device``; the report (module docstring) as a dict, the table printed to ``out``
    (default: stdout)."""
    out = out or sys.stdout
    t0 = time.time()
    floors = Floors(device)
    backend = backend_name(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    print(f"gvpo_kernels {gk.__version__} self-check on {device_name(device)}: torch {torch.__version__}, "
          f"triton {triton_version}; backend='auto' runs {backend}", file=out, flush=True)
    rows = []
    for path, dtype_name, shape_index, layout, anchored in plan_rows(full):
        shape = SHAPES["cuda" if device.type == "cuda" else "cpu"][shape_index]
        rows.append(check_row(path, dtype_name, shape, layout, anchored, device, floors, backend, reps, budget_s))
    failed = [r for r in rows if not r.ok and not r.note.startswith("skipped")]
    print(table(rows), file=out)
    seconds = time.time() - t0
    print(f"floors: copy {_fmt(floors.copy_gbps, '.4g')} GB/s (read + write); torch.mm "
          + (", ".join(f"{_fmt(v, '.3g')} TFLOP/s at N {k[0]} H {k[1]} V {k[2]} {str(k[3]).removeprefix('torch.')}"
                       for k, v in floors.mm_tflops.items()) or "-"), file=out)
    print(f"{len(rows) - len(failed)} of {len(rows)} rows ok, {len(failed)} failed, {seconds:.1f} s", file=out)
    return dict(device=device_name(device), device_type=device.type, torch=torch.__version__, triton=triton_version,
                gvpo_kernels=gk.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"), backend=backend,
                floors=dict(copy_gbps=floors.copy_gbps,
                            mm_tflops=[dict(tokens=k[0], hidden=k[1], vocab=k[2], dtype=str(k[3]), tflops=v)
                                       for k, v in floors.mm_tflops.items()]),
                ok=not failed, seconds=seconds, rows=[asdict(r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gvpo-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to check (default: cuda where there is a GPU, ROCm included, else cpu)")
    ap.add_argument("--json", help="also write the report (every row, the floors, versions) to this file")
    ap.add_argument("--full", action="store_true", help="every combination at the realistic shape too")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gvpo-check: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    report = run(torch.device(args.device), full=args.full)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
