"""Every backend's kernels through the written contract (gvpo_kernels/backend.py), called directly: the token
stage on logits (token_forward / token_backward) and on hidden states (linear_work driven by the shared schedule),
against the float64 oracle (gvpo_kernels.reference) within PyTorch's own error at the input dtype plus the slack
of tests/cases.py: log-probs, entropies, and the gradients of sum(u_lp * log-prob + u_ent * entropy) for random
upstream gradients u, at confident rows and small temperatures, with -inf columns, tiles and splits, on every GEMM
schedule. Outputs start as NaN (tests/conftest.py), so an element a kernel never writes fails.

(The public entry points are tested in test_token_logprobs.py, test_gvpo_loss.py and test_linear.py.)
"""

import pytest
import torch
from helpers.cases import SLACK, Case, another_slice_case, assert_within_pytorch_error, make_inputs
from conftest import DEVICE

import gvpo_kernels as gk
from gvpo_kernels import backend as contract
from gvpo_kernels import layout, schedule
from gvpo_kernels.backend import Coefs, LogitSpec, upstream_coefs
from gvpo_kernels.ops.common import Options, Stage

NEG_INF = float("-inf")
# A small temperature at which the inputs get near ties (with_near_ties), and a power of 2, so that z = logits / T
# is exact both here and in PyTorch: the errors compared are then those of the algorithms alone.
TIES_T = 2.0**-13

BASE = Case(groups=(3, 2), seq_len=17, vocab=257)
LOGITS_CASES = [BASE] + [BASE.replace(**change) for change in (
    dict(layout="packed"), dict(dtype=torch.bfloat16), dict(dtype=torch.float16), dict(temperature=0.7),
    dict(dtype=torch.bfloat16, temperature=0.7), dict(vocab=3001), dict(vocab=1), dict(seq_len=1),
    dict(mask="none"), dict(mask="empty"), dict(ignore=True), dict(sliced=True))]
LINEAR_BASE = BASE.replace(hidden_size=16, vocab=200, seq_len=11)
LINEAR_CASES = [LINEAR_BASE] + [LINEAR_BASE.replace(**change) for change in (
    dict(layout="packed", bias=True), dict(dtype=torch.bfloat16), dict(dtype=torch.float16), dict(temperature=0.7),
    dict(mask="empty"), dict(ignore=True), dict(dtype=torch.bfloat16, temperature=0.7, bias=True))]


def stats_kwargs(inputs, temperature=None):
    kw = inputs["kwargs"]
    out = dict(temperature=kw["temperature"] if temperature is None else temperature, mask=kw["mask"],
               cu_seqlens=kw.get("cu_seqlens"))
    out.update({k: kw[k] for k in ("softcap", "logit_scale") if k in kw})
    return out


def spec_of(kwargs) -> LogitSpec:
    return LogitSpec(kwargs["temperature"], kwargs.get("softcap"), kwargs.get("logit_scale", 1.0))


def targets(labels, vocab, kwargs):
    return layout.token_targets(labels, vocab_size=vocab, mask=kwargs["mask"], cu_seqlens=kwargs["cu_seqlens"])


def upstream(shape, which="both", seed=7):
    """Random upstream gradients of the log-probs and the entropies; "entropy": the log-prob's are 0."""
    gen = torch.Generator().manual_seed(seed)
    g_lp, g_ent = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(2))
    return (torch.zeros_like(g_lp) if which == "entropy" else g_lp), g_ent


def oracle(fn, leaves, labels, kwargs, grads, dtype=None):
    """[log-prob, entropy] flat and the gradients at fresh leaves of sum(g_lp lp + g_ent ent)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in leaves]
    args, bias = (leaves, {}) if len(leaves) == 1 else (leaves[:2], dict(bias=leaves[2]))
    lp, ent = fn(*args, labels, return_entropy=True, **bias, **kwargs)
    ((lp * grads[0].to(lp.dtype)).sum() + (ent * grads[1].to(ent.dtype)).sum()).backward()
    return [lp.detach().reshape(-1), ent.detach().reshape(-1)] + [None if t is None else t.grad for t in leaves]


def check_unscored(target, *per_token):
    """Each tensor's rows of unscored tokens are 0 (per-token statistics, normalisers, gradients)."""
    for values in per_token:
        assert (values.reshape(target.numel(), -1)[target < 0] == 0).all(), "unscored tokens must hold 0"


def with_near_ties(logits, temperature, allowed=None, seed=4):
    """At TIES_T random logits are one-hot (entropy 0, nothing tested): give each row 3 rivals within 2 T below
    its largest logit, so that z = logits / T is large (~1e4) while the entropy is of order 1."""
    if temperature != TIES_T:
        return logits
    gen = torch.Generator().manual_seed(seed)
    vocab = logits.shape[-1]
    x = logits.detach().float().reshape(-1, vocab).clone()
    columns = torch.arange(vocab) if allowed is None else allowed
    rivals = columns[torch.randint(0, columns.numel(), (x.shape[0], 3), generator=gen)].to(x.device)
    x.scatter_(1, rivals, x.max(1, keepdim=True).values - 2 * temperature * torch.rand(x.shape[0], 3, generator=gen)
               .to(x.device))
    return x.view(logits.shape).to(logits.dtype)


def confident(logits, scale):
    """Logits of the given scale with one clear winner per row (confident rows), as a trained policy gives."""
    x = logits.detach().float() * (scale / 2.0)
    winner = x.argmax(-1, keepdim=True)
    return x.scatter_add(-1, winner, torch.full_like(winner, scale / 3, dtype=x.dtype)).to(logits.dtype)


# ----------------------------------------------------------------------------------------------------------------
# the logits path


def logits_stats(name, logits, target, spec, grads):
    """token_forward, then token_backward into a NaN-poisoned buffer: log-prob, entropy, norm, gradient."""
    impl = contract.get(name)
    rows = layout.as_rows(logits)
    stats = impl.token_forward(rows, target, spec, True)
    assert stats.norm.shape == (2, target.numel()) and stats.norm.dtype == torch.float32
    out = torch.full(rows.shape, float("nan"), dtype=rows.dtype, device=rows.device)
    impl.token_backward(rows, target, stats.norm, upstream_coefs(target, *grads, stats.entropy, spec), spec, out)
    return stats, out.view(logits.shape)


def check_logits(name, logits, labels, kwargs, dtype, which="both"):
    target = targets(labels, logits.shape[-1], kwargs)
    grads = upstream(labels.shape, which)
    stats, grad = logits_stats(name, logits.detach(), target, spec_of(kwargs), grads)
    assert all(t.dtype == torch.float32 for t in stats) and grad.dtype == logits.dtype
    check_unscored(target, stats.logprob, stats.entropy, stats.norm.T, grad)
    want = oracle(gk.reference.token_logprobs, [logits], labels, kwargs, grads, torch.float64)
    baseline = oracle(gk.reference.token_logprobs, [logits], labels, kwargs, grads)
    # the gradient of the entropies alone is judged on the entropies' scale (cases.ENTROPY_FLOOR): at T = 0.1 a
    # confident row's entropy and its gradient are ~1e-40, below float32's normal range in PyTorch as here
    grad_name = "grad" if which == "both" else "grad_of_entropy"
    assert_within_pytorch_error(["logprob", "entropy", grad_name], [stats.logprob, stats.entropy, grad], baseline,
                                want, SLACK[dtype])
    return target, stats, grad


@pytest.mark.parametrize("case", LOGITS_CASES, ids=lambda c: c.id)
def test_logits_stats_against_the_oracle(backend, case):
    inputs = make_inputs(case, DEVICE)
    check_logits(backend, inputs["logits"], inputs["labels"], stats_kwargs(inputs), case.dtype)


@pytest.mark.parametrize("scale", [10.0, 30.0], ids=lambda s: f"scale{s:g}")
@pytest.mark.parametrize("temperature", [1e-3, 1e-2, 0.1, 0.3, 1.0], ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("which", ["both", "entropy"])
def test_logits_stats_of_confident_rows(backend, temperature, scale, which):
    """Logits up to ~30 with a clear winner per row, small temperatures: every p is formed from the row's shift
    and log-sum, so the log-probs, entropies and both gradients have PyTorch's own float32 error (a float32 lse of
    magnitude ~1e4 would put an ulp of it into every p)."""
    inputs = make_inputs(Case(groups=(2, 2), seq_len=9, vocab=1000), DEVICE)
    logits = confident(inputs["logits"], scale)
    check_logits(backend, logits, inputs["labels"], stats_kwargs(inputs, temperature), torch.float32, which)


SOFTCAPS = [dict(softcap=30.0), dict(softcap=50.0, temperature=0.3), dict(softcap=30.0, logit_scale=0.5),
            dict(logit_scale=0.25), dict(logit_scale=3.0, temperature=0.7)]


@pytest.mark.parametrize("transform", SOFTCAPS, ids=lambda d: "-".join(f"{k}{v:g}" for k, v in d.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_soft_capped_and_scaled_logits(backend, transform, dtype):
    """Gemma-2's soft-cap (in the streaming pass, its derivative 1 - tanh^2 in the backward) and a logit scale, at
    confident rows (logits up to ~30, so the cap bites): log-probs, entropies and both gradients."""
    inputs = make_inputs(Case(groups=(2, 2), seq_len=9, vocab=1000, dtype=dtype), DEVICE)
    kwargs = dict(stats_kwargs(inputs, transform.get("temperature", 1.0)),
                  **{k: v for k, v in transform.items() if k != "temperature"})
    check_logits(backend, confident(inputs["logits"], 30.0), inputs["labels"], kwargs, dtype)


@pytest.mark.parametrize("transform", SOFTCAPS, ids=lambda d: "-".join(f"{k}{v:g}" for k, v in d.items()))
def test_linear_soft_capped_and_scaled_logits(backend, transform, small_chunks_of):
    small_chunks_of(backend)
    inputs = make_inputs(Case(hidden_size=16, groups=(2, 3), seq_len=9, bias=True, scale=30.0), DEVICE)
    inputs["kwargs"].update({k: v for k, v in transform.items() if k != "temperature"})
    inputs["kwargs"]["temperature"] = transform.get("temperature", 1.0)
    check_linear(backend, inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("which", ["both", "entropy"])
def test_logits_stats_of_near_ties_at_a_tiny_temperature(backend, dtype, which):
    inputs = make_inputs(Case(groups=(2, 3), seq_len=9, dtype=dtype), DEVICE)
    logits = with_near_ties(inputs["logits"], TIES_T)
    check_logits(backend, logits, inputs["labels"], stats_kwargs(inputs, TIES_T), dtype, which)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_stats_with_minus_inf_columns_and_blocks(backend, dtype):
    """-inf columns (every 7th) and a whole run of 1024 columns (a block of every backend's pass): p = 0 adds exactly
    0 to the sum, the entropy and the gradient; nothing is NaN."""
    vocab = 3001
    inputs = make_inputs(Case(groups=(2, 2), seq_len=5, vocab=vocab, mask="none", dtype=dtype, temperature=0.7),
                         DEVICE)
    logits = inputs["logits"].detach().clone()
    dead = torch.zeros(vocab, dtype=torch.bool)
    dead[::7] = True
    dead[1024:2048] = True
    logits[..., dead] = NEG_INF
    labels = torch.nonzero(~dead).squeeze(1).to(DEVICE)[inputs["labels"] % int((~dead).sum())]
    _, stats, grad = check_logits(backend, logits, labels, dict(temperature=0.7, mask=None, cu_seqlens=None), dtype)
    assert torch.isfinite(stats.entropy).all() and (grad[..., dead.to(DEVICE)] == 0).all()


def test_logits_stats_of_peaked_and_uniform_rows(backend):
    """A peaked row (one logit far above the rest: lse and E[z] nearly cancel) and a uniform row (H = log V)."""
    vocab = 500
    logits = torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    logits[0, :, 11] += 30.0
    logits[1] = 0.0
    labels = torch.full((2, 3), 11, device=DEVICE)
    _, stats, _ = check_logits(backend, logits, labels, dict(temperature=1.0, mask=None, cu_seqlens=None),
                               torch.float32)
    torch.testing.assert_close(stats.entropy[3:], torch.full((3,), float(torch.log(torch.tensor(float(vocab)))),
                                                             device=DEVICE))
    assert (stats.entropy[:3] > 0).all() and (stats.entropy[:3] < 1e-6).all()


@pytest.mark.parametrize("temperature", [0.7, TIES_T], ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_backward_in_place(backend, dtype, temperature):
    """out may be rows itself (the gradient overwrites the logits): the same bits as into another buffer."""
    inputs = make_inputs(Case(groups=(2, 2), seq_len=9, vocab=3001, dtype=dtype), DEVICE)
    rows = layout.as_rows(with_near_ties(inputs["logits"].detach(), temperature))
    target = targets(inputs["labels"], 3001, stats_kwargs(inputs))
    impl, spec = contract.get(backend), LogitSpec(temperature)
    stats = impl.token_forward(rows, target, spec, True)
    coefs = upstream_coefs(target, *upstream(inputs["labels"].shape), stats.entropy, spec)
    want = torch.full_like(rows, float("nan"))
    impl.token_backward(rows, target, stats.norm, coefs, spec, want)
    got = rows.clone()
    impl.token_backward(got, target, stats.norm, coefs, spec, got)
    assert torch.equal(got, want)


def test_entropy_flag_changes_nothing_else(backend):
    """token_forward(entropy=True) gives the log-prob and normaliser bits of entropy=False; the backward without
    an entropy coefficient gives the bits of the log-prob-only backward."""
    inputs = make_inputs(Case(groups=(2, 2), seq_len=9, vocab=3001), DEVICE)
    rows = layout.as_rows(inputs["logits"].detach())
    target = targets(inputs["labels"], 3001, stats_kwargs(inputs))
    impl, spec = contract.get(backend), LogitSpec(0.7)
    with_entropy, without = impl.token_forward(rows, target, spec, True), impl.token_forward(rows, target, spec, False)
    assert without.entropy is None
    assert torch.equal(with_entropy.logprob, without.logprob) and torch.equal(with_entropy.norm, without.norm)
    c_lp = upstream_coefs(target, upstream(inputs["labels"].shape)[0], None, None, spec).logprob
    got, want = torch.full_like(rows, float("nan")), torch.full_like(rows, float("nan"))
    impl.token_backward(rows, target, without.norm, Coefs(c_lp, torch.zeros_like(c_lp), with_entropy.entropy), spec,
                        got)
    impl.token_backward(rows, target, without.norm, Coefs(c_lp), spec, want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_logits_path_is_bitwise_the_same_at_every_thread_count():
    if contract.unavailable_reason("cpu", DEVICE) is not None:
        pytest.skip("the C++ kernels run on CPU tensors, once built")
    inputs = make_inputs(Case(groups=(2, 2), seq_len=31, vocab=3001), DEVICE)
    target = targets(inputs["labels"], 3001, stats_kwargs(inputs))
    grads = upstream(inputs["labels"].shape)
    before, results = torch.get_num_threads(), []
    try:
        for num_threads in (1, 2, 3, 1):
            torch.set_num_threads(num_threads)
            stats, grad = logits_stats("cpu", inputs["logits"].detach(), target, LogitSpec(0.7), grads)
            results.append((*stats, grad))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for r in results for a, b in zip(r, results[0]))


# ----------------------------------------------------------------------------------------------------------------
# the linear path


def linear_stats(name, hidden, weight, bias, target, spec, grads):
    """schedule.forward, then schedule.backward on the backend's linear_work: (log-prob, entropy), grads."""
    impl = contract.get(name)
    rows = layout.as_rows(hidden)
    work = impl.linear_work(rows, weight, bias, target, spec, (False,) * 3, True)
    stats = schedule.forward(work, target.numel(), True)
    work = impl.linear_work(rows, weight, bias, target, spec, (True, True, bias is not None), True)
    d_hidden, d_weight, d_bias = schedule.backward(work, stats.norm, upstream_coefs(target, *grads, stats.entropy,
                                                                                     spec))
    assert d_hidden.dtype == hidden.dtype and d_weight.dtype == weight.dtype and (d_bias is None) == (bias is None)
    return stats, [d_hidden.reshape(hidden.shape), d_weight, d_bias]


def check_linear(name, inputs, dtype, bias=None, temperature=None, which="both"):
    kwargs = stats_kwargs(inputs, temperature)
    hidden, weight = inputs["hidden"].detach(), inputs["weight"].detach()
    bias = inputs["bias"] if bias is None else bias
    bias = None if bias is None else bias.detach()
    labels = inputs["labels"]
    target = targets(labels, weight.shape[0], kwargs)
    grads = upstream(labels.shape, which)
    stats, got = linear_stats(name, hidden, weight, bias, target, spec_of(kwargs), grads)
    check_unscored(target, stats.logprob, stats.entropy)
    leaves = [hidden, weight, bias]
    want = oracle(gk.reference.linear_token_logprobs, leaves, labels, kwargs, grads, torch.float64)
    baseline = oracle(gk.reference.linear_token_logprobs, leaves, labels, kwargs, grads)
    assert_within_pytorch_error(["logprob", "entropy", "d_hidden", "d_weight", "d_bias"],
                                [stats.logprob, stats.entropy, *got], baseline, want, SLACK[dtype])
    return stats


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.id)
def test_linear_stats_against_the_oracle(backend, case, small_chunks_of):
    """In chunks of a few rows (C++: and blocks of 7 vocabulary rows per thread; Triton: the forward over several
    vocabulary splits), every partial merged with the entropy's sums."""
    small_chunks_of(backend)
    check_linear(backend, make_inputs(case, DEVICE), case.dtype)


@pytest.mark.parametrize("temperature", [1.0, 1e-4, TIES_T], ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("which", ["both", "entropy"])
def test_linear_stats_at_tiny_temperatures(backend, temperature, which, small_chunks_of):
    """The linear path's near ties at T ~ 1e-4 (a bias whose 4 largest entries are equal, hidden states of scale
    2 T): the backward reads the forward's (shift, log_sum) and recomputes the same logits, so its gradients have
    PyTorch's error, where a float32 lse of ~1e4 once gave 2.5x it."""
    small_chunks_of(backend)
    inputs = make_inputs(Case(hidden_size=16, groups=(2, 3), seq_len=9, bias=True), DEVICE)
    if temperature != 1.0:
        gen = torch.Generator().manual_seed(4)
        bias = 2 * torch.randn(inputs["weight"].shape[0], generator=gen)
        bias[torch.randperm(bias.numel(), generator=gen)[:4]] = bias.max()
        inputs["bias"] = bias.to(DEVICE)
        inputs["hidden"] = 2 * temperature * inputs["hidden"].detach()
    check_linear(backend, inputs, torch.float32, temperature=temperature, which=which)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_stats_with_minus_inf_tiles_and_splits(backend, dtype, small_chunks_of):
    """A bias of -inf on every 5th column and on a run of 128 columns (whole tiles, a Triton split, C++ blocks):
    their p = 0 adds exactly 0, and a partial of -inf logits merges without NaN."""
    small_chunks_of(backend)
    vocab = 333
    inputs = make_inputs(Case(hidden_size=16, vocab=vocab, seq_len=12, groups=(2, 1), bias=True, dtype=dtype,
                              temperature=0.7), DEVICE)
    bias = inputs["bias"].detach().clone()
    dead = torch.zeros(vocab, dtype=torch.bool)
    dead[::5] = True
    dead[128:256] = True
    bias[dead.to(DEVICE)] = NEG_INF
    inputs["labels"] = torch.nonzero(~dead).squeeze(1).to(DEVICE)[inputs["labels"] % int((~dead).sum())]
    stats = check_linear(backend, inputs, dtype, bias=bias)
    assert torch.isfinite(stats.entropy).all()


@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("num_tokens", [0, 12])
def test_nothing_scored_gives_zeros(backend, path, num_tokens):
    hidden_size, vocab = 5, 11
    target = torch.full((num_tokens,), -1, device=DEVICE)
    impl, spec = contract.get(backend), LogitSpec()
    zeros = torch.zeros(num_tokens, device=DEVICE)
    if path == "logits":
        rows = torch.randn(1, num_tokens, vocab, device=DEVICE)
        stats = impl.token_forward(rows, target, spec, True)
        out = torch.full_like(rows, float("nan"))
        impl.token_backward(rows, target, stats.norm, Coefs(zeros, zeros, zeros), spec, out)
        grads = [out]
    else:
        hidden = torch.randn(1, num_tokens, hidden_size, device=DEVICE)
        weight, bias = torch.randn(vocab, hidden_size, device=DEVICE), torch.randn(vocab, device=DEVICE)
        stats = schedule.forward(impl.linear_work(hidden, weight, bias, target, spec, (False,) * 3, True),
                                 num_tokens, True)
        work = impl.linear_work(hidden, weight, bias, target, spec, (True,) * 3, True)
        grads = schedule.backward(work, stats.norm, Coefs(zeros, zeros, zeros))
        assert [g.shape for g in grads] == [hidden.shape, (vocab, hidden_size), (vocab,)]
    assert all((s == 0).all() for s in stats) and all((g == 0).all() for g in grads)


# ----------------------------------------------------------------------------------------------------------------
# the GEMM schedule


def schedule_call(name, inputs, entropy, needs, entropy_coef=0.0):
    """schedule.loss_and_grads on the backend's linear work with ops' stage: (GroupStats, TokenStats, Grads)."""
    kw = inputs["kwargs"]
    weight = inputs["weight"].detach()
    opts = Options(group_size=kw.get("group_size"), temperature=kw["temperature"], entropy=entropy,
                   entropy_coef=entropy_coef)
    lay = layout.build(inputs["labels"], inputs["rewards"], vocab_size=weight.shape[0], group_size=opts.group_size,
                       group_ids=kw.get("group_ids"), mask=kw["mask"], cu_seqlens=kw.get("cu_seqlens"),
                       ref_logprobs=kw.get("ref_logprobs"))
    impl = contract.get(name)
    bias = None if inputs["bias"] is None else inputs["bias"].detach()
    needs = (needs[0], needs[1], needs[2] and bias is not None)
    work = impl.linear_work(layout.as_rows(inputs["hidden"].detach()), weight, bias, lay.target, opts.spec, needs,
                            opts.token_entropy)
    return (*schedule.loss_and_grads(work, lay, Stage(impl, lay, opts), needs, opts.token_entropy), lay)


@pytest.mark.parametrize("name, anchor, rows_per_chunk", [
    ("three-on-policy", False, 64), ("three-anchored-group-chunks", True, 128), ("four-group-too-big", True, 40),
    ("no-gradients", True, 64)], ids=lambda v: v if isinstance(v, str) else None)
def test_every_schedule_gives_the_oracle(backend, name, anchor, rows_per_chunk, monkeypatch):
    """Each schedule (the chunk kernels it calls recorded) gives the loss, the statistics and every gradient of
    the float64 oracle within PyTorch's error, and the entropy flag changes none of them."""
    from gvpo_kernels import cpu
    from gvpo_kernels import torch_impl

    inputs = make_inputs(Case(hidden_size=16, vocab=130, seq_len=30, groups=(3, 1, 2), shuffled=True, bias=True,
                              anchor=anchor, temperature=0.7), DEVICE)
    for module in (torch_impl, cpu):
        monkeypatch.setattr(module, "CHUNK_BYTES", rows_per_chunk * 130 * 4)
    monkeypatch.setattr(cpu, "CHUNK_HIDDEN_BYTES", 1)
    if backend == "triton":
        from gvpo_kernels.triton import linear
        monkeypatch.setattr(linear, "CHUNK_BYTES", rows_per_chunk * 130 * 4)
    kept = []
    work_type = type(contract.get(backend).linear_work(torch.zeros(1, 1, 16, device=DEVICE),
                                                        torch.zeros(130, 16, device=DEVICE), None,
                                                        torch.zeros(1, dtype=torch.int64, device=DEVICE), LogitSpec(),
                                                        (False,) * 3, False))
    backward = work_type.backward

    def recording(self, tokens, norm, coefs, kept_logits):
        kept.append(kept_logits)
        return backward(self, tokens, norm, coefs, kept_logits)

    monkeypatch.setattr(work_type, "backward", recording)
    needs = (False, False, False) if name == "no-gradients" else (True, True, True)
    group, stats, grads, lay = schedule_call(backend, inputs, True, needs)
    assert bool(kept) == any(needs)
    assert not any(needs) or all(kept) == name.startswith("three")
    plain = schedule_call(backend, inputs, False, needs)
    for got, want in zip((*group, *grads), (*plain[0], *plain[2])):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    check_unscored(lay.target, stats.entropy)
    kw = inputs["kwargs"]
    leaves = [inputs[k].detach() for k in ("hidden", "weight", "bias")]

    def reference(dtype):
        tensors = [t.to(dtype).clone().requires_grad_() for t in leaves]
        loss, seq = gk.reference.linear_gvpo_loss(tensors[0], tensors[1], inputs["labels"], inputs["rewards"].to(dtype),
                                                  bias=tensors[2], return_stats=True, **kw)
        loss.backward()
        return [loss, *seq[:3], *(t.grad for t in tensors)]

    want, baseline = reference(torch.float64), reference(torch.float32)
    got = [group.loss, group.seq_logprob, group.implicit_reward, group.grad_seq_logprob, *grads]
    if not any(needs):
        got, want, baseline = got[:4], want[:4], baseline[:4]
    assert_within_pytorch_error(["loss", "s", "r", "dL/ds", "d_hidden", "d_weight", "d_bias"], got, baseline, want,
                                SLACK[torch.float32])


def test_linear_buffers_do_not_grow_with_tokens(backend, small_chunks_of):
    """The forward and backward at N and 4N tokens: the largest tensor is the same (a chunk, the head's gradient),
    nothing N x V."""
    from helpers.memory import LargestTensor

    small_chunks_of(backend)
    vocab, largest = 256, []
    for seq_len in (16, 64):  # every token scored: whole chunks at both sizes
        inputs = make_inputs(Case(hidden_size=16, vocab=vocab, seq_len=seq_len, groups=(4,), anchor=False,
                                  mask="none"), DEVICE)
        kwargs = stats_kwargs(inputs)
        hidden, weight = inputs["hidden"].detach(), inputs["weight"].detach()
        target = targets(inputs["labels"], vocab, kwargs)
        with LargestTensor() as mode:
            linear_stats(backend, hidden, weight, None, target, LogitSpec(), upstream(inputs["labels"].shape))
        largest.append(mode.largest)
    assert largest[0] == largest[1] < 4 * 64 * vocab * 4


@pytest.mark.parametrize("anchor", [False, True], ids=["three", "four"])
@pytest.mark.parametrize("kind", ["strided", "stride0"])
def test_bias_with_any_stride(backend, kind, anchor, small_chunks_of):
    """A strided bias (every other element of a longer tensor) and an expanded one (stride 0) give what their
    contiguous copies give, on both schedules."""
    small_chunks_of(backend)
    inputs = make_inputs(Case(hidden_size=16, vocab=203, seq_len=40, groups=(2, 2), anchor=anchor), DEVICE)
    vocab = inputs["weight"].shape[0]
    bias = torch.randn(2 * vocab)[::2] if kind == "strided" else torch.randn(1).expand(vocab)
    got = schedule_call(backend, dict(inputs, bias=bias.to(DEVICE)), False, (True, True, True))
    want = schedule_call(backend, dict(inputs, bias=bias.contiguous().to(DEVICE)), False, (True, True, True))
    for g, w in zip((*got[0], *got[2]), (*want[0], *want[2])):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("anchor", [False, True], ids=["three", "four"])
def test_nothing_scored_gives_the_oracle_loss_and_zero_gradients(backend, anchor):
    """No scored token: no launch over zero rows, the loss the oracle gives (the rewards' centred variance), zero
    gradients."""
    inputs = make_inputs(Case(hidden_size=16, vocab=65, seq_len=5, groups=(2,), anchor=anchor, bias=True), DEVICE)
    inputs["kwargs"]["mask"] = torch.zeros_like(inputs["labels"], dtype=torch.bool)
    group, _, grads, _ = schedule_call(backend, inputs, False, (True, True, True))
    want = gk.reference.linear_gvpo_loss(inputs["hidden"].detach(), inputs["weight"].detach(), inputs["labels"],
                                         inputs["rewards"], bias=inputs["bias"].detach(), **inputs["kwargs"])
    torch.testing.assert_close(group.loss, want)
    for grad in grads:
        assert grad is not None and (grad == 0).all()


@pytest.mark.parametrize("anchor", [False, True], ids=["three", "four"])
def test_gradients_not_asked_for_are_not_computed(backend, anchor):
    """needs = (hidden only): d_weight and d_bias are None (their GEMMs skipped), d_hidden as with all three."""
    inputs = make_inputs(Case(hidden_size=16, vocab=130, seq_len=20, groups=(2, 2), anchor=anchor, bias=True),
                         DEVICE)
    some = schedule_call(backend, inputs, False, (True, False, False))[2]
    every = schedule_call(backend, inputs, False, (True, True, True))[2]
    assert some.weight is None and some.bias is None and every.weight is not None and every.bias is not None
    torch.testing.assert_close(some.hidden, every.hidden)


def test_three_gemm_buffers_do_not_grow_with_tokens(backend, small_chunks_of):
    """The three-GEMM schedule (on-policy) at N and 4N tokens: nothing N x V; the largest tensor is a chunk of at
    most 64 rows of logits, or the N x H of hidden and its gradient."""
    from helpers.memory import LargestTensor

    small_chunks_of(backend)
    vocab, hidden_size = 256, 16
    for seq_len in (32, 128):
        inputs = make_inputs(Case(hidden_size=hidden_size, vocab=vocab, seq_len=seq_len, groups=(4,), anchor=False,
                                  mask="none"), DEVICE)
        with LargestTensor() as mode:
            schedule_call(backend, dict(inputs, bias=None), False, (True, True, False))
        num_tokens = inputs["labels"].numel()
        assert mode.largest <= max(num_tokens * hidden_size * 4, 64 * vocab * 4) < num_tokens * vocab * 4


def test_targets_past_the_vocabulary_are_another_slice(backend):
    """A target >= V (the label in another rank's slice of the vocabulary) counts as a logit of 0 and gets no
    one-hot: token log-prob -lse, gradient -coef * softmax; logits and linear paths."""
    case = another_slice_case()
    want_logprob, want_grad, lse, vocab = case["logprob"], case["grad"], case["lse"], case["logits"].shape[1]
    impl, spec = contract.get(backend), LogitSpec()
    hidden, weight, logits, target, coef = (case[k].to(DEVICE) for k in ("hidden", "weight", "logits", "target",
                                                                         "coef"))

    stats = impl.token_forward(logits[None], target, spec, False)
    torch.testing.assert_close(stats.logprob.cpu(), want_logprob)
    torch.testing.assert_close((stats.norm[0] + stats.norm[1]).cpu(), lse)
    grad = torch.empty(1, 6, vocab, device=DEVICE)
    impl.token_backward(logits[None], target, stats.norm, Coefs(coef), spec, grad)
    torch.testing.assert_close(grad[0].cpu(), want_grad)

    rows = hidden[None]
    stats = schedule.forward(impl.linear_work(rows, weight, None, target, spec, (False,) * 3, False), 6, False)
    torch.testing.assert_close(stats.logprob.cpu(), want_logprob)
    work = impl.linear_work(rows, weight, None, target, spec, (True, True, False), False)
    d_hidden, d_weight, _ = schedule.backward(work, stats.norm, Coefs(coef))
    torch.testing.assert_close(d_hidden[0].cpu(), want_grad @ weight.cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_weight.cpu(), want_grad.T @ hidden.cpu(), rtol=1e-5, atol=1e-5)
