"""Every Triton kernel compiled ahead of time with the installed Triton for nine targets, no GPU needed: sm_80, sm_86,
sm_89, sm_90, sm_100, sm_120 (cubin, through the bundled ptxas) and gfx90a, gfx942, gfx950 (hsaco, through the LLVM
in Triton), each planned for the Device that GPU reports (plan.device_for: SM / CU count, shared memory per block).

tests/helpers/aot.py compiles the launchers' own plans (tests/helpers/aot_cases.py: logits path and group stage; tests/helpers/aot_linear.py:
linear path) for real model shapes, in a child process without TRITON_INTERPRET (conftest.py turns the interpreter
on here, and interpreted kernels cannot be compiled). ``pytest -s`` shows its target x kernel table. Fails, per
target, on: a compile error; shared memory / LDS above that target's per-block limit; a spill in a bf16 kernel (or
in any logits / group kernel); a bf16 linear tile without that target's tensor-core instructions (aot.MMA:
mma.sync, wgmma, tcgen05, mfma); and where the logits kernels' row loads and stores are not 16 bytes wide.

The plan tests below run without the compiler: plans are pure (meta tensors in), never depend on N or T through a
constexpr, and refuse a tensor that a kernel would misread through a raw pointer (a strided or stride-0 view).

The contract with tests/helpers/aot_linear.py: ``linear_plans(device) -> list[Plan]`` with a distinct label per plan, and
optionally ``check(label, target, props)``, called for each compiled linear plan with its properties (the dict that
tests/helpers/aot.py's ``compile_plan`` returns), raising AssertionError when a property is not what it should be.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
sys.path.insert(0, HERE)  # aot.py imports aot_cases / aot_linear from beside it, as a script does

import aot  # noqa: E402
import aot_cases  # noqa: E402

from gvpo_kernels.backend import Coefs, LogitSpec, TokenStats  # noqa: E402
from gvpo_kernels.triton import group, logprob  # noqa: E402
from gvpo_kernels.triton.plan import Device  # noqa: E402

_reason = aot.unavailable_reason()
needs_compiler = pytest.mark.skipif(_reason is not None, reason=_reason or "")
H100 = Device(arch=90, sm_count=132)


# ----------------------------------------------------------------------------------------------------------------
# plans


def test_plans_do_not_depend_on_lengths_through_constexprs():
    """Two batches that differ only in N and T give the same meta-parameters (a constexpr N or T would recompile
    every step)."""
    meta, f32 = aot_cases.meta, torch.float32

    def plans(num_seqs, seq_len):
        n = num_seqs * seq_len
        rows = meta((num_seqs, seq_len + 1, 152064), torch.bfloat16)[:, :-1]
        lay = aot_cases.token_layout(num_tokens=n, num_seqs=num_seqs)
        outs = [meta((num_seqs,), f32) for _ in range(3)] + [meta((lay.num_groups,), f32)]
        per_token = [meta((n,), f32) for _ in range(3)]
        norm = meta((2, n), f32)
        grad = meta(rows.shape, torch.bfloat16)
        return [logprob.forward_plan(rows, lay.target, TokenStats(per_token[0], norm, None), LogitSpec(), H100),
                logprob.forward_plan(rows, lay.target, TokenStats(per_token[0], norm, per_token[1]), LogitSpec(),
                                     H100),
                logprob.backward_plan(rows, lay.target, norm, Coefs(per_token[0]), LogitSpec(), grad, H100),
                logprob.backward_plan(rows, lay.target, norm, Coefs(*per_token), LogitSpec(1.0, 30.0), grad, H100),
                group.group_plan(meta((n,), f32), lay, 0.1, *outs, H100)]

    for a, b in zip(plans(64, 256), plans(16, 1000)):
        assert a.meta == b.meta and a.kernel is b.kernel


def _strided(t):
    """A view of t's shape whose elements are not consecutive: every other element of a tensor twice as long."""
    return torch.empty((2 * t.numel(),), dtype=t.dtype, device=t.device)[::2]


def _expanded(t):
    return torch.empty((1,), dtype=t.dtype, device=t.device).expand(t.shape)


@pytest.mark.parametrize("view", [_strided, _expanded], ids=["strided", "stride0"])
@pytest.mark.parametrize("field", ["rewards", "token_ref", "cu_seqlens", "group_order", "group_ptr"])
def test_group_plan_refuses_a_layout_tensor_it_would_misread(field, view):
    """Once, the group stage read rewards = table[:, 0] as if contiguous and gave a wrong loss."""
    meta, f32 = aot_cases.meta, torch.float32
    lay = aot_cases.token_layout(num_tokens=64, num_seqs=8, group_size=4, with_ref=True)
    lay = dataclasses.replace(lay, **{field: view(getattr(lay, field))})
    outs = [meta((8,), f32) for _ in range(3)] + [meta((2,), f32)]
    with pytest.raises(ValueError, match=field):
        group.group_plan(meta((64,), f32), lay, 0.1, *outs, H100)


@pytest.mark.parametrize("view", [_strided, _expanded], ids=["strided", "stride0"])
@pytest.mark.parametrize("field", ["target", "logprob", "entropy", "norm", "coef_logprob", "coef_entropy",
                                   "token_entropy"])
def test_token_plans_refuse_a_per_token_tensor_they_would_misread(field, view):
    """Every per-token tensor the token kernels read or write through a raw pointer: a strided or stride-0 view is
    refused by name (it would be misread)."""
    meta, f32 = aot_cases.meta, torch.float32
    rows = meta((2, 32, 1000), torch.float32)
    t = {name: meta((64,), f32) for name in ("logprob", "entropy", "coef_logprob", "coef_entropy", "token_entropy")}
    t["target"], t["norm"] = meta((64,), torch.int64), meta((2, 64), f32)
    t[field] = view(t[field])
    out = TokenStats(t["logprob"], t["norm"], t["entropy"])
    coefs = Coefs(t["coef_logprob"], t["coef_entropy"], t["token_entropy"])
    refused = 0
    if field in ("target", "logprob", "entropy", "norm"):
        with pytest.raises(ValueError, match=field):
            logprob.forward_plan(rows, t["target"], out, LogitSpec(), H100)
        refused += 1
    if field not in ("logprob", "entropy"):
        with pytest.raises(ValueError, match=field):
            logprob.backward_plan(rows, t["target"], t["norm"], coefs, LogitSpec(), meta(rows.shape, f32), H100)
        refused += 1
    assert refused


@pytest.mark.parametrize("target", aot.TARGETS)
def test_device_facts_of_each_target(target):
    """The Device a target's GPU reports: vendor, architecture, SM / CU count and shared memory per block (what
    the plans are sized from), with the warp width that follows from the architecture."""
    from gvpo_kernels.triton.plan import ARCHITECTURES, device_for

    dev = device_for(target)
    gpu, sm_count, shared = ARCHITECTURES[target]
    assert (dev.name, dev.sm_count, dev.shared_memory) == (target, sm_count, shared)
    assert dev.vendor == ("hip" if target.startswith("gfx") else "cuda")
    assert dev.warp_size == (64 if target.startswith("gfx9") else 32)
    assert shared >= (64 << 10)


def _fake_gpu(monkeypatch, hip, **props):
    """torch.cuda.get_device_properties answering with ``props`` (a CUDA or a ROCm build's fields)."""
    from types import SimpleNamespace

    from gvpo_kernels.triton import plan

    plan._gpu_device.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(**props))
    monkeypatch.setattr(torch.version, "hip", hip)
    return plan


def test_device_of_reads_a_cuda_gpus_properties(monkeypatch):
    plan = _fake_gpu(monkeypatch, None, major=12, minor=0, multi_processor_count=170,
                     shared_memory_per_block=49152, shared_memory_per_block_optin=101376, gcnArchName="NVIDIA")
    try:
        dev = plan.device_of(torch.device("cuda", 0))
        assert (dev.vendor, dev.arch, dev.sm_count, dev.shared_memory) == ("cuda", 120, 170, 101376)
        assert plan.mma_kind(dev) == "mma.sync"
    finally:
        plan._gpu_device.cache_clear()


def test_device_of_reads_a_rocm_gpus_properties(monkeypatch):
    """ROCm: torch says "cuda"; the architecture is gcnArchName's first field; an older torch has no opt-in field
    and an LDS in shared_memory_per_block."""
    plan = _fake_gpu(monkeypatch, "6.4", major=9, minor=4, multi_processor_count=304,
                     shared_memory_per_block=65536, gcnArchName="gfx942:sramecc+:xnack-")
    try:
        dev = plan.device_of(torch.device("cuda", 0))
        assert (dev.vendor, dev.arch, dev.sm_count, dev.shared_memory, dev.warp_size) == ("hip", "gfx942", 304,
                                                                                         65536, 64)
    finally:
        plan._gpu_device.cache_clear()


def test_device_of_falls_back_to_the_table_without_a_shared_memory_field(monkeypatch):
    plan = _fake_gpu(monkeypatch, "6.2", major=9, minor=5, multi_processor_count=256, gcnArchName="gfx950")
    try:
        assert plan.device_of(torch.device("cuda", 0)).shared_memory == 160 << 10
    finally:
        plan._gpu_device.cache_clear()


@pytest.mark.parametrize("target", aot.TARGETS)
def test_linear_plans_fit_each_target(target):
    """Tiles within the shared memory, no TF32 anywhere (refused on gfx90a / gfx950, and fp32 must not use it)."""
    from gvpo_kernels.triton import linear
    from gvpo_kernels.triton.plan import _tile_shared_bytes

    dev = aot.device(target)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for store in (False, True):
            config = linear.tile_config(dtype, 4096, dev, store=store)
            assert config["DOT_PRECISION"] == "ieee"
            assert _tile_shared_bytes(config, torch.empty((), dtype=dtype).element_size(), dev) <= dev.shared_memory
            assert ("maxnreg" in config) == (target == "sm_100" and dtype != torch.float32)


def test_linear_plans_shrink_to_a_small_shared_memory():
    """A GPU with less shared memory than its family's rule needs gets fewer stages, then a shallower H step."""
    from gvpo_kernels.triton import linear
    from gvpo_kernels.triton.plan import Device, _tile_shared_bytes

    for shared in (40 << 10, 20 << 10):
        dev = Device(arch=90, sm_count=132, shared_memory=shared)
        config = linear.tile_config(torch.bfloat16, 4096, dev)
        assert _tile_shared_bytes(config, 2, dev) <= shared and config["num_stages"] >= 2
    assert linear.tile_config(torch.bfloat16, 4096, Device(arch=90, sm_count=1, shared_memory=20 << 10))["BLOCK_H"] < 64


@pytest.mark.parametrize("target", ["sm_90", "gfx942"])
def test_row_kernels_move_16_bytes_per_thread_whatever_the_warp_width(target):
    """AMD CDNA's warps are 64 threads: the same block on half the warps keeps 16 bytes per thread."""
    dev = aot.device(target)
    for itemsize, per_thread in ((2, 8), (4, 4)):
        params = logprob.block_params(152064, itemsize, logprob.FWD_VECTORS, dev)
        assert params["BLOCK_V"] // (params["num_warps"] * dev.warp_size) == per_thread


# ----------------------------------------------------------------------------------------------------------------
# compiled


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """tests/helpers/aot.py's results for every case: {"triton", "notes", "results": [properties + label, source]}."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "aot.py"), "--json", str(out), "--jobs", "2"],
                          env=env, capture_output=True, text=True, timeout=1800)
    print(proc.stdout)
    if not out.exists():
        pytest.fail(f"tests/helpers/aot.py wrote no results (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _results(compiled, source):
    return [r for r in compiled["results"] if r["source"] == source]


@needs_compiler
def test_every_kernel_compiles(compiled):
    failed = aot.compile_errors(compiled["results"])
    assert not failed, "\n".join(failed)
    assert {r["target"] for r in compiled["results"]} == set(aot.TARGETS)


@needs_compiler
def test_shared_memory_fits_each_target(compiled):
    """Shared memory (NVIDIA) / LDS (AMD) of every kernel within what one block may use on that target: more is an
    OutOfResources at the first launch (gfx942's 64 KB against the 96 KB that sm_90's 4 stages take)."""
    over = aot.over_shared_memory(compiled["results"])
    assert not over, "\n".join(over)


@needs_compiler
def test_no_spills(compiled):
    """No spill in a bf16 kernel; none in the logits and group kernels at any dtype (NVIDIA: ptxas's spill bytes;
    AMD: spilled VGPRs / SGPRs and scratch)."""
    spilled = aot.spills(compiled["results"])
    assert not spilled, "\n".join(spilled)


@needs_compiler
def test_linear_tiles_use_each_targets_tensor_cores(compiled):
    """A bf16 logits tile runs on the target's own matrix instructions (aot.MMA), never on FMA, and on nothing else:
    wgmma only on sm_90, tcgen05 only on sm_100, mma.sync on sm_80-89 and sm_120, mfma on AMD CDNA."""
    from gvpo_kernels.triton.plan import mma_kind

    assert _results(compiled, "linear"), "tests/helpers/aot_linear.py gave no plans"
    bad = aot.without_tensor_cores(compiled["results"])
    assert not bad, "\n".join(bad)
    assert {t: mma_kind(aot.device(t)) for t in aot.TARGETS} == aot.MMA


@needs_compiler
def test_logits_rows_move_in_16_byte_vectors(compiled):
    """aot.narrow_row_accesses: every row load and store 16 bytes wide where rows start 16-byte aligned."""
    bad = aot.narrow_row_accesses(compiled["results"])
    assert not bad, "\n".join(bad)


@needs_compiler
def test_linear_plans(compiled):
    linear, why = aot.linear_module()
    if linear is None:
        pytest.skip(f"no linear cases: {why}")
    assert _results(compiled, "linear"), "tests/helpers/aot_linear.py gave no plans"
    if getattr(linear, "check", None) is None:
        pytest.skip("tests/helpers/aot_linear.py defines no check(label, target, props): compiled only")
    bad = aot.linear_violations(compiled["results"])
    assert not bad, "\n".join(bad)
