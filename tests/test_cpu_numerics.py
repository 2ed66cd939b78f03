"""The C++ CPU backend at the edges of float32: -inf logits, bfloat16 / float16 inputs with float32 logits, a
small temperature, thread counts (bitwise reproducibility), and nothing to score.

Each test compares with the float64 oracle (gvpo_kernels.reference) on the logits path and the linear path.
"""

import pytest
import torch
from helpers.cases import SLACK, Case, assert_within_pytorch_error, check_against_oracle, make_inputs, run, run_linear

import gvpo_kernels as gk
from gvpo_kernels import cpu
from gvpo_kernels.backend import LogitSpec

CPU = torch.device("cpu")
NEG_INF = float("-inf")

if cpu.unavailable_reason() is not None:
    pytest.skip(f"the C++ extension is unavailable: {cpu.unavailable_reason()}", allow_module_level=True)


@pytest.fixture
def threads():
    """Sets torch's thread count for one test (restored after)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def small_blocks(monkeypatch, rows: int = 7) -> None:
    """Linear path: blocks of logits of a few vocabulary rows, so that each thread's range holds several."""
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 4 * 16 * rows)


def linear_inputs(seed=0, num_seqs=4, seq_len=8, hidden_size=16, vocab=300, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(num_seqs, seq_len, hidden_size, generator=gen)).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (num_seqs, seq_len), generator=gen)
    kwargs = dict(group_size=2, ref_logprobs=-5.0 * torch.rand(num_seqs, seq_len, generator=gen))
    return hidden, weight, labels, torch.randn(num_seqs, generator=gen), kwargs


def linear_leaves(*tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def assert_linear_matches_oracle(hidden, weight, bias, labels, rewards, kwargs, slack):
    """Loss and every gradient within PyTorch's own error (float32 math on the same inputs) + slack, against the
    float64 oracle; non-finite values fail."""
    oracle = run_linear(gk.reference.linear_gvpo_loss, *linear_leaves(hidden, weight, bias, dtype=torch.float64),
                        labels, rewards.double(), kwargs)
    baseline = run_linear(gk.reference.linear_gvpo_loss, *linear_leaves(hidden, weight, bias), labels, rewards,
                          kwargs)
    got = run_linear(gk.linear_gvpo_loss, *linear_leaves(hidden, weight, bias), labels, rewards, kwargs,
                     backend="cpu")
    assert_within_pytorch_error(["loss", "d_hidden", "d_weight", "d_bias"], [got[0], *got[1]],
                                [baseline[0], *baseline[1]], [oracle[0], *oracle[1]], slack)


# ----------------------------------------------------------------------------------------------------------------
# -inf logits


def minus_inf_bias(vocab: int, masked: str, labels):
    """A random (vocab,) bias that is -inf over the ``masked`` columns (the head, the tail, the middle, or
    alternate runs of 20: whole blocks and thread ranges), and ``labels`` moved onto the other columns."""
    bias = torch.randn(vocab, generator=torch.Generator().manual_seed(1))
    banned = {"head": torch.arange(vocab) < 200, "tail": torch.arange(vocab) >= 100,
              "middle": (torch.arange(vocab) >= 50) & (torch.arange(vocab) < 250),
              "alternate": torch.arange(vocab) % 40 < 20}[masked]
    bias[banned] = NEG_INF
    allowed = (~banned).nonzero().squeeze(1)
    return bias, allowed[labels % allowed.numel()]


@pytest.mark.parametrize("num_threads", [1, 2, 4])
@pytest.mark.parametrize("masked", ["head", "tail", "middle", "alternate"])
def test_linear_bias_of_minus_inf_over_vocabulary_blocks(masked, num_threads, threads, monkeypatch):
    """Vocabulary masking through the head's bias: -inf over whole blocks and thread ranges (never at a label)."""
    threads(num_threads)
    small_blocks(monkeypatch)
    hidden, weight, labels, rewards, kwargs = linear_inputs()
    bias, labels = minus_inf_bias(weight.shape[0], masked, labels)
    assert_linear_matches_oracle(hidden, weight, bias, labels, rewards, kwargs, SLACK[torch.float32])


@pytest.mark.parametrize("num_threads", [1, 4])
def test_logits_of_minus_inf_away_from_the_labels(num_threads, threads):
    """The logits path with -inf over most of the vocabulary (never at a scored label)."""
    threads(num_threads)
    case = Case(groups=(2, 2), seq_len=9, vocab=300)
    inputs = make_inputs(case, CPU)
    logits, labels = inputs["logits"].detach(), inputs["labels"]
    banned = torch.arange(case.vocab) % 40 < 30
    logits[..., banned] = NEG_INF
    allowed = (~banned).nonzero().squeeze(1)
    labels = allowed[labels % allowed.numel()]
    oracle = run(gk.reference.gvpo_loss, logits.double().requires_grad_(), labels, inputs["rewards"].double(),
                 inputs["kwargs"])
    got = run(gk.gvpo_loss, logits.clone().requires_grad_(), labels, inputs["rewards"], inputs["kwargs"],
              backend="cpu")
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[0], oracle[0].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], oracle[1].float(), rtol=1e-5, atol=1e-6)


def both_paths_with_bad_rows(path: str):
    """Group 0 (sequences 0, 1) holds a scored label whose logit is -inf (sequence 0) and, on the logits path, a
    scored row of -inf only (sequence 1); group 1 (sequences 2, 3) is clean. Returns (reference, cpu) results:
    loss, gradient of the logits / hidden, stats."""
    gen = torch.Generator().manual_seed(2)
    vocab, hidden_size = 40, 8
    labels = torch.randint(0, vocab, (4, 6), generator=gen)
    rewards = torch.randn(4, generator=gen)
    kwargs = dict(group_size=2, ref_logprobs=-5.0 * torch.rand(4, 6, generator=gen))
    if path == "logits":
        logits = torch.randn(4, 6, vocab, generator=gen)
        logits[0, 2, labels[0, 2]] = NEG_INF
        logits[1, 4] = NEG_INF
        want = run(gk.reference.gvpo_loss, logits.double().requires_grad_(), labels, rewards.double(), kwargs)
        got = run(gk.gvpo_loss, logits.clone().requires_grad_(), labels, rewards, kwargs, backend="cpu")
        return want, got
    hidden, weight = torch.randn(4, 6, hidden_size, generator=gen), torch.randn(vocab, hidden_size, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    bias[labels[0, 2]] = NEG_INF
    labels[2:][labels[2:] == labels[0, 2]] = (labels[0, 2] + 1) % vocab  # group 1 never meets the -inf logit
    want = run_linear(gk.reference.linear_gvpo_loss, *linear_leaves(hidden, weight, bias, dtype=torch.float64),
                      labels, rewards.double(), kwargs)
    got = run_linear(gk.linear_gvpo_loss, *linear_leaves(hidden, weight, bias), labels, rewards, kwargs,
                     backend="cpu")
    return (want[0], want[1][0], want[2]), (got[0], got[1][0], got[2])


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_minus_inf_at_a_scored_label_is_what_log_softmax_gives(path):
    """A scored label of logit -inf has log-prob -inf, a scored row of -inf only log-prob NaN (torch.log_softmax's
    values): the sequence log-probs are those of the reference, the loss is NaN as the reference's, the gradient
    is non-finite exactly in the sequences of the affected group and matches the reference elsewhere."""
    want, got = both_paths_with_bad_rows(path)
    torch.testing.assert_close(got[2].seq_logprob, want[2].seq_logprob.float(), equal_nan=True)
    assert got[2].seq_logprob[0] == NEG_INF and (path == "linear" or got[2].seq_logprob[1].isnan())
    assert want[0].isnan() and got[0].isnan()
    bad_want = ~torch.isfinite(want[1]).flatten(1).all(1)
    bad_got = ~torch.isfinite(got[1]).flatten(1).all(1)
    assert bad_want.tolist() == bad_got.tolist() == [True, True, False, False]
    torch.testing.assert_close(got[1][2:], want[1][2:].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_rows_of_minus_inf_only_do_not_crash(path):
    """Every logit -inf (all rows): NaN token log-probs (as torch.log_softmax), a NaN loss, no error; the same rows
    unscored: a finite loss and zero gradients."""
    labels, rewards = torch.randint(0, 9, (2, 3)), torch.randn(2)
    scored_nowhere = torch.zeros(2, 3, dtype=torch.bool)
    for mask in (None, scored_nowhere):
        if path == "logits":
            leaf = torch.full((2, 3, 9), NEG_INF, requires_grad=True)
            loss = gk.gvpo_loss(leaf, labels, rewards, group_size=2, mask=mask, backend="cpu")
        else:
            leaf = torch.randn(2, 3, 4, requires_grad=True)
            loss = gk.linear_gvpo_loss(leaf, torch.randn(9, 4), labels, rewards, bias=torch.full((9,), NEG_INF),
                                       group_size=2, mask=mask, backend="cpu")
        loss.backward()
        if mask is None:
            assert loss.isnan()
        else:
            assert torch.isfinite(loss) and (leaf.grad == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# bfloat16 / float16 inputs: float32 logits


@pytest.mark.parametrize("chunking", ["default", "rows7"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_linear_low_precision_inputs_get_float32_logits(dtype, chunking, monkeypatch):
    """Logits of a few units (hidden of scale 3): the kernel's error must be PyTorch's at float32 logits (its
    gradients only rounded once, to the input dtype) + 1e-4; logits rounded to the input dtype miss it by far."""
    if chunking == "rows7":
        monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * 300 * 7)
        small_blocks(monkeypatch)
    hidden, weight, labels, rewards, kwargs = linear_inputs(vocab=300, dtype=dtype, scale=3.0)
    assert_linear_matches_oracle(hidden, weight, None, labels, rewards, kwargs, 1e-4)
    assert_linear_matches_oracle(hidden, weight, None, labels, rewards, dict(group_size=2), 1e-4)  # on-policy


def test_float16_logits_past_65504_stay_finite():
    """float16 hidden and weight whose logits exceed float16's largest value (65504): loss and gradients finite
    and accurate (on-policy, so that dL/ds, and the float16 gradients, stay small)."""
    hidden, weight, labels, rewards, _ = linear_inputs(hidden_size=32, vocab=64, dtype=torch.float16)
    hidden = (hidden.float().sign() * 60).half()
    weight = (weight.float() * 600).half()
    assert (hidden.float().flatten(0, 1) @ weight.float().T).abs().max() > 65504
    assert_linear_matches_oracle(hidden, weight, None, labels, rewards, dict(group_size=2), 1e-4)


# ----------------------------------------------------------------------------------------------------------------
# a small temperature


def test_logits_path_at_temperature_1e_4():
    check_against_oracle(Case(groups=(2, 2), seq_len=31, temperature=1e-4), "cpu", CPU)


def test_linear_path_at_temperature_1e_4():
    check_against_oracle(Case(hidden_size=16, groups=(2, 2), seq_len=31, temperature=1e-4), "cpu", CPU)


# ----------------------------------------------------------------------------------------------------------------
# bitwise reproducible


@pytest.mark.parametrize("num_threads", [1, 2, 3, 4])
@pytest.mark.parametrize("anchor", [True, False], ids=["four-gemms", "three-gemms"])
def test_linear_path_is_bitwise_reproducible(anchor, num_threads, threads, monkeypatch):
    """The same loss and gradients, bit for bit, in repeated runs at each thread count."""
    threads(num_threads)
    small_blocks(monkeypatch, 16)
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * 2000 * 40)
    hidden, weight, labels, rewards, kwargs = linear_inputs(num_seqs=4, seq_len=32, hidden_size=32, vocab=2000)
    bias = torch.randn(2000)
    if not anchor:
        kwargs = dict(group_size=2)
    first = None
    for _ in range(6):
        loss, grads, _ = run_linear(gk.linear_gvpo_loss, *linear_leaves(hidden, weight, bias), labels, rewards,
                                    kwargs, backend="cpu")
        if first is None:
            first = (loss, grads)
        assert torch.equal(loss, first[0]) and all(torch.equal(g, f) for g, f in zip(grads, first[1]))


def test_logits_path_is_bitwise_the_same_at_every_thread_count(threads):
    """The logits path computes each row alone: the same bits run to run and whatever the thread count."""
    inputs = make_inputs(Case(groups=(2, 2), seq_len=31, vocab=3001), CPU)
    results = []
    for num_threads in (1, 2, 3, 4, 1):
        threads(num_threads)
        results.append(run(gk.gvpo_loss, inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"],
                           backend="cpu")[:2])
    assert all(torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1]) for r in results)


def test_low_precision_weight_blocks_are_bounded():
    """The kernels copy a bfloat16 / float16 block of weight rows to float32 per thread: at most
    WEIGHT_BLOCK_BYTES (a wide hidden size with few tokens per chunk would otherwise make it tens of MB)."""
    hidden_size, vocab = 4096, 64
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        work = cpu._LinearWork(torch.zeros(1, 3, hidden_size, dtype=dtype), torch.zeros(vocab, hidden_size,
                               dtype=dtype), None, torch.zeros(3, dtype=torch.int64), LogitSpec(), (True,) * 3, False)
        rows = work._block_rows(3)
        if dtype == torch.float32:  # no copy: the block of logits alone sets it
            assert rows == cpu.BLOCK_BYTES // (4 * 3)
        else:
            assert rows * hidden_size * 4 <= cpu.WEIGHT_BLOCK_BYTES
