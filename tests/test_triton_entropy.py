"""The Triton backend's token statistics with entropy, its own functions called directly in the interpreter:
logprob.token_stats_forward / token_stats_backward (logits), linear.linear_token_stats_forward / backward and
linear_loss_and_grads(entropy=True) on every GEMM schedule (linear path), against the float64 oracle
(gvpo_kernels.reference) within PyTorch's own error at the input dtype plus the slack of tests/cases.py.

(tests/test_token_logprobs.py runs the public gk.token_logprobs(return_entropy=True) on every backend.)
"""

import pytest
import torch
from cases import SLACK, Case, assert_within_pytorch_error, make_inputs
from conftest import DEVICE

import gvpo_kernels as gk
from gvpo_kernels import layout, torch_impl
from gvpo_kernels.triton import linear, logprob

pytestmark = pytest.mark.skipif(DEVICE.type == "cpu" and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton runs on the CPU only in its interpreter")

BASE = Case(groups=(3, 2), seq_len=17, vocab=257)
LOGITS_CASES = [BASE] + [BASE.replace(**change) for change in (
    dict(layout="packed"), dict(dtype=torch.bfloat16), dict(dtype=torch.float16), dict(temperature=0.7),
    dict(dtype=torch.bfloat16, temperature=0.7), dict(vocab=3001), dict(vocab=1), dict(seq_len=1),
    dict(mask="none"), dict(mask="empty"), dict(ignore=True), dict(sliced=True))]
LINEAR_BASE = BASE.replace(hidden_size=16, vocab=200, seq_len=11)  # 4 vocabulary tiles, 2 chunks of rows
LINEAR_CASES = [c.replace(hidden_size=16, vocab=200, seq_len=11, bias=c.layout == "packed") for c in LOGITS_CASES
                if c.vocab == 257 and c.seq_len == 17] + [LINEAR_BASE.replace(dtype=torch.bfloat16, temperature=0.7,
                                                                              bias=True)]


def _stats_inputs(inputs):
    kw = inputs["kwargs"]
    return dict(temperature=kw["temperature"], mask=kw["mask"], cu_seqlens=kw.get("cu_seqlens"))


def _target(labels, vocab, kwargs):
    return layout.token_targets(labels, vocab_size=vocab, mask=kwargs["mask"], cu_seqlens=kwargs["cu_seqlens"])


def _upstream(shape, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(DEVICE) for _ in range(2)]


def _coefs(target, upstream, temperature):
    """What ops hands the backends: the upstream gradients / T, 0 where not scored, (N,) float32 contiguous."""
    return [torch.where(target >= 0, u.reshape(-1).float() / temperature, 0.0).contiguous() for u in upstream]


def _oracle(fn, leaves, labels, kwargs, upstream, dtype=None, **extra):
    """(token_logprob, token_entropy) flat and the gradients at fresh leaves of sum(u_lp lp + u_ent ent)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in leaves]
    args, bias = (leaves, {}) if len(leaves) == 1 else (leaves[:2], dict(bias=leaves[2]))
    lp, ent = fn(*args, labels, return_entropy=True, **bias, **kwargs, **extra)
    ((lp * upstream[0].to(lp.dtype)).sum() + (ent * upstream[1].to(ent.dtype)).sum()).backward()
    return [lp.detach().reshape(-1), ent.detach().reshape(-1)], [None if t is None else t.grad for t in leaves]


def _check_unscored(target, *outs):
    for out in outs:
        assert out.dtype == torch.float32 and out.shape == target.shape
        assert (out[target < 0] == 0).all(), "unscored tokens must hold 0"


# ----------------------------------------------------------------------------------------------------------------
# logits path


def _logits_stats(logits, target, temperature, upstream):
    """token_stats_forward, then token_stats_backward into a NaN-poisoned buffer: (lp, lse, ent), grad."""
    rows = layout.as_rows(logits)
    token_logprob, lse, token_entropy = logprob.token_stats_forward(rows, target, temperature)
    out = torch.full(rows.shape, float("nan"), dtype=rows.dtype, device=rows.device)
    logprob.token_stats_backward(rows, target, lse, token_entropy, *_coefs(target, upstream, temperature),
                                 temperature, out)
    return (token_logprob, lse, token_entropy), out.view(logits.shape)


def _check_logits(logits, labels, kwargs, dtype):
    target = _target(labels, logits.shape[-1], kwargs)
    upstream = _upstream(labels.shape)
    (lp, lse, ent), grad = _logits_stats(logits.detach(), target, kwargs["temperature"], upstream)
    _check_unscored(target, lp, ent)
    assert torch.isfinite(lse[target >= 0]).all()
    oracle = _oracle(gk.reference.token_logprobs, [logits], labels, kwargs, upstream, torch.float64)
    baseline = _oracle(gk.reference.token_logprobs, [logits], labels, kwargs, upstream)
    assert_within_pytorch_error(["logprob", "entropy", "grad"], [lp, ent, grad], baseline[0] + baseline[1],
                                oracle[0] + oracle[1], SLACK[dtype])
    return target, lp, ent, grad


@pytest.mark.parametrize("case", LOGITS_CASES, ids=lambda c: c.id)
def test_logits_stats_against_the_oracle(case):
    """Log-prob, entropy and the gradient of sum(u_lp lp + u_ent ent) for random u, per layout, dtype and T."""
    inputs = make_inputs(case, DEVICE)
    target, *_, grad = _check_logits(inputs["logits"], inputs["labels"], _stats_inputs(inputs), case.dtype)
    assert (grad.reshape(target.numel(), -1)[target < 0] == 0).all(), "unscored rows get zero gradients"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_stats_with_minus_inf_columns_and_blocks(dtype):
    """-inf columns (every 7th) and a whole -inf block of BLOCK_V columns in both kernels: p = 0 adds exactly 0 to
    the entropy and its gradient, nothing is NaN."""
    vocab = 3001
    inputs = make_inputs(Case(groups=(2, 2), seq_len=5, vocab=vocab, mask="none", dtype=dtype, temperature=0.7),
                         DEVICE)
    logits = inputs["logits"].detach().clone()
    block = logprob.block_params(vocab, logits.element_size(), logprob.FWD_VECTORS)["BLOCK_V"]
    dead = torch.zeros(vocab, dtype=torch.bool)
    dead[::7] = True
    dead[block:2 * block] = True
    logits[..., dead] = float("-inf")
    labels = torch.nonzero(~dead).squeeze(1)[inputs["labels"] % int((~dead).sum())]
    _, _, ent, grad = _check_logits(logits, labels, dict(temperature=0.7, mask=None, cu_seqlens=None), dtype)
    assert torch.isfinite(ent).all() and (grad[..., dead] == 0).all()


def test_logits_stats_of_peaked_and_uniform_rows():
    """A peaked row (one logit far above the rest: lse and E[z] nearly cancel) and a uniform row (H = log V)."""
    vocab = 500
    logits = torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    logits[0, :, 11] += 30.0
    logits[1] = 0.0
    labels = torch.full((2, 3), 11, device=DEVICE)
    _, _, ent, _ = _check_logits(logits, labels, dict(temperature=1.0, mask=None, cu_seqlens=None), torch.float32)
    torch.testing.assert_close(ent[3:], torch.full((3,), float(torch.log(torch.tensor(float(vocab))))))
    assert (ent[:3] > 0).all() and (ent[:3] < 1e-6).all()


def test_flag_off_is_the_log_prob_kernel():
    """token_stats_forward's log-prob and lse are token_forward's; the backward with c_ent = 0 is token_backward's
    (each token its own sequence)."""
    inputs = make_inputs(Case(groups=(2, 2), seq_len=9, vocab=300, temperature=0.7), DEVICE)
    kwargs = _stats_inputs(inputs)
    logits = inputs["logits"].detach()
    target = _target(inputs["labels"], 300, kwargs)
    rows = layout.as_rows(logits)
    lp, lse, ent = logprob.token_stats_forward(rows, target, 0.7)
    lp0, lse0 = logprob.token_forward(rows, target, 0.7)
    torch.testing.assert_close(lp, lp0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, lse0, rtol=0, atol=0)
    upstream = _upstream(target.shape)
    upstream[1] = torch.zeros_like(upstream[1])
    c_lp, c_ent = _coefs(target, upstream, 0.7)
    got = torch.full_like(rows, float("nan"))
    logprob.token_stats_backward(rows, target, lse, ent, c_lp, c_ent, 0.7, got)
    lay = layout.Layout(target=target, token_seq=torch.arange(target.numel(), device=DEVICE), token_ref=None,
                        cu_seqlens=None, rewards=None, seq_group=None, group_order=None, group_ptr=None,
                        max_group_size=1, scale=1.0)
    want = torch.full_like(rows, float("nan"))
    logprob.token_backward(rows, lay, lse, upstream[0].reshape(-1).float(), torch.ones(()), 0.7, want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# linear path


def _linear_leaves(inputs):
    return [inputs["hidden"], inputs["weight"], inputs["bias"]]


def _check_linear(inputs, dtype, bias=None):
    kwargs = _stats_inputs(inputs)
    hidden, weight = inputs["hidden"].detach(), inputs["weight"].detach()
    bias = inputs["bias"] if bias is None else bias
    bias = None if bias is None else bias.detach()
    labels, temperature = inputs["labels"], kwargs["temperature"]
    target = _target(labels, weight.shape[0], kwargs)
    upstream = _upstream(labels.shape)
    rows = layout.as_rows(hidden)
    lp, lse, ent = linear.linear_token_stats_forward(rows, weight, bias, target, temperature)
    _check_unscored(target, lp, ent)
    grads = linear.linear_token_stats_backward(rows, weight, bias, target, lse, ent,
                                               *_coefs(target, upstream, temperature), temperature)
    d_hidden, d_weight, d_bias = grads
    assert d_hidden.dtype == hidden.dtype and d_weight.dtype == weight.dtype and (d_bias is None) == (bias is None)
    leaves = [hidden, weight, bias]
    oracle = _oracle(gk.reference.linear_token_logprobs, leaves, labels, kwargs, upstream, torch.float64)
    baseline = _oracle(gk.reference.linear_token_logprobs, leaves, labels, kwargs, upstream)
    assert_within_pytorch_error(["logprob", "entropy", "d_hidden", "d_weight", "d_bias"],
                                [lp, ent, d_hidden.reshape(hidden.shape), d_weight, d_bias], baseline[0] + baseline[1],
                                oracle[0] + oracle[1], SLACK[dtype])
    return ent


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.id)
def test_linear_stats_against_the_oracle(case, monkeypatch):
    """linear_token_stats_forward / backward: log-prob, entropy, d_hidden, d_weight, d_bias, in chunks of one
    BLOCK_N of rows, the forward over several vocabulary splits (merged with the entropy's sums)."""
    monkeypatch.setattr(linear, "CHUNK_BYTES", 1)
    _check_linear(make_inputs(case, DEVICE), case.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_stats_with_minus_inf_tiles_and_splits(dtype):
    """A bias of -inf on every 5th column, on a whole vocabulary tile and on a whole split of the forward: their
    p = 0 adds exactly 0, and a split of -inf logits merges without NaN."""
    vocab, hidden_size = 333, 16
    inputs = make_inputs(Case(hidden_size=hidden_size, vocab=vocab, seq_len=12, groups=(2, 1), bias=True,
                              dtype=dtype, temperature=0.7), DEVICE)
    config = linear.tile_config(dtype, hidden_size, linear.device_of(DEVICE))
    tiles = -(-vocab // config["BLOCK_V"])
    splits = linear.num_splits(36, vocab, config, linear.device_of(DEVICE))
    assert splits > 1
    per_split = -(-tiles // splits) * config["BLOCK_V"]
    bias = inputs["bias"].detach().clone()
    dead = torch.zeros(vocab, dtype=torch.bool)
    dead[::5] = True
    dead[per_split:2 * per_split] = True  # the whole second split
    bias[dead] = float("-inf")
    inputs["labels"] = torch.nonzero(~dead).squeeze(1)[inputs["labels"] % int((~dead).sum())]
    ent = _check_linear(inputs, dtype, bias=bias)
    assert torch.isfinite(ent).all()


def _loss_call(inputs, entropy, needs=(True, True, True)):
    kwargs = {k: v for k, v in inputs["kwargs"].items() if k in ("mask", "group_size", "group_ids", "cu_seqlens",
                                                                 "ref_logprobs")}
    weight = inputs["weight"].detach()
    lay = layout.build(inputs["labels"], inputs["rewards"], vocab_size=weight.shape[0], **kwargs)
    bias = None if inputs["bias"] is None else inputs["bias"].detach()
    rows = layout.as_rows(inputs["hidden"].detach())
    out = linear.linear_loss_and_grads(rows, weight, bias, lay, 0.1, inputs["kwargs"]["temperature"],
                                       (needs[0], needs[1], needs[2] and bias is not None), entropy=entropy)
    return out, lay, rows, weight, bias


@pytest.mark.parametrize("schedule, anchor, rows_per_chunk", [
    ("three-on-policy", False, 64), ("three-anchored-group-chunks", True, 128), ("four-group-too-big", True, 64),
    ("no-gradients", True, 64)], ids=lambda v: v if isinstance(v, str) else None)
def test_loss_and_grads_with_entropy_on_every_schedule(schedule, anchor, rows_per_chunk, monkeypatch):
    """linear_loss_and_grads(entropy=True): the 7 outputs of entropy=False, then token_entropy (N,) float32 from
    the same forward (three GEMMs: the storing forward; four: the plain one), equal to torch_impl's and within
    PyTorch's error of the float64 oracle; 0 where not scored."""
    inputs = make_inputs(Case(hidden_size=16, vocab=130, seq_len=30, groups=(3, 1, 2), shuffled=True, bias=True,
                              anchor=anchor, temperature=0.7), DEVICE)
    monkeypatch.setattr(linear, "CHUNK_BYTES", rows_per_chunk * 130 * 4)
    calls = []
    grad_from_exp = linear.grad_from_exp_plan
    monkeypatch.setattr(linear, "grad_from_exp_plan", lambda *a, **k: calls.append(1) or grad_from_exp(*a, **k))
    needs = (False, False, False) if schedule == "no-gradients" else (True, True, True)
    got, lay, rows, weight, bias = _loss_call(inputs, True, needs)
    assert bool(calls) == schedule.startswith("three")
    plain, *_ = _loss_call(inputs, False, needs)
    assert len(got) == 8 and len(plain) == 7
    for g, p in zip(got[:7], plain):
        if p is None:
            assert g is None
        else:
            torch.testing.assert_close(g, p, rtol=1e-5, atol=1e-6)
    token_entropy = got[7]
    _check_unscored(lay.target, token_entropy)
    want = torch_impl.linear_token_stats_forward(rows, weight, bias, lay.target, 0.7)[2]
    torch.testing.assert_close(token_entropy, want, rtol=1e-5, atol=1e-6)
    kwargs = _stats_inputs(inputs)
    leaves = _linear_leaves(inputs)
    upstream = [torch.zeros_like(u) for u in _upstream(inputs["labels"].shape)]
    oracle = _oracle(gk.reference.linear_token_logprobs, leaves, inputs["labels"], kwargs, upstream, torch.float64)
    baseline = _oracle(gk.reference.linear_token_logprobs, leaves, inputs["labels"], kwargs, upstream)
    assert_within_pytorch_error(["entropy"], [token_entropy], baseline[0][1:], oracle[0][1:], SLACK[torch.float32])


def test_linear_stats_buffers_do_not_grow_with_tokens(monkeypatch):
    """linear_token_stats_forward + backward at N and 4N tokens: the largest tensor is the same (one chunk of
    BLOCK_N rows, the head's gradient), nothing N x V."""
    from test_linear import LargestTensor

    monkeypatch.setattr(linear, "CHUNK_BYTES", 1)
    vocab, largest = 256, []
    for seq_len in (16, 64):  # every token scored: chunks of exactly BLOCK_N rows at both sizes
        inputs = make_inputs(Case(hidden_size=16, vocab=vocab, seq_len=seq_len, groups=(4,), anchor=False,
                                  mask="none"), DEVICE)
        kwargs = _stats_inputs(inputs)
        rows, weight = layout.as_rows(inputs["hidden"].detach()), inputs["weight"].detach()
        target = _target(inputs["labels"], vocab, kwargs)
        coefs = _coefs(target, _upstream(inputs["labels"].shape), 1.0)
        with LargestTensor() as mode:
            _, lse, ent = linear.linear_token_stats_forward(rows, weight, None, target, 1.0)
            linear.linear_token_stats_backward(rows, weight, None, target, lse, ent, *coefs, 1.0)
        largest.append(mode.largest)
    block_n = linear.tile_config(torch.float32, 16, linear.device_of(DEVICE))["BLOCK_N"]
    assert largest[0] == largest[1] <= block_n * vocab * 4 < 4 * 64 * vocab * 4
