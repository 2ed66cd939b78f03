"""Off-policy GVPO in the trainer: the replay buffer (--replay-groups), demonstrations (--demos) and the lagged
sampler (--rollout-lag). What each step trains on is recorded by wrapping the update; each run is a few steps of
the tiny model on the CPU. The two-process behaviour is in test_trainer_distributed.py."""

import shutil

import pytest
import torch

pytest.importorskip("transformers")

from test_trainer import TIMING, cli_error  # noqa: E402

from gvpo_kernels.trainer import TrainConfig, checks, loop, parallel, tiny, train, update  # noqa: E402
from gvpo_kernels.trainer.models import load_policy  # noqa: E402
from gvpo_kernels.trainer.offpolicy import LaggedSampler, ReplayBuffer  # noqa: E402
from gvpo_kernels.trainer.rollout import DEMO, REPLAYED, SAMPLED, Group, collate, split_groups  # noqa: E402


def config(out, **overrides) -> TrainConfig:
    settings = dict(output_dir=str(out), steps=4, prompts_per_step=2, k=4, lr=1e-2, warmup_steps=1, num_samples=0,
                    progress=False, plot=False, device="cpu")
    return TrainConfig(**{**settings, **overrides})


def strip(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


@pytest.fixture
def recorder(monkeypatch):
    """Every step's trained batch, the policy's weights before its update, and the sampler's weights."""
    steps = []
    real_update, real_sampler = loop.update, loop.Trainer.sampler

    def sampler(self):
        module = real_sampler(self)
        steps.append({"sampler": {n.removeprefix("model."): p.detach().clone() for n, p in module.named_parameters()}})
        return module

    def recording_update(policy, optimizer, scheduler, batch, **kwargs):
        steps[-1]["batch"] = batch
        steps[-1]["before"] = {n.removeprefix("model."): p.detach().clone() for n, p in policy.named_parameters()}
        return real_update(policy, optimizer, scheduler, batch, **kwargs)

    monkeypatch.setattr(loop, "update", recording_update)
    monkeypatch.setattr(loop.Trainer, "sampler", sampler)
    return steps


def model_with(weights):
    model = tiny.build_model(tiny.build_tokenizer(), seed=0)
    model.load_state_dict(weights)
    return model


def assert_anchored_by_the_policy(record):
    """The anchor of every member (sampled, replayed, demonstration) is the policy's log-prob before the update."""
    batch = record["batch"]
    want = update.token_logprobs(model_with(record["before"]), batch, 1.0)
    torch.testing.assert_close(batch.anchor, want, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- replay


def test_replay_trains_on_earlier_groups_with_their_rewards_and_a_fresh_anchor(tmp_path, recorder):
    metrics = train(config(tmp_path, steps=5, replay_groups=2, replay_size=4))
    sampled_before = []  # every step's sampled groups, as token lists
    for t, (record, m) in enumerate(zip(recorder, metrics)):
        groups = split_groups(record["batch"], t)
        fresh = [g for g in groups if g.source[0] == SAMPLED]
        replayed = [g for g in groups if g.source[0] == REPLAYED]
        assert len(fresh) == 2 and all(set(g.source) == {SAMPLED} for g in fresh)
        assert all(set(g.source) == {REPLAYED} and len(g.completions) == 4 for g in replayed)
        # up to 2 groups, from the last 2 steps (capacity 4 groups), never from this step
        assert len(replayed) == min(2, len(sampled_before))
        window = [(g.prompt, g.completions, g.rewards) for g in sampled_before[-4:]]
        for g in replayed:
            assert (g.prompt, g.completions, g.rewards) in window, "replayed a group it never sampled, or changed it"
        assert len({(tuple(g.prompt), str(g.completions)) for g in replayed}) == len(replayed), "drawn twice"
        assert_anchored_by_the_policy(record)
        assert (m["groups_sampled"], m["groups_replayed"], m["members_sampled"], m["members_replayed"]) == (
            2, len(replayed), 8, 4 * len(replayed))
        assert m["members_demo"] == 0 and m["sampler_lag"] == 0
        if replayed:
            assert m["reward_replayed"] == pytest.approx(sum(sum(g.rewards) for g in replayed) / (4 * len(replayed)))
            assert 1 <= m["replay_age"] <= 2
        else:
            assert m["reward_replayed"] is None and m["replay_age"] is None
        # reward_mean is the sampled members' only
        assert m["reward_mean"] == pytest.approx(sum(sum(g.rewards) for g in fresh) / 8)
        sampled_before += fresh


def test_replay_buffer_is_first_in_first_out_and_draws_from_seed_rank_and_step():
    def group(step, i):
        return Group([1, step], [[i, 2]], [float(i)], [SAMPLED], step)

    buffer = ReplayBuffer(capacity=3, draw=2, seed=0, rank=0)
    assert buffer.draw(0) == []
    buffer.push([group(0, 0), group(0, 1)])
    buffer.push([group(1, 2), group(1, 3)])
    assert [g.step for g in buffer.groups] == [0, 1, 1] and [g.rewards for g in buffer.groups] == [[1.0], [2.0], [3.0]]
    drawn = buffer.draw(2)
    assert len(drawn) == 2 and all(g.source == [REPLAYED] for g in drawn)
    assert [g.rewards for g in drawn] == [g.rewards for g in ReplayBuffer.draw(buffer, 2)], "same step, same draw"
    assert buffer.groups[0].source == [SAMPLED], "drawing marked the buffer's own groups"
    other = ReplayBuffer(capacity=3, draw=2, seed=0, rank=1)
    other.groups.extend(buffer.groups)
    assert any([g.rewards for g in buffer.draw(s)] != [g.rewards for g in other.draw(s)] for s in range(5))
    # a checkpoint of 2 ranks, resumed on 1 and on 2
    per_rank = [[group(0, 0).to_dict(), group(1, 2).to_dict()], [group(0, 1).to_dict(), group(1, 3).to_dict()]]
    one = ReplayBuffer(capacity=8, draw=2, seed=0, rank=0)
    one.load(per_rank, rank=0, world_size=1)
    assert [g.rewards[0] for g in one.groups] == [0.0, 1.0, 2.0, 3.0]  # oldest first
    two = ReplayBuffer(capacity=8, draw=2, seed=0, rank=1)
    two.load(per_rank, rank=1, world_size=2)
    assert [g.rewards[0] for g in two.groups] == [1.0, 3.0]  # its own
    three = [ReplayBuffer(capacity=8, draw=1, seed=0, rank=r) for r in range(3)]
    for r, b in enumerate(three):
        b.load(per_rank, rank=r, world_size=3)
    assert [[g.rewards[0] for g in b.groups] for b in three] == [[1.0], [2.0], [3.0]]  # the oldest dropped


# -------------------------------------------------------------------------------------------- demonstrations


def test_each_group_gets_its_demonstration_once_with_its_reward_anchored_like_the_others(tmp_path, recorder):
    tokenizer = tiny.build_tokenizer()
    metrics = train(config(tmp_path, steps=2, demos=True))
    for t, (record, m) in enumerate(zip(recorder, metrics)):
        batch = record["batch"]
        assert batch.sizes == (5, 5) and batch.group_size == 5
        for g in split_groups(batch, t):
            assert g.source == [SAMPLED] * 4 + [DEMO]
            prompt = tokenizer.decode(g.prompt, skip_special_tokens=True)
            a, b = int(prompt[0]), int(prompt[2])
            assert g.completions[-1] == tokenizer(str(a + b), add_special_tokens=False)["input_ids"] + [2]  # + EOS
            assert g.rewards[-1] == 1.0
        assert_anchored_by_the_policy(record)
        assert (m["members_demo"], m["reward_demo"], m["members_sampled"], m["groups_replayed"]) == (2, 1.0, 8, 0)


def test_rows_without_a_demonstration_keep_groups_of_k(tmp_path, recorder):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2", "demonstration": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    train(config(tmp_path / "out", steps=1, demos=True, data=str(data)))
    batch = recorder[0]["batch"]
    assert sorted(batch.sizes) == [4, 5] and batch.group_size is None  # the loss then takes group ids
    assert (batch.source == DEMO).sum() == 1
    # one prompt a step: one step has its demonstration, the other none at all
    metrics = train(config(tmp_path / "one", steps=2, prompts_per_step=1, demos=True, data=str(data)))
    assert sorted(r["batch"].sizes for r in recorder[1:]) == [(4,), (5,)]
    assert sorted(m["members_demo"] for m in metrics) == [0, 1]


def test_groups_of_different_sizes_give_the_loss_of_each_group_alone():
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, seed=1)
    groups = [Group(tokenizer("1+2=")["input_ids"], [[5, 2], [6, 7, 2], [8]], [1.0, 0.0, 0.5], [0, 0, 2], 0),
              Group(tokenizer("12+3=")["input_ids"], [[9, 2], [10]], [0.0, 1.0], [1, 1], 0)]
    batch = collate(groups, tokenizer.pad_token_id, "cpu")
    batch.anchor = update.token_logprobs(tiny.build_model(tokenizer, seed=2), batch, 1.0)
    loss, _ = update.gvpo_loss(model, batch, beta=0.1, temperature=1.0, backend="torch")
    parts = []
    for g in range(2):
        one = batch.groups(g, g + 1)
        parts.append(update.gvpo_loss(model, one, beta=0.1, temperature=1.0, backend="torch")[0])
    torch.testing.assert_close(loss, (parts[0] + parts[1]) / 2, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------------------- lagged sampler


def test_the_lagged_sampler_has_the_policys_weights_of_lag_updates_earlier(tmp_path, recorder):
    metrics = train(config(tmp_path, steps=6, rollout_lag=2))
    for t, (record, m) in enumerate(zip(recorder, metrics)):
        # one optimizer update per step: the policy before step j's update is the policy after j updates
        want = recorder[max(t - 2, 0)]["before"]
        for name, value in record["sampler"].items():
            assert torch.equal(value, want[name]), (t, name)
        assert m["sampler_lag"] == min(t, 2)
    assert any(not torch.equal(recorder[5]["sampler"][n], recorder[5]["before"][n]) for n in recorder[5]["before"])


def test_lagged_sampler_counts_optimizer_updates():
    model = torch.nn.Linear(2, 2)
    lagged = LaggedSampler(model, lag=3)
    assert lagged.model() is model and lagged.lag == 0
    history = [model.weight.detach().clone()]
    for _ in range(5):
        lagged.push()
        with torch.no_grad():
            model.weight.add_(1.0)
        history.append(model.weight.detach().clone())
        t = len(history) - 1
        assert torch.equal(lagged.model().weight, history[max(t - 3, 0)]) and lagged.lag == min(t, 3)
    assert lagged.model() is lagged.copy and not lagged.copy.weight.requires_grad


# -------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("options", [
    dict(replay_groups=2, replay_size=4, micro_batch_groups=1),
    dict(demos=True),
    dict(rollout_lag=3),
    dict(replay_groups=2, demos=True, rollout_lag=2, anchor="ref"),
], ids=["replay", "demos", "lag", "all-ref"])
def test_resume_with_off_policy_options_continues_exactly(tmp_path, options):
    full = train(config(tmp_path, save_every=2, **options))
    final = load_policy(str(tmp_path / "checkpoint-4"), torch.device("cpu"), seed=0, attn_implementation=None)[0]
    final = {k: v.clone() for k, v in final.state_dict().items()}
    shutil.rmtree(tmp_path / "checkpoint-4")
    resumed = train(config(tmp_path, save_every=2, resume="latest", **options))
    assert strip(resumed) == strip(full)
    again = load_policy(str(tmp_path / "checkpoint-4"), torch.device("cpu"), seed=0, attn_implementation=None)[0]
    for name, value in again.state_dict().items():
        assert torch.equal(value, final[name]), name
    if "micro_batch_groups" in options:  # 2 to 4 groups a step, one per optimizer step: the schedule still ends
        assert full[-1]["lr"] == pytest.approx(1e-2 * 0.1)  # on min_lr_ratio * lr, as planned for 4 groups


# -------------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize("argv, message", [
    (["--replay-groups", "-1"], "--replay-groups must be >= 0 (0 = off), got -1"),
    (["--replay-groups", "2", "--replay-size", "0"], "--replay-size must be >= 1, got 0"),
    (["--replay-size", "8"], "--replay-size 8 without --replay-groups: nothing is drawn from the buffer"),
    (["--replay-groups", "9", "--replay-size", "8"], "--replay-groups 9 is more than the buffer holds"),
    (["--replay-groups", "65"], "--replay-groups 65 is more than the buffer holds (--replay-size 64, the default)"),
    (["--rollout-lag", "-2"], "--rollout-lag must be >= 0 (0 = off), got -2"),
    (["--rollout-lag", "1.5"], "argument --rollout-lag: invalid int value: '1.5'"),
])
def test_bad_off_policy_values_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    assert message in cli_error(capsys, monkeypatch, "--output-dir", str(tmp_path / "out"), *argv)


def test_demos_need_demonstrations_in_the_data(tmp_path, capsys, monkeypatch):
    out = ["--output-dir", str(tmp_path / "out"), "--demos"]
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert f"demos: no row of {data} has a 'demonstration'" in cli_error(
        capsys, monkeypatch, *out, "--data", str(data))
    data.write_text('{"prompt": "1+1=", "answer": "2", "demonstration": "2"}\n'
                    '{"prompt": "2+2=", "answer": "4", "demonstration": 4}\n')
    assert "row 2's 'demonstration' must be a non-empty string, got 4" in cli_error(
        capsys, monkeypatch, *out, "--data", str(data))


def test_off_policy_options_must_split_over_the_processes(tmp_path):
    two = parallel.World(0, 2)
    with pytest.raises(checks.ConfigError, match=r"--replay-groups 3 and --replay-size 64 must be multiples of the 2"):
        checks.prepare(TrainConfig(output_dir=str(tmp_path), replay_groups=3), two, torch.device("cpu"))
    with pytest.raises(checks.ConfigError, match=r"--replay-size 7 must be multiples of the 2"):
        checks.prepare(TrainConfig(output_dir=str(tmp_path), replay_groups=2, replay_size=7), two,
                       torch.device("cpu"))
    with pytest.raises(checks.ConfigError, match=r"rollout_lag: not with --fsdp"):
        checks.prepare(TrainConfig(output_dir=str(tmp_path), rollout_lag=2, fsdp=True), two, torch.device("cpu"))
