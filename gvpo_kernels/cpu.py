"""The C++ CPU backend (backend.Backend): builds and loads csrc/, and drives its kernels.

Build: on first use (the first CPU call with backend "auto" or "cpu"), torch.utils.cpp_extension compiles
csrc/rows.cpp and csrc/linear.cpp with ``-O3 -march=native -fopenmp`` (about 8 s on two cores, once) into
``~/.cache/gvpo_kernels/cpu-<key>`` (``$GVPO_KERNELS_CACHE`` replaces ``~/.cache/gvpo_kernels``), saying so on
stderr. <key> hashes what the build depends on (sources, flags, torch, Python, the compiler, this CPU), so another
environment gets its own build and a build is never reused where it could not run. Without a C++ compiler or
ninja, :func:`unavailable_reason` says so, and backend="auto" runs the torch backend instead.

The kernels (``torch.ops.gvpo.*``): token_forward / token_backward (csrc/rows.cpp), one vectorised float32 pass
per row of logits, rows in parallel; linear_lse / linear_grad (csrc/linear.cpp), the linear path on a chunk of
scored tokens, GEMMs included, in which each thread owns a range of the vocabulary. The GEMM schedule over the
chunks is gvpo_kernels/schedule.py's.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import torch

from . import layout, torch_impl
from ._alloc import empty
from .backend import Coefs, Grads, LogitSpec, TokenStats

CHUNK_BYTES = 32 << 20  # linear path, three GEMMs: the logits of a chunk's tokens, kept whole, at most this many bytes
CHUNK_HIDDEN_BYTES = 4 << 20  # linear path, four GEMMs: a chunk's float32 d_hidden, one per thread, at most this
BLOCK_BYTES = 1 << 20  # a thread's block of logits (block_rows x chunk tokens), consumed while in its L2 cache
WEIGHT_BLOCK_BYTES = 2 << 20  # bfloat16 / float16 weight: a thread's block of weight rows converted to float32
# The sources: gvpo_kernels/csrc in an installed wheel, the repository's csrc/ in a checkout (editable install).
_PACKAGE = Path(__file__).resolve().parent
CSRC = _PACKAGE / "csrc" if (_PACKAGE / "csrc" / "rows.cpp").is_file() else _PACKAGE.parent / "csrc"
SOURCES = ["rows.cpp", "linear.cpp"]
HEADERS = ["gvpo_math.h"]
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fopenmp-simd", "-fno-math-errno",
          "-fno-trapping-math", "-ffp-contract=off"]  # each rounding where gvpo_math.h writes it
LDFLAGS = ["-fopenmp"]
COMPILING = "gvpo_kernels: compiling the C++ kernels (once, ~10 s) into {}"
STALE_LOCK_S = 30 * 60  # a build lock older than this was left by a killed build

name = "cpu"
group_stage = torch_impl.group_stage

_lock = threading.Lock()
_state = {}  # "reason": None once loaded, or why the kernels cannot run


# ----------------------------------------------------------------------------------------------------------------
# build and load


def unavailable_reason(device=None):
    """None when the C++ kernels can run (on the CPU: they are built on the first call), else a sentence saying
    why not."""
    if device is not None and torch.device(device).type != "cpu":
        return f"the C++ kernels run on CPU tensors; these are on {torch.device(device).type}"
    with _lock:
        if "reason" not in _state:
            _state["reason"] = _build_and_load()
    return _state["reason"]


def _kernels():
    """torch.ops.gvpo, once the extension is loaded; RuntimeError saying why when it cannot be."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return torch.ops.gvpo


def _build_and_load():
    """Load the extension from its build directory, compiling it there first if it is not built yet; None on
    success, else why it failed."""
    problem = _toolchain_problem()
    if problem is not None:
        return f"the C++ CPU kernels (csrc/) cannot be built: {problem}"
    build_dir = _build_dir(_build_facts())
    library = build_dir / "gvpo_cpu.so"
    if library.is_file():
        try:  # built before in this very environment: no ninja, no compiler
            torch.ops.load_library(str(library))
            return None
        except (OSError, RuntimeError):  # still being written by another process: its build lock says when done
            pass
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(build_dir / "lock")
    print(COMPILING.format(build_dir), file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name="gvpo_cpu", sources=[str(CSRC / s) for s in SOURCES], extra_cflags=CFLAGS,
                           extra_ldflags=LDFLAGS, build_directory=str(build_dir), is_python_module=False)
    except Exception as exc:  # a compiler error, a missing header, a failed load: say which, fall back
        detail = str(exc).strip().splitlines()
        return (f"the C++ CPU kernels (csrc/) failed to build or load ({type(exc).__name__}: "
                f"{detail[-1] if detail else ''}); the build log is in {build_dir}")
    return None


def _remove_stale_lock(lock: Path, max_age_s: float = STALE_LOCK_S) -> None:
    """cpp_extension's build lock, left behind by a build that was killed, makes every later process wait on it
    forever: remove it once it is older than any build takes (a live build holds it for ~10 s to a few minutes)."""
    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
    except OSError:  # no lock, or another process removed it first
        pass


def _toolchain_problem():
    """None when a C++ compiler and ninja are on the PATH (ninja from the pip package counts), else what is missing."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found (looked for {compiler!r}; install g++ or set CXX)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # the pip package ships the binary; torch.utils.cpp_extension looks for it on the PATH
        except ImportError:
            return "ninja is not installed (pip install ninja)"
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    if not CSRC.is_dir():
        return f"the sources are not here ({CSRC} is missing: install from a source checkout)"
    return None


def _build_facts() -> dict:
    """Everything a build depends on, as strings: the sources, the flags, torch (version and where it is
    installed: its headers and libraries), Python (version and headers), the compiler (path and version) and
    the CPU (what -march=native compiles for). Two environments differing in any of them get two builds."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or ""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    sources = hashlib.sha256(b"".join((CSRC / name).read_bytes() for name in SOURCES + HEADERS)).hexdigest()
    return dict(sources=sources, source_dir=str(CSRC), flags=repr((CFLAGS, LDFLAGS)),
                torch=f"{torch.__version__} {Path(torch.__file__).parent}",
                python=f"{sys.version} {sysconfig.get_paths()['include']}",
                compiler=f"{compiler} {version.splitlines()[0] if version else ''}",
                cpu=f"{platform.machine()} {_cpu_model()}")


def _build_dir(facts: dict) -> Path:
    """~/.cache/gvpo_kernels/cpu-<hash of the build facts> ($GVPO_KERNELS_CACHE replaces ~/.cache/gvpo_kernels):
    one directory per environment, side by side, so that alternating environments never rebuilds."""
    root = os.environ.get("GVPO_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gvpo_kernels")
    key = hashlib.sha256(repr(sorted(facts.items())).encode()).hexdigest()[:16]
    return Path(root) / f"cpu-{key}"


def _cpu_model() -> str:
    """The CPU's model name and feature flags (what -march=native compiles for), '' where unknown."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


# ----------------------------------------------------------------------------------------------------------------
# the logits path


def _spec_args(spec: LogitSpec):
    return spec.s, spec.cap, spec.cap_scale


def token_forward(rows: torch.Tensor, target: torch.Tensor, spec: LogitSpec, entropy: bool) -> TokenStats:
    """rows (B', T', V), target (N,) -> TokenStats, one vectorised pass over each scored row (rows in parallel)."""
    f32 = dict(dtype=torch.float32, device=rows.device)
    out = TokenStats(empty(target.shape, **f32), empty((2, target.numel()), **f32),
                     empty(target.shape, **f32) if entropy else None)
    _kernels().token_forward(rows, target, *_spec_args(spec), out.logprob, out.norm, out.entropy)
    return out


def token_backward(rows, target, norm, coefs: Coefs, spec: LogitSpec, out) -> None:
    """Write dx (backend.Coefs) into out (B', T', V), which may be rows itself."""
    _kernels().token_backward(rows, target, norm, coefs.logprob, *_spec_args(spec), out, coefs.token_entropy,
                              coefs.entropy)


# ----------------------------------------------------------------------------------------------------------------
# the linear path: chunk kernels for the shared schedule (gvpo_kernels.schedule)


def linear_work(rows, weight, bias, target, spec: LogitSpec, needs, entropy: bool) -> "_LinearWork":
    """rows (B', T', H) hidden, weight (V, H), bias (V,) or None: the chunk kernels of one linear call
    (csrc/linear.cpp: linear_lse, linear_grad)."""
    return _LinearWork(rows, weight, bias, target, spec, needs, entropy)


class _LinearWork:
    """One linear call's chunks of scored rows (unscored rows cost nothing), the C++ passes over a chunk, and the
    float32 gradient accumulators (backend.LinearWork)."""

    def __init__(self, rows, weight, bias, target, spec: LogitSpec, needs, entropy: bool):
        self.rows_shape, self.bias, self.target, self.spec, self.entropy = rows.shape, bias, target, spec, entropy
        self.weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        self.flat_hidden = layout.flat_rows(rows)  # a view, except for hidden that is not (copy, N x H)
        self.scored = (target >= 0).nonzero().squeeze(1)
        self._buffer, self._kept = None, None
        device, dtype, (vocab, hidden_size) = rows.device, rows.dtype, weight.shape
        f32 = dict(dtype=torch.float32, device=device)
        all_scored = self.scored.numel() == target.numel()  # then every row of d_hidden is written by a chunk
        self.d_hidden = ((torch.empty if all_scored else torch.zeros)(self.flat_hidden.shape, dtype=dtype,
                                                                       device=device) if needs[0] else None)
        self.d_weight = torch.empty((vocab, hidden_size), **f32) if needs[1] else None  # the first chunk writes it
        self.d_bias = torch.empty(vocab, **f32) if needs[2] and bias is not None else None
        self.first_chunk = True

    def logits_dtype(self):
        """The dtype of the kernels' logits: float64 for float64 inputs, else float32 (csrc/linear.cpp)."""
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def chunk_rows(self, keep: bool) -> int:
        vocab, hidden_size = self.weight.shape
        if keep:  # the chunk's logits are kept whole
            return max(1, CHUNK_BYTES // (self.logits_dtype().itemsize * vocab))
        return max(64, CHUNK_HIDDEN_BYTES // (4 * max(hidden_size, 1)))  # bounds the per-thread d_hidden sums

    def _rows(self, tokens):
        """The chunk's hidden rows (r, H) contiguous, and a slice of tokens where they are one contiguous run
        (every token scored, say: no gather, no scatter), else None."""
        num = tokens.numel()
        first = int(tokens[0]) if num else 0
        span = slice(first, first + num) if num and int(tokens[-1]) == first + num - 1 else None
        hidden = self.flat_hidden[span] if span else self.flat_hidden.index_select(0, tokens)
        return hidden.contiguous(), span

    def _logits_buffer(self, num_rows: int):
        """A (V, num_rows) view of one buffer reused by every chunk (allocated for the largest)."""
        vocab = self.weight.shape[0]
        if self._buffer is None or self._buffer.numel() < vocab * num_rows:
            self._buffer = torch.empty(vocab * num_rows, dtype=self.logits_dtype(), device=self.weight.device)
        return self._buffer[: vocab * num_rows].view(vocab, num_rows)

    def _block_rows(self, num_tokens: int) -> int:
        rows = BLOCK_BYTES // (4 * max(num_tokens, 1))
        if self.weight.dtype in (torch.bfloat16, torch.float16):  # bounds the kernels' float32 copy of the block
            rows = min(rows, WEIGHT_BLOCK_BYTES // (4 * max(self.weight.shape[1], 1)))
        return max(16, rows)

    def forward(self, tokens, keep: bool) -> TokenStats:
        hidden, span = self._rows(tokens)
        target = self.target[span] if span else self.target[tokens]
        f32 = dict(dtype=torch.float32, device=target.device)
        out = TokenStats(empty(target.shape, **f32), empty((2, target.numel()), **f32),
                         empty(target.shape, **f32) if self.entropy else None)
        logits_t = self._logits_buffer(tokens.numel()) if keep else None
        _kernels().linear_lse(hidden, self.weight, self.bias, target, *_spec_args(self.spec),
                              self._block_rows(tokens.numel()), out.logprob, out.norm, logits_t, out.entropy)
        self._kept = (hidden, span, logits_t) if keep else None
        return out

    def backward(self, tokens, norm, coefs: Coefs, kept: bool) -> None:
        hidden, span, logits_t = self._kept if kept else (*self._rows(tokens), None)
        self._kept = None
        target = self.target[span] if span else self.target[tokens]
        direct = self.d_hidden is not None and self.d_hidden.dtype == torch.float32 and span
        d_hidden = self.d_hidden[span] if direct else empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        _kernels().linear_grad(hidden, self.weight, self.bias, target, norm.contiguous(), coefs.logprob,
                               *_spec_args(self.spec), self._block_rows(tokens.numel()), logits_t, d_hidden,
                               self.d_weight, self.d_bias, not self.first_chunk, coefs.token_entropy, coefs.entropy)
        self.first_chunk = False
        if self.d_hidden is not None and not direct:
            self.d_hidden.index_copy_(0, tokens, d_hidden.to(self.d_hidden.dtype))

    def grads(self) -> Grads:
        if self.first_chunk:  # no scored row at all
            for grad in (self.d_weight, self.d_bias):
                if grad is not None:
                    grad.zero_()
        return Grads(None if self.d_hidden is None else self.d_hidden.view(self.rows_shape),
                     None if self.d_weight is None else self.d_weight.to(self.weight.dtype),
                     None if self.d_bias is None else self.d_bias.to(self.weight.dtype))
