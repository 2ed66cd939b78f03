"""Token statistics side by side (issue 13): the anchor pass and a log-prob + entropy pass, this package against
what users run instead, on the same inputs in one run.

    python bench/stats.py [--device cpu|cuda] [--quick] [--out DIR] [--budget-s S] [--only NAME,...]
                          [--paths linear,logits] [--passes anchor,stats,stats+bwd] [--models NAME,...]
                          [--tokens N,...]
    python bench/stats.py --report bench/results/stats/<file>.json     # re-make its table

Shapes, dtype and token counts are bench/run.py's (CPU: the heads scaled down 8x, float32; CUDA: the real heads,
bfloat16); every token is scored, temperature 1. Three passes per shape and provider:

* ``anchor``: per-token log-probs under torch.no_grad() (the old / reference policy's pass of an RL step);
* ``stats``: per-token log-probs and entropy under torch.no_grad() (the same with the entropy metric);
* ``stats+bwd``: log-probs and entropy with gradients, then the backward of sum(a * logprob) + sum(b * entropy),
  a and b (B, T) float32 drawn once (a policy-gradient term and an entropy bonus, both gradients counted).

Providers (the linear path takes hidden (B, T, H) and the LM head (V, H); the logits path takes logits (B, T, V)):

* ``gvpo-auto``: gk.linear_token_logprobs / gk.token_logprobs, backend "auto" (the table names the backend
  that "auto" ran);
* ``chunked eager``: the logits a few rows at a time (at most CHUNK_BYTES of float32 logits per chunk; on the
  linear path hidden @ weight.T in the input dtype), float32 log_softmax, gather, entropy -(p * log p).sum(-1),
  the chunks concatenated (with gradients, autograd keeps every chunk's softmax for the backward);
* ``eager``: the same on the whole (N, V) logits at once;
* ``trl selective``: TRL's trl.trainer.utils.selective_log_softmax on the full logits, with entropy its
  selective_log_softmax_and_entropy (one pass: TRL's Triton kernel on CUDA, selective_log_softmax plus
  entropy_from_logits elsewhere) or, in a TRL without it, entropy_from_logits;
* ``trl fused head`` (linear path): trl.kernels.ChunkedLogProbFunction with GRPOTrainer's chunk size, the path
  by which TRL's GRPOTrainer computes its log-probs and entropy (no (N, V) logits either).

Before timing, each provider runs every pass on a check-sized copy of the shape (16 sequences of at most 32
tokens, the same H, V and dtype) next to gvpo-auto: the relative error ||x - ours|| / ||ours|| of the log-probs,
the entropy and (stats+bwd) each gradient must be within bench/measure.py's TOLERANCE for the dtype, else the
provider is reported as "mismatch" for that pass and not timed; gvpo-auto itself is checked against
gvpo_kernels.reference in float64. Time and peak memory come from bench/measure.py (time_ms: median of up to
``reps`` calls on the CPU, triton.testing.do_bench on CUDA; peak_memory_mib: peak RSS growth, or
torch.cuda.max_memory_allocated, above what was allocated before the call), the floor from bench/run.py's probes
(linear: 2 N H V flops without gradients, 6 N H V with; logits: N V elements read without, 2 N V moved with).

It writes DIR/<device>-<date>.json (rewritten after every shape) and DIR/<device>-<date>.md (the table). All
providers run in one process, shape by shape, smallest first. On the CPU it re-executes itself with
MALLOC_MMAP_THRESHOLD_ set, so that freed buffers go back to the system and the peak RSS growth of one call is
that call's own; and it times the providers of a pass in interleaved rounds (one call of each per round), so that
a busy spell of a shared machine slows all of them alike and the ratios between them hold.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(HERE), HERE) if p not in sys.path]

import torch  # noqa: E402

import gvpo_kernels as gk  # noqa: E402
import measure  # noqa: E402
import providers as P  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402

OURS = "gvpo-auto"
PASSES = {"anchor": dict(entropy=False, grad=False), "stats": dict(entropy=True, grad=False),
          "stats+bwd": dict(entropy=True, grad=True)}
CHUNK_BYTES = 64 << 20  # chunked eager: float32 logits per chunk (as the trainer's anchor pass had them)
# Timing per device mode. warmup: calls at the full shape before the measured ones (CUDA: always one, for the
# compilation and autotuning at that shape; on the CPU --quick has none: the check has run every code path).
QUICK = dict(reps=5, min_reps=2, max_time_s=4, rep_ms=100, warmup=0)
FULL = dict(reps=7, min_reps=3, max_time_s=10, rep_ms=200, warmup=1)


# -- providers -----------------------------------------------------------------------------------------------------

@dataclass
class Provider:
    """build(inp, entropy, chunk_rows) -> a closure () -> (logprob, entropy or None), each (B, T) float32
    (chunk_rows: the rows of logits per chunk, for the chunked provider)."""

    name: str
    paths: tuple[str, ...]
    build: Callable
    note: str


def _logits(inp: P.Inputs) -> torch.Tensor:
    """The (N, V) logits in the input dtype (built here on the linear path)."""
    if inp.path == "linear":
        return inp.hidden.flatten(0, 1) @ inp.weight.T
    return inp.logits.flatten(0, 1)


def _softmax_stats(z: torch.Tensor, labels: torch.Tensor, entropy: bool):
    """z (n, V) float32, labels (n,) -> logprob (n,) and the entropy (n,) or None, as a user writes them."""
    logp = torch.log_softmax(z, dim=-1)
    token = logp.gather(-1, labels[:, None]).squeeze(-1)
    return token, (-(logp.exp() * logp).sum(-1) if entropy else None)


def _shaped(inp: P.Inputs, logprob, entropy):
    shape = inp.labels.shape
    return logprob.float().reshape(shape), None if entropy is None else entropy.float().reshape(shape)


def _ours(inp, entropy, chunk_rows=None):
    if inp.path == "linear":
        return lambda: _pair(gk.linear_token_logprobs(inp.hidden, inp.weight, inp.labels, return_entropy=entropy))
    return lambda: _pair(gk.token_logprobs(inp.logits, inp.labels, return_entropy=entropy))


def _pair(out):
    return out if isinstance(out, tuple) else (out, None)


def _eager(inp, entropy, chunk_rows=None):
    labels = inp.labels.reshape(-1)
    return lambda: _shaped(inp, *_softmax_stats(_logits(inp).float(), labels, entropy))


def _chunked(inp, entropy, chunk_rows):
    labels = inp.labels.reshape(-1).split(chunk_rows)
    # split, not slicing: its backward puts the chunks' gradients together once (a slice's makes a full-size one)
    source = (inp.hidden if inp.path == "linear" else inp.logits).flatten(0, 1).split(chunk_rows)

    def run_chunks():
        parts = [_softmax_stats((x @ inp.weight.T if inp.path == "linear" else x).float(), y, entropy)
                 for x, y in zip(source, labels)]
        return _shaped(inp, torch.cat([p[0] for p in parts]),
                       torch.cat([p[1] for p in parts]) if entropy else None)

    return run_chunks


def _trl_selective(inp, entropy, chunk_rows=None):
    from trl.trainer import utils

    both = getattr(utils, "selective_log_softmax_and_entropy", None)
    shape = (*inp.labels.shape, _vocab(inp))

    def run_trl():
        logits = _logits(inp).view(shape)
        if not entropy:
            return _shaped(inp, utils.selective_log_softmax(logits, inp.labels), None)
        if both is not None:
            return _shaped(inp, *both(logits, inp.labels))
        return _shaped(inp, utils.selective_log_softmax(logits, inp.labels), utils.entropy_from_logits(logits))

    return run_trl


def _trl_fused_head(inp, entropy, chunk_rows=None):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk  # GRPOTrainer's

    outputs = ("entropy",) if entropy else ()
    hidden, labels = inp.hidden.flatten(0, 1), inp.labels.reshape(-1)

    def run_trl():
        logprob, ent, *_ = ChunkedLogProbFunction.apply(hidden, inp.weight, None, labels, 1.0, chunk, None, 1.0,
                                                        outputs)
        return _shaped(inp, logprob, ent)

    return run_trl


def _vocab(inp: P.Inputs) -> int:
    return inp.weight.shape[0] if inp.path == "linear" else inp.logits.shape[-1]


PROVIDERS = [
    Provider(OURS, ("linear", "logits"), _ours, "gk.linear_token_logprobs / gk.token_logprobs, backend 'auto'"),
    Provider("chunked eager", ("linear", "logits"), _chunked,
             f"{CHUNK_BYTES >> 20} MiB of float32 logits per chunk, log_softmax, gather, -(p log p).sum"),
    Provider("eager", ("linear", "logits"), _eager, "the whole (N, V) logits, float32 log_softmax, gather, "
             "-(p log p).sum"),
    Provider("trl selective", ("linear", "logits"), _trl_selective,
             "trl.trainer.utils.selective_log_softmax(_and_entropy) on the full logits"),
    Provider("trl fused head", ("linear",), _trl_fused_head,
             "trl.kernels.ChunkedLogProbFunction (GRPOTrainer's fused LM head)"),
]


@functools.lru_cache(maxsize=None)
def auto_backend(device: str, path: str, entropy: bool) -> str:
    """The backend that "auto" runs for these statistics: the device's native one ("cpu": the C++ extension,
    "triton" on CUDA) if a tiny call with it by name works, else "torch" (the public contract: a named backend
    that cannot run, or has no such kernel, raises RuntimeError, and "auto" then falls back to torch)."""
    native = "triton" if device == "cuda" else "cpu"
    labels = torch.zeros(1, 4, dtype=torch.long, device=device)
    try:
        if path == "linear":
            gk.linear_token_logprobs(torch.randn(1, 4, 8, device=device), torch.randn(16, 8, device=device), labels,
                                     return_entropy=entropy, backend=native)
        else:
            gk.token_logprobs(torch.randn(1, 4, 16, device=device), labels, return_entropy=entropy, backend=native)
        return native
    except RuntimeError:
        return "torch"
    except Exception as exc:  # not the contract's refusal: say so rather than guess
        return f"unknown ({type(exc).__name__})"


# -- one provider at one shape ---------------------------------------------------------------------------------------

def _make(task: dict, num_seqs: int, seq_len: int, seed: int):
    """The shape's Inputs and the backward's per-token weights a, b ((B, T) float32)."""
    shape, device = task["shape"], task["device"]
    inp = P.make_inputs(shape["path"], num_seqs, seq_len, shape["vocab"], shape.get("hidden", 0),
                        measure.DTYPES[task["dtype"]], device, run.GROUP_SIZE, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed + 7)
    a, b = (torch.randn(num_seqs, seq_len, device=device, generator=gen) for _ in range(2))
    return inp, a, b


def _outputs(fn, inp: P.Inputs, a, b, grad: bool) -> list[torch.Tensor | None]:
    """[logprob, entropy] of one call of fn, and with ``grad`` the leaves' gradients of the backward."""
    for leaf in inp.leaves():
        leaf.grad = None
    with torch.set_grad_enabled(grad):
        logprob, entropy = fn()
    if not grad:
        return [logprob, entropy]
    ((a * logprob).sum() + (b * entropy).sum()).backward()
    return [logprob.detach(), entropy.detach()] + [leaf.grad for leaf in inp.leaves()]


def _reference(inp: P.Inputs, a, b) -> list[torch.Tensor]:
    """gvpo_kernels.reference in float64 on copies of the inputs: [logprob, entropy, *gradients]."""
    leaves = [leaf.detach().double().requires_grad_() for leaf in inp.leaves()]
    if inp.path == "linear":
        lp, ent = gk.reference.linear_token_logprobs(leaves[0], leaves[1], inp.labels, return_entropy=True)
    else:
        lp, ent = gk.reference.token_logprobs(leaves[0], inp.labels, return_entropy=True)
    ((a * lp).sum() + (b * ent).sum()).backward()
    return [lp.detach(), ent.detach()] + [leaf.grad for leaf in leaves]


NAMES = {"linear": ["logprob", "entropy", "d_hidden", "d_weight"], "logits": ["logprob", "entropy", "d_logits"]}


def check(provider: Provider, task: dict) -> dict:
    """{pass: {"status": "ok" | "mismatch", "errors": {name: relative error}, "reason": str}} on a check-sized
    copy of the shape, against gvpo-auto (gvpo-auto against the float64 reference)."""
    inp, a, b = _make(task, run.CHECK_SEQS, min(task["shape"]["seq_len"], run.CHECK_LEN), seed=task["seed"] + 1)
    target = _reference(inp, a, b) if provider.name == OURS else None
    tol = measure.TOLERANCE[measure.DTYPES[task["dtype"]]]
    out = {}
    for name in task["passes"]:
        mode = PASSES[name]
        got = _outputs(provider.build(inp, mode["entropy"], task["chunk_rows"]), inp, a, b, mode["grad"])
        want = target or _outputs(_ours(inp, mode["entropy"]), inp, a, b, mode["grad"])
        expected = NAMES[inp.path][:2 if mode["entropy"] else 1] + (NAMES[inp.path][2:] if mode["grad"] else [])
        errors = {n: _rel(got[i], want[i]) for i, n in enumerate(NAMES[inp.path]) if n in expected}
        worst = max(errors, key=errors.get)
        bad = errors[worst] > tol or errors[worst] != errors[worst]
        out[name] = {"status": "mismatch" if bad else "ok", "errors": errors,
                     "reason": f"{worst} off by {errors[worst]:.2e} (> {tol:g}): not timed" if bad else ""}
    return out


def _rel(got, want) -> float:
    if got is None or got.shape != want.shape:
        return float("inf")
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def measure_shape(chosen: list[Provider], task: dict) -> list[dict]:
    """Every pass of these providers at one shape: each checked, then per pass each one's warm-up call and peak
    memory, then their times (CPU: interleaved rounds, see _interleaved_ms; CUDA: do_bench one after the other).
    Never raises."""
    shape, device = task["shape"], task["device"]
    rows, checks = {}, {}
    for provider in chosen:
        base = {"path": shape["path"], "shape": shape["name"], "provider": provider.name, "note": provider.note,
                "check_against": "float64 reference" if provider.name == OURS else OURS}
        try:
            checks[provider.name] = check(provider, task)
        except ImportError as exc:
            checks[provider.name] = {p: {"status": "skipped", "reason": f"not installed here: {exc}"}
                                     for p in task["passes"]}
        except Exception as exc:
            checks[provider.name] = {p: {"status": "failed", "traceback": traceback.format_exc(limit=4),
                                         "reason": f"check: {type(exc).__name__}: {_first_line(exc)}"}
                                     for p in task["passes"]}
        for name in task["passes"]:
            rows[provider.name, name] = dict(base, pass_=name, **checks[provider.name][name])
            if provider.name == OURS:
                rows[provider.name, name]["backend"] = auto_backend(device, shape["path"], PASSES[name]["entropy"])
    inp, a, b = _make(task, shape["num_seqs"], shape["seq_len"], seed=task["seed"])
    for name in task["passes"]:
        calls, firsts = {}, {}
        for provider in chosen:
            row = rows[provider.name, name]
            if row["status"] != "ok":
                continue
            try:
                calls[provider.name] = _call(provider.build(inp, PASSES[name]["entropy"], task["chunk_rows"]),
                                             inp, a, b, PASSES[name]["grad"])
                for _ in range(max(task["warmup"], device == "cuda")):  # compilation, autotuning
                    calls[provider.name]()
                _sync(device)
                row["peak_mib"], firsts[provider.name] = measure.peak_memory_mib(calls[provider.name], device,
                                                                                 inp.leaves())
            except Exception as exc:
                calls.pop(provider.name, None)
                oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
                row.update(status="out of memory" if oom else "failed", reason=_first_line(exc))
            _release(device)
        if device == "cuda":
            timings = {n: measure.time_ms(call, task) for n, call in calls.items()}
        else:
            timings = _interleaved_ms(calls, task, firsts)
        for n, timing in timings.items():
            rows[n, name].update(time_ms=timing["median"], time_p20_ms=timing["p20"], time_p80_ms=timing["p80"],
                                 reps=timing["reps"])
        _release(device)
    return list(rows.values())


def _call(fn, inp, a, b, grad):
    return lambda: _outputs(fn, inp, a, b, grad)


def _interleaved_ms(calls: dict, task: dict, firsts: dict) -> dict:
    """CPU times of each call in rounds, one call of each provider per round, so that a busy spell of this
    shared machine slows them all alike: per provider, bench/measure.py's time_ms statistics (median, p20, p80)
    of its call in each round, the memory measurement's call (``firsts``) the first; a provider takes no more
    rounds once it has ``reps`` timings, or ``min_reps`` and more than ``max_time_s`` of them."""
    times = {n: [firsts[n]] for n in calls}
    while True:
        active = [n for n, t in times.items() if len(t) < task["reps"]
                  and (len(t) < task["min_reps"] or sum(t) < 1e3 * task["max_time_s"])]
        if not active:
            break
        for n in active:
            t0 = time.perf_counter()
            calls[n]()
            times[n].append(1e3 * (time.perf_counter() - t0))
    return {n: _summary(t) for n, t in times.items()}


def _summary(times: list[float]) -> dict:
    """The figures of bench/measure.py's time_ms from a list of timings in ms."""
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"median": statistics.median(times), "p20": q[0], "p80": q[3], "reps": len(times)}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _release(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else ""


def _placeholder(task: dict, provider: str, pass_name: str, status: str, reason: str) -> dict:
    return {"path": task["shape"]["path"], "shape": task["shape"]["name"], "provider": provider,
            "pass_": pass_name, "status": status, "reason": reason}


# -- the run -----------------------------------------------------------------------------------------------------

def floor_ms(shape: dict, floors: dict, itemsize: int, grad: bool) -> float:
    """bench/run.py's floor (6 N H V flops / 2 N V elements), a third (2 N H V) / half (N V read) without
    gradients."""
    full = run.floor_ms(shape, floors, itemsize)
    return full if grad else full / (3 if shape["path"] == "linear" else 2)


def add_derived(rows: list[dict], shapes: dict, floors: dict, itemsize: int) -> None:
    """floor_ms, x_floor, and x_ours_time / x_ours_mem (this provider's time / peak over gvpo-auto's, same
    path, shape and pass: above 1, gvpo-auto is faster / smaller)."""
    ours = {(r["path"], r["shape"], r["pass_"]): r for r in rows if r["provider"] == OURS}
    for row in rows:
        grad = PASSES[row["pass_"]]["grad"]
        row["floor_ms"] = floor_ms(shapes[(row["path"], row["shape"])], floors, itemsize, grad)
        if row.get("time_ms") is None:
            continue
        row["x_floor"] = row["time_ms"] / row["floor_ms"]
        mine = ours.get((row["path"], row["shape"], row["pass_"]), {})
        row["x_ours_time"] = row["time_ms"] / mine["time_ms"] if mine.get("time_ms") else None
        row["x_ours_mem"] = row["peak_mib"] / mine["peak_mib"] if (mine.get("peak_mib") or 0) > 0.1 else None


def _ordered(data: dict) -> list[dict]:
    """The results by shape (data["shapes"]' order), pass and provider (PROVIDERS' order)."""
    order = {(s["path"], s["name"]): i for i, s in enumerate(data["shapes"])}
    names = [p.name for p in PROVIDERS]
    return sorted(data["results"], key=lambda r: (order.get((r["path"], r["shape"]), 0), list(PASSES).index(
        r["pass_"]), names.index(r["provider"]) if r["provider"] in names else len(names)))


def summary(data: dict) -> list[str]:
    """One line per shape and pass: gvpo-auto's time and peak memory, then each other provider's time and peak
    memory over gvpo-auto's ("3.1x / 8.4x"; its peak in MiB where gvpo-auto's is under 0.1 MiB), or its status."""
    rows = _ordered(data)
    others = [p.name for p in PROVIDERS if p.name != OURS and any(r["provider"] == p.name for r in rows)]
    lines = [f"| path | shape | pass | {OURS} ms, MiB | " + " | ".join(f"{n}: × time / × memory" for n in others)
             + " |", "|---|---|---|---:|" + "---:|" * len(others)]
    for key in dict.fromkeys((r["path"], r["shape"], r["pass_"]) for r in rows):
        mine = {r["provider"]: r for r in rows if (r["path"], r["shape"], r["pass_"]) == key}
        ours = mine.get(OURS, {})
        cells = [f"{report._fmt(ours.get('time_ms'))}, {report._fmt(ours.get('peak_mib'))}"]
        for name in others:
            r = mine.get(name)
            if r is None:
                cells.append("")
            elif r.get("x_ours_time") is None:
                cells.append(r["status"])
            else:
                memory = (f"{report._fmt(r['x_ours_mem'], 2)}x" if r.get("x_ours_mem") is not None
                          else f"{report._fmt(r['peak_mib'])} MiB")
                cells.append(f"{report._fmt(r['x_ours_time'], 2)}x / {memory}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return lines


def markdown(data: dict) -> str:
    """The summary (see summary), then every row with its figures, floor and check error."""
    meta = data["meta"]
    versions = meta["versions"]
    lines = [f"{meta['device_name']} ({meta['device']}), {meta['date']}, {meta['dtype']}; torch {versions['torch']}, "
             f"triton {versions['triton']}, trl {versions.get('trl')}, gvpo-kernels {versions['gvpo-kernels']}"
             + (" (--quick)" if meta.get("quick") else "") + f"; {meta.get('wall_s', 0):.0f} s", ""]
    lines += summary(data) + ["", "| path | shape | pass | provider | status | ms | × ours (time) | peak MiB | "
                                  "× ours (memory) | floor ms | × floor | rel. err |",
                              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = _ordered(data)
    notes = []
    for r in rows:
        status = r["status"]
        if r.get("reason"):
            notes.append(f"{r['provider']} ({r['path']}, {r['shape']}, {r['pass_']}): {r['reason']}")
            status += f" [{len(notes)}]"
        provider = r["provider"] + (f" ({r['backend']})" if r.get("backend") else "")
        errors = r.get("errors") or {}
        lines.append(f"| {r['path']} | {r['shape']} | {r['pass_']} | {provider} | {status} | "
                     f"{report._fmt(r.get('time_ms'))} | {report._fmt(r.get('x_ours_time'), 2)} | "
                     f"{report._fmt(r.get('peak_mib'))} | {report._fmt(r.get('x_ours_mem'), 2)} | "
                     f"{report._fmt(r.get('floor_ms'))} | {report._fmt(r.get('x_floor'), 2)} | "
                     f"{report._fmt(max(errors.values()) if errors else None, 2)} |")
    lines += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)] if notes else []
    lines += ["", "rel. err: the largest relative error (log-prob, entropy, gradients) on the check-sized copy, "
                  f"against {OURS} ({OURS} itself: against the float64 reference). × ours: this provider's time "
                  f"or peak memory over {OURS}'s in the same pass (above 1: {OURS} is faster / smaller). "
                  f"Floors (bench/README.md): {report.floors_line(meta['floors'])}."]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="bench/run.py's quick shapes, fewer repeats")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "stats"), help="folder for the JSON and table")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new shape after this many seconds (the rest is reported as skipped)")
    parser.add_argument("--only", default=None,
                        help="comma-separated providers: " + ", ".join(p.name for p in PROVIDERS))
    parser.add_argument("--paths", default="linear,logits")
    parser.add_argument("--passes", default=",".join(PASSES))
    parser.add_argument("--models", default=None, help="as in bench/run.py")
    parser.add_argument("--tokens", default=None, help="as in bench/run.py")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="only re-make the table (.md beside it) from this JSON, e.g. of a run that was stopped")
    args = parser.parse_args(argv)
    args.models = args.models.split(",") if args.models else None
    args.tokens = [int(n) for n in args.tokens.split(",")] if args.tokens else None
    for option, given, known in (("--only", args.only, [p.name for p in PROVIDERS]), ("--passes", args.passes, PASSES),
                                 ("--paths", args.paths, ("linear", "logits"))):
        unknown = sorted(set(given.split(",")) - set(known)) if given else []
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            table = markdown(json.load(f))
        with open(args.report.removesuffix(".json") + ".md", "w") as f:
            f.write(table)
        print(table)
        return 0
    if args.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # freed buffers back to the system
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None
                                                                              else argv)], env)
    start = time.perf_counter()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch", file=sys.stderr)
        return 2
    cfg = run.SETTINGS[device]
    dtype = getattr(torch, cfg["dtype"])
    paths = args.paths.split(",")
    shapes = [s for s in run.shapes_for(device, args.quick, args.models, args.tokens) if s["path"] in paths]
    only = set(args.only.split(",")) if args.only else None
    chosen = [p for p in PROVIDERS if only is None or p.name in only]
    passes = args.passes.split(",")
    date = datetime.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{device}-{date}")
    print(f"gvpo-kernels token statistics bench: {run.device_name(device)}, {cfg['dtype']}, {len(shapes)} shapes x "
          f"{len(chosen)} providers x {len(passes)} passes{' (quick)' if args.quick else ''}", flush=True)
    floors = run.measure_floors(shapes, device, dtype, reps=3 if args.quick else 7)
    print(f"floors: {report.floors_line(floors)}", flush=True)
    meta = {"date": date, "device": device, "device_name": run.device_name(device), "dtype": cfg["dtype"],
            "quick": args.quick, "versions": dict(run.versions(), trl=P.package_version("trl")),
            "floors": floors, "passes": {p: PASSES[p] for p in passes}, "chunk_bytes": CHUNK_BYTES,
            "check": {"seqs": run.CHECK_SEQS, "max_len": run.CHECK_LEN,
                      "tolerance": measure.TOLERANCE[dtype]}, "providers": {p.name: p.note for p in chosen}}
    data = {"meta": meta, "shapes": shapes, "results": []}
    by_key = {(s["path"], s["name"]): s for s in shapes}
    timing = QUICK if args.quick else FULL

    def task_for(shape):  # the chunked provider keeps the real head's rows per chunk on the scaled-down CPU heads
        rows = max(1, CHUNK_BYTES // (4 * shape["vocab"] * cfg["scale"]))
        return dict(shape=shape, dtype=cfg["dtype"], device=device, passes=passes, seed=0, chunk_rows=rows,
                    warmup_ms=25, **timing)

    def on_results(results):
        data["results"] += results
        add_derived(data["results"], by_key, floors, dtype.itemsize)
        data["meta"]["wall_s"] = time.perf_counter() - start
        for r in results:
            figures = (f"{r['time_ms']:.4g} ms, {r['peak_mib']:.4g} MiB, x{r['x_ours_time'] or 0:.3g} ours"
                       if r.get("time_ms") is not None else r.get("reason", ""))
            errors = r.get("errors") or {}
            print(f"[{time.perf_counter() - start:5.0f} s] {r['path']:6} {r['shape']:28} {r['pass_']:9} "
                  f"{r['provider']:15} {r['status']:8} check {max(errors.values()) if errors else float('nan'):.1e}"
                  f" vs {r.get('check_against', '')}: {figures}", flush=True)
        run._write_json(stem + ".json", data)

    last = None
    for shape in sorted(shapes, key=lambda s: s["tokens"]):  # smallest first, both paths
        here = [p for p in chosen if shape["path"] in p.paths]
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            on_results([_placeholder(task_for(shape), p.name, name, "skipped",
                                     f"time budget (--budget-s {args.budget_s:.0f}) ran out")
                        for p in here for name in passes])
            continue
        if last is not None and shape["path"] != last:  # the floors again, keeping the best (as bench/run.py)
            run.measure_floors([shape], device, dtype, floors, reps=3)
        last = shape["path"]
        on_results(measure_shape(here, task_for(shape)))
    table = markdown(data)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print("\n" + table + f"\nwrote {stem}.json, {stem}.md in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
