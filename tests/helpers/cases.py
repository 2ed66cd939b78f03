"""Random GVPO inputs for every layout and option, and the comparison against the float64 oracle.

A backend passes when, for the loss, the logits gradient and every per-sequence statistic, its error against the
reference evaluated in float64 is no worse than the reference's own error at the input dtype plus a small slack
(DESIGN.md section 4). Errors are relative: ||got - oracle|| / ||oracle||, or ||got|| when the oracle is zero.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import gvpo_kernels as gk

SLACK = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    layout: str = "padded"  # "padded" (B, T, V) or "packed" (N, V) with cu_seqlens
    groups: tuple = (4, 4)  # group sizes, in sequence order unless shuffled
    shuffled: bool = False  # arbitrary group ids in shuffled sequence order (always group_ids, never group_size)
    vocab: int = 257
    seq_len: int = 63  # T padded; the longest sequence packed
    mask: str = "random"  # "none", "random", or "empty" (random, and sequence 0 has no scored token)
    anchor: bool = True
    temperature: float = 1.0
    reduction: str = "mean"
    beta: float = 0.1
    dtype: torch.dtype = torch.float32
    ignore: bool = False  # labels of ignore_index, and out-of-range labels where mask is False
    sliced: bool = False  # padded logits as logits[:, :-1] of a longer tensor (not viewable as 2-D)
    inplace: bool = False
    hidden_size: int = 0  # > 0: the linear path, hidden (..., H) and weight (V, H) instead of logits
    bias: bool = False  # linear path: with an LM-head bias
    scale: float = 2.0  # of the random logits (hidden states); above 2, confident rows: one clear winner per row
    softcap: float | None = None  # the softmax sees softcap * tanh(logits * logit_scale / softcap) / T
    logit_scale: float = 1.0
    entropy_coef: float = 0.0  # an entropy bonus in the loss
    seed: int = 0

    def replace(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)

    @property
    def id(self) -> str:
        base = Case()
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if f.name not in ("dtype", "seed") and getattr(self, f.name) != getattr(base, f.name)]
        return "-".join([DTYPE_NAMES[self.dtype]] + parts).replace(" ", "")


# Each entry changes one factor of a base case; both paths' grids are their base followed by these (and their own).
ONE_FACTOR_CHANGES = [
    dict(layout="packed"),
    dict(groups=(1,)),
    dict(groups=(2,)),
    dict(groups=(2, 3, 1, 5)),
    dict(groups=(2, 3, 1, 5), shuffled=True),
    dict(groups=(8, 6, 1, 7), shuffled=True, seq_len=9),  # group sizes up to 8
    dict(vocab=1),
    dict(vocab=3001),
    dict(seq_len=1),
    dict(mask="none"),
    dict(mask="empty"),
    dict(anchor=False),
    dict(temperature=0.7),
    dict(reduction="sum"),
    dict(beta=1.0),
    dict(dtype=torch.bfloat16),
    dict(dtype=torch.float16),
    dict(dtype=torch.float64),
    dict(ignore=True),
    dict(sliced=True),
    # soft-capped and scaled logits (Gemma-2, Cohere, Granite), the entropy bonus
    dict(softcap=30.0, scale=30.0),
    dict(softcap=50.0, scale=30.0, temperature=0.3, dtype=torch.bfloat16),
    dict(logit_scale=0.25),
    dict(logit_scale=2.0, softcap=30.0, temperature=0.7),
    dict(entropy_coef=0.05),
    dict(entropy_coef=0.05, softcap=30.0, scale=30.0, temperature=0.3),
    dict(entropy_coef=-0.02, anchor=False, reduction="sum"),
    # confident rows at small temperatures: p formed from each row's (shift, log_sum), never from one float32 lse
    dict(scale=30.0, temperature=1e-3),
    dict(scale=10.0, temperature=1e-2),
    dict(scale=30.0, temperature=0.1),
    dict(scale=30.0, temperature=0.3),
    dict(scale=30.0, dtype=torch.bfloat16, temperature=0.3),
]


def one_factor(base: Case, *changes: dict) -> list[Case]:
    """``base``, then ``base`` with each change of ONE_FACTOR_CHANGES and of ``changes`` applied alone."""
    return [base] + [base.replace(**change) for change in (*ONE_FACTOR_CHANGES, *changes)]


def confident(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Each row's largest logit raised by scale / 3: one clear winner per row, as a trained policy gives."""
    return logits.scatter_add(-1, logits.argmax(-1, keepdim=True), torch.full(logits.shape[:-1] + (1,), scale / 3))


def make_inputs(case: Case, device) -> dict:
    """Inputs of one case: logits (leaf, requires grad), labels, rewards and the keyword arguments.

    With ``case.hidden_size`` the linear path's hidden, weight and bias (leaves) replace the logits.
    """
    gen = torch.Generator().manual_seed(case.seed)
    num_seqs = sum(case.groups)
    if case.layout == "padded":
        lengths = [case.seq_len] * num_seqs
        shape = (num_seqs, case.seq_len)
    else:
        lengths = torch.randint(1, case.seq_len + 1, (num_seqs,), generator=gen).tolist()
        shape = (sum(lengths),)
    vocab = case.vocab

    labels = torch.randint(0, vocab, shape, generator=gen)
    mask = None
    if case.mask != "none":
        mask = torch.rand(shape, generator=gen) < 0.8
        if case.mask == "empty":
            if case.layout == "padded":
                mask[0] = False
            else:
                mask[: lengths[0]] = False
    if case.ignore:
        ignored = torch.rand(shape, generator=gen) < 0.15
        labels[ignored] = -100
        if mask is not None:  # never read as token ids: they are not scored
            labels[~mask] = torch.where(torch.rand(shape, generator=gen) < 0.5, vocab + 7, -5)[~mask]

    width = case.hidden_size or vocab
    if case.layout == "padded" and case.sliced:
        full = case.scale * torch.randn(num_seqs, case.seq_len + 1, width, generator=gen)
        if case.scale > 2.0 and not case.hidden_size:
            full = confident(full, case.scale)
        logits = full.to(case.dtype)[:, :-1]
    else:
        logits = case.scale * torch.randn(*shape, width, generator=gen)
        if case.scale > 2.0 and not case.hidden_size:
            logits = confident(logits, case.scale)
        logits = logits.to(case.dtype)

    rewards = torch.randn(num_seqs, generator=gen)
    rewards[: case.groups[0]] = 1.0  # one group whose rewards are all equal
    kwargs = dict(temperature=case.temperature, reduction=case.reduction, beta=case.beta, mask=mask)
    for name in ("softcap", "logit_scale", "entropy_coef"):
        if getattr(case, name) != getattr(Case(), name):
            kwargs[name] = getattr(case, name)

    if case.shuffled or len(set(case.groups)) > 1:
        ids = torch.cat([torch.full((size,), 13 * g + 5) for g, size in enumerate(case.groups)])
        if case.shuffled:
            ids = ids[torch.randperm(num_seqs, generator=gen)]
        kwargs["group_ids"] = ids
    else:
        kwargs["group_size"] = case.groups[0]

    if case.anchor:
        ref = -5.0 * torch.rand(shape, generator=gen)
        if mask is not None:
            ref[~mask] = float("nan")  # never read: not scored
        kwargs["ref_logprobs"] = ref
    if case.layout == "packed":
        kwargs["cu_seqlens"] = torch.tensor([0] + lengths).cumsum(0)

    def to_device(v):
        return v.to(device) if isinstance(v, torch.Tensor) else v

    inputs = dict(labels=labels.to(device), rewards=rewards.to(device),
                  kwargs={k: to_device(v) for k, v in kwargs.items()})
    if not case.hidden_size:
        return dict(inputs, logits=logits.to(device).requires_grad_())
    weight = torch.randn(vocab, case.hidden_size, generator=gen) / case.hidden_size**0.5
    bias = torch.randn(vocab, generator=gen) if case.bias else None
    return dict(inputs, hidden=(logits / 2).to(device).requires_grad_(),
                weight=weight.to(case.dtype).to(device).requires_grad_(),
                bias=None if bias is None else bias.to(case.dtype).to(device).requires_grad_())


def run(fn, logits, labels, rewards, kwargs, **extra):
    """Loss, logits gradient and stats of one call; the logits leaf is used as given."""
    logits.grad = None
    loss, stats = fn(logits, labels, rewards, return_stats=True, **kwargs, **extra)
    loss.backward()
    return loss.detach(), logits.grad, stats


def run_linear(fn, hidden, weight, bias, labels, rewards, kwargs, **extra):
    """Loss, (d_hidden, d_weight, d_bias) and stats of one linear call; d_bias is None without a bias."""
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    for t in leaves:
        t.grad = None
    loss, stats = fn(hidden, weight, labels, rewards, bias=bias, return_stats=True, **kwargs, **extra)
    loss.backward()
    return loss.detach(), [hidden.grad, weight.grad, None if bias is None else bias.grad], stats


# Entropies are judged against a scale of at least this many nats per element: at T = 1e-4 a row's entropy can be
# ~1e-12 nats, carried by one token of p ~ 1e-13 whose float32 rounding (~4%, in PyTorch as in ours) would make
# the relative error a coin toss. 1e-3 nats x slack still fails a 1e-8-nat error in float32.
ENTROPY_FLOOR = 1e-3


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """|got - want| / |want| (norms over all elements), the scale at least ``floor`` per element."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = max(want.norm().item(), floor * want.numel() ** 0.5)
    diff = (got - want).norm().item()
    return diff / scale if scale > 0 else diff


def assert_within_pytorch_error(names, got, baseline, oracle, slack: float) -> None:
    """Each ``got`` (ours) no further from the float64 ``oracle`` than ``baseline`` (PyTorch at the input dtype) is,
    plus ``slack``; finite. Entries whose oracle is None are skipped; entropies get the ENTROPY_FLOOR scale."""
    for name, g, b, o in zip(names, got, baseline, oracle):
        if o is None:
            continue
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        floor = ENTROPY_FLOOR if "entropy" in name else 0.0
        err, base = rel_err(g, o, floor), rel_err(b, o, floor)
        assert err <= base + slack, f"{name}: error {err:.3g} vs PyTorch's {base:.3g} + slack {slack:g}"


def check_against_oracle(case: Case, backend: str, device) -> None:
    """The backend's loss, gradient and stats against the float64 oracle, within the dtype's tolerance."""
    if case.hidden_size:
        return check_linear_against_oracle(case, backend, device)
    inputs = make_inputs(case, device)
    logits, labels, rewards, kwargs = inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"]

    oracle = run(gk.reference.gvpo_loss, logits.detach().double().requires_grad_(), labels, rewards.double(),
                 kwargs)
    baseline = run(gk.reference.gvpo_loss, logits.detach().clone().requires_grad_(), labels, rewards, kwargs)

    original = logits.detach().clone()
    fed = logits.clone() if case.inplace else logits  # in place: not a leaf (a leaf requiring grad is refused)
    logits.grad = None
    loss, stats = gk.gvpo_loss(fed, labels, rewards, return_stats=True, backend=backend,
                               inplace_backward=case.inplace, **kwargs)
    loss.backward()
    loss, grad = loss.detach(), logits.grad

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == case.dtype and grad.shape == logits.shape
    assert all(s.dtype == torch.float32 and s.shape == rewards.shape for s in stats[:4])
    assert stats.gvpo_loss.shape == stats.entropy_bonus.shape == ()
    assert (stats.entropy_bonus == 0) == (case.entropy_coef == 0)
    if case.inplace:  # the logits were consumed: they now hold the gradient
        torch.testing.assert_close(fed.detach(), grad, rtol=0, atol=0)
    torch.testing.assert_close(logits.detach(), original, rtol=0, atol=0)

    assert_within_pytorch_error(["loss", "grad_logits", *gk.GVPOStats._fields], [loss, grad, *stats],
                                [baseline[0], baseline[1], *baseline[2]], [oracle[0], oracle[1], *oracle[2]],
                                SLACK[case.dtype])


def check_linear_against_oracle(case: Case, backend: str, device) -> None:
    """linear_gvpo_loss: loss, d_hidden, d_weight, d_bias and stats against the float64 oracle."""
    assert case.hidden_size and not case.inplace
    inputs = make_inputs(case, device)
    hidden, weight, bias = inputs["hidden"], inputs["weight"], inputs["bias"]
    labels, rewards, kwargs = inputs["labels"], inputs["rewards"], inputs["kwargs"]

    def copies(dtype=None):
        return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_()
                for t in (hidden, weight, bias)]

    oracle = run_linear(gk.reference.linear_gvpo_loss, *copies(torch.float64), labels, rewards.double(), kwargs)
    baseline = run_linear(gk.reference.linear_gvpo_loss, *copies(), labels, rewards, kwargs)
    loss, grads, stats = run_linear(gk.linear_gvpo_loss, hidden, weight, bias, labels, rewards, kwargs,
                                    backend=backend)

    assert loss.dtype == torch.float32 and loss.shape == ()
    for name, grad, leaf in zip(["d_hidden", "d_weight", "d_bias"], grads, (hidden, weight, bias)):
        if leaf is not None:
            assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
    assert_within_pytorch_error(["loss", "d_hidden", "d_weight", "d_bias", *gk.GVPOStats._fields],
                                [loss, *grads, *stats], [baseline[0], *baseline[1], *baseline[2]],
                                [oracle[0], *oracle[1], *oracle[2]], SLACK[case.dtype])


def another_slice_case():
    """A head and targets of which some lie past the vocabulary (>= V: the label is in another rank's slice), with
    what the kernels must give: such a label counts as a logit of 0 and gets no one-hot. -> hidden (6, 8),
    weight (37, 8), logits (6, 37), target (6,), coef (6,), the log-probs and the gradient coef (onehot - softmax)."""
    gen = torch.Generator().manual_seed(5)
    vocab, hidden_size = 37, 8
    hidden, weight = torch.randn(6, hidden_size, generator=gen), torch.randn(vocab, hidden_size, generator=gen)
    logits = hidden @ weight.T
    target = torch.tensor([3, vocab, vocab + 5, 0, 36, vocab + 1])
    coef = torch.randn(6, generator=gen)
    in_slice = target < vocab
    lse = torch.logsumexp(logits, 1)
    want_logprob = torch.where(in_slice, logits.gather(1, target.clamp(max=vocab - 1)[:, None])[:, 0], 0.0) - lse
    onehot = torch.nn.functional.one_hot(target.clamp(max=vocab - 1), vocab) * in_slice[:, None]
    want_grad = coef[:, None] * (onehot - torch.softmax(logits, 1))
    return dict(hidden=hidden, weight=weight, logits=logits, target=target, coef=coef, lse=lse,
                logprob=want_logprob, grad=want_grad)
