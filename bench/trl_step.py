"""GVPOTrainer against TRL's own GRPOTrainer (with its tiled fused LM head): time and peak memory of a training step,
on the CPU; bench/README.md says what is compared and how to run it.

A randomly initialised Qwen2 built here (nothing downloaded), float32. Three measurements, each in a fresh process
per trainer (its shapes one after the other, smallest first), the trainers taking turns: ``update``
(compute_loss + backward on one fixed micro-batch, the same for both), ``logps`` (the old-policy / reference
log-prob pass, no grad, on the same batch) and ``step`` (trainer.train() for a few steps, generation included;
TRL's step_time). Writes DIR/trl_step.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import common as C

MODEL = dict(vocab=32768, hidden=256, intermediate=768, layers=2, heads=4, kv_heads=2)
# B completions (groups of G) of C tokens after prompts of P tokens
UPDATE_SHAPES = [dict(B=8, G=4, P=16, C=112), dict(B=8, G=4, P=16, C=240)]
STEP_SHAPE = dict(B=8, G=4, P=16, C=64, steps=4)
QUICK_MODEL = dict(vocab=4096, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
QUICK_UPDATE_SHAPES = [dict(B=8, G=4, P=8, C=24)]
QUICK_STEP_SHAPE = dict(B=8, G=4, P=8, C=8, steps=2)
TRAINERS = ("grpo", "gvpo")
GVPO_BETA = 0.1
TIMING = dict(device="cpu", reps=5, min_reps=3, max_time_s=10.0)


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


def distinct_fraction(completions, **kwargs):  # a reward that varies within a group
    return [len(set(c.split())) / max(len(c.split()), 1) for c in completions]


def make_trainer(name: str, m: dict, shape: dict, output_dir: str):
    """TRL's defaults otherwise (GRPO: loss_type "dapo", beta 0, no reference model); B / G prompts of P words."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from gvpo_kernels.integrations.trl import GVPOConfig, GVPOTrainer

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
                       train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                       processing_class=make_tokenizer(m["vocab"]))


def make_batch(m: dict, shape: dict) -> dict:
    """One micro-batch in TRL's layout with the columns of both trainers (GRPO's advantages, GVPO's rewards and
    group ids): random tokens, every completion token scored, N(0, 1) rewards, GRPO's advantages from them."""
    g = torch.Generator().manual_seed(2)
    B, G, P, C_ = shape["B"], shape["G"], shape["P"], shape["C"]
    rewards = torch.randn(B, generator=g)
    grouped = rewards.view(-1, G)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)
    completion_mask = torch.ones(B, C_, dtype=torch.long)
    return dict(prompt_ids=torch.randint(3, m["vocab"], (B, P), generator=g),
                prompt_mask=torch.ones(B, P, dtype=torch.long), completion_ids=torch.randint(3, m["vocab"], (B, C_), generator=g), completion_mask=completion_mask,
                advantages=advantages, num_items_in_batch=completion_mask.sum(), gvpo_rewards=rewards,
                gvpo_group_ids=torch.arange(B) // G)


def _timed(call, params: list, extra) -> dict:
    """A warm-up call, the peak RSS growth of one call, then common.time_ms's figures as <k>_ms."""
    call()
    peak_mib, first_ms = C.peak_memory_mib(call, "cpu", params)
    timing = C.time_ms(call, TIMING, first=first_ms)
    return dict(peak_mib=peak_mib, **extra(), **{f"{k}_ms" if k != "reps" else k: v for k, v in timing.items()})


def run_update(name: str, m: dict, shape: dict) -> dict:
    """compute_loss + backward on one fixed micro-batch."""
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(name, m, shape, out)
        trainer.current_gradient_accumulation_steps = 1  # what Trainer.train() sets before its first step
        model, batch = trainer.model, make_batch(m, shape)
        model.train()
        params, losses = [p for p in model.parameters() if p.requires_grad], []

        def call():
            for p in params:
                p.grad = None
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            losses.append(float(loss.detach()))

        return _timed(call, params, extra=lambda: dict(loss=losses[-1]))


def run_logps(name: str, m: dict, shape: dict) -> dict:
    """The old-policy / reference log-prob pass (`_get_per_token_logps_and_entropies`, no grad, one chunk of B
    rows as TRL calls it); the sum of the log-probs is recorded (the same for both to float32 rounding)."""
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(name, m, shape, out)
        batch, sums = make_batch(m, shape), []
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)

        def call():
            with torch.no_grad():
                logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask,
                                                                         shape["C"], batch_size=shape["B"])
            sums.append(float(logps.sum()))

        return _timed(call, [], extra=lambda: dict(logps_sum=sums[-1]))


def run_step(name: str, m: dict, shape: dict) -> dict:
    """trainer.train(): TRL's step_time per step (median after the first), peak RSS growth of the whole run."""
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(name, m, shape, out)
        before = C.reset_peak_rss()
        start = time.perf_counter()
        trainer.train()
        total_s = time.perf_counter() - start
        peak_mib = C.proc_mib("VmHWM") - before
    history = trainer.state.log_history
    steps_ms = [1e3 * h["step_time"] for h in history if "step_time" in h]
    return dict(peak_mib=peak_mib, steps_ms=steps_ms, median_ms=statistics.median(steps_ms[1:] or steps_ms),
                total_s=total_s, completion_lengths=[h["completions/mean_length"] for h in history
                                                     if "completions/mean_length" in h])


def _label(phase: str, shape: dict) -> str:
    text = f"B{shape['B']} G{shape['G']} P{shape['P']} C{shape['C']} ({shape['B'] * shape['C']} completion tokens)"
    return text + (f", {shape['steps']} steps" if phase == "step" else "")


def markdown(report: dict) -> str:
    m, v = report["model"], report["versions"]
    lines = [f"{report['cpu']}, {report['threads']} torch thread(s), {report['date']}; torch {v['torch']}, "
             f"transformers {v['transformers']}, trl {v['trl']}, gvpo-kernels {v['gvpo-kernels']} "
             f"({report['commit']}); `{report['command']}`, {report['runtime_s']:.0f} s", "",
             f"Model: random Qwen2, V {m['vocab']}, H {m['hidden']}, {m['layers']} layers, float32. update = "
             "compute_loss + backward on one fixed micro-batch; logps = the old-policy (or reference) log-prob pass, "
             "no grad, on the same batch (`_get_per_token_logps_and_entropies`); step = generate, score, update, "
             "AdamW (TRL's step_time).", ""]
    keys = list(dict.fromkeys((r["phase"], json.dumps(r["shape"])) for r in report["rows"]))
    rows = []
    for row in sorted(report["rows"], key=lambda r: (keys.index((r["phase"], json.dumps(r["shape"]))), r["trainer"])):
        grpo = next(r for r in report["rows"] if r["trainer"] == "grpo" and r["phase"] == row["phase"]
                    and r["shape"] == row["shape"])
        head = [row["phase"], _label(row["phase"], row["shape"]), row["trainer"]]
        if "error" in row:
            rows.append(head + [f"error: {row['error']}", "", "", ""])
            continue
        ratio_t = row["median_ms"] / grpo["median_ms"] if "median_ms" in grpo else None
        ratio_m = row["peak_mib"] / grpo["peak_mib"] if grpo.get("peak_mib") else None
        rows.append(head + [C.fmt(x) for x in (row["median_ms"], ratio_t, row["peak_mib"], ratio_m)])
    lines += C.md_table(["measurement", "shape", "trainer", "ms", "× GRPO time", "peak MiB", "× GRPO memory"], rows, 3)
    sums = [f"{_label('logps', r['shape'])} {r['trainer']} {r['logps_sum']:.6g}" for r in report["rows"]
            if "logps_sum" in r]
    if sums:
        lines += ["", "Sum of the log-probs of each logps pass (the two trainers agree): " + "; ".join(sums) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench trl-step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, to check that it runs")
    parser.add_argument("--out", help="folder for trl_step.json and .md (default bench/results/, or a temporary "
                                      "folder with --quick)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads per measurement (default: all cores; 1 is steadier on a loaded machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one trainer's phase, as JSON
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        torch.set_num_threads(spec["threads"])
        for shape in spec["shapes"]:
            C.emit(dict(update=run_update, logps=run_logps, step=run_step)[spec["phase"]](spec["trainer"],
                                                                                          spec["model"], shape))
        return 0
    m = QUICK_MODEL if args.quick else MODEL
    update_shapes = QUICK_UPDATE_SHAPES if args.quick else UPDATE_SHAPES
    phases = [("update", update_shapes), ("logps", update_shapes),
              ("step", [QUICK_STEP_SHAPE if args.quick else STEP_SHAPE])]
    start, rows = time.perf_counter(), []
    for phase, shapes in phases:
        for name in TRAINERS:
            results = []
            spec = dict(trainer=name, phase=phase, model=m, shapes=shapes, threads=args.threads)
            why = C.run_fresh("trl-step", spec, len(shapes), 3600, results.append, {"TOKENIZERS_PARALLELISM": "false"})
            for shape, result in zip(shapes, results + [dict(error=why)] * (len(shapes) - len(results))):
                rows.append(dict(trainer=name, phase=phase, shape=shape, **result))
                print(f"{phase:6s} {_label(phase, shape):50s} {name}: " + (
                    result.get("error") or f"{result['median_ms']:,.0f} ms, peak +{result['peak_mib']:,.0f} MiB"),
                    flush=True)
    versions = C.versions("transformers", "trl")
    report = dict(command="python -m bench trl-step" + (" --quick" if args.quick else "") + f" --threads {args.threads}",
                  date=datetime.date.today().isoformat(), cpu=C.cpu_name(), threads=args.threads,
                  versions=dict(versions, **{"gvpo-kernels": versions["gvpo-kernels"].split(" ")[0]}),
                  commit=versions["gvpo-kernels"].partition(" ")[2].strip("()") or "unknown", model=m,
                  gvpo_beta=GVPO_BETA, runtime_s=time.perf_counter() - start, rows=rows)
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) if args.quick else Path(C.RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    (out / "trl_step.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "trl_step.md").write_text(markdown(report))
    print(markdown(report) + f"wrote {out / 'trl_step.json'} and {out / 'trl_step.md'}")
    return 0

