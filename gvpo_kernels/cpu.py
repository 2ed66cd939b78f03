"""The C++ CPU backend: builds and loads csrc/, and drives its kernels through the backend interface.

Build: on first use (the first CPU call with backend "auto" or "cpu"), torch.utils.cpp_extension compiles
csrc/rows.cpp and csrc/linear.cpp with ``-O3 -march=native -fopenmp`` (about 8 s on two cores, once) into
``~/.cache/gvpo_kernels/cpu-<key>`` (``$GVPO_KERNELS_CACHE`` replaces ``~/.cache/gvpo_kernels``), saying so on
stderr ("gvpo_kernels: compiling the C++ kernels ..."). <key> hashes what the build depends on (the sources, the
flags, torch's version and install path, Python's version and headers, the compiler's path and version, this
CPU): every later process of the same environment loads that build directly in ~0.1 s, another environment (a
second venv) gets its own build beside it, and a build is never reused where it could not run. Without a C++
compiler or ninja, :func:`unavailable_reason` says so, and backend="auto" runs the torch backend instead
(ops.select_backend).

The kernels (``torch.ops.gvpo.*``): token_forward and token_backward (csrc/rows.cpp), one vectorised float32 pass
per row of logits, rows in parallel; linear_lse and linear_grad (csrc/linear.cpp), the linear path on a chunk of
tokens, GEMMs included, each one parallel region in which a thread owns a range of the vocabulary. Given an
entropy tensor, the forward kernels also compute each token's entropy in the same pass, and the backward kernels
add its gradient. The backend interface (see torch_impl) over them:

    token_forward(rows, target, temperature)                   -> token_logprob (N,), lse (N,)
    group_stage                                                   torch_impl's (O(N + S), no vocabulary)
    token_backward(rows, lay, lse, grad_seq_logprob, grad_loss, temperature, out)
    linear_forward(rows, weight, bias, target, temperature)     -> token_logprob (N,), lse (N,)
    linear_backward(rows, weight, bias, lay, lse, grad_seq_logprob, grad_loss, temperature)
                                                                -> d_hidden (B', T', H), d_weight (V, H), d_bias (V,)
    linear_loss_and_grads(rows, weight, bias, lay, beta, temperature, needs, entropy=False)
                                                                -> loss, s, r, dL/ds, d_hidden, d_weight, d_bias
                                                                   (, token_entropy (N,) with entropy=True)
    token_stats_forward(rows, target, temperature)              -> token_logprob, lse, token_entropy (N,)
    token_stats_backward(rows, target, lse, token_entropy, coef_logprob, coef_entropy, temperature, out)
    linear_token_stats_forward(rows, weight, bias, target, temperature)
                                                                -> token_logprob, lse, token_entropy (N,)
    linear_token_stats_backward(rows, weight, bias, target, lse, token_entropy, coef_logprob, coef_entropy,
                                temperature)                    -> d_hidden, d_weight, d_bias

linear_loss_and_grads is what ops.linear_loss_op calls: the forward and the gradients together, with the fewest
GEMMs that the inputs allow (its docstring says when three are enough). Only scored rows are computed.
"""

from __future__ import annotations

import hashlib
import math
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

from . import torch_impl
from ._alloc import empty
from .layout import Layout

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
          "-fno-trapping-math", "-ffp-contract=off"]  # no fused x * s - lse: csrc/gvpo_math.h says why
LDFLAGS = ["-fopenmp"]
COMPILING = "gvpo_kernels: compiling the C++ kernels (once, ~10 s) into {}"
STALE_LOCK_S = 30 * 60  # a build lock older than this was left by a killed build

group_stage = torch_impl.group_stage

_lock = threading.Lock()
_state = {}  # "reason": None once loaded, or why the kernels cannot run


# ----------------------------------------------------------------------------------------------------------------
# build and load


def unavailable_reason():
    """None when the C++ kernels can run (building them on the first call), else a sentence saying why not."""
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


def token_forward(rows: torch.Tensor, target: torch.Tensor, temperature: float):
    """rows (B', T', V), target (N,) -> token log-prob (N,), lse (N,), float32; both 0 where target < 0."""
    return _token_forward(rows, target, temperature, entropy=False)


def token_stats_forward(rows: torch.Tensor, target: torch.Tensor, temperature: float):
    """rows (B', T', V), target (N,) -> token log-prob, lse, entropy of softmax(rows / T) (N,) float32, from one
    pass over each row; all 0 where target < 0."""
    return _token_forward(rows, target, temperature, entropy=True)


def _token_forward(rows, target, temperature: float, entropy: bool):
    outs = [empty(target.shape, dtype=torch.float32, device=rows.device) for _ in range(3 if entropy else 2)]
    _kernels().token_forward(rows, target, 1.0 / temperature, *outs)
    return tuple(outs)


def token_backward(rows, lay: Layout, lse, grad_seq_logprob, grad_loss, temperature: float, out):
    """Write grad_loss * dL/ds[seq(n)] / T * (onehot - softmax(rows[n] / T)) into out (B', T', V), which may be
    rows itself; rows that are not scored get zeros."""
    coef = torch_impl._token_coef(lay, grad_seq_logprob, grad_loss, temperature).contiguous()
    _kernels().token_backward(rows, lay.target, lse, coef, 1.0 / temperature, out)


def token_stats_backward(rows, target, lse, token_entropy, coef_logprob, coef_entropy, temperature: float, out):
    """Write d(sum_n c_lp[n] T token_logprob[n] + c_ent[n] T token_entropy[n]) / drows into out (B', T', V), which
    may be rows itself: c_lp (onehot - p) + c_ent p (lse - rows / T - H) per row, p = softmax(rows / T); rows that
    are not scored get zeros. coef_logprob, coef_entropy (N,) float32: the upstream gradients / T, 0 where
    target < 0; lse, token_entropy (N,) float32 from token_stats_forward."""
    _kernels().token_backward(rows, target, lse, coef_logprob, 1.0 / temperature, out, token_entropy, coef_entropy)


# ----------------------------------------------------------------------------------------------------------------
# the linear path


def linear_loss_and_grads(rows, weight, bias, lay: Layout, beta: float, temperature: float, needs,
                          entropy: bool = False):
    """The linear path's loss and statistics and, for grad_loss = 1, the gradients that ``needs`` asks for.

    Args:
        rows: (B', T', H) hidden states (``layout.as_rows``); weight (V, H); bias (V,) or None.
        needs: (hidden, weight, bias) booleans; the gradients not asked for are None (none asked for: no GEMM past
            the forward's).
        entropy: also return each token's entropy, from the forward's pass (no extra GEMM).

    Returns:
        loss (), seq_logprob (S,), implicit_reward (S,), grad_seq_logprob (S,), d_hidden (B', T', H) in the hidden
        dtype, d_weight (V, H) and d_bias (V,) in the weight dtype (accumulated in float32) or None; with entropy,
        token_entropy (N,) float32 (0 where not scored) after them.

    The schedule. dL/dlogits of a token needs dL/ds of its sequence, which depends on the whole group's s. Where
    that coefficient is known once a chunk's log-sum-exps are, three GEMMs: the chunk's logits, kept (at most
    CHUNK_BYTES), then d_hidden and d_weight from them. Otherwise four: the logits once for the log-sum-exps, the
    group stage on every token, then the logits again for the gradients, block by block, never kept. Three apply
      - on-policy (no ref_logprobs): r_i = 0 whatever s_i is, so dL/ds comes from the rewards alone, before any
        logit;
      - with whole groups per chunk: when all scored rows fit in one chunk, or each group's tokens are
        contiguous and fit in one: once a chunk's log-probs are in, the s of its groups are complete and the
        group stage gives their dL/ds.
    """
    work = _LinearWork(rows, weight, bias, lay.target, temperature, needs, entropy)
    token_logprob = work.token_logprob
    if any(needs) and lay.token_ref is None:  # three GEMMs, on-policy: the coefficients first
        coef = work.coef(lay, group_stage(token_logprob, lay, beta)[3])
        for chunk in work.chunks(keep=True):
            work.backward(chunk, work.forward(chunk), coef[chunk.tokens])
    elif any(needs) and (group_chunks := work.group_chunks(lay)) is not None:  # three GEMMs, whole groups
        for chunk in group_chunks:
            lse = work.forward(chunk)
            coef = work.coef(lay, group_stage(token_logprob, lay, beta)[3])  # exact for every group seen so far
            work.backward(chunk, lse, coef[chunk.tokens])
    else:  # four GEMMs (or the forward alone)
        lse = work.forward_all()
        if any(needs):
            coef = work.coef(lay, group_stage(token_logprob, lay, beta)[3])
            for chunk in work.chunks(keep=False):
                work.backward(chunk, lse[chunk.tokens], coef[chunk.tokens])
    out = (*group_stage(token_logprob, lay, beta), *work.grads())
    return (*out, work.token_entropy) if entropy else out


def linear_forward(rows: torch.Tensor, weight, bias, target: torch.Tensor, temperature: float):
    """rows (B', T', H) hidden, weight (V, H) -> token log-prob (N,), lse (N,), float32, 0 where not scored."""
    work = _LinearWork(rows, weight, bias, target, temperature)
    return work.token_logprob, work.forward_all()


def linear_token_stats_forward(rows: torch.Tensor, weight, bias, target: torch.Tensor, temperature: float):
    """rows (B', T', H) hidden, weight (V, H), bias (V,) or None -> token log-prob, lse, entropy of
    softmax(logits / T) (N,) float32, 0 where not scored; the logits never held whole (as linear_forward)."""
    work = _LinearWork(rows, weight, bias, target, temperature, entropy=True)
    lse = work.forward_all()
    return work.token_logprob, lse, work.token_entropy


def linear_backward(rows, weight, bias, lay: Layout, lse, grad_seq_logprob, grad_loss, temperature: float):
    """d_hidden (B', T', H) in the hidden dtype, d_weight (V, H) and d_bias (V,) in the weight dtype: the
    gradient pass of the four-GEMM schedule (logits recomputed, lse from the forward)."""
    coef = torch_impl._token_coef(lay, grad_seq_logprob, grad_loss, temperature)
    return _linear_grads(rows, weight, bias, lay.target, temperature, lse, coef)


def linear_token_stats_backward(rows, weight, bias, target, lse, token_entropy, coef_logprob, coef_entropy,
                                temperature: float):
    """d_hidden (B', T', H) in the hidden dtype, d_weight (V, H) and d_bias (V,) (None without bias) in the weight
    dtype, accumulated in float32, of sum_n c_lp[n] T token_logprob[n] + c_ent[n] T token_entropy[n]: the logits
    recomputed chunk by chunk. coef_logprob, coef_entropy (N,) float32: the upstream gradients / T, 0 where
    target < 0; lse, token_entropy (N,) float32 from linear_token_stats_forward."""
    return _linear_grads(rows, weight, bias, target, temperature, lse, coef_logprob, token_entropy, coef_entropy)


def _linear_grads(rows, weight, bias, target, temperature: float, lse, coef, token_entropy=None, coef_entropy=None):
    """The four-GEMM schedule's gradient pass over every chunk; the entropy's term where token_entropy is given."""
    work = _LinearWork(rows, weight, bias, target, temperature, (True, True, bias is not None))
    for chunk in work.chunks(keep=False):
        entropy_args = () if token_entropy is None else (token_entropy[chunk.tokens], coef_entropy[chunk.tokens])
        work.backward(chunk, lse[chunk.tokens], coef[chunk.tokens], *entropy_args)
    return work.grads()


class _Chunk:
    """Scored rows [lo, hi) of one linear call: their token ids (r,), hidden rows (r, H), targets (r,), and, for
    the three-GEMM schedules, a (V, r) buffer that keeps their logits from forward to backward."""

    def __init__(self, work, lo: int, hi: int, keep: bool):
        self.tokens = work.scored[lo:hi]
        first = int(self.tokens[0]) if hi > lo else 0
        # A contiguous run of tokens (every token scored, say) is a slice: no gather, no scatter.
        self.span = slice(first, first + hi - lo) if hi > lo and int(self.tokens[-1]) == first + hi - lo - 1 else None
        hidden = work.flat_hidden[self.span] if self.span else work.flat_hidden.index_select(0, self.tokens)
        self.hidden = hidden.contiguous()
        self.target = work.target[self.span] if self.span else work.target[self.tokens]
        self.logits_t = work.logits_buffer(hi - lo) if keep else None


class _LinearWork:
    """One linear call's scored rows (unscored rows cost nothing) in chunks, the C++ passes over a chunk
    (csrc/linear.cpp: linear_lse, linear_grad), the forward's outputs token_logprob and (entropy=True)
    token_entropy (N,) float32 (0 where not scored), and the float32 gradient accumulators."""

    def __init__(self, rows, weight, bias, target, temperature: float, needs=(False, False, False),
                 entropy: bool = False):
        self.rows_shape, self.bias, self.target = rows.shape, bias, target
        self.weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        self.flat_hidden = rows.reshape(-1, rows.shape[-1])  # a view, except for hidden that is not (copy, N x H)
        self.scored = (target >= 0).nonzero().squeeze(1)
        self.inv_temperature = 1.0 / temperature
        self._buffer = None
        device, dtype, (vocab, hidden_size) = rows.device, rows.dtype, weight.shape
        f32 = dict(dtype=torch.float32, device=device)
        self.token_logprob = torch.zeros(target.shape, **f32)
        self.token_entropy = torch.zeros(target.shape, **f32) if entropy else None
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
        return max(64, CHUNK_HIDDEN_BYTES // (4 * hidden_size))  # bounded by the per-thread d_hidden accumulators

    def chunks(self, keep: bool):
        num_rows, step = self.scored.numel(), self.chunk_rows(keep)
        return (_Chunk(self, lo, min(lo + step, num_rows), keep) for lo in range(0, num_rows, step))

    def group_chunks(self, lay: Layout):
        """Chunks of whole groups, logits kept (each at most chunk_rows(keep=True) scored rows), or None where a
        group's tokens are not contiguous or do not fit in one chunk."""
        num_rows, most = self.scored.numel(), self.chunk_rows(keep=True)
        if num_rows <= most:
            return [_Chunk(self, 0, num_rows, keep=True)] if num_rows else []
        first_seqs = (lay.seq_group[1:] != lay.seq_group[:-1]).nonzero().squeeze(1) + 1
        if first_seqs.numel() != lay.num_groups - 1:  # some group is not one run of consecutive sequences
            return None
        starts = torch.cat([first_seqs.new_zeros(1), first_seqs, first_seqs.new_full((1,), lay.num_seqs)])
        row_starts = torch.searchsorted(self.scored, lay.cu_seqlens[starts]).tolist()  # scored rows before each
        bounds, lo = [], 0
        for start, end in zip(row_starts[:-1], row_starts[1:]):  # greedy: whole groups until the chunk is full
            if end - start > most:
                return None
            if end - lo > most:
                bounds.append((lo, start))
                lo = start
        bounds.append((lo, num_rows))
        return (_Chunk(self, lo, hi, keep=True) for lo, hi in bounds)

    def logits_buffer(self, num_rows: int):
        """A (V, num_rows) view of one buffer reused by every chunk (allocated for the largest)."""
        vocab = self.weight.shape[0]
        if self._buffer is None or self._buffer.numel() < vocab * num_rows:
            self._buffer = torch.empty(vocab * num_rows, dtype=self.logits_dtype(), device=self.weight.device)
        return self._buffer[: vocab * num_rows].view(vocab, num_rows)

    def coef(self, lay: Layout, grad_seq_logprob):
        """(N,) float32: dL/ds of each token's sequence / T (grad_loss = 1), 0 where not scored."""
        return torch_impl._token_coef(lay, grad_seq_logprob, torch.ones((), device=grad_seq_logprob.device),
                                      1.0 / self.inv_temperature)

    def block_rows(self, chunk: _Chunk) -> int:
        rows = BLOCK_BYTES // (4 * chunk.tokens.numel())
        if self.weight.dtype in (torch.bfloat16, torch.float16):  # bounds the kernels' float32 copy of the block
            rows = min(rows, WEIGHT_BLOCK_BYTES // (4 * self.weight.shape[1]))
        return max(16, rows)

    def forward(self, chunk: _Chunk):
        """The chunk's lse (r,) float32; its token log-probs (and entropies) go to token_logprob (token_entropy),
        its logits to chunk.logits_t if any."""
        outs = [empty(chunk.target.shape, dtype=torch.float32, device=chunk.target.device)
                for _ in range(2 if self.token_entropy is None else 3)]
        _kernels().linear_lse(chunk.hidden, self.weight, self.bias, chunk.target, self.inv_temperature,
                              self.block_rows(chunk), outs[0], outs[1], chunk.logits_t, *outs[2:])
        self.token_logprob[chunk.tokens] = outs[0]
        if self.token_entropy is not None:
            self.token_entropy[chunk.tokens] = outs[2]
        return outs[1]

    def forward_all(self):
        """The forward over every chunk, logits not kept: lse (N,) float32, 0 where not scored."""
        lse = torch.zeros_like(self.token_logprob)
        for chunk in self.chunks(keep=False):
            lse[chunk.tokens] = self.forward(chunk)
        return lse

    def backward(self, chunk: _Chunk, lse, coef, token_entropy=None, coef_entropy=None):
        """Add the chunk's gradients (its logits from chunk.logits_t if kept, else computed again); lse, coef and
        the entropy's token_entropy, coef_entropy (r,) float32 are the chunk's tokens'."""
        direct = self.d_hidden is not None and self.d_hidden.dtype == torch.float32 and chunk.span
        d_hidden = (self.d_hidden[chunk.span] if direct
                    else empty(chunk.hidden.shape, dtype=torch.float32, device=chunk.hidden.device))
        _kernels().linear_grad(chunk.hidden, self.weight, self.bias, chunk.target, lse, coef, self.inv_temperature,
                               self.block_rows(chunk), chunk.logits_t, d_hidden, self.d_weight, self.d_bias,
                               not self.first_chunk, token_entropy, coef_entropy)
        self.first_chunk = False
        if self.d_hidden is not None and not direct:
            self.d_hidden.index_copy_(0, chunk.tokens, d_hidden.to(self.d_hidden.dtype))

    def grads(self):
        """d_hidden (B', T', H), d_weight (V, H), d_bias (V,) in their final dtypes, None where not computed."""
        if self.first_chunk:  # no scored row at all
            for grad in (self.d_weight, self.d_bias):
                if grad is not None:
                    grad.zero_()
        d_hidden = None if self.d_hidden is None else self.d_hidden.view(self.rows_shape)
        d_weight = None if self.d_weight is None else self.d_weight.to(self.weight.dtype)
        d_bias = None if self.d_bias is None else self.d_bias.to(self.weight.dtype)
        return d_hidden, d_weight, d_bias
