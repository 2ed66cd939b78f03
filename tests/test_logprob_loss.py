"""gvpo_loss_from_logprobs: the GVPO loss on per-token log-probs, against the float64 oracle
(gvpo_kernels.reference.gvpo_loss_from_logprobs), against the official recipe's loss written out here, against
the logits loss, with every bad input named, and across 2 gloo ranks (tests/logprob_loss_worker.py).

Tolerance (DESIGN.md section 4): the error against the reference evaluated in float64 is no worse than the
reference's own at the input dtype, plus a small slack.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.multiprocessing as mp

import gvpo_kernels as gk
from helpers import logprob_loss_worker
from helpers.bad_inputs import changed, sequence_errors
from gvpo_kernels import reference

SLACK = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # as tests/cases.py
NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    scale = want.norm().item()
    diff = (got - want).norm().item()
    return diff / scale if scale > 0 else diff


@dataclasses.dataclass(frozen=True)
class Case:
    groups: tuple = (4, 4)  # group sizes, in sequence order unless shuffled
    shuffled: bool = False  # arbitrary int64 ids in shuffled order (group_ids), else group_size or runs
    packed: bool = False  # (N,) with cu_seqlens, sequences of different lengths
    seq_len: int = 9
    mask: str = "random"  # "none", "random", "empty" (sequence 0 has no scored token)
    anchor: bool = True
    reduction: str = "mean"
    beta: float = 0.1
    dtype: torch.dtype = torch.float32
    strided: bool = False  # token_logprobs a non-contiguous view
    seed: int = 0

    @property
    def id(self) -> str:
        base = Case()
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if f.name not in ("dtype", "seed") and getattr(self, f.name) != getattr(base, f.name)]
        return "-".join([NAMES[self.dtype]] + parts).replace(" ", "")


def make(case: Case) -> dict:
    """Log-probs as a policy gives them (<= 0, 0 where not scored is not assumed: padding holds NaN and inf),
    rewards, groups, mask and anchor, in float64; ``kwargs`` for both functions."""
    gen = torch.Generator().manual_seed(case.seed)
    sizes = list(case.groups)
    num = sum(sizes)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if case.shuffled:
        ids = torch.tensor([-7, 10**12, 3, 0, 41, -10**15, 5, 6])[ids][torch.randperm(num, generator=gen)]
    kwargs = dict(reduction=case.reduction, beta=case.beta)
    if case.shuffled or len(set(sizes)) > 1:
        kwargs["group_ids"] = ids
    else:
        kwargs["group_size"] = sizes[0]
    if case.packed:
        lengths = torch.randint(1, case.seq_len + 1, (num,), generator=gen)
        lengths[0] = 0 if num > 1 else 1  # an empty sequence
        shape = (int(lengths.sum()),)
        kwargs["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    else:
        shape = (num, case.seq_len)
    logprobs = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3 - 0.05
    anchor = logprobs + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if case.mask == "none":
        mask = None
        scored = torch.ones(shape, dtype=torch.bool)
    else:
        scored = torch.rand(shape, generator=gen) < 0.75
        if case.mask == "empty":
            first = slice(0, int(kwargs["cu_seqlens"][1])) if case.packed else 0
            scored[first] = False
        mask = scored if case.seed % 2 else scored.to(torch.uint8)  # bool or 0/1
        logprobs = logprobs.masked_fill(~scored, float("nan"))  # never read
        anchor = anchor.masked_fill(~scored, float("inf"))
    kwargs["mask"] = mask
    rewards = torch.randint(0, 3, (num,), generator=gen).double() + 0.1 * torch.randn(num, generator=gen,
                                                                                         dtype=torch.float64)
    return dict(logprobs=logprobs, rewards=rewards, anchor=anchor if case.anchor else None, scored=scored,
                kwargs=kwargs)


def as_input(x: torch.Tensor, case: Case) -> torch.Tensor:
    """``x`` at the case's dtype, as a leaf; a strided view of a wider tensor when ``case.strided``."""
    x = x.to(case.dtype)
    if case.strided:
        wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=case.dtype)
        wide[..., ::2] = x
        leaf = wide.requires_grad_()
        return leaf, leaf[..., ::2]
    leaf = x.clone().requires_grad_()
    return leaf, leaf


def loss_grad_stats(fn, case: Case, inputs: dict, dtype) -> tuple:
    leaf, view = as_input(inputs["logprobs"], dataclasses.replace(case, dtype=dtype))
    anchor = None if inputs["anchor"] is None else inputs["anchor"].to(dtype)
    loss, stats = fn(view, inputs["rewards"].to(dtype), ref_logprobs=anchor, return_stats=True, **inputs["kwargs"])
    (grad,) = torch.autograd.grad(loss, leaf)
    if case.strided:
        assert grad[..., 1::2].eq(0).all()
        grad = grad[..., ::2]
    return loss, grad, stats


BASE = Case()
ONE_FACTOR = [dataclasses.replace(BASE, **change) for change in [
    {}, dict(packed=True), dict(groups=(1,)), dict(groups=(2,)), dict(groups=(2, 3, 1, 5)),
    dict(groups=(8, 6, 1, 7), shuffled=True), dict(groups=(5, 5, 5), shuffled=True), dict(groups=(3, 3)),
    dict(mask="none"), dict(mask="empty"), dict(anchor=False), dict(reduction="sum"), dict(beta=1.0),
    dict(beta=0.01), dict(seq_len=1), dict(dtype=torch.float64), dict(dtype=torch.bfloat16),
    dict(dtype=torch.float16), dict(strided=True), dict(seed=1),
]]
COMBINED = [
    Case(packed=True, groups=(2, 3, 1, 5), shuffled=True, reduction="sum", anchor=False, seed=3),
    Case(packed=True, dtype=torch.bfloat16, mask="empty", groups=(7, 8), seed=5),
    Case(dtype=torch.float64, groups=(1, 2, 3, 4, 5, 6, 7, 8), shuffled=True, mask="empty", strided=True),
    Case(dtype=torch.float16, groups=(4,), mask="none", anchor=False, beta=1.0, seq_len=40),
]


def random_cases(count: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    choices = dict(groups=[(1,), (2,), (4, 4), (2, 3, 1, 5), (8, 6, 1, 7)], shuffled=[False, True],
                   packed=[False, True], seq_len=[1, 9, 33], mask=["none", "random", "empty"], anchor=[False, True],
                   reduction=["mean", "sum"], beta=[0.1, 1.0], dtype=[torch.float64, torch.float32, torch.bfloat16],
                   strided=[False, True])
    return [Case(seed=seed + i, **{k: rng.choice(v) for k, v in choices.items()}) for i in range(count)]


CASES = ONE_FACTOR + COMBINED + random_cases(12, seed=2024)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case):
    """Loss, gradient and stats against the float64 reference, no further off than the reference at the input
    dtype; the gradient in the input's dtype and shape, dL/ds_i at scored tokens, 0 (not NaN) elsewhere."""
    inputs = make(case)
    got = loss_grad_stats(gk.gvpo_loss_from_logprobs, case, inputs, case.dtype)
    baseline = loss_grad_stats(reference.gvpo_loss_from_logprobs, case, inputs, case.dtype)
    oracle = loss_grad_stats(reference.gvpo_loss_from_logprobs, case, inputs, torch.float64)
    loss, grad, stats = got
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == case.dtype and grad.shape == inputs["logprobs"].shape and torch.isfinite(grad).all()
    names = ("loss", "grad", "seq_logprob", "implicit_reward", "grad_seq_logprob")
    for name, g, b, o in zip(names, (loss, grad, *stats[:3]), (baseline[0], baseline[1], *baseline[2][:3]),
                             (oracle[0], oracle[1], *oracle[2][:3])):
        assert g.dtype == torch.float32 or name == "grad"
        err, base = rel_err(g, o), rel_err(b, o)
        assert err <= base + SLACK[case.dtype], f"{name}: error {err:.3g} vs the reference's {base:.3g}"
    assert stats.entropy.shape == (0,) and oracle[2].entropy.shape == (0,)
    # the gradient is dL/ds_i at each scored token of sequence i, and 0 elsewhere
    cu = inputs["kwargs"].get("cu_seqlens")
    seq = (torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff()) if cu is not None
           else torch.arange(grad.shape[0])[:, None].expand(grad.shape))
    want = torch.where(inputs["scored"], stats.grad_seq_logprob[seq], torch.zeros(()))
    torch.testing.assert_close(grad.float(), want.to(case.dtype).float(), rtol=0, atol=0)


def official_recipe_loss(log_prob, old_log_prob, rewards, response_mask, uids, beta):
    """The official GVPO code's per-micro-batch policy loss, written out from its description (its recipe runs
    verl's GRPO advantage with norm_adv_by_std_in_grpo=False, so each row's advantage is R_i - mean_G R):

        rtheta_i = beta * (sum_t log_prob * mask - sum_t old_log_prob * mask)
        m_G      = mean of rtheta over the rows of uid G (gathered over the ranks, *detached*)
        A_i      = R_i - mean_G R
        loss     = sum over rows i of 0.5 * ((rtheta_i - m_G) - A_i)^2, divided by (n - 1)

    with n the rollout count (it asserts every uid has n rows), then scaled by 1 / gradient accumulation steps.
    So its value is the sum over groups of L_G (reduction="sum"), and its gradient too: the detached mean drops
    -1/n sum_j d_j from each row's gradient, which is 0 because the d_j of a group sum to 0.
    """
    rtheta = beta * ((log_prob * response_mask).sum(-1) - (old_log_prob * response_mask).sum(-1))
    detached = rtheta.detach()
    loss = rtheta.new_zeros(())
    for i in range(len(uids)):
        same = [j for j in range(len(uids)) if uids[j] == uids[i]]
        n = len(same)
        mean_r = detached[same].mean()
        advantage = rewards[i] - rewards[same].mean()
        loss = loss + 0.5 * ((rtheta[i] - mean_r) - advantage) ** 2 / (n - 1)
    return loss


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("anchor", [True, False], ids=["anchor", "on-policy"])
def test_equals_official_recipe(n, anchor):
    """reduction="sum" is the official loss in value and gradient (float64); "mean" is it over the number of
    groups. On-policy (ref_logprobs=None) is the recipe's single-mini-batch case, old_log_prob = log_prob.detach()."""
    gen = torch.Generator().manual_seed(n)
    uids = [p for p in range(3) for _ in range(n)]
    random.Random(n).shuffle(uids)
    num, length = len(uids), 6
    log_prob = (-3 * torch.rand(num, length, generator=gen, dtype=torch.float64)).requires_grad_()
    old = log_prob.detach() + 0.2 * torch.randn(num, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(num, length, generator=gen) < 0.8
    rewards = torch.randint(0, 2, (num,), generator=gen).double()
    want = official_recipe_loss(log_prob, old if anchor else log_prob.detach(), rewards, mask.double(), uids, 0.1)
    (want_grad,) = torch.autograd.grad(want, log_prob)
    kwargs = dict(mask=mask, group_ids=torch.tensor(uids), beta=0.1)
    for reduction, scale in (("sum", 1.0), ("mean", 1.0 / 3)):
        results = {}
        for name, fn, dtype in (("ours", gk.gvpo_loss_from_logprobs, torch.float32),
                                ("reference fp32", reference.gvpo_loss_from_logprobs, torch.float32),
                                ("reference fp64", reference.gvpo_loss_from_logprobs, torch.float64)):
            leaf = log_prob.detach().to(dtype).requires_grad_()
            value = fn(leaf, rewards.to(dtype), reduction=reduction, ref_logprobs=old.to(dtype) if anchor else None,
                       **kwargs)
            results[name] = (value, torch.autograd.grad(value, leaf)[0])
        oracle = results["reference fp64"]  # the oracle is the official formula, to float64 rounding
        assert rel_err(oracle[0], scale * want) < 1e-12 and rel_err(oracle[1], scale * want_grad) < 1e-12
        for i, what in enumerate(("loss", "grad")):  # ours in float32: no worse than the reference in float32
            err = rel_err(results["ours"][i], scale * (want, want_grad)[i])
            base = rel_err(results["reference fp32"][i], scale * (want, want_grad)[i])
            assert err <= base + SLACK[torch.float32], (reduction, what, err, base)
    if not anchor:  # the value is constant; the gradient is -beta / (n - 1) (R_i - mean R) at each scored token
        advantage = rewards - torch.stack([rewards[[j for j in range(num) if uids[j] == u]].mean() for u in uids])
        torch.testing.assert_close(want_grad, (-0.1 / (n - 1) * advantage)[:, None] * mask.double())


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_equals_logits_loss(packed):
    """From the log-probs of logits, the same loss and logits gradient as gk.gvpo_loss on the logits."""
    gen = torch.Generator().manual_seed(4)
    num, length, vocab = 6, 7, 13
    logits = torch.randn(num, length, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (num, length), generator=gen)
    mask = torch.rand(num, length, generator=gen) < 0.8
    anchor = -3 * torch.rand(num, length, generator=gen, dtype=torch.float64)
    rewards = torch.randn(num, generator=gen, dtype=torch.float64)
    kwargs = dict(group_ids=torch.tensor([0, 1, 0, 1, 1, 2]), beta=0.5, reduction="sum")
    if packed:
        keep = torch.ones(num, length, dtype=torch.bool)
        keep[1, 5:] = False  # sequence 1 is shorter
        logits, labels, mask, anchor = logits[keep], labels[keep], mask[keep], anchor[keep]
        kwargs["cu_seqlens"] = torch.tensor([0] + keep.sum(1).cumsum(0).tolist())
    leaf = logits.clone().requires_grad_()
    want = gk.reference.gvpo_loss(leaf, labels, rewards, mask=mask, ref_logprobs=anchor, temperature=0.7, **kwargs)
    (want_grad,) = torch.autograd.grad(want, leaf)
    leaf = logits.clone().requires_grad_()
    token_logprobs = torch.log_softmax(leaf / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    got = gk.gvpo_loss_from_logprobs(token_logprobs, rewards, mask=mask, ref_logprobs=anchor, **kwargs)
    (grad,) = torch.autograd.grad(got, leaf)
    assert rel_err(got, want) < 1e-6 and rel_err(grad, want_grad) < 1e-6


def test_groups_of_one_add_nothing():
    """A group of one adds no loss and no gradient, whatever its reward; all-equal rewards are fine."""
    lp = (-torch.rand(5, 4)).requires_grad_()
    anchor = -torch.rand(5, 4)
    ids = torch.tensor([0, 1, 1, 2, 2])
    loss = gk.gvpo_loss_from_logprobs(lp, torch.tensor([9.0, 1.0, 1.0, 0.0, 2.0]), group_ids=ids,
                                      ref_logprobs=anchor, reduction="sum")
    loss.backward()
    assert lp.grad[0].eq(0).all() and lp.grad[1:].ne(0).any()
    without = gk.gvpo_loss_from_logprobs(lp[1:], torch.tensor([1.0, 1.0, 0.0, 2.0]), group_ids=ids[1:],
                                         ref_logprobs=anchor[1:], reduction="sum")
    torch.testing.assert_close(loss, without)


def test_scaled_upstream_gradient_and_no_double_backward():
    lp = (-torch.rand(4, 3)).requires_grad_()
    kwargs = dict(group_size=2, ref_logprobs=-torch.rand(4, 3))
    (grad,) = torch.autograd.grad(gk.gvpo_loss_from_logprobs(lp, torch.randn(4), **kwargs), lp)
    torch.manual_seed(0)
    rewards = torch.randn(4)
    (g1,) = torch.autograd.grad(gk.gvpo_loss_from_logprobs(lp, rewards, **kwargs), lp)
    (g3,) = torch.autograd.grad(3 * gk.gvpo_loss_from_logprobs(lp, rewards, **kwargs), lp)
    torch.testing.assert_close(g3, 3 * g1)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(gk.gvpo_loss_from_logprobs(lp, rewards, **kwargs), lp, create_graph=True)
    assert grad.shape == lp.shape


def test_no_grad_and_mixed_dtypes():
    """Under no_grad the loss is computed all the same; float64 rewards with float32 log-probs are fine."""
    lp, rewards = -torch.rand(4, 3), torch.randn(4, dtype=torch.float64)
    with torch.no_grad():
        loss = gk.gvpo_loss_from_logprobs(lp, rewards, group_size=2, ref_logprobs=lp - 0.1)
    want = reference.gvpo_loss_from_logprobs(lp.double(), rewards, group_size=2, ref_logprobs=lp.double() - 0.1)
    assert rel_err(loss, want) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", [Case(), Case(packed=True, groups=(2, 3, 1, 5), shuffled=True, dtype=torch.bfloat16),
                                  Case(anchor=False, reduction="sum")], ids=lambda c: c.id)
def test_cuda_matches_reference(case):
    """On the GPU: CUDA tensors in, the loss, gradient and stats on the GPU, against the float64 reference."""
    inputs = make(case)
    to_cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs["kwargs"].items()}
    leaf = inputs["logprobs"].to(case.dtype).cuda().requires_grad_()
    anchor = None if inputs["anchor"] is None else inputs["anchor"].to(case.dtype).cuda()
    loss, stats = gk.gvpo_loss_from_logprobs(leaf, inputs["rewards"].to(case.dtype).cuda(), ref_logprobs=anchor,
                                             return_stats=True, **to_cuda)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert loss.is_cuda and grad.is_cuda and stats.grad_seq_logprob.is_cuda and grad.dtype == case.dtype
    oracle = loss_grad_stats(reference.gvpo_loss_from_logprobs, dataclasses.replace(case, strided=False), inputs,
                             torch.float64)
    baseline = loss_grad_stats(reference.gvpo_loss_from_logprobs, dataclasses.replace(case, strided=False), inputs,
                               case.dtype)
    for got, base, want in ((loss, baseline[0], oracle[0]), (grad, baseline[1], oracle[1]),
                            (stats.grad_seq_logprob, baseline[2].grad_seq_logprob, oracle[2].grad_seq_logprob)):
        assert rel_err(got.cpu(), want) <= rel_err(base, want) + SLACK[case.dtype]


# ---- bad input ---------------------------------------------------------------------------------------------------

B, T = 4, 3


def good():
    return dict(token_logprobs=-torch.rand(B, T), rewards=torch.randn(B), group_size=2)


def good_packed():
    return dict(token_logprobs=-torch.rand(6), rewards=torch.randn(2), group_size=2,
                cu_seqlens=torch.tensor([0, 2, 6]))


ERRORS = {
    "logprobs-not-tensor": (changed(good, token_logprobs=[[-1.0]]), TypeError, "token_logprobs"),
    "logprobs-int": (changed(good, token_logprobs=torch.zeros(B, T, dtype=torch.int64)), TypeError,
                     "token_logprobs"),
    "logprobs-3d": (changed(good, token_logprobs=torch.zeros(B, T, 5)), ValueError, "token_logprobs"),
    "logprobs-0d": (changed(good, token_logprobs=torch.zeros(())), ValueError, "token_logprobs"),
    **sequence_errors(good, good_packed, B, T),
}


def call(fn, args):
    args = dict(args)
    return fn(args.pop("token_logprobs"), args.pop("rewards"), **args)


@pytest.mark.parametrize("fn", [gk.gvpo_loss_from_logprobs, reference.gvpo_loss_from_logprobs],
                         ids=["fused", "reference"])
@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_is_named(name, fn):
    args, error, argument = ERRORS[name]
    with pytest.raises(error, match=argument):
        call(fn, args)


def test_bad_process_group_is_named():
    with pytest.raises(TypeError, match="group_process_group"):
        call(gk.gvpo_loss_from_logprobs, changed(good, group_process_group="world"))


def test_good_inputs_pass():
    """The bases of the error table are valid, as are numpy integers and bools."""
    np = pytest.importorskip("numpy")
    for base in (good, good_packed):
        call(gk.gvpo_loss_from_logprobs, base())
    args = changed(good, group_size=np.int64(2), return_stats=np.bool_(False))
    torch.testing.assert_close(call(gk.gvpo_loss_from_logprobs, args),
                               call(gk.gvpo_loss_from_logprobs, dict(args, group_size=2, return_stats=False)))


# ---- across ranks ------------------------------------------------------------------------------------------------

def test_two_ranks_groups_split(tmp_path):
    """2 gloo processes, groups split over the ranks in uneven shares (padded and packed, anchor or not, mean and
    sum): each rank's loss, gradient and stats equal the single-process float64 reference; a bad input on one rank
    raises on both."""
    mp.spawn(logprob_loss_worker.run, args=(2, str(tmp_path / "init")), nprocs=2)
