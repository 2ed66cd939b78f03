"""What the benchmark compares: the inputs of one shape, and every provider that computes the loss from them.

A *provider* is one way a user could compute the GVPO loss and its gradients: this package's backends, or an
alternative they would pick instead (eager PyTorch, torch.compile, a fused cross-entropy from PyTorch or
cut-cross-entropy followed by the GVPO math, or the closest fused RL loss, Liger-Kernel's GRPO). Each provider
turns an :class:`Inputs` into a closure that returns the scalar loss; the caller runs ``loss.backward()``.

Two paths:

* ``linear``: hidden (B, T, H) and the LM head weight (V, H) -> loss; gradients reach hidden and weight.
* ``logits``: logits (B, T, V) -> loss; the gradient reaches the logits.

Every input is padded (B, T) with every token scored (no mask), groups of ``group_size`` consecutive sequences,
an anchor (``ref_logprobs``) per token, beta = 0.1 and temperature 1: the plain GVPO call of a training step.
Because every token is scored, this package gets no credit here for skipping unscored (prompt) tokens.
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import gvpo_kernels as gk

BETA = 0.1
GVPO = "gvpo"  # what a provider computes: the GVPO loss, checked against gvpo_kernels.reference
GRPO = "grpo"  # a different loss (Liger's GRPO): timed for its cost only, its values are not compared


@dataclass
class Inputs:
    """One shape's tensors, on one device.

    path "linear": hidden (B, T, H) and weight (V, H) in ``dtype``, both requiring grad, logits None.
    path "logits": logits (B, T, V) in ``dtype`` requiring grad, hidden and weight None.
    labels (B, T) int64 in [0, V); rewards (B,) float32; ref_logprobs (B, T) float32 (the anchor's log-probs).
    """

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

    def nbytes(self) -> int:
        tensors = self.leaves() + [self.labels, self.rewards, self.ref_logprobs]
        return sum(t.numel() * t.element_size() for t in tensors)


def make_inputs(path: str, num_seqs: int, seq_len: int, vocab: int, hidden_size: int, dtype: torch.dtype,
                device: str | torch.device, group_size: int, seed: int = 0) -> Inputs:
    """Random inputs of one shape: N = num_seqs * seq_len tokens, logits with a standard deviation of about 2.

    Rewards are N(0, 1) per sequence; the anchor's per-token log-probs are those of a uniform policy plus noise,
    so that implicit rewards are neither zero nor constant within a group.
    """
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
    """The GVPO loss from per-token log-probs (B, T) float32, as a user would write it around a fused
    cross-entropy: sequence sums, implicit rewards, centring within groups of ``group_size`` consecutive
    sequences, the Bessel factor 1 / (k - 1), mean over groups. ref_logprobs (B, T), rewards (B,)."""
    k = group_size
    seq_logprob = token_logprob.sum(dim=1)
    implicit = beta * (seq_logprob - ref_logprobs.sum(dim=1))
    r = implicit.view(-1, k)
    big_r = rewards.view(-1, k)
    diff = (r - r.mean(dim=1, keepdim=True)) - (big_r - big_r.mean(dim=1, keepdim=True))
    return ((diff**2).sum(dim=1) / (2 * max(k - 1, 1))).mean()


def _gather_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 over the vocabulary, then the label's entry: (B, T, V) -> (B, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def eager_linear(hidden, weight, labels, ref_logprobs, rewards, group_size):
    """What a training loop writes by hand: materialise the logits in the input dtype, upcast, log_softmax."""
    return gvpo_from_token_logprobs(_gather_logprob(hidden @ weight.T, labels), ref_logprobs, rewards, group_size)


def eager_logits(logits, labels, ref_logprobs, rewards, group_size):
    """The same on given logits."""
    return gvpo_from_token_logprobs(_gather_logprob(logits, labels), ref_logprobs, rewards, group_size)


def _args(inp: Inputs) -> tuple:
    """The positional arguments of eager_linear / eager_logits for these inputs."""
    head = (inp.hidden, inp.weight) if inp.path == "linear" else (inp.logits,)
    return head + (inp.labels, inp.ref_logprobs, inp.rewards, inp.group_size)


def _eager(fn):
    def build(inp, device):
        args = _args(inp)
        return lambda: fn(*args)

    return build


@dataclass
class Provider:
    """One way of computing the loss.

    build(inp, device) returns a closure () -> scalar loss for those inputs (anything slow to set up, like a
    module or a compiled function, is made once here). unavailable(device) is None or the reason it cannot run.
    consumes_input: the closure overwrites its input (inplace_backward), so every call needs a fresh copy.
    """

    name: str
    path: str
    build: Callable[[Inputs, str], Callable[[], torch.Tensor]]
    computes: str = GVPO
    unavailable: Callable[[str], str | None] = lambda device: None
    consumes_input: bool = False
    note: str = ""


def _compiled(fn):
    """torch.compile(fn, dynamic=True), made once per process: compiled once for every shape, as a training job
    whose lengths vary ends up with anyway (and on a GPU, where one process runs every shape, without a
    recompilation per shape)."""
    compiled = {}

    def build(inp, device):
        if "fn" not in compiled:
            compiled["fn"] = torch.compile(fn, dynamic=True)
        args = _args(inp)
        return lambda: compiled["fn"](*args)

    return build


def _compile_unavailable(device):
    if device == "cpu":
        import shutil

        if shutil.which("g++") is None and shutil.which("c++") is None:
            return "torch.compile on the CPU needs a C++ compiler (g++), and none is on PATH"
    return None


def _torch_lce_unavailable(device):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"F.linear_cross_entropy with chunking needs PyTorch >= 2.13 (this is {torch.__version__})"
    return None


def _torch_lce(inp, device):
    """PyTorch's own fused linear cross-entropy, chunked (LinearCrossEntropyOptions()), per token, + GVPO."""
    options = torch.nn.LinearCrossEntropyOptions()
    num_seqs, seq_len, _ = inp.hidden.shape

    def run():
        nll = F.linear_cross_entropy(inp.hidden.flatten(0, 1), inp.weight, inp.labels.flatten(),
                                     reduction="none", options=options)
        return gvpo_from_token_logprobs(-nll.float().view(num_seqs, seq_len), inp.ref_logprobs, inp.rewards,
                                        inp.group_size)

    return run


def _missing(module):
    def unavailable(device):
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a peer that fails on this platform at import
            return f"{module} cannot be imported here ({type(exc).__name__}: {exc})"
        return None

    return unavailable


def _cce_impl(device):
    """cut-cross-entropy's CCE kernel is Triton for CUDA; on the CPU its torch.compile implementation runs."""
    return "cce" if device == "cuda" else "torch_compile"


def _cce(inp, device):
    """cut-cross-entropy's linear_cross_entropy(reduction="none") per token (its default filter_eps), + GVPO."""
    from cut_cross_entropy import linear_cross_entropy

    impl = _cce_impl(device)

    def run():
        nll = linear_cross_entropy(inp.hidden, inp.weight, inp.labels, reduction="none", impl=impl)
        return gvpo_from_token_logprobs(-nll.float(), inp.ref_logprobs, inp.rewards, inp.group_size)

    return run


def _liger_grpo(inp, device):
    """Liger-Kernel's fused linear GRPO (chunked PyTorch plus torch.compile of the loss math), its defaults,
    with the anchor as both reference and old policy and GRPO's group-normalised advantages."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss()
    attention_mask = torch.ones_like(inp.labels)
    k = inp.group_size

    def run():
        grouped = inp.rewards.view(-1, k)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
        loss, _metrics = loss_fn(inp.hidden, inp.weight, inp.labels, attention_mask, advantages,
                                 ref_per_token_logps=inp.ref_logprobs, old_per_token_logps=inp.ref_logprobs)
        return loss

    return run


def _gvpo(path, backend, inplace=False):
    def build(inp, device):
        kwargs = dict(group_size=inp.group_size, ref_logprobs=inp.ref_logprobs, beta=BETA, backend=backend)
        if path == "linear":
            return lambda: gk.linear_gvpo_loss(inp.hidden, inp.weight, inp.labels, inp.rewards, **kwargs)
        return lambda: gk.gvpo_loss(inp.logits, inp.labels, inp.rewards, inplace_backward=inplace, **kwargs)

    return build


def _gvpo_unavailable(backend):
    def unavailable(device):
        if backend == "triton" and device != "cuda":
            return "Triton kernels need CUDA (the Triton interpreter on the CPU is for tests, far too slow to time)"
        if backend == "cpu":
            if device != "cpu":
                return "the C++ backend runs on CPU tensors only"
            try:
                from gvpo_kernels import cpu

                reason = cpu.unavailable_reason()
            except Exception:  # no such helper any more: the call itself will say (RuntimeError, reported)
                reason = None
            if reason:
                return f"backend='cpu' cannot run: {reason}"
        return None  # anything else that stops a backend surfaces as gk's RuntimeError, reported as skipped

    return unavailable


def _ours(path):
    out = []
    for backend in ("triton", "torch", "cpu"):
        unavailable = _gvpo_unavailable(backend)
        out.append(Provider(f"gvpo-{backend}", path, _gvpo(path, backend), unavailable=unavailable))
        if path == "logits":
            out.append(Provider(f"gvpo-{backend} inplace", path, _gvpo(path, backend, inplace=True),
                                unavailable=unavailable, consumes_input=True,
                                note="inplace_backward=True: the gradient overwrites the logits"))
    return out


def all_providers() -> list[Provider]:
    """Every provider of both paths, eager first (the baseline of the speed-up column)."""
    compiled_note = "torch.compile(eager, dynamic=True)"
    linear = [
        Provider("eager", "linear", _eager(eager_linear),
                 note="hidden @ weight.T in the input dtype, float32 log_softmax, gather"),
        Provider("torch.compile", "linear", _compiled(eager_linear), unavailable=_compile_unavailable,
                 note=compiled_note),
        Provider("torch-lce", "linear", _torch_lce, unavailable=_torch_lce_unavailable,
                 note="F.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions()) + GVPO"),
        Provider("liger-grpo", "linear", _liger_grpo, computes=GRPO,
                 unavailable=_missing("liger_kernel.chunked_loss"),
                 note="LigerFusedLinearGRPOLoss, defaults: GRPO, not GVPO"),
        Provider("cce", "linear", _cce, unavailable=_missing("cut_cross_entropy"),
                 note="cut_cross_entropy.linear_cross_entropy(reduction='none') + GVPO; impl 'cce' on CUDA, "
                      "'torch_compile' on the CPU"),
    ]
    logits = [
        Provider("eager", "logits", _eager(eager_logits), note="float32 log_softmax, gather"),
        Provider("torch.compile", "logits", _compiled(eager_logits), unavailable=_compile_unavailable,
                 note=compiled_note),
    ]
    return linear + _ours("linear") + logits + _ours("logits")


def package_version(name: str | None) -> str | None:
    """The installed version of a PyPI distribution, or None."""
    if name is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
