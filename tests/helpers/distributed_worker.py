"""What each spawned process of tests/test_distributed.py runs: the losses across ranks against one process.

Every rank builds the same full problem from one seed (S sequences, full vocabulary), takes its share (its
sequences for a group split, its vocabulary columns or weight rows for a vocabulary split), calls the loss with
the process groups, and compares its loss and gradients with the float64 reference on the full problem.
"""

import datetime
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import torch.distributed as dist  # noqa: E402

import gvpo_kernels as gk  # noqa: E402
from gvpo_kernels import distributed  # noqa: E402

TOLERANCE = 1e-5  # float32 against the float64 oracle, relative


def init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    # a rank left waiting (a check that raised on one rank only) fails the test in a minute, not gloo's 30
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def finish() -> None:
    """Every check passed: wait for the other ranks, tear the process group down, and leave without the
    interpreter's own teardown, where torch 2.13 with gloo sometimes aborts in a C++ destructor after a rank has
    raised and caught an error ("terminate called without an active exception", no Python frame left: seen about
    once in 20 runs of run_bad_inputs, never in its checks)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def problem(seed: int, num_seqs: int = 9, seq_len: int = 5, vocab: int = 37, hidden_size: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        logits=2 * torch.randn(num_seqs, seq_len, vocab, generator=gen),
        hidden=torch.randn(num_seqs, seq_len, hidden_size, generator=gen),
        weight=torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5,
        bias=torch.randn(vocab, generator=gen),
        labels=torch.randint(0, vocab, (num_seqs, seq_len), generator=gen),
        mask=torch.rand(num_seqs, seq_len, generator=gen) < 0.8,
        ref_logprobs=-3 * torch.rand(num_seqs, seq_len, generator=gen),
        rewards=torch.randn(num_seqs, generator=gen),
        group_ids=torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 3])[torch.randperm(num_seqs, generator=gen)],
    )


def masked_slice(full: dict, lo: int, hi: int) -> dict:
    """``full`` with the vocabulary columns [lo, hi) at -inf: the logits at every other position (per-position
    masking, as constrained decoding does), the bias everywhere; every label moved outside [lo, hi)."""
    masked = dict(full)
    logits = full["logits"].clone()
    logits[0::2, :, lo:hi] = float("-inf")
    logits[1::2, 0::2, lo:hi] = float("-inf")
    masked["logits"] = logits
    bias = full["bias"].clone()
    bias[lo:hi] = float("-inf")
    masked["bias"] = bias
    vocab = logits.shape[-1]
    labels = full["labels"]
    masked["labels"] = torch.where((labels >= lo) & (labels < hi), hi + labels % (vocab - hi), labels)
    return masked


def rel_err(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()


def check(path: str, backend: str, full: dict, seqs, vocab_slice, group_pg, vocab_pg, reduction: str,
          anchor: bool = True, **extra) -> None:
    """This rank's loss and gradients against the single-process oracle on the full problem; ``extra``: more
    options for both (softcap, logit_scale, entropy_coef)."""
    lo, hi = vocab_slice
    ref_kwargs = dict(mask=full["mask"], group_ids=full["group_ids"], reduction=reduction, temperature=0.8,
                      ref_logprobs=full["ref_logprobs"] if anchor else None, **extra)
    sparse_ids = torch.tensor([-5, 10**12, 7, 0])[full["group_ids"]]  # any int64 ids work across ranks
    mine = dict(mask=full["mask"][seqs], group_ids=sparse_ids[seqs], reduction=reduction, temperature=0.8,
                ref_logprobs=full["ref_logprobs"][seqs] if anchor else None, group_process_group=group_pg,
                vocab_process_group=vocab_pg, backend=backend, **extra)
    labels, rewards = full["labels"], full["rewards"]
    if path == "logits":
        oracle = full["logits"].double().requires_grad_()
        want, want_stats = gk.reference.gvpo_loss(oracle, labels, rewards.double(), return_stats=True, **ref_kwargs)
        want.backward()
        logits = full["logits"][seqs][..., lo:hi].contiguous().requires_grad_()
        got, stats = gk.gvpo_loss(logits, labels[seqs], rewards[seqs], return_stats=True, **mine)
        got.backward()
        pairs = [("logits", logits.grad, oracle.grad[seqs][..., lo:hi])]
    else:
        leaves = [full[k].double().requires_grad_() for k in ("hidden", "weight", "bias")]
        want, want_stats = gk.reference.linear_gvpo_loss(leaves[0], leaves[1], labels, rewards.double(),
                                                         bias=leaves[2], return_stats=True, **ref_kwargs)
        want.backward()
        hidden = full["hidden"][seqs].clone().requires_grad_()
        weight = full["weight"][lo:hi].clone().requires_grad_()
        bias = full["bias"][lo:hi].clone().requires_grad_()
        got, stats = gk.linear_gvpo_loss(hidden, weight, labels[seqs], rewards[seqs], bias=bias, return_stats=True,
                                         **mine)
        got.backward()
        d_hidden = hidden.grad.clone()
        if vocab_pg is not None:  # each slice gives its contribution; the vocabulary group sums them
            dist.all_reduce(d_hidden, group=vocab_pg)
        # the weight rows are shared by every data-parallel rank: sum their gradients over the group split
        d_weight, d_bias = weight.grad.clone(), bias.grad.clone()
        if group_pg is not None:
            dist.all_reduce(d_weight, group=group_pg)
            dist.all_reduce(d_bias, group=group_pg)
        pairs = [("d_hidden", d_hidden, leaves[0].grad[seqs]), ("d_weight", d_weight, leaves[1].grad[lo:hi]),
                 ("d_bias", d_bias, leaves[2].grad[lo:hi])]
    assert abs(got.item() - want.item()) <= TOLERANCE * abs(want.item()) + 1e-7, (path, got.item(), want.item())
    # the per-sequence statistics of this rank's sequences, the entropy over the whole vocabulary included
    pairs += [(name, got_stat, want_stat[seqs]) for name, got_stat, want_stat in zip(stats._fields[:4], stats,
                                                                                      want_stats)]
    pairs += [(name, getattr(stats, name), getattr(want_stats, name)) for name in ("gvpo_loss", "entropy_bonus")]
    for name, g, w in pairs:
        assert rel_err(g, w) <= TOLERANCE, (path, backend, name, rel_err(g, w))


def run_splits(rank: int, world: int, init_file: str, backend: str) -> None:
    """Group splits (whole groups, a group across ranks, uneven shares) and vocabulary splits (even and uneven),
    alone and combined (world 4 = 2 data-parallel x 2 vocabulary ranks)."""
    init(rank, world, init_file)
    full = problem(seed=7)
    order = torch.argsort(full["group_ids"], stable=True)  # by group: 0 0 | 1 1 1 1 | 2 2 | 3 (a group of one)
    everyone = dist.group.WORLD
    if world in (2, 3):
        whole = {2: [order[:6], order[6:]], 3: [order[:2], order[2:6], order[6:]]}[world]
        split = {2: [order[[0, 2, 3, 6]], order[[1, 4, 5, 7, 8]]],  # group 1 split 2 + 2, groups 0 and 2 1 + 1
                 3: [order[[0, 2, 3]], order[[1, 4, 5, 8]], order[[6, 7]]]}[world]
        uneven = {2: [order[[3]], order[[0, 1, 2, 4, 5, 6, 7, 8]]],
                  3: [order[[7]], order[:3], order[[3, 4, 5, 6, 8]]]}[world]
        even_vocab = {2: [(0, 18), (18, 37)], 3: [(0, 12), (12, 25), (25, 37)]}[world]
        uneven_vocab = {2: [(0, 5), (5, 37)], 3: [(0, 30), (30, 31), (31, 37)]}[world]
        for path in ("logits", "linear"):
            for shares, reduction in ((whole, "mean"), (split, "sum"), (uneven, "mean")):
                check(path, backend, full, shares[rank], (0, 37), everyone, None, reduction)
            check(path, backend, full, split[rank], (0, 37), everyone, None, "mean", anchor=False)
            for vocab in (even_vocab, uneven_vocab):
                check(path, backend, full, torch.arange(9), vocab[rank], None, everyone, "mean")
            # rank 0's whole slice masked (-inf) at every other position (the linear path: through its bias, at
            # every position), the labels elsewhere: that slice adds nothing, no inf - inf, no 0 * inf
            vocab = uneven_vocab if world == 2 else even_vocab
            check(path, backend, masked_slice(full, *vocab[0]), torch.arange(9), vocab[rank], None, everyone,
                  "mean")
            # a soft-capped, scaled head and an entropy bonus (its mean over every rank's scored tokens)
            transform = dict(softcap=3.0, logit_scale=1.5, entropy_coef=0.05)
            check(path, backend, full, split[rank], (0, 37), everyone, None, "mean", **transform)
            check(path, backend, full, torch.arange(9), even_vocab[rank], None, everyone, "sum", **transform)
    else:  # world 4: data-parallel pairs {0, 1}, {2, 3}; vocabulary pairs {0, 2}, {1, 3}
        dp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        tp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        dp_rank, tp_rank = rank % 2, rank // 2
        group_pg, vocab_pg = dp_groups[tp_rank], tp_groups[dp_rank]
        seqs = [order[[0, 2, 3, 6]], order[[1, 4, 5, 7, 8]]][dp_rank]
        vocab = [(0, 9), (9, 37)][tp_rank]
        for path in ("logits", "linear"):
            check(path, backend, full, seqs, vocab, group_pg, vocab_pg, "mean")
    finish()


def raised(expected, accepted: str, fn, *args, **kwargs):
    """The exception of type ``expected`` (or a subclass) that fn(*args, **kwargs) raises; AssertionError(accepted)
    if it returns."""
    try:
        fn(*args, **kwargs)
    except expected as exc:
        return exc
    raise AssertionError(accepted)


def run_bad_inputs(rank: int, world: int, init_file: str, backend: str) -> None:
    """A wrong setup raises on every rank (no rank is left waiting in a collective)."""
    init(rank, world, init_file)
    full = problem(seed=3)
    everyone = dist.group.WORLD
    seqs = [torch.arange(0, 4), torch.arange(4, 9)][rank]
    this_rank_or_another = ValueError if rank == 0 else distributed.InputError

    # one rank passes group_size instead of global group ids: it raises ValueError, the others InputError
    kwargs = dict(group_size=2) if rank == 0 else dict(group_ids=full["group_ids"][seqs])
    exc = raised((ValueError, distributed.InputError), "a wrong group setup was accepted", gk.gvpo_loss,
                 full["logits"][seqs], full["labels"][seqs], full["rewards"][seqs], backend=backend,
                 group_process_group=everyone, **kwargs)
    assert type(exc) is this_rank_or_another, (rank, exc)
    assert "group_ids" in str(exc) or "another rank" in str(exc), str(exc)

    # one rank asks for inplace_backward, which a process group does not support: ValueError there, InputError on
    # the others (the check runs before the exchanges, not instead of them)
    exc = raised((ValueError, distributed.InputError), "inplace_backward with a process group was accepted",
                 gk.gvpo_loss, full["logits"][seqs].requires_grad_(), full["labels"][seqs], full["rewards"][seqs],
                 backend=backend, group_ids=full["group_ids"][seqs], group_process_group=everyone,
                 inplace_backward=rank == 0)
    assert type(exc) is this_rank_or_another, (rank, exc)
    assert "inplace_backward" in str(exc) or "another rank" in str(exc), str(exc)

    # a label outside every vocabulary slice (>= the total vocabulary): ValueError naming labels, on every rank
    labels = full["labels"].clone()
    labels[0, 0] = 37
    lo, hi = [(0, 20), (20, 37)][rank]
    exc = raised(ValueError, "a label outside every vocabulary slice was accepted", gk.gvpo_loss,
                 full["logits"][..., lo:hi].contiguous(), labels, full["rewards"], backend=backend,
                 group_ids=full["group_ids"], vocab_process_group=everyone)
    assert "labels" in str(exc) and "[0, 37)" in str(exc), str(exc)

    # vocabulary ranks holding different tokens (rank 1's labels shifted): ValueError on every rank
    exc = raised(ValueError, "vocabulary ranks with different labels were accepted", gk.gvpo_loss,
                 full["logits"][..., lo:hi].contiguous(), full["labels"].roll(rank, dims=1), full["rewards"],
                 backend=backend, group_ids=full["group_ids"], vocab_process_group=everyone)
    assert "different labels" in str(exc), str(exc)

    # data-parallel ranks with different settings (beta): ValueError on every rank
    exc = raised(ValueError, "data-parallel ranks with different beta were accepted", gk.gvpo_loss,
                 full["logits"][seqs], full["labels"][seqs], full["rewards"][seqs], backend=backend,
                 group_ids=full["group_ids"][seqs], beta=0.1 + rank, group_process_group=everyone)
    assert "different settings" in str(exc), str(exc)

    # vocabulary ranks where only rank 0 asks for the statistics (logging on rank 0), which changes what crosses
    # the network: ValueError on every rank, not a crash inside the collective
    exc = raised(ValueError, "vocabulary ranks disagreeing on return_stats were accepted", gk.gvpo_loss,
                 full["logits"][..., lo:hi].contiguous(), full["labels"], full["rewards"], backend=backend,
                 group_ids=full["group_ids"], vocab_process_group=everyone, return_stats=rank == 0)
    assert "return_stats" in str(exc), str(exc)

    # and after all of that, the ranks still agree on a good call (no collective was left half done)
    got = gk.gvpo_loss(full["logits"][seqs], full["labels"][seqs], full["rewards"][seqs], backend=backend,
                       group_ids=full["group_ids"][seqs], group_process_group=everyone)
    want = gk.reference.gvpo_loss(full["logits"].double(), full["labels"], full["rewards"].double(),
                                  group_ids=full["group_ids"])
    assert abs(got.item() - want.item()) <= TOLERANCE * abs(want.item()) + 1e-7, (got.item(), want.item())
    finish()
