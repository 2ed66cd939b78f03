"""train(config): the GVPO loop. Each step samples k completions for each of its prompts, scores them, records the
anchor log-probs and updates the policy; metrics, samples, checkpoints and the plot go to ``output_dir``. With the
off-policy options (offpolicy.py) the sampler may be a stale copy of the policy, and the groups trained on may
also hold a demonstration or come from a replay buffer.

On several processes (torchrun) each rank does this for its share of the step's prompts, the gradients are
averaged over ranks (parallel.py says why that is the mean over all groups), and rank 0 writes every file."""

from __future__ import annotations

import json
import math
import random
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import checkpoint, checks, parallel, report
from .config import TrainConfig
from .data import encode_prompts, step_rows
from .models import autocast, eos_ids, load_policy
from .offpolicy import LaggedSampler, ReplayBuffer, add_demonstrations, demonstration_tokens
from .rewards import score
from .rollout import DEMO, REPLAYED, Rollout, collate, decode_completions, split_groups
from .update import Policy, optimizer_steps_per_rollout, update


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` optimizer steps, then cosine from 1 down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """The state of one run on one rank: policy (wrapped for DDP / FSDP), optional frozen reference, data,
    reward, optimizer, schedule, and the off-policy parts: replay buffer, lagged sampler."""

    def __init__(self, cfg: TrainConfig, world: parallel.World, device: torch.device, plan: checks.Plan):
        self.cfg, self.world, self.device = cfg, world, device
        self.out = Path(cfg.output_dir)
        self.rows, self.reward_fn = plan.rows, plan.reward_fn
        torch.manual_seed(parallel.rank_seed(cfg.seed, world.rank))
        random.seed(parallel.rank_seed(cfg.seed, world.rank))
        load = partial(load_policy, device=device, seed=cfg.seed, attn_implementation=cfg.attn_implementation)
        if plan.resume_from:
            try:
                model, self.tokenizer = load(str(plan.resume_from))
            except checks.ConfigError:  # a checkpoint whose logits are not what its config says
                raise
            except Exception as err:  # damaged weights (the sizes in run.json matched): one line, not a traceback
                text = str(err).splitlines()[0] if str(err) else ""
                raise checkpoint.CheckpointError(f"resume: cannot load the model in {str(plan.resume_from)!r} "
                                                 f"({type(err).__name__}: {text})") from None
        else:
            model, self.tokenizer = load(cfg.model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.stop_ids = eos_ids(model, self.tokenizer)
        self.policy_module = Policy(model)  # what the checkpoint saves and the optimizer steps
        self.policy = parallel.wrap(self.policy_module, world, device, cfg.fsdp)  # what the update calls
        self.ref = None
        if cfg.anchor == "ref":
            self.ref = Policy(load(cfg.model)[0].eval().requires_grad_(False))
            if cfg.fsdp:
                self.ref = parallel.wrap(self.ref, world, device, fsdp=True)
        self.autocast = partial(autocast, device, cfg.bf16)
        self.optimizer = torch.optim.AdamW(self.policy_module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = cfg.lr  # the schedule's base, as LambdaLR records it (and a checkpoint holds it)
        self.replay = self.lagged = self.lagged_policy = None
        if cfg.replay_groups:
            self.replay = ReplayBuffer(cfg.replay_capacity // world.size, cfg.replay_groups // world.size, cfg.seed,
                                       world.rank)
        if cfg.rollout_lag:
            self.lagged = LaggedSampler(model, cfg.rollout_lag)
            self.lagged_policy = Policy(self.lagged.copy)
        self.start = 0
        if plan.resume_from:
            state = checkpoint.load_state(plan.resume_from)
            self.start = checkpoint.restore(plan.resume_from, self.policy_module, self.optimizer, world, cfg.seed,
                                            state)
            if self.replay is not None and state.get("ranks"):
                self.replay.load([(r or {}).get("replay") or [] for r in state["ranks"]], world.rank, world.size)
            if self.lagged is not None and (state.get("state") or {}).get("lag"):
                self.lagged.load(state["state"]["lag"])
        # the schedule is a function of the share of the run done, so it continues where it was on any world size;
        # a step with fewer groups (a replay buffer still filling) makes up its missing optimizer steps in the
        # schedule, so every rollout step moves it by the same amount
        self.per_rollout = optimizer_steps_per_rollout((cfg.prompts_per_step + cfg.replay_groups) // world.size,
                                                       cfg.micro_batch_groups, cfg.grad_accum, cfg.update_epochs)
        schedule = partial(lr_factor, warmup=cfg.warmup_steps, total=cfg.steps * self.per_rollout,
                           min_ratio=cfg.min_lr_ratio)
        offset = self.start * self.per_rollout
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: schedule(i + offset))

    def my_rows(self, rows: list[dict]) -> list[dict]:
        """This rank's share of a step's rows (whole prompts: each group stays on one rank)."""
        share = len(rows) // self.world.size
        return rows[self.world.rank * share:(self.world.rank + 1) * share]

    def sampler(self):
        """What samples this step: the policy, or with --rollout-lag its copy as it was that many updates ago."""
        if self.lagged is not None and self.lagged.lag:
            self.lagged.model()  # loads the oldest snapshot into the copy
            return self.lagged_policy
        return self.policy

    def rollout(self, rows: list[dict], sampler=None):
        """Sample k completions per row with ``sampler`` (default: the policy) and score them: (the rollout, its
        rewards set; the completion texts)."""
        cfg = self.cfg
        prompt_ids = encode_prompts(self.tokenizer, [r["prompt"] for r in rows], cfg.chat_template)
        with torch.no_grad(), self.autocast():  # no_grad outside the wrapper: DDP then expects no backward
            batch = (sampler or self.policy)("sample", prompt_ids, k=cfg.k, max_new_tokens=cfg.max_new_tokens,
                                             temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=self.stop_ids,
                                             pad_id=self.tokenizer.pad_token_id, synced_gpus=cfg.fsdp)
        completions = decode_completions(self.tokenizer, batch)
        each = [row for row in rows for _ in range(cfg.k)]
        batch.rewards = score(self.reward_fn, cfg.reward, [r["prompt"] for r in each], completions, each)
        batch.rewards = batch.rewards.to(self.device)
        return batch, completions

    def mix(self, sampled: Rollout, rows: list[dict], step: int) -> tuple[Rollout, list]:
        """The batch the update trains on: this step's sampled groups, each with its row's demonstration as one
        more member (--demos), then the groups drawn from the replay buffer (--replay-groups), which this step's
        sampled groups then join. Returns (that batch, the replayed groups)."""
        groups = split_groups(sampled, step)
        have = [row for row in rows if "demonstration" in row] if self.cfg.demos else []
        if have:
            tokens = [demonstration_tokens(self.tokenizer, row["demonstration"], self.stop_ids[0]) for row in have]
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
            rewards = score(self.reward_fn, self.cfg.reward, [r["prompt"] for r in have], texts, have)
            add_demonstrations(groups, rows, tokens, rewards.tolist())
        replayed = []
        if self.replay is not None:
            replayed = self.replay.draw(step)
            self.replay.push(groups)
        return collate(groups + replayed, self.tokenizer.pad_token_id, self.device), replayed

    def step(self, step: int) -> dict:
        """One rollout step; its metrics line (over every rank's samples)."""
        cfg, start = self.cfg, time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        rows = self.my_rows(step_rows(self.rows, step, cfg.prompts_per_step, cfg.seed))
        lag = self.lagged.lag if self.lagged is not None else 0
        sampled, _ = self.rollout(rows, self.sampler())
        batch, replayed = sampled, []
        if cfg.demos or self.replay is not None:
            batch, replayed = self.mix(sampled, rows, step)
        with torch.no_grad(), self.autocast():
            if self.ref is None:  # the sampling policy's entropy, from the anchor pass
                batch.anchor, entropy = self.policy("logprobs", batch, cfg.temperature, return_entropy=True,
                                                    backend=cfg.backend)
            else:  # with a frozen reference, the entropy comes from the loss's own pass (GVPOStats.entropy)
                batch.anchor, entropy = self.ref("logprobs", batch, cfg.temperature, backend=cfg.backend), None
        stats = update(self.policy, self.optimizer, self.scheduler, batch, beta=cfg.beta,
                       temperature=cfg.temperature, backend=cfg.backend, update_epochs=cfg.update_epochs,
                       micro_batch_groups=cfg.micro_batch_groups, grad_accum=cfg.grad_accum,
                       max_grad_norm=cfg.max_grad_norm, autocast=self.autocast(), world=self.world,
                       before_step=None if self.lagged is None else self.lagged.push, entropy_coef=cfg.entropy_coef)
        for _ in range(self.per_rollout - stats["optimizer_steps"]):  # fewer groups than planned: keep the schedule
            self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        # reward, length and entropy are those of the members sampled at this step (the sampler's own samples)
        rewards = sampled.rewards.double()
        entropy_sum = stats["entropy_sum"] if entropy is None else (
            entropy if batch.source is None else entropy * batch.sampled()[:, None]).sum().item()
        origin = [0, 0.0, 0, 0.0]  # replayed members, their reward sum, demonstrations, their reward sum
        if batch.source is not None:
            is_replayed, is_demo = batch.source == REPLAYED, batch.source == DEMO
            origin = [is_replayed.sum().item(), batch.rewards[is_replayed].double().sum().item(),
                      is_demo.sum().item(), batch.rewards[is_demo].double().sum().item()]
        (count, reward_sum, reward_sq, tokens, scored, entropy_sum, groups, replayed_groups, age_sum,
         replayed_members, replayed_reward, demo_members, demo_reward) = parallel.all_sum(
            [rewards.numel(), rewards.sum().item(), (rewards**2).sum().item(), batch.attention_mask.sum().item(),
             sampled.completion_mask.sum().item(), entropy_sum, sampled.num_groups, len(replayed),
             sum(step - g.step for g in replayed), *origin], self.world, self.device)
        seconds = parallel.all_max(seconds, self.world, self.device)
        mean = reward_sum / count
        record = {"step": step + 1, "reward_mean": mean, "reward_std": max(0.0, reward_sq / count - mean**2) ** 0.5,
                  "loss": stats["loss"],
                  **({"gvpo_loss": stats["gvpo_loss"], "entropy_bonus": stats["entropy_bonus"]}
                     if cfg.entropy_coef else {}),
                  "implicit_reward": stats["implicit_reward"], "kl": stats["kl"],
                  "entropy": entropy_sum / scored, "grad_seq_abs": stats["grad_seq_abs"],
                  "completion_len": scored / count, "grad_norm": stats["grad_norm"],
                  "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens / seconds, "step_time": seconds,
                  "peak_mem_mb": parallel.all_max(report.peak_memory_mb(self.device), self.world, self.device),
                  "groups_sampled": int(groups), "groups_replayed": int(replayed_groups),
                  "members_sampled": int(count), "members_replayed": int(replayed_members),
                  "members_demo": int(demo_members), "sampler_lag": lag}
        if self.replay is not None:
            record["reward_replayed"] = replayed_reward / replayed_members if replayed_members else None
            record["replay_age"] = age_sum / replayed_groups if replayed_groups else None
        if cfg.demos:
            record["reward_demo"] = demo_reward / demo_members if demo_members else None
        return record

    def samples(self, title: str) -> None:
        """Print completions for ``num_samples`` prompts picked by the seed (own RNG stream: training is not
        disturbed). Every rank samples them (a sharded model samples together); rank 0 prints and writes."""
        rows = random.Random(self.cfg.seed).sample(self.rows, min(self.cfg.num_samples, len(self.rows)))
        if not rows:
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed + 1)
            batch, completions = self.rollout(rows)
        if self.world.main:
            text = report.print_samples(title, [r["prompt"] for r in rows], completions, batch.rewards.tolist(),
                                        self.cfg.k)
            with (self.out / "samples.txt").open("a") as f:
                f.write(text + "\n")

    def save(self, step: int) -> Path:
        """The checkpoint after ``step`` steps, with every rank's replay buffer and the lagged sampler's snapshots
        (the same on every rank: rank 0's)."""
        rank_state = None if self.replay is None else {"replay": self.replay.state()}
        state = None if self.lagged is None else {"lag": self.lagged.state()}
        return checkpoint.save(self.cfg.output_dir, step, self.policy_module, self.tokenizer, self.optimizer,
                               self.cfg.to_dict(), self.world, rank_state=rank_state, state=state)


def train(cfg: TrainConfig) -> list[dict]:
    """Run ``cfg`` (from its checkpoint with ``cfg.resume``) on this process, or on every process torchrun
    started; return the metrics of every step, resumed or run (rank 0; the other ranks get [])."""
    world = parallel.world_from_env()
    device = checks.device_for(cfg, world)  # ConfigError before anything is loaded or written
    plan = checks.prepare(cfg, world, device)
    created = parallel.init(world, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or (1 if cfg.model is None else threads))
    try:
        return _train(cfg, world, device, plan)
    finally:
        torch.set_num_threads(threads)
        if created:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, world: parallel.World, device: torch.device, plan: checks.Plan) -> list[dict]:
    out = Path(cfg.output_dir)
    if world.main:
        if cfg.overwrite:
            checks.clear(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
    parallel.barrier(world)
    trainer = Trainer(cfg, world, device, plan)
    log = None
    if world.main:
        checkpoint.write_synced(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        log = report.MetricsLog(out / "metrics.jsonl", trainer.start)
    if trainer.start == 0:
        if world.main:
            (out / "samples.txt").write_text("")
        trainer.samples(f"samples before training ({cfg.k} per prompt, first shown):")
    elif world.main:
        print(f"resuming after step {trainer.start} of {cfg.steps}", flush=True)
    bar = tqdm(range(trainer.start, cfg.steps), initial=trainer.start, total=cfg.steps, desc="GVPO",
               disable=not (cfg.progress and world.main), dynamic_ncols=True)
    for step in bar:
        record = trainer.step(step)
        if log is not None:
            log.write(record)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", loss=f"{record['loss']:.4f}")
        if step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            trainer.save(step + 1)
    bar.close()
    trainer.samples("samples after training:")
    if not world.main:
        return []
    metrics = report.read_metrics(out / "metrics.jsonl")
    tenth = max(1, len(metrics) // 10)
    first, last = (sum(m["reward_mean"] for m in part) / len(part) for part in (metrics[:tenth], metrics[-tenth:]))
    print(f"mean reward: first {tenth} steps {first:.3f}, last {tenth} steps {last:.3f}", flush=True)
    if cfg.plot and metrics:
        print(f"plot: {report.plot(metrics, out / 'metrics.png')}", flush=True)
    procs = f" ({world.size} processes, {'FSDP' if cfg.fsdp else 'DDP'})" if world.size > 1 else ""
    print(f"metrics: {out / 'metrics.jsonl'}, checkpoint: {out / f'checkpoint-{cfg.steps}'}{procs}", flush=True)
    return metrics
