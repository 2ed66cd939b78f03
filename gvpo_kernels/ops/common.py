"""What the autograd entry points share: a call's options as one frozen object, its tensors as one tuple, the
stage that turns token statistics into the loss, and the small guards of every backward.

The options travel as one :class:`Options` through autograd.Functions (which accept any object) and, for
torch.compile, through torch.library custom ops whose schemas are built from the same field list
(:func:`op_schema`, :meth:`Options.from_args`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import layout
from ..backend import Coefs, GroupStats, LogitSpec, TokenStats
from ..layout import Layout

# The custom ops' schema type of each Options field.
_SCHEMA_TYPES = {"Optional[int]": "int?", "float": "float", "Optional[float]": "float?", "str": "str", "int": "int",
                 "bool": "bool"}


@dataclass(frozen=True)
class Options:
    """The non-tensor options of one call (functional.py documents each)."""

    group_size: Optional[int] = None
    beta: float = 0.1
    temperature: float = 1.0
    softcap: Optional[float] = None
    logit_scale: float = 1.0
    reduction: str = "mean"
    ignore_index: int = -100
    backend: str = "auto"
    entropy: bool = False  # also the per-sequence mean entropies (GVPOStats.entropy / token entropies)
    entropy_coef: float = 0.0  # an entropy bonus in the loss: minus this times the mean token entropy

    @property
    def spec(self) -> LogitSpec:
        return LogitSpec(self.temperature, self.softcap, self.logit_scale)

    @property
    def token_entropy(self) -> bool:
        """Whether the forward computes each token's entropy (for the statistics or the bonus)."""
        return self.entropy or self.entropy_coef != 0.0

    def args(self) -> tuple:
        """The fields' values in order: the custom ops' trailing arguments."""
        return dataclasses.astuple(self)

    @classmethod
    def from_args(cls, args) -> "Options":
        return cls(*args)


def op_schema(tensors: str, outputs: str) -> str:
    """A custom op's schema: ``tensors`` (the tensor arguments, schema syntax), then every Options field."""
    fields = ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(Options))
    return f"({tensors}, {fields}) -> {outputs}"


class Data(NamedTuple):
    """A call's tensors that carry no gradient: labels (B, T) / (N,), rewards (S,) (None for token statistics),
    group_ids, mask, cu_seqlens, ref_logprobs (each None where not given)."""

    labels: Tensor
    rewards: Optional[Tensor] = None
    group_ids: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    cu_seqlens: Optional[Tensor] = None
    ref_logprobs: Optional[Tensor] = None

    def check_kinds(self, device, group_size) -> None:
        """What layout.build would reject by name but the dispatcher meets first: optional arguments that are not
        tensors, tensors on another device (a meta tensor would route an op to its fake), a group_size not an
        int."""
        for name, value in self._asdict().items():
            if value is not None or name in ("labels", "rewards"):
                if name == "rewards" and value is None and self.group_ids is None and group_size is None:
                    continue  # token statistics
                layout._check_tensor(name, value)
                layout._check_device(name, value, device)
        if group_size is not None:
            layout.check_count("group_size", group_size)


DATA_SCHEMA = "Tensor labels, Tensor? rewards, Tensor? group_ids, Tensor? mask, Tensor? cu_seqlens, Tensor? ref_logprobs"


def build_layout(vocab_size: int, data: Data, opts: Options) -> Layout:
    """The checked, flattened call (layout.build): the checks that read values run here, before any kernel."""
    return layout.build(data.labels, data.rewards, vocab_size=vocab_size, group_size=opts.group_size,
                        group_ids=data.group_ids, mask=data.mask, cu_seqlens=data.cu_seqlens,
                        ref_logprobs=data.ref_logprobs, ignore_index=opts.ignore_index, reduction=opts.reduction)


def num_seqs(data: Data) -> int:
    """S from the shapes alone (0 for packed input without cu_seqlens, which the real op rejects)."""
    if data.labels.dim() == 2:
        return data.labels.shape[0]
    return data.cu_seqlens.shape[0] - 1 if data.cu_seqlens is not None else 0


# ----------------------------------------------------------------------------------------------------------------
# the stage: token statistics -> the loss and every token's coefficients


class Stage:
    """The group stage of one process: token statistics -> (the statistics, GroupStats with the entropy bonus,
    every token's Coefs for grad_loss = 1). distributed.py's stage, with the same call, combines vocabulary slices
    and centres groups across ranks. ``local``: no collective inside (the GEMM schedule may then call it once per
    chunk)."""

    local = True

    def __init__(self, impl, lay: Layout, opts: Options):
        self.impl, self.lay, self.opts = impl, lay, opts

    def on(self, impl) -> "Stage":
        """This stage with another backend's group stage (a fallback)."""
        other = copy.copy(self)
        other.impl = impl
        return other

    def group(self, stats: TokenStats) -> tuple[TokenStats, GroupStats]:
        return stats, self.impl.group_stage(stats.logprob, self.lay, self.opts.beta)

    def scored_entropy(self, token_entropy: Tensor) -> Tensor:
        """(2,) float64: the number of scored tokens and the sum of their entropies (over the call)."""
        scored = self.lay.target >= 0
        return torch.stack([scored.sum().double(), torch.where(scored, token_entropy, 0.0).sum().double()])

    def __call__(self, stats: TokenStats) -> tuple[TokenStats, GroupStats, Coefs]:
        stats, group = self.group(stats)
        opts, lay = self.opts, self.lay
        zero = torch.zeros((), dtype=torch.float32, device=lay.target.device)
        if opts.entropy_coef == 0.0:
            return stats, group._replace(entropy_bonus=zero), loss_coefs(lay, group.grad_seq_logprob, None, opts)
        count, total = self.scored_entropy(stats.entropy)
        bonus = (opts.entropy_coef * total / count.clamp(min=1)).float()  # entropy_coef x the mean token entropy
        group = group._replace(loss=group.loss - bonus, entropy_bonus=bonus)
        return stats, group, loss_coefs(lay, group.grad_seq_logprob, stats.entropy, opts, count=count)


def loss_coefs(lay: Layout, grad_seq_logprob: Tensor, token_entropy: Optional[Tensor], opts: Options,
               count: Optional[Tensor] = None) -> Coefs:
    """The loss's per-token coefficients for grad_loss = 1: c_lp[n] = dL/ds[seq(n)] * s, and with an entropy bonus
    c_ent[n] = -entropy_coef * s / count (the bonus is entropy_coef times the mean entropy over the ``count``
    scored tokens of the call), 0 where not scored."""
    spec = opts.spec
    scored = lay.target >= 0
    c_lp = torch.where(scored, grad_seq_logprob[lay.token_seq] * spec.s, 0.0).float().contiguous()
    if opts.entropy_coef == 0.0:
        return Coefs(c_lp)
    weight = (-opts.entropy_coef * spec.s / count.clamp(min=1)).float()
    c_ent = torch.where(scored, weight, 0.0).float().contiguous()
    return Coefs(c_lp, c_ent, token_entropy)


def outputs(group: GroupStats, stats: TokenStats, call: "Call") -> tuple:
    """A loss's outputs: loss, s, r, dL/ds, seq_entropy ((S,) with Options.entropy, else (0,)), entropy_bonus."""
    seq_entropy = seq_mean(stats.entropy if call.opts.entropy else None, call.lay)
    return (group.loss, group.seq_logprob, group.implicit_reward, group.grad_seq_logprob, seq_entropy,
            group.entropy_bonus)


def seq_mean(token_values: Optional[Tensor], lay: Layout) -> Tensor:
    """(S,) float32 mean of ``token_values`` (N,) over each sequence's scored tokens (0 for a sequence with none);
    (0,) when ``token_values`` is None."""
    if token_values is None:
        return torch.zeros(0, dtype=torch.float32, device=lay.target.device)
    scored = (lay.target >= 0).float()
    sums = torch.zeros((2, lay.num_seqs), dtype=torch.float32, device=token_values.device)
    sums[0].index_add_(0, lay.token_seq, token_values * scored)
    sums[1].index_add_(0, lay.token_seq, scored)
    return sums[0] / sums[1].clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------
# guards


def own_precision(device):
    """Autocast off inside the ops: the backends choose their own precision (float32 accumulation whatever the
    input dtype) and take the inputs in the dtypes they come in; an autocast region around the call would
    otherwise turn their float32 products into bfloat16 ones."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def no_double_backward(name: str) -> None:
    """Raise if a backward runs with create_graph=True (grad mode is on inside backward only then): these
    gradients are computed by kernels, not by differentiable torch ops, so a second derivative would silently be
    0."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"gvpo_kernels.{name} is not twice differentiable: backward(create_graph=True) or "
                           "torch.autograd.grad(..., create_graph=True) through it is not supported (a gradient "
                           "penalty on its gradient would silently be zero); use gvpo_kernels.reference for that")


def hand_out_once(ctx, attr: str, name: str, why: str):
    """The gradients a forward left on ``ctx.<attr>``, released: a second backward (retain_graph=True) raises,
    as does a backward with create_graph=True."""
    no_double_backward(name)
    value = getattr(ctx, attr)
    if value is None:
        raise RuntimeError(f"gvpo_kernels.{name}: a second backward through the same call is not supported ({why});"
                           " run the loss again for a second backward")
    setattr(ctx, attr, None)
    return value


def scale_coefs(coefs: Coefs, grad: Tensor) -> Coefs:
    """The coefficients saved for grad_loss = 1, times the upstream gradient (a 0-d tensor)."""
    g = grad.float()
    return Coefs(coefs.logprob * g, None if coefs.entropy is None else coefs.entropy * g, coefs.token_entropy)


FUNCTORCH_MESSAGE = ("gvpo_kernels' losses and token statistics do not support functorch transforms "
                     "(torch.func.grad, vmap, jacrev, ...): their gradients come from fused kernels; use "
                     "loss.backward() / torch.autograd.grad, or gvpo_kernels.reference under torch.func")


# ----------------------------------------------------------------------------------------------------------------
# a prepared call


@dataclass
class Call:
    """One call, checked and flattened, with the backend that runs it and its stage; what the eager
    autograd.Functions take (distributed.py prepares its own, with a stage across ranks)."""

    opts: Options
    lay: Layout
    impl: object
    stage: Stage

    def on(self, impl) -> "Call":
        """This call on another backend (a fallback)."""
        return dataclasses.replace(self, impl=impl, stage=self.stage.on(impl))

    def attempt(self, work):
        """(the Call that ran, work(call)): ``work`` on this call's backend, or where a kernel cannot compile or
        launch, on the torch backend under "auto" (select.attempt)."""
        from .select import attempt

        ran = []

        def on_backend(impl):
            call = self if impl is self.impl else self.on(impl)
            ran[:] = [call]
            return work(call)

        result = attempt(self.opts.backend, self.impl, on_backend)
        return ran[0], result


def prepare(vocab_size: int, device, data: Data, opts: Options) -> Call:
    """A local call: its Layout (the checks that read values), backend and stage."""
    from .select import backend_for

    lay = build_layout(vocab_size, data, opts)
    impl = backend_for(opts.backend, device, lay)
    return Call(opts, lay, impl, Stage(impl, lay, opts))
