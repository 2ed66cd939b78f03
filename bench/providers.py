"""Every way of computing the GVPO loss, or the per-token log-probs and entropy, that the benchmarks compare: this
package's backends and what users would pick instead (bench/README.md lists them with what each runs).

A "loss" provider's build(inp, device) returns a closure () -> scalar loss. A "tokens" provider's
build(inp, device, entropy) returns () -> (log-prob (B, T) float32, entropy (B, T) float32 or None); the loss
benchmark puts the GVPO math a user would write on top of its log-probs (common.gvpo_from_token_logprobs).
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import gvpo_kernels as gk

from .common import BETA, SETTINGS, Inputs, gvpo_from_token_logprobs

GVPO, GRPO, CE = "gvpo", "grpo", "ce"  # what a loss provider computes (CE: the sum over tokens of -log p)
CHUNK_BYTES = 64 << 20  # chunked eager: float32 logits per chunk (as the trainer's anchor pass had them)


@dataclass
class Provider:
    """unavailable(device): None or why it cannot run there (reported as "skipped: <why>"). anchor: for a peer
    that only a GPU measures, why the CPU does not time it (`--check-only` still checks it here where its code
    runs). ran(device): which implementation a dispatching peer runs, for the note. consumes_input: the closure
    overwrites its input (inplace_backward), so every call needs a fresh copy."""

    name: str
    path: str
    build: Callable
    kind: str = "loss"  # or "tokens"
    computes: str = GVPO
    benches: tuple = ("loss",)
    entropy: bool = False  # a tokens provider that can return the entropy
    unavailable: Callable[[str], str | None] = lambda device: None
    anchor: str = ""
    ran: Callable[[str], str] | None = None
    consumes_input: bool = False
    note: str = ""

    def skip_reason(self, device: str, check_only: bool = False) -> str | None:
        return (None if check_only or device == "cuda" else self.anchor or None) or self.unavailable(device)


# -- eager PyTorch, torch.compile, TRL ---------------------------------------------------------------------------------

def eager_tokens(head, weight, labels, entropy: bool):
    """head (..., H) with weight (V, H), or logits (..., V) with weight None: the logits in the input dtype, float32
    log_softmax, the label's entry and -(p log p).sum(-1), as a training loop writes them."""
    logp = torch.log_softmax((head if weight is None else head @ weight.T).float(), dim=-1)
    token = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return token, (-(logp.exp() * logp).sum(-1) if entropy else None)


def eager_loss(head, weight, labels, ref_logprobs, rewards, group_size):
    return gvpo_from_token_logprobs(eager_tokens(head, weight, labels, False)[0], ref_logprobs, rewards, group_size)


def _head(inp: Inputs):
    return (inp.hidden, inp.weight) if inp.path == "linear" else (inp.logits, None)


def _eager(compiled: bool):
    """eager_loss, or torch.compile(eager_loss, dynamic=True) made once per process: compiled once for every shape,
    as a job whose lengths vary ends up with (on a GPU one process runs every shape: no recompilation per shape)."""
    made = {}

    def build(inp, device):
        if "fn" not in made:
            made["fn"] = torch.compile(eager_loss, dynamic=True) if compiled else eager_loss
        args = _head(inp) + (inp.labels, inp.ref_logprobs, inp.rewards, inp.group_size)
        return lambda: made["fn"](*args)

    return build


def _chunked(chunked: bool):
    """eager_tokens on the whole logits, or (chunked) on CHUNK_BYTES of float32 logits at a time at the real
    head's width (the same rows per chunk on the CPU's scaled-down heads), split (not sliced: the backward puts the
    chunks' gradients together once)."""
    def build(inp, device, entropy):
        head, weight = _head(inp)
        if not chunked:
            return lambda: eager_tokens(head, weight, inp.labels, entropy)
        rows = max(1, CHUNK_BYTES // (4 * inp.vocab * SETTINGS[device]["scale"]))
        parts = list(zip(head.flatten(0, 1).split(rows), inp.labels.reshape(-1).split(rows)))

        def run():
            out = [eager_tokens(x, weight, y, entropy) for x, y in parts]
            return (torch.cat([o[0] for o in out]).view(inp.labels.shape),
                    torch.cat([o[1] for o in out]).view(inp.labels.shape) if entropy else None)

        return run

    return build


def _trl_selective(inp, device, entropy):
    """TRL's selective_log_softmax on the full logits; with entropy selective_log_softmax_and_entropy (one Triton
    pass on CUDA) or, in a TRL without it, entropy_from_logits."""
    from trl.trainer import utils

    both = getattr(utils, "selective_log_softmax_and_entropy", None)
    head, weight = _head(inp)

    def run():
        logits = head if weight is None else head @ weight.T
        if not entropy:
            return utils.selective_log_softmax(logits, inp.labels).float(), None
        if both is not None:
            return tuple(t.float() for t in both(logits, inp.labels))
        return utils.selective_log_softmax(logits, inp.labels).float(), utils.entropy_from_logits(logits).float()

    return run


def _trl_fused_head(inp, device, entropy):
    """trl.kernels.ChunkedLogProbFunction with GRPOTrainer's chunk size: how its GRPOTrainer gets log-probs."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk

    h, w, y, shape = inp.hidden.flatten(0, 1), inp.weight, inp.labels.reshape(-1), inp.labels.shape
    outputs = ("entropy",) if entropy else ()

    def run():
        logprob, ent, *_ = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, chunk, None, 1.0, outputs)
        return logprob.float().view(shape), (ent.float().view(shape) if entropy else None)

    return run


# -- fused linear cross-entropies ----------------------------------------------------------------------------------

def _per_token(make):
    """A tokens provider from make(device, entropy) -> fn(hidden (N, H), weight (V, H), labels (N,)) -> nll (N,)
    or (nll, entropy): a fused linear cross-entropy, reduction "none", whose -nll is the log-prob."""
    def build(inp, device, entropy=False):
        fn, h, y, shape = make(device, entropy), inp.hidden.flatten(0, 1), inp.labels.reshape(-1), inp.labels.shape

        def run():
            out = fn(h, inp.weight, y)
            nll, ent = out if isinstance(out, tuple) else (out, None)
            return -nll.float().view(shape), (ent.float().view(shape) if entropy else None)

        return run

    return build


def _torch_lce(device, entropy):  # PyTorch's own, chunked (LinearCrossEntropyOptions())
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, w, y: F.linear_cross_entropy(h, w, y, reduction="none", options=options)


def _cce(device, entropy):  # its CCE Triton kernel on CUDA; on the CPU its torch.compile code, the only one there
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if device == "cuda" else "torch_compile"
    return lambda h, w, y: linear_cross_entropy(h, w, y, reduction="none", impl=impl)


def _liger_flce(device, entropy):  # Triton; recomputes the logits in the backward
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y, reduction="none")


def _liger_fused_ce(device, entropy):  # NLL and entropy: CuTe SM90 kernels for bf16 on Hopper, chunked torch elsewhere
    from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as Fn

    return lambda h, w, y: Fn.apply(h, w, y, 1.0, -100, 1, entropy)


def _liger_impl(device: str) -> str:
    from liger_kernel.ops import fused_linear_scaled_cross_entropy as m

    return m._resolve_implementation(torch.device(device)).__name__


def _quack_ce(device, entropy):  # F.linear, then its CuTe DSL cross-entropy kernel
    from quack.linear_cross_entropy import linear_cross_entropy_func

    return lambda h, w, y: linear_cross_entropy_func(h, w, None, y, reduction="none")


def _quack_lce(inp, device):
    """QuACK's chunked_linear_cross_entropy, reduction "sum" (it fuses no per-token form): the cross-entropy, its
    GEMMs and gradients all in the forward (its scaled-exp pipeline on SM90 in bf16)."""
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    h, y = inp.hidden.flatten(0, 1), inp.labels.reshape(-1)
    return lambda: chunked_linear_cross_entropy(h, inp.weight, y, reduction="sum")


def _liger_grpo(inp, device):
    """Liger-Kernel's fused linear GRPO (chunked torch plus torch.compile of the loss math), its defaults, the
    anchor as both reference and old policy, GRPO's group-normalised advantages."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn, mask, k = LigerFusedLinearGRPOLoss(), torch.ones_like(inp.labels), inp.group_size

    def run():
        grouped = inp.rewards.view(-1, k)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
        return loss_fn(inp.hidden, inp.weight, inp.labels, mask, advantages, ref_per_token_logps=inp.ref_logprobs,
                       old_per_token_logps=inp.ref_logprobs)[0]

    return run


# -- this package ----------------------------------------------------------------------------------------------------

def _gvpo(backend, inplace=False):
    def build(inp, device):
        kw = dict(group_size=inp.group_size, ref_logprobs=inp.ref_logprobs, beta=BETA, backend=backend)
        if inp.path == "linear":
            return lambda: gk.linear_gvpo_loss(inp.hidden, inp.weight, inp.labels, inp.rewards, **kw)
        if inplace:  # as a model's output: a view of the leaf, which in-place use refuses to overwrite itself
            return lambda: gk.gvpo_loss(inp.logits.view_as(inp.logits), inp.labels, inp.rewards,
                                        inplace_backward=True, **kw)
        return lambda: gk.gvpo_loss(inp.logits, inp.labels, inp.rewards, **kw)

    return build


def _gvpo_auto(inp, device, entropy):
    if inp.path == "linear":
        fn = lambda: gk.linear_token_logprobs(inp.hidden, inp.weight, inp.labels, return_entropy=entropy)  # noqa
    else:
        fn = lambda: gk.token_logprobs(inp.logits, inp.labels, return_entropy=entropy)  # noqa
    return fn if entropy else lambda: (fn(), None)


# -- availability ------------------------------------------------------------------------------------------------------

def _backend_unavailable(backend):
    def unavailable(device):
        if backend == "triton" and device != "cuda":
            return "Triton kernels need CUDA (the Triton interpreter on the CPU is for tests, far too slow to time)"
        try:
            from gvpo_kernels.functional import select_backend

            select_backend(backend, torch.device(device))
        except RuntimeError as exc:  # the contract: a backend asked for by name that cannot run says why
            return str(exc)
        return None

    return unavailable


def _auto_backend(device: str) -> str:
    """The backend that "auto" ran here: what the package reports of its last call (after any fallback: a kernel
    that cannot compile or launch on this GPU runs on torch), else the device's native one if select_backend takes
    it by name, else torch."""
    from gvpo_kernels.ops.select import last_backend

    native = "triton" if device == "cuda" else "cpu"
    return last_backend() or (native if _backend_unavailable(native)(device) is None else "torch")


def _importable(module: str, cpu_reason: str | None = None, more: str = ""):
    """unavailable(device): whether ``module`` imports here; then, off CUDA, ``cpu_reason`` if given."""
    def unavailable(device):
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a peer that fails on this platform at import
            return f"{module} cannot be imported here ({type(exc).__name__}: {exc}){more}"
        return cpu_reason if cpu_reason and device != "cuda" else None

    return unavailable


def _compile_unavailable(device):
    if device == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        return "torch.compile on the CPU needs a C++ compiler (g++), and none is on PATH"


def _torch_lce_unavailable(device):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"F.linear_cross_entropy with chunking needs PyTorch >= 2.13 (this is {torch.__version__})"


def _liger_flce_unavailable(device):
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Liger's Triton kernels need CUDA (or TRITON_INTERPRET=1, for --check-only)"
    return _importable("liger_kernel.transformers.functional")(device)


def _liger_fused_unavailable(device):
    try:
        _liger_impl(device)  # on Hopper this imports the CuTe DSL kernels
    except Exception as exc:
        return f"Liger's fused scaled cross-entropy cannot be loaded here ({type(exc).__name__}: {exc}){_CUTE}"


_CUTE = "; it needs nvidia-cutlass-dsl (bench/gpu.sh installs it from the carried wheels)"
_QUACK = "QuACK's CuTe DSL kernels need an NVIDIA GPU (SM90 or newer)"


# -- the table ---------------------------------------------------------------------------------------------------------

def all_providers() -> list[Provider]:
    """Every provider; the loss benchmark's first is eager (the baseline of × eager), the statistics' gvpo-auto."""
    P, compiled = Provider, "torch.compile(eager, dynamic=True)"
    quack = _importable("quack.linear_cross_entropy", _QUACK, _CUTE)
    both = ("loss", "stats")
    out = [
        P("eager", "linear", _eager(False), note="hidden @ weight.T in the input dtype, float32 log_softmax, gather"),
        P("torch.compile", "linear", _eager(True), unavailable=_compile_unavailable, note=compiled),
        P("torch-lce", "linear", _per_token(_torch_lce), "tokens", unavailable=_torch_lce_unavailable,
          note="F.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions()) + GVPO"),
        P("liger-grpo", "linear", _liger_grpo, computes=GRPO, unavailable=_importable("liger_kernel.chunked_loss"),
          note="LigerFusedLinearGRPOLoss, defaults: GRPO, not GVPO"),
        P("cce", "linear", _per_token(_cce), "tokens", unavailable=_importable("cut_cross_entropy"),
          note="cut_cross_entropy.linear_cross_entropy(reduction='none') + GVPO; impl 'cce' on CUDA, "
               "'torch_compile' on the CPU"),
        P("liger-flce", "linear", _per_token(_liger_flce), "tokens", benches=both, unavailable=_liger_flce_unavailable,
          anchor="a GPU anchor: Liger's Triton kernels need CUDA",
          note="liger_fused_linear_cross_entropy(reduction='none'), Triton, + GVPO"),
        P("liger-fused-ce", "linear", _per_token(_liger_fused_ce), "tokens", benches=both, entropy=True,
          unavailable=_liger_fused_unavailable, ran=_liger_impl,
          anchor="a GPU anchor: on the CPU Liger runs its chunked torch fallback, not its CuTe kernels",
          note="LigerFusedLinearScaledCrossEntropyFunction (NLL, entropy) + GVPO"),
        P("quack-ce", "linear", _per_token(_quack_ce), "tokens", anchor=f"a GPU anchor: {_QUACK}", unavailable=quack,
          note="quack linear_cross_entropy_func(reduction='none'): F.linear + CuTe cross-entropy, + GVPO"),
        P("quack-lce", "linear", _quack_lce, computes=CE, anchor=f"a GPU anchor: {_QUACK}", unavailable=quack,
          note="quack chunked_linear_cross_entropy(reduction='sum'): cross-entropy, not GVPO"),
        P("eager", "logits", _eager(False), note="float32 log_softmax, gather"),
        P("torch.compile", "logits", _eager(True), unavailable=_compile_unavailable, note=compiled),
    ]
    for backend in ("triton", "torch", "cpu"):
        unavailable = _backend_unavailable(backend)
        out += [P(f"gvpo-{backend}", "linear", _gvpo(backend), unavailable=unavailable),
                P(f"gvpo-{backend}", "logits", _gvpo(backend), unavailable=unavailable),
                P(f"gvpo-{backend} inplace", "logits", _gvpo(backend, inplace=True), unavailable=unavailable,
                  consumes_input=True, note="inplace_backward=True: the gradient overwrites the logits")]
    for path in ("linear", "logits"):
        out += [P("gvpo-auto", path, _gvpo_auto, "tokens", benches=("stats",), entropy=True, ran=_auto_backend,
                  note="gk.linear_token_logprobs / gk.token_logprobs, backend 'auto'"),
                P("chunked eager", path, _chunked(True), "tokens", benches=("stats",), entropy=True,
                  note=f"{CHUNK_BYTES >> 20} MiB of float32 logits per chunk, log_softmax, gather, -(p log p).sum"),
                P("eager", path, _chunked(False), "tokens", benches=("stats",), entropy=True,
                  note="the whole (N, V) logits, float32 log_softmax, gather, -(p log p).sum"),
                P("trl selective", path, _trl_selective, "tokens", benches=("stats",), entropy=True,
                  unavailable=_importable("trl.trainer.utils"),
                  note="trl.trainer.utils.selective_log_softmax(_and_entropy) on the full logits")]
    out.append(P("trl fused head", "linear", _trl_fused_head, "tokens", benches=("stats",), entropy=True,
                 unavailable=_importable("trl.kernels"),
                 note="trl.kernels.ChunkedLogProbFunction (GRPOTrainer's fused LM head)"))
    return out


def for_bench(bench: str, paths, only=None) -> list[Provider]:
    """The providers of one benchmark ("loss" or "stats") on these paths (and among ``only``); in the statistics,
    gvpo-auto first (the baseline of its ratios) and the GPU anchors last."""
    out = [p for p in all_providers() if bench in p.benches and p.path in paths and (only is None or p.name in only)]
    return out if bench == "loss" else sorted(out, key=lambda p: (p.name != "gvpo-auto", bool(p.anchor)))
