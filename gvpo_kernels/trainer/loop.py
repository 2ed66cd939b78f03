"""train(config): the GVPO loop. Each step samples k completions for each of its prompts, scores them, records the
anchor log-probs and updates the policy; metrics, samples, checkpoints and the plot go to ``output_dir``."""

from __future__ import annotations

import json
import math
import random
import time
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint, report
from .config import TrainConfig
from .data import encode_prompts, load_rows, step_rows
from .models import autocast, eos_ids, load_policy, pick_device
from .rewards import load_reward, score
from .rollout import decode_completions, sample
from .update import optimizer_steps_per_rollout, token_logprobs, update


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` optimizer steps, then cosine from 1 down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """The state of one run: policy, optional frozen reference, data, reward, optimizer, schedule."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.device = cfg, pick_device(cfg.device)
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        resume_from = checkpoint.find(cfg.resume, cfg.output_dir) if cfg.resume else None
        load = partial(load_policy, device=self.device, seed=cfg.seed, attn_implementation=cfg.attn_implementation)
        self.model, self.tokenizer = load(str(resume_from) if resume_from else cfg.model)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.ref = load(cfg.model)[0].eval().requires_grad_(False) if cfg.anchor == "ref" else None
        self.rows, self.reward_fn = load_rows(cfg.data), load_reward(cfg.reward)
        self.stop_ids = eos_ids(self.model, self.tokenizer)
        self.autocast = partial(autocast, self.device, cfg.bf16)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = cfg.steps * optimizer_steps_per_rollout(cfg.prompts_per_step, cfg.micro_batch_groups,
                                                        cfg.grad_accum, cfg.update_epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_factor, warmup=cfg.warmup_steps, total=total, min_ratio=cfg.min_lr_ratio))
        self.start = checkpoint.restore(resume_from, self.optimizer, self.scheduler) if resume_from else 0

    def rollout(self, rows: list[dict]):
        """Sample k completions per row and score them: (the rollout, its rewards set; the completion texts)."""
        cfg = self.cfg
        prompt_ids = encode_prompts(self.tokenizer, [r["prompt"] for r in rows], cfg.chat_template)
        with self.autocast():
            batch = sample(self.model, prompt_ids, k=cfg.k, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=self.stop_ids,
                           pad_id=self.tokenizer.pad_token_id)
        completions = decode_completions(self.tokenizer, batch)
        each = [row for row in rows for _ in range(cfg.k)]
        batch.rewards = score(self.reward_fn, cfg.reward, [r["prompt"] for r in each], completions, each)
        batch.rewards = batch.rewards.to(self.device)
        return batch, completions

    def step(self, step: int) -> dict:
        """One rollout step; its metrics line."""
        cfg, start = self.cfg, time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        batch, _ = self.rollout(step_rows(self.rows, step, cfg.prompts_per_step, cfg.seed))
        with self.autocast():
            batch.anchor = token_logprobs(self.ref or self.model, batch, cfg.temperature)
        stats = update(self.model, self.optimizer, self.scheduler, batch, beta=cfg.beta,
                       temperature=cfg.temperature, backend=cfg.backend, update_epochs=cfg.update_epochs,
                       micro_batch_groups=cfg.micro_batch_groups, grad_accum=cfg.grad_accum,
                       max_grad_norm=cfg.max_grad_norm, autocast=self.autocast())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        return {"step": step + 1, "reward_mean": batch.rewards.mean().item(),
                "reward_std": batch.rewards.std(unbiased=False).item(), "loss": stats["loss"],
                "implicit_reward": stats["implicit_reward"], "grad_seq_abs": stats["grad_seq_abs"],
                "completion_len": batch.completion_mask.sum(1).float().mean().item(),
                "grad_norm": stats["grad_norm"], "lr": self.scheduler.get_last_lr()[0],
                "tokens_per_s": batch.attention_mask.sum().item() / seconds, "step_time": seconds,
                "peak_mem_mb": report.peak_memory_mb(self.device)}

    def samples(self, title: str) -> None:
        """Print completions for ``num_samples`` prompts picked by the seed (own RNG stream: training is not
        disturbed)."""
        rows = random.Random(self.cfg.seed).sample(self.rows, min(self.cfg.num_samples, len(self.rows)))
        if not rows:
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed + 1)
            batch, completions = self.rollout(rows)
        text = report.print_samples(title, [r["prompt"] for r in rows], completions, batch.rewards.tolist(),
                                    self.cfg.k)
        with (self.out / "samples.txt").open("a") as f:
            f.write(text + "\n")

    def save(self, step: int) -> Path:
        return checkpoint.save(self.cfg.output_dir, step, self.model, self.tokenizer, self.optimizer,
                               self.scheduler, self.cfg.to_dict())


def train(cfg: TrainConfig) -> list[dict]:
    """Run ``cfg`` (from its checkpoint with ``cfg.resume``); return the metrics of every step, resumed or run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or (1 if cfg.model is None else threads))
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> list[dict]:
    trainer = Trainer(cfg)
    out = trainer.out
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log = report.MetricsLog(out / "metrics.jsonl", trainer.start)
    if trainer.start == 0:
        (out / "samples.txt").write_text("")
        trainer.samples(f"samples before training ({cfg.k} per prompt, first shown):")
    else:
        print(f"resuming after step {trainer.start} of {cfg.steps}", flush=True)
    bar = tqdm(range(trainer.start, cfg.steps), initial=trainer.start, total=cfg.steps, desc="GVPO",
               disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        record = trainer.step(step)
        log.write(record)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", loss=f"{record['loss']:.4f}")
        if step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            trainer.save(step + 1)
    bar.close()
    trainer.samples("samples after training:")
    metrics = report.read_metrics(out / "metrics.jsonl")
    tenth = max(1, len(metrics) // 10)
    first, last = (sum(m["reward_mean"] for m in part) / len(part) for part in (metrics[:tenth], metrics[-tenth:]))
    print(f"mean reward: first {tenth} steps {first:.3f}, last {tenth} steps {last:.3f}", flush=True)
    if cfg.plot and metrics:
        print(f"plot: {report.plot(metrics, out / 'metrics.png')}", flush=True)
    print(f"metrics: {out / 'metrics.jsonl'}, checkpoint: {out / f'checkpoint-{cfg.steps}'}", flush=True)
    return metrics
