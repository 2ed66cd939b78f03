"""What each spawned process of tests/test_logprob_loss.py runs: gvpo_loss_from_logprobs across gloo ranks.

Every rank builds the same full problem from one seed, takes its share of the sequences (groups split over the
ranks, uneven shares), calls the loss with global group ids and ``group_process_group``, and compares its loss,
its log-probs' gradient and its sequences' stats with the float64 reference on the whole problem.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist

import gvpo_kernels as gk
from gvpo_kernels import distributed

TOLERANCE = 1e-5  # float32 against the float64 oracle, relative


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    scale = want.norm().item()
    return (got - want).norm().item() / scale if scale > 0 else (got - want).norm().item()


def problem(seed: int, num_seqs: int = 9, seq_len: int = 6):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(num_seqs, seq_len, generator=gen, dtype=torch.float64)
    return dict(
        logprobs=logprobs,
        mask=torch.rand(num_seqs, seq_len, generator=gen) < 0.8,
        ref_logprobs=logprobs + 0.3 * torch.randn(num_seqs, seq_len, generator=gen, dtype=torch.float64),
        rewards=torch.randn(num_seqs, generator=gen, dtype=torch.float64),
        # sizes 2, 4, 2, 1, in shuffled order; sparse int64 ids, as global ids may be
        group_ids=torch.tensor([-5, 10**12, 7, 0])[torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 3])[
            torch.randperm(num_seqs, generator=gen)]],
    )


def check(full: dict, seqs: torch.Tensor, group_pg, reduction: str, anchor: bool, packed: bool) -> None:
    """This rank's loss, gradient and stats against the single-process float64 oracle on the full problem."""
    anchor_full = full["ref_logprobs"] if anchor else None
    oracle = full["logprobs"].clone().requires_grad_()
    want, want_stats = gk.reference.gvpo_loss_from_logprobs(
        oracle, full["rewards"], mask=full["mask"], group_ids=full["group_ids"], ref_logprobs=anchor_full,
        reduction=reduction, return_stats=True)
    want.backward()

    logprobs = full["logprobs"][seqs].float().requires_grad_()
    kwargs = dict(mask=full["mask"][seqs], group_ids=full["group_ids"][seqs], reduction=reduction,
                  ref_logprobs=None if anchor_full is None else anchor_full[seqs].float(),
                  group_process_group=group_pg, return_stats=True)
    if packed:  # each local sequence packed to its scored tokens only (so lengths differ), mask dropped
        keep = kwargs.pop("mask")
        lengths = keep.sum(1)
        kwargs["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        if kwargs["ref_logprobs"] is not None:
            kwargs["ref_logprobs"] = kwargs["ref_logprobs"][keep]
        got, stats = gk.gvpo_loss_from_logprobs(logprobs[keep], full["rewards"][seqs].float(), **kwargs)
    else:
        got, stats = gk.gvpo_loss_from_logprobs(logprobs, full["rewards"][seqs].float(), **kwargs)
    got.backward()
    where = (reduction, anchor, packed)
    assert rel_err(got, want) <= TOLERANCE, (where, got.item(), want.item())
    assert rel_err(logprobs.grad, oracle.grad[seqs]) <= TOLERANCE, where
    for name in ("seq_logprob", "implicit_reward", "grad_seq_logprob"):
        assert rel_err(getattr(stats, name), getattr(want_stats, name)[seqs]) <= TOLERANCE, (where, name)
    assert stats.entropy.shape == (0,)


def run(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    everyone = dist.group.WORLD
    full = problem(seed=11)
    order = torch.argsort(full["group_ids"], stable=True)  # by group: 0 0 | 1 1 1 1 | 2 2 | 3 (sorted ids)
    shares = {
        "split": [order[[0, 2, 3, 6]], order[[1, 4, 5, 7, 8]]],  # every group of 2+ members on both ranks
        "uneven": [order[[3]], order[[0, 1, 2, 4, 5, 6, 7, 8]]],
        "one-empty": [order[[]], order],  # a rank without sequences still takes part
    }
    for name, share in shares.items():
        for reduction, anchor, packed in (("mean", True, False), ("sum", True, True), ("mean", False, True),
                                          ("sum", False, False)):
            check(full, share[rank], everyone, reduction, anchor, packed)

    # a bad input on one rank (group_size instead of global group ids; a bad beta) raises there and InputError on
    # the other, which is not left waiting in a collective
    seqs = shares["split"][rank]
    lp, rewards, ids = full["logprobs"][seqs].float(), full["rewards"][seqs].float(), full["group_ids"][seqs]
    for bad, needle in ((dict(group_size=1), "group_ids"), (dict(group_ids=ids, beta=-1.0), "beta"),
                        (dict(group_ids=ids, mask=torch.ones(3)), "mask")):
        kwargs = bad if rank == 0 else dict(group_ids=ids)
        try:
            gk.gvpo_loss_from_logprobs(lp, rewards, group_process_group=everyone, **kwargs)
        except (ValueError, TypeError, distributed.InputError) as exc:
            if rank == 0:
                assert needle in str(exc), str(exc)
            else:
                assert type(exc) is distributed.InputError, exc
        else:
            raise AssertionError(f"a bad input ({needle}) on rank 0 was accepted")
    # ranks with different beta all raise
    try:
        gk.gvpo_loss_from_logprobs(lp, rewards, group_ids=ids, beta=0.1 + rank, group_process_group=everyone)
    except ValueError as exc:
        assert "different settings" in str(exc), str(exc)
    else:
        raise AssertionError("ranks with different beta were accepted")
    check(full, seqs, everyone, "mean", True, False)  # and the ranks still agree afterwards

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as tests/distributed_worker.py: skip the interpreter's teardown, where gloo sometimes aborts
