"""The C++ CPU backend's token statistics with entropy (gvpo_kernels.cpu.token_stats_* and linear_token_stats_*,
and linear_loss_and_grads(..., entropy=True)), called directly, against the float64 oracle
gvpo_kernels.reference.token_logprobs(..., return_entropy=True): log-probs, entropies, and the gradients of
sum(g_lp * log-prob + g_ent * entropy) for random upstream gradients, each within PyTorch's own error at the input
dtype (the reference in float32 math) + the SLACK of cases.py.
"""

import pytest
import torch
from cases import SLACK, Case, assert_within_pytorch_error, make_inputs
from test_cpu_numerics import minus_inf_bias

from gvpo_kernels import cpu, layout, reference

NEG_INF = float("-inf")

if cpu.unavailable_reason() is not None:
    pytest.skip(f"the C++ extension is unavailable: {cpu.unavailable_reason()}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# At T = 1e-4 random logits are one-hot (entropy 0). TIES_T, a small temperature at which the inputs get near ties
# (with_near_ties), and a power of 2, so that z = logits / T is exact both here and in PyTorch (which divides by
# float32(1e-4) where the kernels multiply by 1 / T): the errors compared are then those of the algorithms alone,
# not two different roundings of z of ~1e-3 each at |z| ~ 1e4.
TIES_T = 2.0**-13
TEMPERATURES = [1.0, 0.7, 1e-4, TIES_T]


@pytest.fixture
def threads():
    """Sets torch's thread count for one test (restored after)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def token_kwargs(inputs, temperature):
    kwargs = inputs["kwargs"]
    return dict(temperature=temperature, mask=kwargs["mask"], cu_seqlens=kwargs.get("cu_seqlens"))


def upstream(labels, which: str, seed: int = 3):
    """Random upstream gradients of the log-probs and the entropies (labels' shape); "entropy": log-prob's 0."""
    gen = torch.Generator().manual_seed(seed)
    g_lp, g_ent = torch.randn(labels.shape, generator=gen), torch.randn(labels.shape, generator=gen)
    return (torch.zeros_like(g_lp) if which == "entropy" else g_lp), g_ent


def coefs(target, g_lp, g_ent, temperature):
    """The kernels' coefficients: the upstream gradients / T, 0 where not scored (as ops computes them)."""
    return [torch.where(target >= 0, g.reshape(-1).float() / temperature, 0.0).contiguous() for g in (g_lp, g_ent)]


def reference_stats(fn, leaves, labels, g_lp, g_ent, kwargs):
    """log-prob, entropy and the gradients of sum(g_lp * log-prob + g_ent * entropy) w.r.t. each leaf."""
    bias = {} if len(leaves) < 3 else dict(bias=leaves[2])  # the linear path: hidden, weight, bias
    lp, ent = fn(*leaves[:2], labels, return_entropy=True, **kwargs, **bias)
    ((g_lp.to(lp.dtype) * lp).sum() + (g_ent.to(ent.dtype) * ent).sum()).backward()
    return [lp.detach(), ent.detach(), *[None if t is None else t.grad for t in leaves]]


def leaves_of(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def with_near_ties(logits, temperature, allowed=None, seed=4):
    """At a small temperature, random logits give one token all the probability (entropy 0, nothing tested):
    give each row 3 rivals (among the `allowed` columns) within 2 T below its largest logit, so that
    z = logits / T is large (~1e4 at T = TIES_T) while the entropy is of order 1. Strided logits stay strided."""
    if temperature != TIES_T:
        return logits
    gen = torch.Generator().manual_seed(seed)
    vocab = logits.shape[-1]
    x = logits.detach().float().reshape(-1, vocab).clone()
    columns = torch.arange(vocab) if allowed is None else allowed
    rivals = columns[torch.randint(0, columns.numel(), (x.shape[0], 3), generator=gen)]
    x.scatter_(1, rivals, x.max(1, keepdim=True).values - 2 * temperature * torch.rand(x.shape[0], 3, generator=gen))
    x = x.view(logits.shape).to(logits.dtype)
    if logits.is_contiguous():
        return x
    full = torch.zeros(*logits.shape[:-2], logits.shape[-2] + 1, vocab, dtype=logits.dtype)
    full[..., :-1, :] = x
    return full[..., :-1, :]


def assert_unscored_are_zero(target, *per_token):
    for values in per_token:
        assert (values.reshape(target.numel(), -1)[target < 0] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# the logits path


def cpu_token_stats(logits, labels, g_lp, g_ent, kwargs):
    """cpu.token_stats_forward / token_stats_backward on the logits: log-prob, entropy (labels' shape), gradient
    (logits' shape, written over NaN), target."""
    temperature = kwargs["temperature"]
    target = layout.token_targets(labels, vocab_size=logits.shape[-1], mask=kwargs["mask"],
                                  cu_seqlens=kwargs["cu_seqlens"])
    rows = layout.as_rows(logits)
    token_logprob, lse, token_entropy = cpu.token_stats_forward(rows, target, temperature)
    assert all(t.dtype == torch.float32 and t.shape == target.shape for t in (token_logprob, lse, token_entropy))
    out = torch.full(rows.shape, float("nan"), dtype=rows.dtype)
    cpu.token_stats_backward(rows, target, lse, token_entropy, *coefs(target, g_lp, g_ent, temperature), temperature,
                             out)
    return token_logprob.view(labels.shape), token_entropy.view(labels.shape), out.view(logits.shape), target


def check_logits_path(logits, labels, kwargs, which="both", allowed=None):
    logits = with_near_ties(logits, kwargs["temperature"], allowed)
    g_lp, g_ent = upstream(labels, which)
    oracle = reference_stats(reference.token_logprobs, leaves_of([logits], torch.float64), labels, g_lp, g_ent,
                             kwargs)
    baseline = reference_stats(reference.token_logprobs, leaves_of([logits]), labels, g_lp, g_ent, kwargs)
    *got, target = cpu_token_stats(logits.detach(), labels, g_lp, g_ent, kwargs)
    assert got[2].dtype == logits.dtype
    assert_unscored_are_zero(target, *got)
    assert_within_pytorch_error(["token_logprob", "token_entropy", "grad_logits"], got, baseline, oracle,
                                SLACK[logits.dtype])


@pytest.mark.parametrize("temperature", TEMPERATURES, ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", [Case(groups=(2, 3), seq_len=9), Case(layout="packed", groups=(2, 3), seq_len=9),
                                  Case(groups=(2, 2), seq_len=5, sliced=True, ignore=True, vocab=3001)],
                         ids=["padded", "packed", "sliced-ignore-V3001"])
def test_logits_path_against_float64(case, dtype, temperature):
    inputs = make_inputs(case.replace(dtype=dtype), torch.device("cpu"))
    check_logits_path(inputs["logits"], inputs["labels"], token_kwargs(inputs, temperature))


@pytest.mark.parametrize("temperature", [1.0, TIES_T], ids=lambda t: f"T{t:g}")
def test_logits_path_entropy_gradient_alone(temperature):
    """Upstream gradient on the entropies only: the entropy's own gradient is not hidden by the log-prob's."""
    inputs = make_inputs(Case(groups=(2, 3), seq_len=9), torch.device("cpu"))
    check_logits_path(inputs["logits"], inputs["labels"], token_kwargs(inputs, temperature), which="entropy")


@pytest.mark.parametrize("temperature", [1.0, TIES_T], ids=lambda t: f"T{t:g}")
def test_logits_path_columns_of_minus_inf(temperature):
    """-inf over most of the vocabulary (never at a scored label): p = 0 adds exactly 0, no NaN."""
    inputs = make_inputs(Case(groups=(2, 2), seq_len=9, vocab=300), torch.device("cpu"))
    logits, labels = inputs["logits"].detach().clone(), inputs["labels"]
    banned = torch.arange(300) % 40 < 30
    logits[..., banned] = NEG_INF
    allowed = (~banned).nonzero().squeeze(1)
    check_logits_path(logits, allowed[labels % allowed.numel()], token_kwargs(inputs, temperature), allowed=allowed)


def test_logits_path_is_bitwise_the_same_at_every_thread_count(threads):
    inputs = make_inputs(Case(groups=(2, 2), seq_len=31, vocab=3001), torch.device("cpu"))
    logits, labels = inputs["logits"].detach(), inputs["labels"]
    kwargs = token_kwargs(inputs, 0.7)
    g_lp, g_ent = upstream(labels, "both")
    results = []
    for num_threads in (1, 2, 3, 1):
        threads(num_threads)
        results.append(cpu_token_stats(logits, labels, g_lp, g_ent, kwargs)[:3])
    assert all(torch.equal(a, b) for r in results for a, b in zip(r, results[0]))


def test_logits_path_matches_the_loss_kernels_without_entropy():
    """The entropy flag changes nothing else: the same log-prob and lse bits as token_forward, and with
    coef_entropy = 0 the same gradient bits as the loss's token_backward kernel (|lse| < 64: the entropy's
    backward reads the lse, as the loss's does)."""
    inputs = make_inputs(Case(groups=(2, 2), seq_len=9, vocab=3001, mask="random"), torch.device("cpu"))
    rows, labels = layout.as_rows(inputs["logits"].detach()), inputs["labels"]
    target = layout.token_targets(labels, vocab_size=3001, mask=inputs["kwargs"]["mask"])
    token_logprob, lse, token_entropy = cpu.token_stats_forward(rows, target, 0.7)
    want_logprob, want_lse = cpu.token_forward(rows, target, 0.7)
    assert torch.equal(token_logprob, want_logprob) and torch.equal(lse, want_lse)
    c_lp, _ = coefs(target, *upstream(labels, "both"), 0.7)
    got, want = torch.full_like(rows, float("nan")), torch.full_like(rows, float("nan"))
    cpu.token_stats_backward(rows, target, lse, token_entropy, c_lp, torch.zeros_like(c_lp), 0.7, got)
    torch.ops.gvpo.token_backward(rows, target, lse, c_lp, 1 / 0.7, want)
    assert torch.equal(got, want)


@pytest.mark.parametrize("temperature", [1.0, TIES_T], ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_path_backward_in_place(dtype, temperature):
    """out may be rows itself (the gradient overwrites the logits): the same bits as into another buffer."""
    inputs = make_inputs(Case(groups=(2, 2), seq_len=9, vocab=3001, dtype=dtype), torch.device("cpu"))
    labels = inputs["labels"]
    rows = layout.as_rows(with_near_ties(inputs["logits"].detach(), temperature))
    target = layout.token_targets(labels, vocab_size=3001, mask=inputs["kwargs"]["mask"])
    _, lse, token_entropy = cpu.token_stats_forward(rows, target, temperature)
    args = (target, lse, token_entropy, *coefs(target, *upstream(labels, "both"), temperature), temperature)
    want = torch.full_like(rows, float("nan"))
    cpu.token_stats_backward(rows, *args, want)
    got = rows.clone()
    cpu.token_stats_backward(got, *args, got)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------------------------
# the linear path


def small_blocks(monkeypatch, rows: int = 7) -> None:
    """Blocks of logits of a few vocabulary rows, so that each thread's range holds several."""
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 4 * 16 * rows)


def cpu_linear_stats(hidden, weight, bias, labels, g_lp, g_ent, kwargs):
    """cpu.linear_token_stats_forward / backward: log-prob, entropy (labels' shape), d_hidden, d_weight, d_bias."""
    temperature = kwargs["temperature"]
    target = layout.token_targets(labels, vocab_size=weight.shape[0], mask=kwargs["mask"],
                                  cu_seqlens=kwargs["cu_seqlens"])
    rows = layout.as_rows(hidden)
    token_logprob, lse, token_entropy = cpu.linear_token_stats_forward(rows, weight, bias, target, temperature)
    assert all(t.dtype == torch.float32 and t.shape == target.shape for t in (token_logprob, lse, token_entropy))
    d_hidden, d_weight, d_bias = cpu.linear_token_stats_backward(
        rows, weight, bias, target, lse, token_entropy, *coefs(target, g_lp, g_ent, temperature), temperature)
    assert d_hidden.dtype == hidden.dtype and d_weight.dtype == weight.dtype and d_weight.shape == weight.shape
    assert (d_bias is None) == (bias is None)
    return [token_logprob.view(labels.shape), token_entropy.view(labels.shape), d_hidden.view(hidden.shape),
            d_weight, d_bias], target


def linear_near_ties(hidden, bias, vocab, temperature, seed=4):
    """The linear path's with_near_ties: at a small temperature, a bias of a few units whose 4 largest entries are
    equal, and hidden states of scale 2 T, so that 4 tokens compete within a few T at logits of a few units
    (z ~ 1e4 at T = TIES_T, entropy of order 1)."""
    if temperature != TIES_T:
        return hidden, bias
    gen = torch.Generator().manual_seed(seed)
    new_bias = 2 * torch.randn(vocab, generator=gen)
    new_bias[torch.randperm(vocab, generator=gen)[:4]] = new_bias.max()
    return (2 * temperature * hidden.detach().float()).to(hidden.dtype), new_bias.to(hidden.dtype)


def check_linear_path(hidden, weight, bias, labels, kwargs, which="both"):
    hidden, bias = linear_near_ties(hidden, bias, weight.shape[0], kwargs["temperature"])
    g_lp, g_ent = upstream(labels, which)
    tensors = [hidden, weight, bias]
    oracle = reference_stats(reference.linear_token_logprobs, leaves_of(tensors, torch.float64), labels, g_lp,
                             g_ent, kwargs)
    baseline = reference_stats(reference.linear_token_logprobs, leaves_of(tensors), labels, g_lp, g_ent, kwargs)
    got, target = cpu_linear_stats(*[None if t is None else t.detach() for t in tensors], labels, g_lp, g_ent,
                                   kwargs)
    assert_unscored_are_zero(target, got[0], got[1], got[2])
    assert_within_pytorch_error(["token_logprob", "token_entropy", "d_hidden", "d_weight", "d_bias"], got, baseline,
                                oracle, SLACK[hidden.dtype])


@pytest.mark.parametrize("temperature", TEMPERATURES[:3], ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", [Case(hidden_size=16, groups=(2, 3), seq_len=9, bias=True),
                                  Case(hidden_size=16, layout="packed", groups=(2, 3), seq_len=9, ignore=True)],
                         ids=["padded-bias", "packed-ignore"])
def test_linear_path_against_float64(case, dtype, temperature, monkeypatch):
    small_blocks(monkeypatch)
    inputs = make_inputs(case.replace(dtype=dtype), torch.device("cpu"))
    check_linear_path(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["labels"],
                      token_kwargs(inputs, temperature))


@pytest.mark.parametrize("temperature", [
    1.0, 1e-4, pytest.param(TIES_T, marks=pytest.mark.xfail(strict=True, reason=(
        "the linear backward reads the forward's float32 lse, whose rounding at |lse| ~ 1e4 (an ulp, 4e-3) enters "
        "every p and p (lse - z - H): ~2.5x PyTorch's gradient error on rows that are not one-hot; the logits "
        "path computes its row's shift and log-sum again instead, which the linear path cannot without the "
        "whole row (a second pass of GEMMs)")))], ids=lambda t: f"T{t:g}")
def test_linear_path_entropy_gradient_alone(temperature):
    inputs = make_inputs(Case(hidden_size=16, groups=(2, 3), seq_len=9, bias=True),
                         torch.device("cpu"))
    check_linear_path(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["labels"],
                      token_kwargs(inputs, temperature), which="entropy")


@pytest.mark.parametrize("num_threads", [1, 2, 4])
@pytest.mark.parametrize("masked", ["head", "tail", "middle", "alternate"])
def test_linear_bias_of_minus_inf_over_vocabulary_blocks(masked, num_threads, threads, monkeypatch):
    """-inf through the head's bias over whole blocks and thread ranges (never at a label): no NaN, exact."""
    threads(num_threads)
    small_blocks(monkeypatch)
    inputs = make_inputs(Case(hidden_size=16, groups=(2, 2), seq_len=8, vocab=300), torch.device("cpu"))
    bias, labels = minus_inf_bias(300, masked, inputs["labels"])
    check_linear_path(inputs["hidden"], inputs["weight"], bias, labels, token_kwargs(inputs, 1.0))


@pytest.mark.parametrize("num_threads", [1, 3])
def test_linear_path_is_bitwise_reproducible(num_threads, threads, monkeypatch):
    threads(num_threads)
    small_blocks(monkeypatch, 16)
    inputs = make_inputs(Case(hidden_size=32, groups=(2, 2), seq_len=32, vocab=2000, bias=True),
                         torch.device("cpu"))
    tensors = [inputs[k].detach() for k in ("hidden", "weight", "bias")]
    g_lp, g_ent = upstream(inputs["labels"], "both")
    kwargs = token_kwargs(inputs, 0.7)
    first = cpu_linear_stats(*tensors, inputs["labels"], g_lp, g_ent, kwargs)[0]
    for _ in range(3):
        again = cpu_linear_stats(*tensors, inputs["labels"], g_lp, g_ent, kwargs)[0]
        assert all(torch.equal(a, b) for a, b in zip(again, first))


# ----------------------------------------------------------------------------------------------------------------
# linear_loss_and_grads(..., entropy=True)


@pytest.mark.parametrize("schedule", ["on-policy", "whole-groups", "four-gemms"])
def test_loss_and_grads_with_entropy(schedule, monkeypatch):
    """entropy=True: the same 7 results, bit for bit, as entropy=False, and token_entropy (N,) from the same
    forward, within PyTorch's error against float64, 0 where not scored; on every GEMM schedule."""
    small_blocks(monkeypatch)
    case = Case(hidden_size=16, groups=(2, 2), seq_len=16, vocab=300, bias=True, anchor=schedule != "on-policy")
    inputs = make_inputs(case, torch.device("cpu"))
    hidden, weight, bias = (inputs[k].detach() for k in ("hidden", "weight", "bias"))
    labels, kwargs = inputs["labels"], inputs["kwargs"]
    if schedule == "four-gemms":  # a group (2 x 16 tokens) larger than a chunk
        monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * 300 * 20)
    lay = layout.build(labels, inputs["rewards"], vocab_size=300, group_size=2, mask=kwargs["mask"],
                       ref_logprobs=kwargs.get("ref_logprobs"))
    work = cpu._LinearWork(layout.as_rows(hidden), weight, bias, lay.target, 1.0)
    assert (schedule == "four-gemms") == (lay.token_ref is not None and work.group_chunks(lay) is None)
    args = (layout.as_rows(hidden), weight, bias, lay, 0.1, 0.7, (True, True, True))
    want = cpu.linear_loss_and_grads(*args)
    got = cpu.linear_loss_and_grads(*args, entropy=True)
    assert len(want) == 7 and len(got) == 8
    assert all(torch.equal(g, w) for g, w in zip(got[:7], want))
    token_entropy = got[7]
    assert token_entropy.dtype == torch.float32 and token_entropy.shape == (lay.num_tokens,)
    assert (token_entropy[lay.target < 0] == 0).all()
    stats_kwargs = dict(temperature=0.7, mask=kwargs["mask"])
    _, oracle = reference.linear_token_logprobs(hidden.double(), weight.double(), labels, bias=bias.double(),
                                                return_entropy=True, **stats_kwargs)
    _, baseline = reference.linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True,
                                                  **stats_kwargs)
    assert_within_pytorch_error(["token_entropy"], [token_entropy], [baseline.reshape(-1)], [oracle.reshape(-1)],
                                SLACK[torch.float32])


# ----------------------------------------------------------------------------------------------------------------
# nothing to score


@pytest.mark.parametrize("num_tokens", [0, 12])
def test_nothing_scored_gives_zeros(num_tokens):
    hidden_size, vocab = 5, 11
    target = torch.full((num_tokens,), -1)
    rows = torch.randn(1, num_tokens, vocab)
    zeros = torch.zeros(num_tokens)
    for stats in (cpu.token_stats_forward(rows, target, 1.0),
                  cpu.linear_token_stats_forward(torch.randn(1, num_tokens, hidden_size),
                                                 torch.randn(vocab, hidden_size), torch.randn(vocab), target, 1.0)):
        assert all(s.shape == (num_tokens,) and (s == 0).all() for s in stats)
    out = torch.full_like(rows, float("nan"))
    cpu.token_stats_backward(rows, target, zeros, zeros, zeros, zeros, 1.0, out)
    assert (out == 0).all()
    hidden = torch.randn(1, num_tokens, hidden_size)
    grads = cpu.linear_token_stats_backward(hidden, torch.randn(vocab, hidden_size), torch.randn(vocab), target,
                                            zeros, zeros, zeros, zeros, 1.0)
    assert [g.shape for g in grads] == [hidden.shape, (vocab, hidden_size), (vocab,)]
    assert all((g == 0).all() for g in grads)
