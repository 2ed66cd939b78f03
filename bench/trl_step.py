"""GVPOTrainer against TRL's own GRPOTrainer (with its tiled fused LM head): time and peak memory of a training step.

    python bench/trl_step.py              # writes bench/results/trl_step.{json,md}; a few minutes on 2 cores
    python bench/trl_step.py --threads 1  # steadier on a machine shared with other work (the committed run)
    python bench/trl_step.py --quick      # small shapes, to check that the script runs (writes under /tmp)

TRL 1.16's GRPOTrainer always computes its log-probs and entropy through a fused LM head (``add_fused_lm_head`` in
its constructor, ``fused_lm_head=True`` in ``_get_per_token_logps_and_entropies``; there is no option to turn it
off): the head runs in tiles of 4096 tokens x 32768 vocabulary entries (``TOKEN_CHUNK_SIZE`` x
``_CHUNKED_LOGPROB_CHUNK_SIZE``), a Triton kernel folds each tile on CUDA/XPU, torch ops elsewhere. So the
comparison is GVPOTrainer (``gvpo_kernels.linear_gvpo_loss``, backend "auto": the C++ kernels here) against
GRPOTrainer with that head, both with TRL's defaults otherwise (GRPO: loss_type "dapo", beta 0, no reference model).

The model is a randomly initialised Qwen2 built here (nothing is downloaded) with a word-level tokenizer of the
same vocabulary; float32 (``bf16=False``: CPUs without bfloat16 matmul units emulate it). Three measurements, each
in a fresh process per trainer (``--run``; the update shapes one after the other, smallest first), the trainers
taking turns:

* ``update``: ``trainer.compute_loss(model, batch)`` and ``backward()`` on one fixed micro-batch (B completions of
  C tokens after prompts of P tokens, groups of G, every completion token scored), the same batch for both: the
  part of a step the two trainers do differently. A warm-up call, then the peak RSS growth of one call over the
  RSS before it (parameter gradients released first, so they count; ``MALLOC_MMAP_THRESHOLD_`` set so that freed
  buffers go back to the system), then the median of up to 5 timed calls (bench/measure.py's helpers).
* ``logps``: the old-policy log-prob pass that TRL runs on each generation batch with ``num_iterations > 1`` (and
  the reference pass with ``beta != 0``): ``trainer._get_per_token_logps_and_entropies`` without gradients on the
  same batch, in one chunk of B rows as TRL calls it; GRPOTrainer's is TRL's fused head, GVPOTrainer's runs the
  model for the last hidden state and :func:`gvpo_kernels.linear_token_logprobs`. Measured as ``update``; the
  sum of the log-probs is recorded (``logps_sum``), the same for both to float32 rounding.
* ``step``: ``trainer.train()`` for a few steps, each generating B completions of exactly C tokens
  (``min_new_tokens``) for B / G prompts, scoring them, one update and an AdamW step; the time per step is TRL's
  own ``step_time`` metric (median over the steps after the first), the memory is the peak RSS growth of the
  whole run over the RSS after the trainer was built (it includes AdamW's state, the same for both).

On the CPU (no Triton), TRL's fused head scores every position of the micro-batch, prompt included (it compacts
to the completion tokens only on Triton devices); GVPOTrainer always projects the completion positions only.
The CPU ranks the two and shows the memory each needs; an absolute time holds only on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import torch  # noqa: E402

MODEL = dict(vocab=32768, hidden=256, intermediate=768, layers=2, heads=4, kv_heads=2)
# B completions (groups of G) of C tokens after prompts of P tokens
UPDATE_SHAPES = [dict(B=8, G=4, P=16, C=112), dict(B=8, G=4, P=16, C=240)]
STEP_SHAPE = dict(B=8, G=4, P=16, C=64, steps=4)
QUICK_MODEL = dict(vocab=4096, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
QUICK_UPDATE_SHAPES = [dict(B=8, G=4, P=8, C=24)]
QUICK_STEP_SHAPE = dict(B=8, G=4, P=8, C=8, steps=2)
TRAINERS = ("grpo", "gvpo")
GVPO_BETA = 0.1


# ----------------------------------------------------------------------------------------------------------------
# model, tokenizer, data, trainer


def make_tokenizer(vocab: int):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")


def make_model(m: dict):
    """A randomly initialised Qwen2 (seed 0), untied head so that every TRL option applies, float32."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=m["vocab"], hidden_size=m["hidden"],
                                      intermediate_size=m["intermediate"], num_hidden_layers=m["layers"],
                                      num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
                                      max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=None, tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(config)


def distinct_fraction(completions, **kwargs):
    """A reward that varies within a group: the fraction of distinct words of each completion."""
    return [len(set(c.split())) / max(len(c.split()), 1) for c in completions]


def make_trainer(name: str, m: dict, shape: dict, output_dir: str):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from gvpo_kernels.integrations.trl import GVPOConfig, GVPOTrainer

    tokenizer = make_tokenizer(m["vocab"])
    g = torch.Generator().manual_seed(1)
    prompts = [" ".join(f"w{i}" for i in torch.randint(3, m["vocab"], (shape["P"],), generator=g).tolist())
               for _ in range(64)]
    options = dict(output_dir=output_dir, per_device_train_batch_size=shape["B"], num_generations=shape["G"],
                   steps_per_generation=1, max_completion_length=shape["C"], max_steps=shape.get("steps", 1),
                   generation_kwargs={"min_new_tokens": shape["C"]}, learning_rate=1e-5, bf16=False,
                   use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
    if name == "gvpo":
        config_cls, trainer_cls, options["gvpo_beta"] = GVPOConfig, GVPOTrainer, GVPO_BETA
    else:
        config_cls, trainer_cls = GRPOConfig, GRPOTrainer
    return trainer_cls(model=make_model(m), reward_funcs=distinct_fraction, args=config_cls(**options),
                       train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)


def make_batch(m: dict, shape: dict) -> dict:
    """One micro-batch in TRL's layout, with the columns of both trainers (GRPO's advantages, GVPO's rewards and
    group ids): random tokens, every completion token scored, N(0, 1) rewards, GRPO's advantages from them."""
    g = torch.Generator().manual_seed(2)
    B, G, P, C = shape["B"], shape["G"], shape["P"], shape["C"]
    rewards = torch.randn(B, generator=g)
    grouped = rewards.view(-1, G)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    return dict(prompt_ids=torch.randint(3, m["vocab"], (B, P), generator=g),
                prompt_mask=torch.ones(B, P, dtype=torch.long),
                completion_ids=torch.randint(3, m["vocab"], (B, C), generator=g), completion_mask=completion_mask,
                advantages=advantages, num_items_in_batch=completion_mask.sum(), gvpo_rewards=rewards,
                gvpo_group_ids=torch.arange(B) // G)


# ----------------------------------------------------------------------------------------------------------------
# one measurement, in this process


def run_update(name: str, m: dict, shape: dict) -> dict:
    from measure import peak_memory_mib, time_ms

    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(name, m, shape, out)
        trainer.current_gradient_accumulation_steps = 1  # what Trainer.train() sets before its first step
        model, batch = trainer.model, make_batch(m, shape)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        losses = []

        def call():
            for p in params:
                p.grad = None
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            losses.append(float(loss.detach()))

        call()  # warm-up: the C++ extension, first touch of the buffers
        peak_mib, first_ms = peak_memory_mib(call, "cpu", params)
        timing = time_ms(call, dict(device="cpu", reps=5, min_reps=3, max_time_s=10.0), first=first_ms)
    return dict(peak_mib=peak_mib, loss=losses[-1], **{f"{k}_ms" if k != "reps" else k: v for k, v in timing.items()})


def run_logps(name: str, m: dict, shape: dict) -> dict:
    from measure import peak_memory_mib, time_ms

    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(name, m, shape, out)
        model, batch = trainer.model, make_batch(m, shape)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        sums = []

        def call():
            with torch.no_grad():
                logps, _, _ = trainer._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, shape["C"], batch_size=shape["B"])
            sums.append(float(logps.sum()))

        call()  # warm-up
        peak_mib, first_ms = peak_memory_mib(call, "cpu", [])
        timing = time_ms(call, dict(device="cpu", reps=5, min_reps=3, max_time_s=10.0), first=first_ms)
    return dict(peak_mib=peak_mib, logps_sum=sums[-1],
                **{f"{k}_ms" if k != "reps" else k: v for k, v in timing.items()})


def _rss_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_step(name: str, m: dict, shape: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(name, m, shape, out)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_mib("VmRSS")
        start = time.perf_counter()
        trainer.train()
        total_s = time.perf_counter() - start
        peak_mib = _rss_mib("VmHWM") - before
    history = trainer.state.log_history
    steps_ms = [1e3 * h["step_time"] for h in history if "step_time" in h]
    lengths = [h["completions/mean_length"] for h in history if "completions/mean_length" in h]
    return dict(peak_mib=peak_mib, steps_ms=steps_ms, median_ms=statistics.median(steps_ms[1:] or steps_ms),
                total_s=total_s, completion_lengths=lengths)


def run(spec: dict) -> None:
    """What a fresh process does: one trainer's measurements of one phase, one RESULT line per shape."""
    torch.set_num_threads(spec["threads"])
    measure = dict(update=run_update, logps=run_logps, step=run_step)[spec["phase"]]
    for shape in spec["shapes"]:
        print("RESULT " + json.dumps(measure(spec["trainer"], spec["model"], shape)), flush=True)


def in_fresh_process(name: str, phase: str, m: dict, shapes: list[dict], threads: int) -> list[dict]:
    """One result per shape, measured one after the other in one fresh process (an error for those not reached)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 16), TOKENIZERS_PARALLELISM="false")
    spec = json.dumps(dict(trainer=name, phase=phase, model=m, shapes=shapes, threads=threads))
    proc = subprocess.run([sys.executable, __file__, "--run", spec], capture_output=True, text=True, env=env)
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return results + [dict(error=error)] * (len(shapes) - len(results))


# ----------------------------------------------------------------------------------------------------------------
# the report


def _label(phase: str, shape: dict) -> str:
    tokens = shape["B"] * shape["C"]
    text = f"B{shape['B']} G{shape['G']} P{shape['P']} C{shape['C']} ({tokens} completion tokens)"
    return text + (f", {shape['steps']} steps" if phase == "step" else "")


def _fmt(x) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def markdown(report: dict) -> str:
    m = report["model"]
    v = report["versions"]
    lines = [f"{report['cpu']}, {report['threads']} torch thread(s), {report['date']}; torch {v['torch']}, "
             f"transformers {v['transformers']}, trl {v['trl']}, gvpo-kernels "
             f"{v['gvpo-kernels']} ({report['commit']}); `{report['command']}`, "
             f"{report['runtime_s']:.0f} s",
             "",
             f"Model: random Qwen2, V {m['vocab']}, H {m['hidden']}, {m['layers']} layers, float32. "
             "update = compute_loss + backward on one fixed micro-batch; logps = the old-policy (or reference) "
             "log-prob pass, no grad, on the same batch (`_get_per_token_logps_and_entropies`); step = generate, "
             "score, update, AdamW (TRL's step_time).",
             "",
             "| measurement | shape | trainer | ms | × GRPO time | peak MiB | × GRPO memory |",
             "|---|---|---|---:|---:|---:|---:|"]
    order = {key: i for i, key in enumerate(
        dict.fromkeys((r["phase"], json.dumps(r["shape"])) for r in report["rows"]))}
    for row in sorted(report["rows"], key=lambda r: (order[r["phase"], json.dumps(r["shape"])], r["trainer"])):
        grpo = next(r for r in report["rows"] if r["trainer"] == "grpo" and r["phase"] == row["phase"]
                    and r["shape"] == row["shape"])
        if "error" in row:
            lines.append(f"| {row['phase']} | {_label(row['phase'], row['shape'])} | {row['trainer']} | "
                         f"error: {row['error']} | | | |")
            continue
        ratio_t = row["median_ms"] / grpo["median_ms"] if "median_ms" in grpo else None
        ratio_m = row["peak_mib"] / grpo["peak_mib"] if grpo.get("peak_mib") else None
        lines.append(f"| {row['phase']} | {_label(row['phase'], row['shape'])} | {row['trainer']} | "
                     f"{_fmt(row['median_ms'])} | {_fmt(ratio_t)} | {_fmt(row['peak_mib'])} | {_fmt(ratio_m)} |")
    sums = [f"{_label('logps', r['shape'])} {r['trainer']} {r['logps_sum']:.6g}" for r in report["rows"]
            if "logps_sum" in r]
    if sums:
        lines += ["", "Sum of the log-probs of each logps pass (the two trainers agree): " + "; ".join(sums) + "."]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "trl", "gvpo-kernels")}


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, to check that the script runs")
    parser.add_argument("--out", help="directory for trl_step.json and .md (default bench/results/, or a "
                                      "temporary directory with --quick)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads per measurement (default: all cores; 1 is steadier on a loaded machine)")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one measurement, as JSON: what a fresh process does
    args = parser.parse_args()
    if args.run:
        run(json.loads(args.run))
        return

    m = QUICK_MODEL if args.quick else MODEL
    update_shapes = QUICK_UPDATE_SHAPES if args.quick else UPDATE_SHAPES
    phases = [("update", update_shapes), ("logps", update_shapes),
              ("step", [QUICK_STEP_SHAPE if args.quick else STEP_SHAPE])]
    start, rows = time.perf_counter(), []
    for phase, shapes in phases:
        for name in TRAINERS:
            for shape, result in zip(shapes, in_fresh_process(name, phase, m, shapes, args.threads)):
                rows.append(dict(trainer=name, phase=phase, shape=shape, **result))
                print(f"{phase:6s} {_label(phase, shape):50s} {name}: " + (
                    result.get("error") or f"{result['median_ms']:,.0f} ms, peak +{result['peak_mib']:,.0f} MiB"),
                    flush=True)
    command = "python bench/trl_step.py" + (" --quick" if args.quick else "") + f" --threads {args.threads}"
    report = dict(command=command, date=datetime.date.today().isoformat(), cpu=_cpu_name(),
                  threads=args.threads, versions=_versions(), commit=_commit(), model=m, gvpo_beta=GVPO_BETA,
                  runtime_s=time.perf_counter() - start, rows=rows)
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) if args.quick else HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "trl_step.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "trl_step.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'trl_step.json'} and {out / 'trl_step.md'}")


if __name__ == "__main__":
    main()
