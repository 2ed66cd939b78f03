"""Token statistics side by side: the anchor pass and a log-prob + entropy pass, this package against what users
run instead (bench/providers.py), on the same inputs in one process; bench/README.md says how to run it.

Shapes, dtypes and floors are the loss benchmark's. Passes: ``anchor`` (log-probs under no_grad), ``stats``
(log-probs and entropy under no_grad) and ``stats+bwd`` (both with gradients, then the backward of
sum(a * logprob) + sum(b * entropy), a and b fixed random per-token weights). Each provider is checked first on a
check-sized copy against gvpo-auto (gvpo-auto against the float64 reference), then per pass warmed up, its peak
memory taken and timed: on CUDA one after the other, on the CPU in interleaved rounds so that a busy spell of a
shared machine slows all of them alike. Writes DIR/<device>-<date>.json (after every shape) and .md.
"""

from __future__ import annotations

import argparse
import functools
import time
import traceback

import torch

import gvpo_kernels as gk

from . import common as C
from .floors import floor_ms, floors_line, measure_floors
from .providers import CHUNK_BYTES, Provider, for_bench

OURS = "gvpo-auto"
PASSES = {"anchor": dict(entropy=False, grad=False), "stats": dict(entropy=True, grad=False),
          "stats+bwd": dict(entropy=True, grad=True)}
NAMES = {"linear": ["logprob", "entropy", "d_hidden", "d_weight"], "logits": ["logprob", "entropy", "d_logits"]}
# Timing. warmup: calls at the full shape before the measured ones (CUDA: at least one, for the compilation and
# autotuning at that shape; on the CPU --quick has none: the check has run every code path).
QUICK = dict(reps=5, min_reps=2, max_time_s=4, rep_ms=100, warmup=0)
FULL = dict(reps=7, min_reps=3, max_time_s=10, rep_ms=200, warmup=1)


def _make(task: dict, num_seqs: int, seq_len: int, seed: int):
    """The shape's Inputs and the backward's per-token weights a, b ((B, T) float32)."""
    shape, device = task["shape"], task["device"]
    inp = C.make_inputs(shape["path"], num_seqs, seq_len, shape["vocab"], shape.get("hidden", 0),
                        C.DTYPES[task["dtype"]], device, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed + 7)
    return (inp, *(torch.randn(num_seqs, seq_len, device=device, generator=gen) for _ in range(2)))


def _outputs(fn, inp: C.Inputs, a, b, grad: bool) -> list:
    """[logprob, entropy] of one call of fn, and with ``grad`` the leaves' gradients of the backward."""
    for leaf in inp.leaves():
        leaf.grad = None
    with torch.set_grad_enabled(grad):
        logprob, entropy = fn()
    if not grad:
        return [logprob, entropy]
    ((a * logprob).sum() + (b * entropy).sum()).backward()
    return [logprob.detach(), entropy.detach()] + [leaf.grad for leaf in inp.leaves()]


def _reference(inp: C.Inputs, a, b) -> list:
    """gvpo_kernels.reference in float64 on copies of the inputs: [logprob, entropy, *gradients]."""
    leaves = [leaf.detach().double().requires_grad_() for leaf in inp.leaves()]
    tokens = gk.reference.linear_token_logprobs if inp.path == "linear" else gk.reference.token_logprobs
    lp, ent = tokens(*leaves, inp.labels, return_entropy=True)
    ((a * lp).sum() + (b * ent).sum()).backward()
    return [lp.detach(), ent.detach()] + [leaf.grad for leaf in leaves]


def check(provider: Provider, task: dict) -> dict:
    """{pass: {"status": "ok" | "mismatch" | "skipped", "errors": {name: relative error}, "reason": str}} on a
    check-sized copy of the shape, against gvpo-auto (gvpo-auto against the float64 reference)."""
    inp, a, b = _make(task, C.CHECK_SEQS, min(task["shape"]["seq_len"], C.CHECK_LEN), seed=task["seed"] + 1)
    target = _reference(inp, a, b) if provider.name == OURS else None
    ours = next(p for p in for_bench("stats", [inp.path]) if p.name == OURS)
    tol, device, out = C.TOLERANCE[C.DTYPES[task["dtype"]]], task["device"], {}
    for name in task["passes"]:
        mode = PASSES[name]
        if mode["entropy"] and not provider.entropy:
            out[name] = {"status": "skipped", "reason": "gives no entropy"}
            continue
        got = _outputs(provider.build(inp, device, mode["entropy"]), inp, a, b, mode["grad"])
        want = target or _outputs(ours.build(inp, device, mode["entropy"]), inp, a, b, mode["grad"])
        expected = NAMES[inp.path][:2 if mode["entropy"] else 1] + (NAMES[inp.path][2:] if mode["grad"] else [])
        errors = {n: C.rel_err(got[i], want[i]) for i, n in enumerate(NAMES[inp.path]) if n in expected}
        out[name] = C.verdict(errors, tol)
    return out


def measure_shape(chosen: list[Provider], task: dict) -> list[dict]:
    """Every pass of these providers at one shape: each checked, then per pass each one's warm-up call and peak
    memory, then their times (CPU: interleaved rounds; CUDA: do_bench one after the other). Never raises."""
    shape, device = task["shape"], task["device"]
    rows = {}
    for provider in chosen:
        base = {"path": shape["path"], "shape": shape["name"], "provider": provider.name, "note": provider.note,
                "check_against": "float64 reference" if provider.name == OURS else OURS}
        reason = provider.skip_reason(device)
        try:
            checks = ({p: {"status": "skipped", "reason": reason} for p in task["passes"]} if reason
                      else check(provider, task))
            if provider.ran and not reason:  # after the check's calls: the backend that really ran them
                base["note"] += f"; ran {provider.ran(device)}"
                if provider.name == OURS:
                    base["backend"] = provider.ran(device)
        except Exception as exc:
            checks = {p: {"status": "failed", "traceback": traceback.format_exc(limit=4),
                          "reason": f"check: {C.first_line(exc)}"} for p in task["passes"]}
        for name in task["passes"]:
            rows[provider.name, name] = dict(base, pass_=name, **checks[name])
    inp, a, b = _make(task, shape["num_seqs"], shape["seq_len"], seed=task["seed"])
    for name in task["passes"]:
        calls, firsts = {}, {}
        for provider in chosen:
            row = rows[provider.name, name]
            if row["status"] != "ok":
                continue
            try:
                fn = provider.build(inp, device, PASSES[name]["entropy"])
                calls[provider.name] = functools.partial(_outputs, fn, inp, a, b, PASSES[name]["grad"])
                for _ in range(max(task["warmup"], device == "cuda")):  # compilation, autotuning
                    calls[provider.name]()
                C.sync(device)
                row["peak_mib"], firsts[provider.name] = C.peak_memory_mib(calls[provider.name], device, inp.leaves())
            except Exception as exc:
                calls.pop(provider.name, None)
                row.update(status="out of memory" if C.is_oom(exc) else "failed", reason=C.first_line(exc))
            C.release(device)
        if device == "cuda":
            timings = {n: C.time_ms(call, task) for n, call in calls.items()}
        else:
            timings = _interleaved_ms(calls, task, firsts)
        for n, timing in timings.items():
            rows[n, name].update(time_ms=timing["median"], time_p20_ms=timing["p20"], time_p80_ms=timing["p80"],
                                 reps=timing["reps"])
        C.release(device)
    return list(rows.values())


def _interleaved_ms(calls: dict, task: dict, firsts: dict) -> dict:
    """CPU times of each call in rounds, one call of each provider per round (the memory measurement's call the
    first); a provider takes no more rounds once it has ``reps`` timings, or ``min_reps`` and more than
    ``max_time_s`` of them."""
    times = {n: [firsts[n]] for n in calls}
    while True:
        active = [n for n, t in times.items() if len(t) < task["reps"]
                  and (len(t) < task["min_reps"] or sum(t) < 1e3 * task["max_time_s"])]
        if not active:
            return {n: C.summary(t) for n, t in times.items()}
        for n in active:
            t0 = time.perf_counter()
            calls[n]()
            times[n].append(1e3 * (time.perf_counter() - t0))


def add_derived(rows: list[dict], shapes: dict, floors: dict, itemsize: int) -> None:
    """floor_ms (the loss benchmark's: 6 N H V flops / 2 N V elements with gradients, a third / half without),
    x_floor, and x_ours_time / x_ours_mem (time / peak over gvpo-auto's, same path, shape and pass)."""
    ours = {(r["path"], r["shape"], r["pass_"]): r for r in rows if r["provider"] == OURS}
    for row in rows:
        shape = shapes[(row["path"], row["shape"])]
        full = floor_ms(shape, floors, itemsize)
        row["floor_ms"] = full if PASSES[row["pass_"]]["grad"] else full / (3 if shape["path"] == "linear" else 2)
        if row.get("time_ms") is None:
            continue
        row["x_floor"] = row["time_ms"] / row["floor_ms"]
        mine = ours.get((row["path"], row["shape"], row["pass_"]), {})
        row["x_ours_time"] = row["time_ms"] / mine["time_ms"] if mine.get("time_ms") else None
        row["x_ours_mem"] = row["peak_mib"] / mine["peak_mib"] if (mine.get("peak_mib") or 0) > 0.1 else None


def _ordered(data: dict) -> list[dict]:
    """The results by shape (data["shapes"]' order), pass and provider (as measured)."""
    order = {(s["path"], s["name"]): i for i, s in enumerate(data["shapes"])}
    names = list(dict.fromkeys(r["provider"] for r in data["results"]))
    return sorted(data["results"], key=lambda r: (order.get((r["path"], r["shape"]), 0), list(PASSES).index(
        r["pass_"]), names.index(r["provider"])))


def markdown(data: dict) -> str:
    """A summary (gvpo-auto's time and peak memory, then each other provider's over gvpo-auto's: "3.1x / 8.4x",
    its peak in MiB where gvpo-auto's is under 0.1 MiB), then every row with figures, floor and check error; the
    providers that ran nowhere in a path listed under it with their reason."""
    meta, rows = data["meta"], _ordered(data)
    v = meta["versions"]
    measured = ("ok", "out of memory", "failed", "mismatch")
    hidden = C.notes_and_skipped(rows, measured)
    rows = [r for r in rows if (r["path"], r["provider"]) not in hidden]
    others = [n for n in dict.fromkeys(r["provider"] for r in rows) if n != OURS]
    summary = []
    for key in dict.fromkeys((r["path"], r["shape"], r["pass_"]) for r in rows):
        mine = {r["provider"]: r for r in rows if (r["path"], r["shape"], r["pass_"]) == key}
        ours = mine.get(OURS, {})
        cells = [f"{C.fmt(ours.get('time_ms'))}, {C.fmt(ours.get('peak_mib'))}"]
        for r in (mine.get(n) for n in others):
            if r is None or r.get("x_ours_time") is None:
                cells.append(r["status"] if r else "")
            else:
                memory = (f"{C.fmt(r['x_ours_mem'], 2)}x" if r.get("x_ours_mem") is not None
                          else f"{C.fmt(r['peak_mib'])} MiB")
                cells.append(f"{C.fmt(r['x_ours_time'], 2)}x / {memory}")
        summary.append(list(key) + cells)
    lines = [f"{meta['device_name']} ({meta['device']}), {meta['date']}, {meta['dtype']}; torch {v['torch']}, "
             f"triton {v['triton']}, trl {v.get('trl')}, gvpo-kernels {v['gvpo-kernels']}"
             + (" (--quick)" if meta.get("quick") else "") + f"; {meta.get('wall_s', 0):.0f} s", ""]
    lines += C.md_table(["path", "shape", "pass", f"{OURS} ms, MiB"] + [f"{n}: × time / × memory" for n in others],
                        summary, 3) + [""]
    notes, table = [], []
    for r in rows:
        status = r["status"]
        if r.get("reason"):
            notes.append(f"{r['provider']} ({r['path']}, {r['shape']}, {r['pass_']}): {r['reason']}")
            status += f" [{len(notes)}]"
        errors = r.get("errors") or {}
        table.append([r["path"], r["shape"], r["pass_"], r["provider"] + (f" ({r['backend']})" if r.get("backend")
                                                                           else ""), status]
                     + [C.fmt(r.get(k), d) for k, d in (("time_ms", 3), ("x_ours_time", 2), ("peak_mib", 3),
                                                        ("x_ours_mem", 2), ("floor_ms", 3), ("x_floor", 2))]
                     + [C.fmt(max(errors.values()) if errors else None, 2)])
    lines += C.md_table(["path", "shape", "pass", "provider", "status", "ms", "× ours (time)", "peak MiB",
                         "× ours (memory)", "floor ms", "× floor", "rel. err"], table, 5)
    lines += C.footer(notes, hidden)
    lines += ["", "rel. err: the largest relative error (log-prob, entropy, gradients) on the check-sized copy, "
                  f"against {OURS} ({OURS} itself: against the float64 reference). × ours: this provider's time "
                  f"or peak memory over {OURS}'s in the same pass (above 1: {OURS} is faster / smaller). "
                  f"Floors (bench/README.md): {floors_line(meta['floors'])}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench stats", description=__doc__.split("\n\n")[0])
    C.add_run_args(parser, f"{C.RESULTS}/stats")
    parser.add_argument("--passes", default=",".join(PASSES), help="comma-separated: " + ", ".join(PASSES))
    args = parser.parse_args(argv)
    args = C.finish_run_args(parser, args, [p.name for p in for_bench("stats", ("linear", "logits"))])
    passes = args.passes.split(",")
    if set(passes) - set(PASSES):
        parser.error(f"--passes: expected some of {', '.join(PASSES)}")
    chosen = for_bench("stats", args.paths.split(","), args.only)
    run = C.Run(args, f"token statistics bench, {len({p.name for p in chosen})} providers x {len(passes)} passes",
                floor_reps=3 if args.quick else 7, versions=C.versions(*C.PEERS, "trl"),
                passes={p: PASSES[p] for p in passes}, chunk_bytes=CHUNK_BYTES,
                check={"seqs": C.CHECK_SEQS, "max_len": C.CHECK_LEN,
                       "tolerance": C.TOLERANCE[C.DTYPES[C.SETTINGS[args.device]["dtype"]]]},
                providers={p.name: p.note for p in chosen})
    device, timing = args.device, QUICK if args.quick else FULL

    def on_results(results):
        run.add(results, add_derived)
        for r in results:
            figures = (f"{r['time_ms']:.4g} ms, {r['peak_mib']:.4g} MiB, x{r['x_ours_time'] or 0:.3g} ours"
                       if r.get("time_ms") is not None else r.get("reason", ""))
            errors = r.get("errors") or {}
            print(f"[{run.elapsed():5.0f} s] {r['path']:6} {r['shape']:28} {r['pass_']:9} {r['provider']:15} "
                  f"{r['status']:8} check {max(errors.values()) if errors else float('nan'):.1e} vs "
                  f"{r.get('check_against', '')}: {figures}", flush=True)

    last = None
    for shape in sorted(run.shapes, key=lambda s: s["tokens"]):  # smallest first, both paths
        here = [p for p in chosen if p.path == shape["path"]]
        if run.out_of_budget():
            on_results([{"path": shape["path"], "shape": shape["name"], "provider": p.name, "pass_": name,
                         "status": "skipped", "reason": run.out_of_budget()} for p in here for name in passes])
            continue
        if last is not None and shape["path"] != last:  # the floors again, keeping the best
            measure_floors([shape], device, run.dtype, run.floors, reps=3)
        last = shape["path"]
        on_results(measure_shape(here, dict(shape=shape, dtype=run.cfg["dtype"], device=device, passes=passes,
                                            seed=0, warmup_ms=25, **timing)))
    run.finish(markdown(run.data))
    return 0


def run(argv=None) -> int:
    """The entry point: on the CPU first re-executed with MALLOC_ENV, so that a call's peak RSS growth is its own."""
    import os
    import sys

    argv = sys.argv[2:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if pre.parse_known_args(argv)[0].device == "cpu" and any(k not in os.environ for k in C.MALLOC_ENV):
        env = dict(os.environ, **C.MALLOC_ENV, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (C.ROOT, env.get("PYTHONPATH")) if p)
        os.execve(sys.executable, [sys.executable, "-m", "bench", "stats", *argv], env)
    return main(argv)
