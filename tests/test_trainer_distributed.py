"""The trainer on several processes (gloo on the CPU, spawned; see tests/trainer_worker.py): the update on every
rank's share gives the one-process loss and gradients with DDP and with FSDP2, runs write one metrics.jsonl,
resume exactly, resume on another world size and with FSDP, and a two-process run learns."""

import json

import pytest
import torch.multiprocessing as mp

pytest.importorskip("transformers")

import trainer_worker  # noqa: E402
from gvpo_kernels.trainer import checkpoint, train  # noqa: E402
from gvpo_kernels.trainer.report import read_metrics  # noqa: E402


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"world{w}")
def test_update_on_ranks_matches_one_process(world, tmp_path):
    mp.spawn(trainer_worker.run_update, args=(world, str(tmp_path / "init")), nprocs=world)


def test_two_processes_write_one_log_resume_exactly_and_resume_anywhere(tmp_path):
    mp.spawn(trainer_worker.run_train, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    full = json.loads((tmp_path / "metrics.json").read_text())["full"]
    # each step once, written by rank 0 alone (the last two by the resumed run)
    assert trainer_worker.strip(read_metrics(tmp_path / "run" / "metrics.jsonl")) == trainer_worker.strip(full)
    run = json.loads((tmp_path / "run" / "checkpoint-2" / checkpoint.RUN_FILE).read_text())
    assert run["world_size"] == 2 and run["step"] == 2
    # the two-process checkpoint continues in one process, on the same schedule
    one = train(trainer_worker.config(tmp_path / "one", resume=str(tmp_path / "run" / "checkpoint-2")))
    assert [m["step"] for m in one] == [3, 4] and [m["lr"] for m in one] == [m["lr"] for m in full[2:]]
