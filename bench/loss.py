"""The GVPO loss, forward + backward, side by side with what users would pick instead (bench/providers.py), on the
same inputs in one run; bench/README.md says how to run it and what each column means.

Each provider is first checked on a check-sized copy of the shape against gvpo_kernels.reference (a provider of
cross-entropy against the reference's per-token log-probs; GRPO for finite gradients only), then warmed up, its
peak memory taken and its forward + backward timed, the time set against the floor measured in the same run. On
the CPU each provider runs in a fresh process of its own (its shapes one after the other); on CUDA all run in
this process. Writes DIR/<device>-<date>.json (after every measurement), .md and .png (bench/report.py).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

import gvpo_kernels as gk

from . import common as C
from . import report
from .floors import FLOOR_DEFINITION, floor_ms, measure_floors
from .providers import CE, GRPO, GVPO, Provider, for_bench

GRAD_NAMES = {"linear": ["d_hidden", "d_weight"], "logits": ["d_logits"]}


def _inputs(task: dict, num_seqs: int, seq_len: int, seed: int) -> C.Inputs:
    s = task["shape"]
    return C.make_inputs(task["path"], num_seqs, seq_len, s["vocab"], s.get("hidden", 0), C.DTYPES[task["dtype"]],
                         task["device"], task["group_size"], seed)


def loss_fn(provider: Provider, inp: C.Inputs, device: str):
    """() -> the scalar loss: the provider's own, or the GVPO math on its per-token log-probs."""
    if provider.kind == "loss":
        return provider.build(inp, device)
    tokens = provider.build(inp, device, False)
    return lambda: C.gvpo_from_token_logprobs(tokens()[0], inp.ref_logprobs, inp.rewards, inp.group_size)


def _loss_and_grads(fn, leaves):
    for leaf in leaves:
        leaf.grad = None
    loss = fn()
    loss.backward()
    return float(loss.detach()), [None if leaf.grad is None else leaf.grad.detach() for leaf in leaves]


def _reference(inp: C.Inputs, computes: str):
    """gvpo_kernels.reference's loss and gradients (float32 math) on copies of the inputs; for cross-entropy,
    minus the sum of its per-token log-probs."""
    leaves = [leaf.detach().clone().requires_grad_() for leaf in inp.leaves()]
    linear = inp.path == "linear"
    if computes == CE:
        tokens = gk.reference.linear_token_logprobs if linear else gk.reference.token_logprobs
        return _loss_and_grads(lambda: -tokens(*leaves, inp.labels).sum(), leaves)
    loss = gk.reference.linear_gvpo_loss if linear else gk.reference.gvpo_loss
    kw = dict(group_size=inp.group_size, ref_logprobs=inp.ref_logprobs, beta=C.BETA)
    return _loss_and_grads(lambda: loss(*leaves, inp.labels, inp.rewards, **kw), leaves)


def check(provider: Provider, task: dict) -> dict:
    """{"status": "ok" | "mismatch" | "different loss", "errors": {...}, "reason": str} on a check-sized copy."""
    inp = _inputs(task, task["check_seqs"], task["check_len"], seed=task["seed"] + 1)
    ref_loss, ref_grads = _reference(inp, GVPO if provider.computes == GRPO else provider.computes)  # first: an
    loss, grads = _loss_and_grads(loss_fn(provider, inp, task["device"]), inp.leaves())  # inplace one eats its input
    names = GRAD_NAMES[task["path"]]
    if provider.computes == GRPO:
        bad = [n for n, g, r in zip(names, grads, ref_grads) if g is None or g.shape != r.shape
               or not bool(torch.isfinite(g).all())]
        if bad or loss != loss:
            return {"status": "mismatch", "errors": {}, "reason": f"non-finite or missing gradients: {bad}"}
        return {"status": "different loss", "errors": {"loss_value": loss, "gvpo_reference_loss": ref_loss},
                "reason": "computes GRPO, not GVPO: timed for cost only"}
    errors = {"loss": abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)}
    errors.update({n: C.rel_err(g, r) for n, g, r in zip(names, grads, ref_grads)})
    out = C.verdict(errors, C.TOLERANCE[C.DTYPES[task["dtype"]]])
    if out["status"] == "ok" and provider.computes == CE:
        out.update(status="different loss", reason="computes cross-entropy, not GVPO (checked as such): timed "
                                                    "for cost only")
    return out


def measure(task: dict, provider: Provider | None = None) -> dict:
    """Check, warm up, then peak memory and time of one provider at one shape; never raises."""
    provider = provider or next(p for p in for_bench("loss", [task["path"]]) if p.name == task["provider"])
    device = task["device"]
    result = _row(task, "", "", provider)
    reason = provider.skip_reason(device, task.get("check_only", False))
    if reason:
        return dict(result, status="skipped", reason=reason)
    try:
        result.update(check(provider, task))
        if provider.ran:  # after the check's call: the backend that really ran it
            result["note"] += f"; ran {provider.ran(device)}"
    except Exception as exc:
        return dict(result, status="failed", reason=f"check: {C.first_line(exc)}",
                    traceback=traceback.format_exc(limit=4))
    if result["status"] == "mismatch" or task.get("check_only"):
        return result
    for attempt in (1, 2):
        try:
            return dict(result, **_measure_full(provider, task))
        except Exception as exc:
            if C.is_oom(exc):
                size = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else 0
                return dict(result, status="out of memory",
                            reason=f"does not fit in this GPU's {size:.0f} GiB" if size else "out of memory")
            if attempt == 2:
                return dict(result, status="failed", reason=C.first_line(exc), traceback=traceback.format_exc(limit=4))
            # Once more, from fresh inputs: a peer's torch.compile can fail once in a process when a new shape
            # makes a dimension dynamic (seen with Liger's compiled loss) and compile fine on the next call.
            result["retried_after"] = C.first_line(exc)
            C.release(device)


def _measure_full(provider: Provider, task: dict) -> dict:
    shape, device = task["shape"], task["device"]
    inp = _inputs(task, shape["num_seqs"], shape["seq_len"], seed=task["seed"])
    fn, leaves = loss_fn(provider, inp, device), inp.leaves()

    def run():
        for leaf in leaves:
            leaf.grad = None
        fn().backward()

    if provider.consumes_input:
        pristine = inp.logits.detach().clone()

        def restore():
            with torch.no_grad():
                inp.logits.copy_(pristine)

        def call():
            restore()
            run()
    else:
        restore, call = None, run
    for _ in range(max(1, task["warmup"])):
        call()
    C.sync(device)
    peak, first_ms = C.peak_memory_mib(call, device, leaves)
    out = {"peak_mib": peak}
    timing = C.time_ms(call, task, first=first_ms)
    if restore is not None:
        copy = C.time_ms(restore, task)
        out["subtracted_copy_ms"] = copy["median"]
        timing = {k: (v - copy["median"] if k != "reps" else v) for k, v in timing.items()}
    return dict(out, time_ms=timing["median"], time_p20_ms=timing["p20"], time_p80_ms=timing["p80"],
                reps=timing["reps"])


def _row(task: dict, status: str, reason: str, provider: Provider | None = None) -> dict:
    return {"path": task["path"], "shape": task["shape"]["name"], "provider": task["provider"],
            "computes": provider.computes if provider else "", "note": provider.note if provider else "",
            "status": status, "reason": reason}


def add_derived(rows: list[dict], shapes: dict, floors: dict, itemsize: int) -> None:
    """floor_ms, x_floor (time / floor) and x_eager (eager's time / this time, same path and shape)."""
    for row in rows:
        row["floor_ms"] = floor_ms(shapes[(row["path"], row["shape"])], floors, itemsize)
        if row.get("time_ms") is not None:
            row["x_floor"] = row["time_ms"] / row["floor_ms"]
            eager = next((r for r in rows if r["path"] == row["path"] and r["shape"] == row["shape"]
                          and r["provider"] == "eager" and r.get("time_ms")), None)
            row["x_eager"] = eager["time_ms"] / row["time_ms"] if eager else None


def _first(provider_name: str) -> bool:
    """Eager and this package's backends are measured first: a run stopped by its budget keeps them."""
    return provider_name == "eager" or provider_name.startswith("gvpo-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench loss", description=__doc__.split("\n\n")[0])
    C.add_run_args(parser, C.RESULTS)
    parser.add_argument("--in-process", action="store_true",
                        help="on the CPU too, every measurement in this process (only to test the CUDA flow: its "
                             "peak-RSS figures are then not per provider)")
    parser.add_argument("--check-only", action="store_true",
                        help="only the checks, at every head of the run, the GPU anchors too where their code runs "
                             "here; exit 1 on a mismatch or failure")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a fresh process's tasks, as JSON
    args = parser.parse_args(argv)
    if args.worker:
        for task in json.loads(args.worker):
            torch.manual_seed(task["seed"])
            C.emit(measure(task))
            C.release(task["device"])
        return 0
    args = C.finish_run_args(parser, args, [p.name for p in for_bench("loss", ("linear", "logits"))])
    device, cfg, quick = args.device, C.SETTINGS[args.device], args.quick
    providers = for_bench("loss", args.paths.split(","), args.only)

    def task_for(shape, provider):
        return dict(path=shape["path"], provider=provider.name, shape=shape, dtype=cfg["dtype"], device=device,
                    group_size=C.GROUP_SIZE, check_seqs=C.CHECK_SEQS, check_len=min(shape["seq_len"], C.CHECK_LEN),
                    seed=0, warmup=cfg.get("quick_warmup" if quick else "warmup", cfg["warmup"]),
                    reps=cfg.get("quick_reps" if quick else "reps"), min_reps=2 if quick else 3,
                    max_time_s=cfg.get("quick_max_time_s" if quick else "max_time_s"), warmup_ms=cfg.get("warmup_ms"),
                    rep_ms=cfg.get("quick_rep_ms" if quick else "rep_ms"), check_only=args.check_only)

    if args.check_only:
        return check_only(providers, C.shapes_for(device, args.pairs), task_for, device)
    run = C.Run(args, f"bench, {len(providers)} providers", group_size=C.GROUP_SIZE, versions=C.versions(*C.PEERS),
                check={"seqs": C.CHECK_SEQS, "max_len": C.CHECK_LEN, "tolerance": {cfg["dtype"]: C.TOLERANCE[
                    C.DTYPES[cfg["dtype"]]]}}, floor_definition=FLOOR_DEFINITION)

    def on_result(result):
        result["elapsed_s"] = round(run.elapsed(), 1)
        run.add([result], add_derived)
        _progress(result, run.elapsed())

    # Smallest token counts first, both paths: a run stopped by its budget still covers every provider and path.
    tasks = []
    for shape in sorted(run.shapes, key=lambda s: s["tokens"]):
        for provider in (p for p in providers if p.path == shape["path"]):
            reason = provider.skip_reason(device)
            if reason:
                on_result(dict(_row(task_for(shape, provider), "skipped", reason, provider)))
            else:
                tasks.append(task_for(shape, provider))
    fresh = device == "cpu" and not args.in_process
    if fresh:  # one fresh process per provider and path, its shapes in order; eager and ours first
        batches = {}
        for task in tasks:
            batches.setdefault((task["path"], task["provider"]), []).append(task)
        batches = sorted(batches.values(), key=lambda b: not _first(b[0]["provider"]))
    else:  # shape by shape, eager and ours first within each
        batches = [[t] for t in sorted(tasks, key=lambda t: (t["shape"]["tokens"], not _first(t["provider"])))]
    last_shapes = None
    for batch in batches:
        if run.out_of_budget():
            for task in batch:
                on_result(_row(task, "skipped", run.out_of_budget()))
            continue
        batch_shapes = [t["shape"] for t in batch]
        if batch_shapes != last_shapes:  # the floors again, keeping the best (floors.py)
            measure_floors(batch_shapes, device, run.dtype, run.floors, reps=3)
            last_shapes = batch_shapes
        if fresh:
            before = len(run.data["results"])
            why = C.run_fresh("loss", batch, len(batch),
                              cfg["quick_timeout_s" if quick else "timeout_s"] * len(batch), on_result)
            for task in batch[len(run.data["results"]) - before:] if why else []:
                on_result(_row(task, "failed", why))
        else:
            on_result(measure(batch[0], next(p for p in providers if (p.path, p.name) == (batch[0]["path"],
                                                                                         batch[0]["provider"]))))
            C.release(device)
    problem = report.plot(run.data, run.stem + ".png")
    run.finish(report.markdown(run.data), f" ({problem})" if problem else f", {run.stem}.png")
    return 0


def check_only(providers: list[Provider], shapes: list[dict], task_for, device: str) -> int:
    """Every provider's check at each head (H, V) of the run, nothing timed; 1 on a mismatch or failure."""
    rows, start = [], time.perf_counter()
    for shape in {(s["path"], s["hidden"], s["vocab"]): s for s in shapes}.values():
        for provider in (p for p in providers if p.path == shape["path"]):
            rows.append(measure(task_for(shape, provider), provider))
            _progress(rows[-1], time.perf_counter() - start)
    bad = [r for r in rows if r["status"] in ("mismatch", "failed")]
    print(f"{len(rows)} checks on {device}: {sum(r['status'] in report.MEASURED for r in rows)} passed, "
          f"{len(bad)} failed, {sum(r['status'] == 'skipped' for r in rows)} skipped")
    return 1 if bad else 0


def _progress(r: dict, elapsed: float) -> None:
    errors = [v for k, v in (r.get("errors") or {}).items() if k in ("loss", *GRAD_NAMES[r["path"]])]
    figures = f"check {max(errors):.2g}" if errors else ""
    if r.get("time_ms") is not None:
        figures += f", {r['time_ms']:.3g} ms, {r['peak_mib']:.4g} MiB, x{r.get('x_floor', 0):.3g} floor"
    print(f"[{elapsed:6.0f} s] {r['path']:6} {r['shape']:32} {r['provider']:20} {r['status']:14} {figures} "
          f"{r['reason'] if r['status'] not in report.MEASURED else ''}", flush=True)
