"""Groups across ranks and a vocabulary split across ranks, in real processes (gloo on the CPU), against the
single-process float64 reference: see tests/distributed_worker.py for the splits each process checks."""

import pytest
import torch
import torch.multiprocessing as mp

from helpers import distributed_worker
from gvpo_kernels import cpu

BACKENDS = ["torch", "triton"] + (["cpu"] if cpu.unavailable_reason() is None else [])


@pytest.mark.parametrize("world", [2, 3, 4], ids=lambda w: f"world{w}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_splits_match_one_process(world, backend, tmp_path):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("these ranks hold CPU tensors, which Triton runs only in its interpreter, and that is off where "
                    "CUDA is present; tests/test_gpu.py runs the Triton backend across ranks with NCCL")
    if backend == "triton" and world != 2:
        pytest.skip("the Triton interpreter is slow: world 2 covers its part (the token stage) fully")
    mp.spawn(distributed_worker.run_splits, args=(world, str(tmp_path / "init"), backend), nprocs=world)


def test_bad_setup_raises_on_every_rank(tmp_path):
    mp.spawn(distributed_worker.run_bad_inputs, args=(2, str(tmp_path / "init"), "torch"), nprocs=2)
