"""The trainer on several processes (gloo on the CPU, spawned; see tests/trainer_worker.py): the update on every
rank's share gives the one-process loss and gradients with DDP and with FSDP2, runs write one metrics.jsonl,
resume exactly, resume on another world size and with FSDP; with the off-policy options each rank keeps and draws
its own groups, and a run resumes exactly."""

import json

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")

from helpers import trainer_worker  # noqa: E402
from gvpo_kernels.trainer import checkpoint, data, tiny, train  # noqa: E402
from gvpo_kernels.trainer.report import read_metrics  # noqa: E402


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"world{w}")
def test_update_on_ranks_matches_one_process(world, tmp_path):
    mp.spawn(trainer_worker.run_update, args=(world, str(tmp_path / "init")), nprocs=world)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """The runs of trainer_worker.run_train on 2 gloo ranks (one spawn for both tests below)."""
    out = tmp_path_factory.mktemp("two")
    mp.spawn(trainer_worker.run_train, args=(2, str(out / "init"), str(out)), nprocs=2)
    return out


def test_two_processes_write_one_log_resume_exactly_and_resume_anywhere(two_process_runs):
    tmp_path = two_process_runs
    full = json.loads((tmp_path / "metrics.json").read_text())["full"]
    # each step once, written by rank 0 alone (the last two by the resumed run)
    assert trainer_worker.strip(read_metrics(tmp_path / "run" / "metrics.jsonl")) == trainer_worker.strip(full)
    run = json.loads((tmp_path / "run" / "checkpoint-2" / checkpoint.RUN_FILE).read_text())
    assert run["world_size"] == 2 and run["step"] == 2
    # the two-process checkpoint continues in one process, on the same schedule
    one = train(trainer_worker.config(tmp_path / "one", resume=str(tmp_path / "run" / "checkpoint-2")))
    assert [m["step"] for m in one] == [3, 4] and [m["lr"] for m in one] == [m["lr"] for m in full[2:]]


def test_with_off_policy_options_each_rank_keeps_and_draws_its_own_groups(two_process_runs):
    out = two_process_runs
    result = json.loads((out / "offpolicy.json").read_text())
    metrics, prompts = result["metrics"], result["prompts"]
    # every step over both ranks: 4 sampled groups with a demonstration each, 2 replayed (1 per rank) after step 1
    assert [(m["groups_sampled"], m["groups_replayed"], m["members_demo"], m["sampler_lag"]) for m in metrics] == [
        (4, 0, 4, 0), (4, 2, 4, 1), (4, 2, 4, 2), (4, 2, 4, 2)]
    # each rank sampled its half of each step's prompts (rank 0 the first half)
    rows = tiny.task_rows()
    for step in range(4):
        picked = [r["prompt"] for r in data.step_rows(rows, step, 4, seed=0)]
        assert prompts[0][step] == picked[:2] and prompts[1][step] == picked[2:]
    # the checkpoint after step 2 holds each rank's buffer (2 groups each: its own two of step 2, the newest) and
    # one copy of the lagged sampler's 2 snapshots
    tokenizer = tiny.build_tokenizer()
    state = torch.load(out / "offpolicy" / "checkpoint-2" / checkpoint.STATE_FILE, weights_only=True)
    for rank, rank_state in enumerate(state["ranks"]):
        buffer = rank_state["replay"]
        assert [g["step"] for g in buffer] == [1, 1]  # 0-based: step 2's
        held = sorted(tokenizer.decode(g["prompt"], skip_special_tokens=True) for g in buffer)
        assert held == sorted(prompts[rank][1]), (rank, held)
        assert all(len(g["completions"]) == 4 for g in buffer), "a demonstration went into the buffer"
    assert len(state["state"]["lag"]["snapshots"]) == 2 and state["state"]["lag"]["updates"] == 2
    # the 2-process checkpoint resumes on one process: the buffers are pooled (newest kept)
    one = train(trainer_worker.config(out / "offpolicy-one", replay_groups=2, replay_size=4, demos=True,
                                      rollout_lag=2, resume=str(out / "offpolicy" / "checkpoint-2")))
    assert [(m["step"], m["groups_sampled"], m["groups_replayed"]) for m in one] == [(3, 4, 2), (4, 4, 2)]
