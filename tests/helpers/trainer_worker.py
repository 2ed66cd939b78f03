"""What each spawned process of tests/test_trainer_distributed.py runs: the trainer on several gloo ranks.

run_update: every rank samples the same batch from one seed (so the ranks hold the same samples one process would),
computes the one-process update on the whole batch, then takes its share of the groups and runs the update
through DDP and through FSDP2 (and through DDP with an entropy bonus); loss, logged statistics and every gradient
must match the one-process ones.

run_train: gvpo-train's loop on the ranks: a run, the same run resumed from its middle checkpoint (identical
metrics), and that checkpoint resumed with FSDP; then a run with replay, demonstrations and a lagged sampler,
resumed from its middle checkpoint too, recording what each rank held.
"""

import datetime
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gvpo_kernels.trainer import TrainConfig, loop, parallel, tiny, train, update
from gvpo_kernels.trainer.models import eos_ids
from gvpo_kernels.trainer.rollout import sample

TIMING = ("tokens_per_s", "step_time", "peak_mem_mb")


def init(rank: int, world: int, init_file: str) -> parallel.World:
    torch.set_num_threads(1)
    # a rank left waiting fails the test in a minute, not gloo's 30
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    return parallel.World(rank, world)


def finish() -> None:
    """Wait for the other ranks, tear the group down, and leave without the interpreter's teardown (see
    tests/distributed_worker.py: torch 2.13 with gloo sometimes aborts in a C++ destructor there)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def whole_batch():
    """4 groups of 4 completions of prompts of different lengths, random rewards, a foreign anchor."""
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, seed=1)
    torch.manual_seed(0)
    prompts = [tokenizer(p)["input_ids"] for p in ("1+2=", "12+3=", "4?", "3+3=")]
    batch = sample(model, prompts, k=4, max_new_tokens=5, temperature=1.0, top_p=1.0,
                   stop_ids=eos_ids(model, tokenizer), pad_id=tokenizer.pad_token_id)
    batch.rewards = torch.rand(16)
    batch.anchor = update.token_logprobs(tiny.build_model(tokenizer, seed=2), batch, 1.0)
    return batch


def run_once(policy, batch, world, **kwargs):
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stats = update.update(policy, optimizer, scheduler, batch, beta=0.1, temperature=1.0, backend="torch",
                          update_epochs=1, max_grad_norm=0.0, autocast=torch.autocast("cpu", enabled=False),
                          world=world, **kwargs)
    return stats, [parallel.full(p.grad).clone() for p in policy.parameters()]


def run_update(rank: int, world_size: int, init_file: str) -> None:
    world = init(rank, world_size, init_file)
    batch = whole_batch()
    want, want_grads = run_once(update.Policy(tiny.build_model(tiny.build_tokenizer(), seed=1)), batch,
                                parallel.World(), micro_batch_groups=None, grad_accum=1)
    share = batch.num_groups // world_size
    mine = batch.groups(rank * share, (rank + 1) * share)
    for fsdp in (False, True):
        policy = parallel.wrap(update.Policy(tiny.build_model(tiny.build_tokenizer(), seed=1)), world,
                               torch.device("cpu"), fsdp)
        # one group per micro-batch, every micro-batch of the share in one optimizer step: the first ones
        # accumulate without syncing, the last one averages over ranks
        got, got_grads = run_once(policy, mine, world, micro_batch_groups=1, grad_accum=share)
        for key in ("loss", "implicit_reward", "kl", "grad_seq_abs", "grad_norm"):
            assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key]) + 1e-12, (fsdp, key, got[key], want[key])
        assert want["loss"] > 1e-3 and want["grad_norm"] > 0
        for (name, _), g, w in zip(update.Policy(tiny.build_model(tiny.build_tokenizer(), 1)).named_parameters(),
                                   got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8, msg=lambda m: f"fsdp={fsdp} {name}: {m}")
    # with an entropy bonus (DDP): the ranks' shares, in micro-batches of groups with different token counts, give
    # the one-process step, whose bonus is the mean over all its scored tokens
    want, want_grads = run_once(update.Policy(tiny.build_model(tiny.build_tokenizer(), seed=1)), batch,
                                parallel.World(), micro_batch_groups=None, grad_accum=1, entropy_coef=0.3)
    policy = parallel.wrap(update.Policy(tiny.build_model(tiny.build_tokenizer(), seed=1)), world,
                           torch.device("cpu"), fsdp=False)
    got, got_grads = run_once(policy, mine, world, micro_batch_groups=1, grad_accum=share, entropy_coef=0.3)
    for key in ("loss", "gvpo_loss", "entropy_bonus", "grad_norm"):
        assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key]) + 1e-12, ("bonus", key, got[key], want[key])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)
    finish()


def config(out: Path, **overrides) -> TrainConfig:
    settings = dict(output_dir=str(out), steps=4, save_every=2, prompts_per_step=4, k=4, lr=1e-2, warmup_steps=1,
                    num_samples=1, progress=False, plot=False, device="cpu")
    return TrainConfig(**{**settings, **overrides})


def strip(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def run_train(rank: int, world_size: int, init_file: str, out: str) -> None:
    world = init(rank, world_size, init_file)
    out = Path(out)
    full = train(config(out / "run"))
    if world.main:
        shutil.rmtree(out / "run" / "checkpoint-4")  # as if the run had died after step 2's checkpoint
    dist.barrier()
    resumed = train(config(out / "run", resume="latest"))
    sharded = train(config(out / "fsdp", resume=str(out / "run" / "checkpoint-2"), fsdp=True))
    if world.main:
        assert [m["step"] for m in full] == [1, 2, 3, 4], full
        assert strip(resumed) == strip(full)
        assert [m["step"] for m in sharded] == [3, 4]
        assert [m["lr"] for m in sharded] == [m["lr"] for m in full[2:]]
        (out / "metrics.json").write_text(json.dumps({"full": full, "sharded": sharded}))
    else:
        assert full == resumed == sharded == []

    # off-policy: 2 of the 4 groups of a step replayed (1 per rank, from its own buffer of 2), a demonstration per
    # group, sampling 2 updates behind; each rank records the prompts it sampled at each step
    options = dict(replay_groups=2, replay_size=4, demos=True, rollout_lag=2)
    sampled = []
    real_mix = loop.Trainer.mix

    def recording_mix(self, batch, rows, step):
        sampled.append([row["prompt"] for row in rows])
        return real_mix(self, batch, rows, step)

    loop.Trainer.mix = recording_mix
    offpolicy = train(config(out / "offpolicy", **options))
    if world.main:
        shutil.rmtree(out / "offpolicy" / "checkpoint-4")
    dist.barrier()
    again = train(config(out / "offpolicy", resume="latest", **options))
    loop.Trainer.mix = real_mix
    prompts = parallel.gather_objects(sampled[:4], world)  # the first (uninterrupted) run's steps
    if world.main:
        assert strip(again) == strip(offpolicy)
        (out / "offpolicy.json").write_text(json.dumps({"metrics": offpolicy, "prompts": prompts}))
    finish()
