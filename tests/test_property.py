"""Property test: seeded random draws of everything a caller can vary, every backend against the float64 oracle.

Each draw picks a path (logits or linear), a layout (padded, sliced along T, packed), a group structure (sizes 1..8,
consecutive or arbitrary ids in any order), a vocabulary (1 to 300), a dtype, a mask, ignore_index labels, an
anchor or none, a temperature, beta and reduction, -inf logits (or -inf bias entries) at columns no scored label
uses, confident rows (logits up to ~30 with a clear winner) at temperatures down to 1e-3, and a view for every
tensor the kernels read: contiguous, strided, transposed or stride-0 (expanded).
The loss, every gradient and the per-sequence stats must be as close to the float64 oracle as the reference at
the input dtype is, plus the dtype's slack (DESIGN.md section 4). The draws are fixed by their seeds, so a failure
is reproduced by its test id.
"""

import random

import pytest
import torch
from helpers.cases import SLACK, assert_within_pytorch_error
from conftest import DEVICE

import gvpo_kernels as gk
from gvpo_kernels import cpu

DRAWS = {"torch": 48, "cpu": 48, "triton": 16}  # the Triton interpreter is ~100x slower per element


class Viewed:
    """A differentiable input as a contiguous base and the view of it that the call receives: gradients are
    compared at the base, and the backend reads the view's strides (strided, transposed, expanded, sliced)."""

    def __init__(self, base: torch.Tensor, make_view=lambda b: b, compare_grad=True):
        self.base, self.make_view, self.compare_grad = base, make_view, compare_grad

    def leaf_and_view(self, dtype=None):
        leaf = self.base.detach().to(dtype or self.base.dtype).clone().requires_grad_()
        return leaf, self.make_view(leaf)


def strided(b):
    """b's values with stride 3 along the last dimension (a new tensor, so autograd reaches b)."""
    return torch.stack([torch.zeros_like(b), b, torch.zeros_like(b)], dim=-1)[..., 1]


def view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A non-differentiable tensor's values through a view of the given kind."""
    if kind == "strided":
        return strided(t)
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


def viewed(t: torch.Tensor, kind: str) -> Viewed:
    if kind == "strided":
        return Viewed(t, strided)
    if kind == "transposed" and t.dim() >= 2:
        return Viewed(t.transpose(0, 1).contiguous(), lambda b: b.transpose(0, 1))
    if kind == "expanded":
        shape = t.shape
        return Viewed(t[:1].contiguous(), lambda b: b.expand(shape))
    return Viewed(t)


def draw(seed: int) -> dict:
    """One random call: the path, the inputs (with their views) and the keyword arguments."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    path = rng.choice(["logits", "linear"])
    layout = rng.choice(["padded", "sliced", "packed"])
    sizes = [rng.randint(1, 8) for _ in range(rng.randint(1, 3))]
    num_seqs = sum(sizes)
    vocab = rng.choice([1, 5, 67, 300])
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64])
    hidden_size = rng.choice([4, 16])
    width = hidden_size if path == "linear" else vocab

    if layout == "packed":
        lengths = [rng.randint(0, 9) for _ in range(num_seqs)]
        shape = (sum(lengths),)
    else:
        shape = (num_seqs, rng.randint(1, 9))
    labels = torch.randint(0, vocab, shape, generator=gen)
    mask = None if rng.random() < 0.3 else torch.rand(shape, generator=gen) < 0.7
    if rng.random() < 0.3:
        labels[torch.rand(shape, generator=gen) < 0.2] = -100
    scored = labels != -100
    if mask is not None:
        scored &= mask
        labels[~mask] = vocab + 3  # never read as a token id: not scored

    # -inf at columns no scored label uses (vocabulary masking), for a third of the draws
    banned = torch.zeros(vocab, dtype=torch.bool)
    if vocab > 1 and rng.random() < 0.35:
        banned = torch.rand(vocab, generator=gen) < 0.5
        banned[labels[scored].unique()] = False

    # confident rows at small temperatures for half the float32 / bfloat16 draws (their own random stream: the
    # other choices stay). Not for float64 inputs, which the kernels compute in float32 math (DESIGN.md section 4):
    # z ~ 300 carries float32's rounding, beyond float64's slack. Not for float16, whose range (65504) a gradient
    # of dL/ds / T at T = 1e-3 leaves, in PyTorch's backward as in ours.
    extreme = random.Random(seed + 1_000_003)
    scale = extreme.choice([2.0, 2.0, 10.0, 30.0]) if dtype in (torch.float32, torch.bfloat16) else 2.0
    x = scale * torch.randn(*shape, width, generator=gen)
    if path == "logits":
        if scale > 2.0:  # one clear winner per row
            x = x.scatter_add(-1, x.argmax(-1, keepdim=True), torch.full(x.shape[:-1] + (1,), scale / 3))
        x = x.masked_fill(banned, float("-inf"))
    x = x.to(dtype)
    if layout == "sliced":  # x[:, :-1] of a longer tensor: rows not viewable as 2-D
        longer = torch.cat([x, torch.zeros(num_seqs, 1, width, dtype=dtype)], dim=1)
        x = Viewed(longer, lambda b: b[:, :-1])
    elif layout == "padded" and rng.random() < 0.2:
        x = viewed(x[:1].expand_as(x).contiguous(), "expanded")  # every sequence the same rows: stride 0
    else:
        x = viewed(x, rng.choice(["contiguous", "strided"]))

    rewards = torch.randn(num_seqs, generator=gen)
    reward_view = rng.choice(["contiguous", "column", "expanded"])
    if reward_view == "column":  # one column of a (S, num_reward_funcs) table
        rewards = torch.stack([torch.randn(num_seqs, generator=gen), rewards], dim=1)[:, 1]
    elif reward_view == "expanded":
        rewards = rewards[:1].expand(num_seqs)

    kwargs = dict(temperature=rng.choice([1.0, 0.7, 1.3]), beta=rng.choice([0.1, 1.0]),
                  reduction=rng.choice(["mean", "sum"]))
    if rng.random() < 0.5 and len(set(sizes)) == 1:
        kwargs["group_size"] = sizes[0]
    else:
        ids = torch.cat([torch.full((k,), 7 * g - 3) for g, k in enumerate(sizes)])
        if rng.random() < 0.5:
            ids = ids[torch.randperm(num_seqs, generator=gen)]
        kwargs["group_ids"] = view(ids, rng.choice(["contiguous", "strided"]))
    token_view = rng.choice(["contiguous", "strided", "transposed"])
    labels = view(labels, token_view)
    if mask is not None:
        kwargs["mask"] = view(mask, token_view)
    if rng.random() < 0.6:
        ref = -3.0 * torch.rand(shape, generator=gen)
        if rng.random() < 0.2 and layout != "packed":
            ref = ref[:1].expand(shape)  # one anchor row for every sequence
        kwargs["ref_logprobs"] = view(ref, rng.choice(["contiguous", "strided"]))
    if layout == "packed":
        kwargs["cu_seqlens"] = torch.tensor([0] + lengths).cumsum(0)
    if scale > 2.0:
        kwargs["temperature"] = extreme.choice([1e-3, 1e-2, 0.1, 0.3, 1.0])

    inputs = dict(path=path, dtype=dtype, labels=labels, rewards=rewards, kwargs=kwargs, x=x)
    if path == "linear":
        weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(dtype)
        inputs["weight"] = viewed(weight, rng.choice(["contiguous", "strided", "transposed"]))
        inputs["bias"] = None
        if rng.random() < 0.5 or banned.any():
            bias = torch.randn(vocab, generator=gen).masked_fill(banned, float("-inf")).to(dtype)
            kind = rng.choice(["contiguous", "strided", "expanded"] if not banned.any() else ["contiguous", "strided"])
            inputs["bias"] = viewed(bias[:1].expand(vocab).contiguous() if kind == "expanded" else bias, kind)
            # one bias value for every column: its gradient, the sum of each row's (onehot - softmax), is 0 up to
            # rounding, so only the other gradients can show that the stride-0 bias was read right
            inputs["bias"].compare_grad = kind != "expanded"
    return _to_device(inputs)


def _to_device(inputs):
    def move(v):
        if isinstance(v, Viewed):
            return Viewed(v.base.to(DEVICE), v.make_view, v.compare_grad)
        return v.to(DEVICE) if isinstance(v, torch.Tensor) else v

    out = {k: move(v) for k, v in inputs.items() if k != "kwargs"}
    out["kwargs"] = {k: move(v) for k, v in inputs["kwargs"].items()}
    return out


def call(inputs, fn, dtype=None, **extra):
    """(loss, [gradients at the bases], stats) of one call on fresh leaves (float64 ones for the oracle)."""
    labels, rewards, kwargs = inputs["labels"], inputs["rewards"], inputs["kwargs"]
    if dtype is not None:
        rewards = rewards.to(dtype)
    sources = [inputs["x"]] if inputs["path"] == "logits" else [inputs["x"], inputs["weight"], inputs["bias"]]
    pairs = [None if s is None else s.leaf_and_view(dtype) for s in sources]
    args = [None if p is None else p[1] for p in pairs]
    if inputs["path"] == "logits":
        loss, stats = fn(args[0], labels, rewards, return_stats=True, **kwargs, **extra)
    else:
        loss, stats = fn(args[0], args[1], labels, rewards, bias=args[2], return_stats=True, **kwargs, **extra)
    loss.backward()
    grads = [None if p is None or not src.compare_grad else p[0].grad for p, src in zip(pairs, sources)]
    return loss.detach(), grads, stats


@pytest.mark.parametrize("backend, seed", [(b, s) for b, count in DRAWS.items() for s in range(count)],
                         ids=lambda v: str(v))
def test_random_call_matches_oracle(backend, seed):
    if backend == "cpu" and (DEVICE.type != "cpu" or cpu.unavailable_reason() is not None):
        pytest.skip("the C++ kernels run on CPU tensors, once built")
    inputs = draw(1000 + seed)
    fused = gk.gvpo_loss if inputs["path"] == "logits" else gk.linear_gvpo_loss
    oracle_fn = gk.reference.gvpo_loss if inputs["path"] == "logits" else gk.reference.linear_gvpo_loss
    oracle = call(inputs, oracle_fn, torch.float64)
    baseline = call(inputs, oracle_fn)
    got = call(inputs, fused, backend=backend)

    names = ["loss"] + [f"grads[{i}]" for i in range(len(got[1]))] + list(gk.GVPOStats._fields)
    flat = [[loss, *grads, *stats] for loss, grads, stats in (got, baseline, oracle)]
    assert_within_pytorch_error(names, *flat, SLACK[inputs["dtype"]])
