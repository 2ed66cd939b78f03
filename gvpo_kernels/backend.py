"""The contract between the autograd layer and the backends: what every backend computes, in which shapes.

A backend (torch_impl, cpu, triton) implements :class:`Backend`: the token stage on rows of logits or on hidden
states times the LM head (per-token log-prob, the row's softmax normaliser, optionally its entropy, and the
backward from per-token coefficients), and the group stage. The linear path's GEMM schedule is shared
(:mod:`gvpo_kernels.schedule`); a backend supplies its chunk kernels through :meth:`Backend.linear_work`.

The normaliser. Every row's softmax is described by two float32 numbers, ``norm[:, n] = (shift, log_sum)``:
``shift`` is the row's largest transformed logit y (0 where all are -inf) and ``log_sum = log sum_v exp((y_v -
shift) s)``, so that ``log p_v = (y_v - shift) s - log_sum``, formed without the cancellation of ``z - lse`` with
one float32 lse of magnitude ~1e4 (small temperatures, confident rows): the likeliest token gets exactly
``-log_sum``, as in PyTorch's own log_softmax.

The registry: :func:`get` returns a backend by name; gvpo_kernels.ops picks one per call (backend="auto").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol

import torch
from torch import Tensor

from .layout import Layout


@dataclass(frozen=True)
class LogitSpec:
    """How a raw logit x (the LM head's output) becomes the softmax's input z.

    y = softcap * tanh(x * logit_scale / softcap) with a softcap, else y = x; z = y * s, with s = 1 / temperature
    (times logit_scale when there is no softcap, which then folds into the temperature).
    """

    temperature: float = 1.0
    softcap: Optional[float] = None
    logit_scale: float = 1.0

    @property
    def s(self) -> float:
        """dz / dy: the factor of y in z."""
        return (self.logit_scale if self.softcap is None else 1.0) / self.temperature

    @property
    def cap(self) -> float:
        """The soft-cap (0.0: none)."""
        return 0.0 if self.softcap is None else float(self.softcap)

    @property
    def cap_scale(self) -> float:
        """x's factor inside the tanh: logit_scale / softcap (0.0 without a softcap)."""
        return 0.0 if self.softcap is None else self.logit_scale / self.softcap

    def transform(self, x: Tensor) -> Tensor:
        """y of raw logits x (any float dtype; used by the torch backend and the reference)."""
        return x if self.softcap is None else self.softcap * torch.tanh(x * self.cap_scale)

    def dy_dx(self, y: Tensor) -> Tensor | float:
        """dy/dx from y: logit_scale (1 - (y / softcap)^2) with a softcap, else 1."""
        if self.softcap is None:
            return 1.0
        t = y / self.softcap
        return self.logit_scale * (1.0 - t * t)

    @property
    def max_dz_dx(self) -> float:
        """The largest dz/dx (s, times at most logit_scale through the soft-cap): bounds every gradient entry."""
        return self.s * (self.logit_scale if self.softcap is not None else 1.0)


class TokenStats(NamedTuple):
    """What the token stage's forward gives for N tokens.

    logprob: (N,) float32, log softmax(z)[target], 0 where target < 0 (not scored). A target >= V (the label lies
             in another rank's slice of the vocabulary) counts its logit as 0 here: ``-shift * s - log_sum``.
    norm:    (2, N) float32, (shift, log_sum) of each row (see the module docstring); 0 where not scored.
    entropy: (N,) float32 entropy of softmax(z), 0 where not scored; None when not asked for.
    """

    logprob: Tensor
    norm: Tensor
    entropy: Optional[Tensor]


class Coefs(NamedTuple):
    """Per-token coefficients of the token stage's backward: the gradient of sum_n (c_lp[n] logprob[n] + c_ent[n]
    entropy[n]) / s with respect to the raw logits is, per row,

        dx_v = (c_lp (onehot_v - p_v) + c_ent p_v (-log p_v - H)) * dy/dx_v

    logprob:  (N,) float32 c_lp: the upstream gradient of each token's log-prob times s, 0 where not scored
    entropy:  (N,) float32 c_ent, likewise for the entropy, or None (no entropy term)
    token_entropy: (N,) float32 H from the forward, needed with ``entropy``, else None
    """

    logprob: Tensor
    entropy: Optional[Tensor] = None
    token_entropy: Optional[Tensor] = None


class Grads(NamedTuple):
    """The linear path's gradients: d_hidden (B', T', H) in the hidden dtype, d_weight (V, H) and d_bias (V,) in the
    weight's dtype (accumulated in float32), each None where not asked for."""

    hidden: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]


class GroupStats(NamedTuple):
    """The group stage: loss () float32, and per sequence (S,) float32 s_i, r_i = beta (s_i - a_i), dL/ds_i;
    entropy_bonus () float32, the entropy bonus subtracted from the loss (None where the stage adds none)."""

    loss: Tensor
    seq_logprob: Tensor
    implicit_reward: Tensor
    grad_seq_logprob: Tensor
    entropy_bonus: Optional[Tensor] = None


class LinearWork(Protocol):
    """One linear call's scored rows, in chunks, on one backend: the chunk kernels the shared GEMM schedule
    (:mod:`gvpo_kernels.schedule`) drives, and the float32 gradient accumulators.

    ``scored`` (M,) int64: the flat ids of the scored tokens (only they are ever computed).
    """

    scored: Tensor

    def chunk_rows(self, keep: bool) -> int:
        """How many scored rows one chunk holds; ``keep``: the chunk's logits are kept from forward to backward."""

    def forward(self, tokens: Tensor, keep: bool) -> TokenStats:
        """The token statistics (of length M_c) of the scored tokens ``tokens`` (M_c,) int64; with ``keep`` the
        chunk's logits (or what the backward needs of them) stay for :meth:`backward` with ``kept=True``."""

    def backward(self, tokens: Tensor, norm: Tensor, coefs: Coefs, kept: bool) -> None:
        """Add the gradients of the chunk ``tokens`` (M_c,): norm (2, M_c) and coefs (each (M_c,)) are the chunk's;
        ``kept``: from the logits its last forward kept, else computed again."""

    def grads(self) -> Grads:
        """The accumulated gradients (zeros where nothing is scored), in their final dtypes."""


class Backend(Protocol):
    """What a backend provides. Shapes: rows is the (B', T', D) view of the logits (D = V) or hidden states
    (D = H) from :func:`gvpo_kernels.layout.as_rows` (flat token n is row (n // T', n % T')); target (N,) int64,
    -1 where not scored, >= V where the label lies in another rank's slice; weight (V, H), bias (V,) or None."""

    name: str

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when the backend can run on tensors on ``device``, else a sentence saying why not."""

    def token_forward(self, rows: Tensor, target: Tensor, spec: LogitSpec, entropy: bool) -> TokenStats:
        """The token statistics of rows of logits, in one pass over each row."""

    def token_backward(self, rows: Tensor, target: Tensor, norm: Tensor, coefs: Coefs, spec: LogitSpec,
                       out: Tensor) -> None:
        """Write dx (see :class:`Coefs`) into out, rows' shape (float32 or rows' dtype); out may be rows itself.
        Rows whose coefficients are all 0 get zeros without their logits being read."""

    def group_stage(self, token_logprob: Tensor, lay: Layout, beta: float) -> GroupStats:
        """Sequence sums, group centring and dL/ds (DESIGN.md section 1) for the (N,) token log-probs."""

    def linear_work(self, rows: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, spec: LogitSpec,
                    needs: tuple, entropy: bool) -> LinearWork:
        """The chunk kernels of one linear call; ``needs``: (hidden, weight, bias) gradients to accumulate."""


# ----------------------------------------------------------------------------------------------------------------
# helpers every backend shares


def upstream_coefs(target: Tensor, grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor],
                   token_entropy: Optional[Tensor], spec: LogitSpec) -> Coefs:
    """The token statistics' coefficients from the upstream gradients of the log-probs and entropies (labels'
    shape each, or None for 0): times s, 0 where not scored; the entropy's term only where it is asked for."""
    zero = torch.zeros(target.shape, dtype=torch.float32, device=target.device)

    def coef(g):
        return zero if g is None else torch.where(target >= 0, g.reshape(-1).float() * spec.s, zero).contiguous()

    if token_entropy is None or grad_entropy is None:
        return Coefs(coef(grad_logprob))
    return Coefs(coef(grad_logprob), coef(grad_entropy), token_entropy)


# ----------------------------------------------------------------------------------------------------------------
# the registry


class _Entry(NamedTuple):
    load: Callable[[], Backend]  # imports the backend (Triton, the C++ build) on first use
    unavailable_reason: Callable[[torch.device], Optional[str]]  # light: importable without the backend's deps


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, load: Callable[[], Backend], unavailable_reason: Callable) -> None:
    """Make ``name`` a backend: ``load()`` returns it, ``unavailable_reason(device)`` says why it cannot run on
    tensors on ``device`` (None when it can) without importing it."""
    _REGISTRY[name] = _Entry(load, unavailable_reason)


def get(name: str) -> Backend:
    """The backend registered as ``name``."""
    return _REGISTRY[name].load()


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run on tensors on ``device``, else a sentence saying why not."""
    return _REGISTRY[name].unavailable_reason(device)


def names() -> tuple:
    """The registered backends' names."""
    return tuple(_REGISTRY)


def _module(name: str):
    return lambda: importlib.import_module(name, __package__)


def _reason(module: str):
    return lambda device: importlib.import_module(module, __package__).unavailable_reason(device)


register("torch", _module(".torch_impl"), lambda device: None)
register("cpu", _module(".cpu"), _reason(".cpu"))
register("triton", _module(".triton.backend"), _reason(".triton"))
