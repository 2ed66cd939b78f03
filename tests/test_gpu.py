"""The compiled Triton kernels on a real GPU: what the interpreter cannot show (skipped without CUDA).

Realistic shapes, no recompilation when N or T changes, int64 offsets past 2^31 logits elements, strided rewards,
and the ahead-of-time compile (tests/helpers/aot.py) agreeing with what a launch compiles.
"""

import pytest
import torch
from helpers.cases import run

import gvpo_kernels as gk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(num_seqs, seq_len, vocab, dtype, seed=0, group_size=4):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = (2 * torch.randn(num_seqs, seq_len, vocab, device="cuda", generator=gen)).to(dtype)
    labels = torch.randint(0, vocab, (num_seqs, seq_len), device="cuda", generator=gen)
    mask = torch.rand(num_seqs, seq_len, device="cuda", generator=gen) < 0.8
    kwargs = dict(group_size=group_size, mask=mask, temperature=0.9,
                  ref_logprobs=-5 * torch.rand(num_seqs, seq_len, device="cuda", generator=gen))
    return logits.requires_grad_(), labels, torch.randn(num_seqs, device="cuda", generator=gen), kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_realistic_shape_against_reference(dtype, packed):
    logits, labels, rewards, kwargs = _inputs(16, 512, 32003, dtype)
    if packed:
        kwargs = dict(kwargs, cu_seqlens=torch.arange(0, 16 * 512 + 1, 512, device="cuda"),
                      mask=kwargs["mask"].flatten(), ref_logprobs=kwargs["ref_logprobs"].flatten())
        logits = logits.detach().flatten(0, 1).requires_grad_()
        labels = labels.flatten()
    oracle = run(gk.reference.gvpo_loss, logits.detach().double().requires_grad_(), labels, rewards.double(),
                 kwargs)
    got = run(gk.gvpo_loss, logits, labels, rewards, kwargs, backend="triton")
    slack = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(got[0].item() - oracle[0].item()) <= slack * abs(oracle[0].item()) + 1e-6
    err = (got[1].double() - oracle[1]).norm() / oracle[1].norm()
    base = (oracle[1].to(dtype).double() - oracle[1]).norm() / oracle[1].norm()  # rounding to the dtype alone
    assert err <= base + slack


def _compiled_variants(kernel):
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton version keeps its kernel cache elsewhere")
    return sum(len(entry[0]) for entry in caches.values())


# Triton keys an int argument on == 1 and on divisibility by 16 only, and the row strides are specialised (for 16-byte
# loads): lengths 1, 16 and 17 meet every such class of T x V, so no later length may add a variant.
WARM_LENGTHS, NEW_LENGTHS = [1, 16, 17], [2, 32, 33, 100, 257, 512]


def test_new_lengths_do_not_recompile():
    from gvpo_kernels.triton import group, logprob

    kernels = [logprob.token_logprob_fwd_kernel, logprob.token_logprob_bwd_kernel, group.gvpo_group_fwd_kernel]
    for vocab in (4099, 4096):  # rows 16-byte aligned or not
        for seq_len in WARM_LENGTHS:
            logits, labels, rewards, kwargs = _inputs(8, seq_len, vocab, torch.bfloat16, seed=seq_len)
            run(gk.gvpo_loss, logits, labels, rewards, kwargs, backend="triton")
    before = [_compiled_variants(k) for k in kernels]
    assert max(before) <= 8, before
    for vocab in (4099, 4096):
        for seq_len in NEW_LENGTHS:
            logits, labels, rewards, kwargs = _inputs(8, seq_len, vocab, torch.bfloat16, seed=seq_len)
            run(gk.gvpo_loss, logits, labels, rewards, kwargs, backend="triton")
    assert [_compiled_variants(k) for k in kernels] == before


def test_aot_compile_matches_the_launched_kernel():
    """tests/helpers/aot.py, which CI runs without a GPU, compiles a plan to the very kernel a launch of that plan gets:
    same registers, no spills (a launched kernel's cache holds it after the launch)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
    import aot

    from gvpo_kernels.backend import LogitSpec, TokenStats
    from gvpo_kernels.triton import logprob
    from gvpo_kernels.triton.plan import device_of, launch

    if aot.unavailable_reason():
        pytest.skip(aot.unavailable_reason())
    rows = torch.randn(4, 33, 152064, device="cuda", dtype=torch.bfloat16)[:, :-1]
    target = torch.randint(0, 152064, (4 * 32,), device="cuda")
    out = TokenStats(torch.empty(4 * 32, device="cuda"), torch.empty(2, 4 * 32, device="cuda"), None)
    plan = logprob.forward_plan(rows, target, out, LogitSpec(), device_of(rows.device))
    launch(plan)
    torch.cuda.synchronize()
    props = aot.compile_plan(plan, device_of(rows.device).arch)
    assert props["ok"], props.get("error")
    launched = [k for k in plan.kernel.device_caches[torch.cuda.current_device()][0].values()]
    assert props["regs"] in {k.n_regs for k in launched}
    assert props["spill_st"] == 0 and all(k.n_spills == 0 for k in launched)
    assert props["ld16"] >= 1


def test_strided_and_expanded_rewards():
    """A rewards column of a table (stride 2) or an expanded scalar (stride 0) must be read as values,
    not as consecutive memory."""
    logits, labels, _, kwargs = _inputs(8, 17, 4099, torch.float32)
    table = torch.randn(8, 2, device="cuda")
    for rewards in (table[:, 0], torch.tensor(0.5, device="cuda").expand(8)):
        want = run(gk.reference.gvpo_loss, logits.detach().double().requires_grad_(), labels, rewards.double(),
                   kwargs)
        got = run(gk.gvpo_loss, logits, labels, rewards, kwargs, backend="triton")
        assert abs(got[0].item() - want[0].item()) <= 1e-5 * abs(want[0].item()) + 1e-6
        torch.testing.assert_close(got[1].double(), want[1], rtol=1e-4, atol=1e-6)


def test_offsets_past_two_to_the_31():
    """N x V > 2^31: only the last rows are scored, so a wrapped int32 offset would read the wrong rows."""
    num_tokens, vocab = 16400, 131072
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    assert num_tokens * vocab > 2**31
    logits = torch.randn(num_tokens, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (num_tokens,), device="cuda")
    mask = torch.zeros(num_tokens, dtype=torch.bool, device="cuda")
    mask[-8:] = True
    rewards = torch.tensor([0.0, 1.0], device="cuda")
    cu = torch.tensor([0, num_tokens - 4, num_tokens], device="cuda")
    logits.requires_grad_()
    loss = gk.gvpo_loss(logits, labels, rewards, group_size=2, mask=mask, cu_seqlens=cu, backend="triton")
    loss.backward()
    tail = logits.detach()[-8:].clone().requires_grad_()
    want = gk.reference.gvpo_loss(tail, labels[-8:], rewards, group_size=2, cu_seqlens=torch.tensor(
        [0, 4, 8], device="cuda"))
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(logits.grad[-8:], tail.grad)
    assert logits.grad[:-8].abs().max() == 0


@pytest.mark.parametrize("bias_view", ["contiguous", "strided", "expanded"])
@pytest.mark.parametrize("anchor", [True, False], ids=["four-gemms", "three-gemms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_realistic_shape_against_reference(dtype, anchor, bias_view):
    """The compiled tl.dot tiles (bf16 tensor cores; IEEE fp32 for fp32) against the float64 oracle, on both GEMM
    schedules (an anchor: four GEMMs; on-policy: three, from the stored exponentials), with a contiguous, a
    strided and an expanded (stride-0) bias. bf16 must accumulate d_weight inside cuBLAS (no fallback)."""
    from gvpo_kernels.triton import linear_work

    gen = torch.Generator(device="cuda").manual_seed(0)
    num_seqs, seq_len, hidden_size, vocab = 16, 256, 1024, 32003
    hidden = torch.randn(num_seqs, seq_len, hidden_size, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=gen) / hidden_size**0.5).to(dtype)
    bias = torch.randn(vocab, device="cuda", generator=gen).to(dtype)
    if bias_view == "expanded":
        bias = bias[:1].expand(vocab).contiguous()
    labels = torch.randint(0, vocab, (num_seqs, seq_len), device="cuda", generator=gen)
    kwargs = dict(group_size=8, mask=torch.rand(num_seqs, seq_len, device="cuda", generator=gen) < 0.6,
                  temperature=0.9)
    if anchor:
        kwargs["ref_logprobs"] = -5 * torch.rand(num_seqs, seq_len, device="cuda", generator=gen)
    rewards = torch.randn(num_seqs, device="cuda", generator=gen)

    def grads(fn, cast, **extra):
        leaves = [t.detach().to(cast).requires_grad_() for t in (hidden, weight, bias)]
        b = leaves[2]
        if bias_view == "strided":
            b = torch.stack([torch.zeros_like(b), b], dim=1)[:, 1]
        elif bias_view == "expanded":
            b = b[:1].expand(vocab)
        loss = fn(*leaves[:2], labels, rewards.to(cast), bias=b, **kwargs, **extra)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    oracle = grads(gk.reference.linear_gvpo_loss, torch.float64)
    baseline = grads(gk.reference.linear_gvpo_loss, dtype)  # PyTorch's own error at this dtype
    got = grads(gk.linear_gvpo_loss, dtype, backend="triton")
    slack = 1e-5 if dtype == torch.float32 else 1e-2
    names = ["loss", "d_hidden", "d_weight", "d_bias"][: 3 if bias_view == "expanded" else 4]  # expanded: sum ~0
    for name, g, b, o in zip(names, got, baseline, oracle):
        err = ((g.double() - o).norm() / o.norm()).item()
        base = ((b.double() - o).norm() / o.norm()).item()
        assert err <= base + slack, f"{name}: {err:.3g} vs {base:.3g}"
    if dtype == torch.bfloat16:
        assert linear_work._MIXED_ADDMM[0], "addmm(out_dtype=float32) into the accumulator fell back to a temporary"


def test_linear_new_lengths_do_not_recompile():
    from gvpo_kernels.triton import linear

    kernels = [linear.linear_logprob_fwd_kernel, linear.linear_logprob_bwd_kernel]

    def step(seq_len):
        hidden = torch.randn(8, seq_len, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(4099, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, 4099, (8, seq_len), device="cuda")
        gk.linear_gvpo_loss(hidden, weight, labels, torch.randn(8, device="cuda"), group_size=4,
                            backend="triton").backward()

    for seq_len in WARM_LENGTHS:
        step(seq_len)
    before = [_compiled_variants(k) for k in kernels]
    for seq_len in NEW_LENGTHS:
        step(seq_len)
    assert [_compiled_variants(k) for k in kernels] == before


def test_across_ranks_with_nccl(tmp_path):
    """The distributed path on CUDA tensors through NCCL (which takes CUDA tensors only), on one rank: a group split
    and a vocabulary split of one rank each must give what the single-process call gives."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("torch.distributed with NCCL is not available")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        logits, labels, rewards, kwargs = _inputs(8, 33, 4099, torch.bfloat16)
        kwargs["group_ids"] = torch.arange(8, device="cuda") // kwargs.pop("group_size") * 1000 - 7  # any int64 ids
        hidden = torch.randn(8, 33, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(4099, 64, device="cuda") / 8).to(torch.bfloat16).requires_grad_()
        ranks = dict(group_process_group=dist.group.WORLD, vocab_process_group=dist.group.WORLD)

        def call(loss_fn, leaves, **extra):
            for leaf in leaves:
                leaf.grad = None
            loss, stats = loss_fn(*leaves, labels, rewards, backend="triton", return_stats=True, **kwargs, **extra)
            loss.backward()
            return [loss.detach(), *stats, *(leaf.grad.float() for leaf in leaves)]

        for loss_fn, leaves in ((gk.gvpo_loss, [logits]), (gk.linear_gvpo_loss, [hidden, weight])):
            want, got = call(loss_fn, leaves), call(loss_fn, leaves, **ranks)
            num_stats = 1 + len(gk.GVPOStats._fields)
            for g, w in zip(got[:num_stats], want[:num_stats]):  # loss and stats, float32
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
            for g, w in zip(got[num_stats:], want[num_stats:]):  # bfloat16 gradients: one ulp apart at most
                torch.testing.assert_close(g, w, rtol=1.6e-2, atol=1e-5)
    finally:
        dist.destroy_process_group()
