"""The C++ CPU backend (csrc/, gvpo_kernels/cpu.py) against the float64 oracle, its GEMM schedules, and the
fallback when the extension cannot be built.

The logits path runs the same grid as the other backends (tests/test_gvpo_loss.py); the linear path runs its grid
(tests/test_linear.py) under three chunkings, so that each GEMM schedule of cpu.linear_loss_and_grads meets every
case: one chunk for all rows, chunks of whole groups, and chunks of 7 rows (which cut sequences and groups).
"""

from pathlib import Path

import pytest
import torch
from helpers.cases import Case, another_slice_case, check_against_oracle, make_inputs, run, run_linear
from helpers.grids import LINEAR_CASES

import gvpo_kernels as gk
from gvpo_kernels import cpu, layout, ops, torch_impl
from gvpo_kernels.backend import LogitSpec
from gvpo_kernels.ops import select

CPU = torch.device("cpu")

if cpu.unavailable_reason() is not None:  # built once per session (and cached across sessions)
    pytest.skip(f"the C++ extension is unavailable: {cpu.unavailable_reason()}", allow_module_level=True)


def chunk_rows(monkeypatch, vocab: int, rows: int) -> None:
    """Make the linear path's chunks hold ``rows`` rows (logits kept whole, or not), and its blocks of logits a
    few vocabulary rows (so that the threads' vocabulary ranges are cut into several blocks)."""
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * vocab * rows)
    monkeypatch.setattr(cpu, "CHUNK_HIDDEN_BYTES", 1)  # chunks of 64 rows when the logits are not kept
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 4 * 7 * rows)


def largest_group_rows(case: Case) -> int:
    """The scored rows of the largest group of ``case``: chunks of this many rows hold whole groups."""
    inputs = make_inputs(case, CPU)
    keys = ("mask", "group_size", "group_ids", "cu_seqlens", "ref_logprobs")
    lay = layout.build(inputs["labels"], inputs["rewards"], vocab_size=case.vocab,
                       **{k: v for k, v in inputs["kwargs"].items() if k in keys})
    per_seq = torch.zeros(lay.num_seqs).index_add_(0, lay.token_seq, (lay.target >= 0).float())
    return int(torch.zeros(lay.num_groups).index_add_(0, lay.seq_group, per_seq).max())


@pytest.fixture
def gradient_passes(monkeypatch):
    """Records each chunk's gradient pass of one linear call: True where it read the logits kept by the forward
    (a three-GEMM schedule), False where it computed them again (four GEMMs)."""
    kept = []
    original = cpu._LinearWork.backward

    def recording(self, tokens, norm, coefs, kept_logits):
        kept.append(kept_logits)
        return original(self, tokens, norm, coefs, kept_logits)

    monkeypatch.setattr(cpu._LinearWork, "backward", recording)
    return kept


# ----------------------------------------------------------------------------------------------------------------
# against the oracle


@pytest.mark.parametrize("chunking", ["one", "groups", "rows7"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.id)
def test_linear_path(case, chunking, monkeypatch):
    if chunking == "groups":
        chunk_rows(monkeypatch, case.vocab, max(1, largest_group_rows(case)))
    elif chunking == "rows7":
        chunk_rows(monkeypatch, case.vocab, 7)
    check_against_oracle(case, "cpu", CPU)


# ----------------------------------------------------------------------------------------------------------------
# the GEMM schedules


@pytest.mark.parametrize("name, case, rows, gemms", [
    ("on-policy", Case(hidden_size=16, groups=(4, 4), seq_len=9, anchor=False), 7, 3),
    ("whole-batch", Case(hidden_size=16, groups=(4, 4), seq_len=9), 1000, 3),
    ("whole-groups", Case(hidden_size=16, groups=(2, 3, 1, 5), seq_len=9, layout="packed"), "group", 3),
    ("groups-split", Case(hidden_size=16, groups=(4, 4), seq_len=9), 7, 4),
    ("groups-shuffled", Case(hidden_size=16, groups=(2, 3, 1, 5), shuffled=True, seq_len=9), "group", 3),
], ids=lambda v: v if isinstance(v, str) else "")
def test_schedule(name, case, rows, gemms, monkeypatch, gradient_passes):
    """Three GEMMs (the gradient reads the logits kept from the forward) where dL/ds is known once a chunk's
    log-sum-exps are (the scored rows ordered by group, so shuffled group ids too), else four (the logits computed
    again)."""
    chunk_rows(monkeypatch, case.vocab, largest_group_rows(case) if rows == "group" else rows)
    check_against_oracle(case, "cpu", CPU)
    assert gradient_passes and all(gradient_passes) == (gemms == 3) and any(gradient_passes) == (gemms == 3)
    if name == "whole-groups":
        assert len(gradient_passes) > 1  # several chunks, each of whole groups


def test_no_gradient_work_without_grad(gradient_passes):
    """Under no_grad (or when nothing requires grad) the linear path runs its forward only."""
    inputs = make_inputs(Case(hidden_size=16, groups=(2, 2), seq_len=5, vocab=33), CPU)
    args = (inputs["hidden"], inputs["weight"], inputs["labels"], inputs["rewards"])
    want = gk.reference.linear_gvpo_loss(*args, **inputs["kwargs"])
    with torch.no_grad():
        got = gk.linear_gvpo_loss(*args, backend="cpu", **inputs["kwargs"])
    torch.testing.assert_close(got, want)
    assert gradient_passes == [] and not got.requires_grad


def test_frozen_weight_gets_no_gradient():
    inputs = make_inputs(Case(hidden_size=16, groups=(2, 2), seq_len=5, vocab=33), CPU)
    weight = inputs["weight"].detach()
    want = run_linear(gk.reference.linear_gvpo_loss, inputs["hidden"].detach().clone().requires_grad_(), weight,
                      None, inputs["labels"], inputs["rewards"], inputs["kwargs"])
    got = run_linear(gk.linear_gvpo_loss, inputs["hidden"], weight, None, inputs["labels"], inputs["rewards"],
                     inputs["kwargs"], backend="cpu")
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1][0], want[1][0])
    assert weight.grad is None


def test_upstream_gradient_scales_the_linear_gradients():
    """The linear gradients are computed in the forward for grad_loss = 1; backward scales them by the real one."""
    inputs = make_inputs(Case(hidden_size=16, bias=True, groups=(3,), seq_len=5, vocab=11), CPU)
    leaves = [inputs[k] for k in ("hidden", "weight", "bias")]
    want = run_linear(gk.reference.linear_gvpo_loss, *[t.detach().clone().requires_grad_() for t in leaves],
                      inputs["labels"], inputs["rewards"], inputs["kwargs"])[1]
    loss = gk.linear_gvpo_loss(leaves[0], leaves[1], inputs["labels"], inputs["rewards"], bias=leaves[2],
                               backend="cpu", **inputs["kwargs"])
    (-2.5 * loss).backward()
    for leaf, expected in zip(leaves, want):
        torch.testing.assert_close(leaf.grad, -2.5 * expected)


# ----------------------------------------------------------------------------------------------------------------
# kernel details


def test_auto_means_cpu_on_cpu_tensors():
    assert ops.select_backend("auto", CPU) is cpu
    with pytest.raises(RuntimeError, match="CPU tensors"):
        ops.select_backend("cpu", torch.device("meta"))


def test_non_contiguous_vocabulary_dimension():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 13, 6, generator=gen).transpose(1, 2).requires_grad_()  # stride(-1) = 6
    labels = torch.randint(0, 13, (4, 6), generator=gen)
    rewards = torch.randn(4, generator=gen)
    want = run(gk.reference.gvpo_loss, logits, labels, rewards, dict(group_size=2))
    got = run(gk.gvpo_loss, logits, labels, rewards, dict(group_size=2), backend="cpu")
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_large_vocabulary_matches_reference_closely():
    """Default chunking at a larger shape: fp32 loss to 1e-6 and gradients to 1e-5 relative, both paths."""
    inputs = make_inputs(Case(layout="packed", groups=(3, 5), seq_len=200, vocab=5000, temperature=0.9), CPU)
    got = run(gk.gvpo_loss, inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"], backend="cpu")
    want = run(gk.reference.gvpo_loss, inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"])
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)


def test_exp_is_accurate_where_the_softmax_lives():
    """The kernels' exp against float64, through token_forward on rows holding one large and one spread value."""
    x = torch.linspace(-85.0, 0.0, 200_001, dtype=torch.float64)
    rows = torch.stack([x, torch.zeros_like(x)], dim=1).float().unsqueeze(0)  # (1, n, 2): lse = log(e^x + 1)
    target = torch.zeros(x.numel(), dtype=torch.int64)
    norm = cpu.token_forward(rows, target, LogitSpec(), False).norm
    lse = norm[0] + norm[1]
    want = torch.logaddexp(x, torch.zeros_like(x))
    assert ((lse.double() - want).abs() <= 2e-7 * want.abs().clamp(min=1)).all()


# ----------------------------------------------------------------------------------------------------------------
# without the extension


def test_fallback_warns_once_and_runs_torch(monkeypatch):
    """Where the extension cannot be built, backend='auto' on the CPU warns once and runs the torch backend;
    backend='cpu' raises RuntimeError saying why."""
    reason = "the C++ CPU kernels (csrc/) cannot be built: no C++ compiler found (test)"
    monkeypatch.setattr(cpu, "unavailable_reason", lambda device=None: reason)
    monkeypatch.setattr(select, "_warned", set())
    inputs = make_inputs(Case(groups=(2, 2), seq_len=5, vocab=17), CPU)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler") as record:
        for _ in range(3):
            got = run(gk.gvpo_loss, inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"])
    assert len([w for w in record if "torch backend" in str(w.message)]) == 1
    want = run(gk.gvpo_loss, inputs["logits"], inputs["labels"], inputs["rewards"], inputs["kwargs"],
               backend="torch")
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert ops.select_backend("auto", CPU) is torch_impl
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        gk.gvpo_loss(inputs["logits"], inputs["labels"], inputs["rewards"], backend="cpu", **inputs["kwargs"])


def test_missing_compiler_is_reported_before_building(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    reason = cpu._build_and_load()
    assert "no C++ compiler" in reason and "csrc" in reason


def test_build_directory_is_one_per_environment(monkeypatch, tmp_path):
    """One build directory per distinct sources / flags / torch / Python / compiler / CPU, side by side: the same
    environment always finds its own, another one (a second venv, even with the same torch version) its own."""
    monkeypatch.setenv("GVPO_KERNELS_CACHE", str(tmp_path))
    facts = cpu._build_facts()
    first = cpu._build_dir(facts)
    assert first.parent == tmp_path and first.name.startswith("cpu-")
    assert cpu._build_dir(cpu._build_facts()) == first
    others = [dict(facts, torch=f"{torch.__version__} /elsewhere/.venv-verl/lib/python3.11/site-packages/torch"),
              dict(facts, torch=f"2.99.0 {facts['torch'].split(' ', 1)[1]}"),
              dict(facts, python="3.12.1 /usr/include/python3.12"),
              dict(facts, compiler="/usr/bin/clang++ clang version 18.1.0")]
    dirs = {cpu._build_dir(other) for other in others}
    assert len(dirs) == len(others) and first not in dirs
    monkeypatch.setattr(cpu, "CFLAGS", cpu.CFLAGS + ["-DGVPO_TEST"])
    assert cpu._build_dir(cpu._build_facts()) != first


def test_compiling_says_so_once_then_loads_the_build(monkeypatch, tmp_path, capsys):
    """The first use in an environment compiles (one line on stderr naming the directory); later ones load that
    build without compiling (the compile step and the loader are stand-ins here)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("GVPO_KERNELS_CACHE", str(tmp_path))
    compiled, loaded = [], []

    def fake_compile(name, build_directory, **kwargs):
        compiled.append(build_directory)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    monkeypatch.setattr(cpp_extension, "load", fake_compile)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    assert cpu._build_and_load() is None
    build_dir = cpu._build_dir(cpu._build_facts())
    assert compiled == [str(build_dir)] and loaded == []
    assert capsys.readouterr().err == (f"gvpo_kernels: compiling the C++ kernels (once, ~10 s) into {build_dir}\n")
    assert cpu._build_and_load() is None
    assert compiled == [str(build_dir)] and loaded == [str(build_dir / "gvpo_cpu.so")]
    assert capsys.readouterr().err == ""


def test_the_raw_ops_take_targets_past_the_vocabulary():
    """torch.ops.gvpo.* called directly: a target >= V (the label in another rank's slice) counts as a logit of 0 and
    gets no one-hot (test_kernels.py runs the same through the contract on every backend)."""
    case = another_slice_case()
    hidden, weight, logits, target, coef = (case[k] for k in ("hidden", "weight", "logits", "target", "coef"))
    want_logprob, want_grad, (vocab, hidden_size) = case["logprob"], case["grad"], weight.shape

    token_logprob, norm = torch.empty(6), torch.empty(2, 6)
    torch.ops.gvpo.token_forward(logits[None], target, 1.0, 0.0, 0.0, token_logprob, norm)
    torch.testing.assert_close(token_logprob, want_logprob)
    grad = torch.empty(1, 6, vocab)
    torch.ops.gvpo.token_backward(logits[None], target, norm, coef, 1.0, 0.0, 0.0, grad)
    torch.testing.assert_close(grad[0], want_grad)

    torch.ops.gvpo.linear_lse(hidden, weight, None, target, 1.0, 0.0, 0.0, 16, token_logprob, norm, None)
    torch.testing.assert_close(token_logprob, want_logprob)
    d_hidden, d_weight = torch.empty(6, hidden_size), torch.empty(vocab, hidden_size)
    torch.ops.gvpo.linear_grad(hidden, weight, None, target, norm, coef, 1.0, 0.0, 0.0, 16, None, d_hidden, d_weight,
                               None, False)
    torch.testing.assert_close(d_hidden, want_grad @ weight)
    torch.testing.assert_close(d_weight, want_grad.T @ hidden)


def test_autocast_around_the_call_does_not_reach_inside():
    """Under torch.autocast the losses still take their float32 inputs as float32 (the ops turn autocast off)."""
    inputs = make_inputs(Case(hidden_size=16, groups=(2, 2), seq_len=5, vocab=33, bias=True), CPU)
    args = (inputs["hidden"], inputs["weight"], inputs["labels"], inputs["rewards"])
    want = gk.linear_gvpo_loss(*args, bias=inputs["bias"], backend="cpu", **inputs["kwargs"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gk.linear_gvpo_loss(*args, bias=inputs["bias"], backend="cpu", **inputs["kwargs"])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path):
    """A build killed midway leaves cpp_extension's lock file, on which every later build would wait forever."""
    import os
    import time

    stale, live = tmp_path / "stale", tmp_path / "live"
    stale.write_text("")
    live.write_text("")
    old = time.time() - 2 * cpu.STALE_LOCK_S
    os.utime(stale, (old, old))
    cpu._remove_stale_lock(stale)
    cpu._remove_stale_lock(live)
    cpu._remove_stale_lock(tmp_path / "missing")
    assert not stale.exists() and live.exists()
