"""Measure one provider at one shape: check it against the reference, then time it and take its peak memory.

On the CPU, bench/run.py runs this file once per provider, in a fresh process, so that one provider (its
allocator's and compiler's leftovers) cannot touch another's figures; that process measures the provider's shapes
one after the other, smallest first:

    python bench/measure.py '<list of tasks as JSON>'      # prints one line per task: RESULT <result as JSON>

On CUDA, bench/run.py calls :func:`measure` in its own process (peak memory then comes from
torch.cuda.max_memory_allocated, which resets per measurement).

The steps, for one task:

1. Check. On a check-sized copy of the shape (the same H, V and dtype, ``check_seqs`` x ``check_len`` tokens),
   compute the loss and every gradient with the provider and with ``gvpo_kernels.reference`` (float32 math) and
   compare: |loss - ref| / |ref| and ||grad - ref|| / ||ref|| per gradient must be within TOLERANCE for the
   dtype, else the provider is reported as "mismatch" and not timed. A provider that computes another loss
   (Liger's GRPO) is only checked for finite gradients of the right shapes, and reported as "different loss".
2. Warm up (compilation, autotuning, allocator growth) on the full shape.
3. Peak memory of one forward+backward above the inputs, gradients set to None first (so the fresh gradients
   count, as they would in training). CPU: growth of the process's peak RSS (VmHWM, reset through
   /proc/self/clear_refs) over its RSS before the call; bench/run.py sets MALLOC_MMAP_THRESHOLD_ so that freed
   buffers go back to the system and cannot hide growth. CUDA: max_memory_allocated minus memory_allocated.
4. Time forward+backward. CPU: median of ``reps`` calls of time.perf_counter, the memory measurement's call
   the first of them (fewer if they pass ``max_time_s``, at least ``min_reps``). CUDA: triton.testing.do_bench, median
   (and 20th/80th percentiles).
   A provider that consumes its input (inplace_backward) is given a fresh copy of the logits before each call;
   the copy, timed alone the same way, is subtracted.
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script: make the repository and bench/ importable
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [p for p in (os.path.dirname(_here), _here) if p not in sys.path]

import torch  # noqa: E402

import gvpo_kernels as gk  # noqa: E402
import providers as P  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Largest accepted relative error against the float32 reference, per input dtype. float32: rounding plus TF32
# (Triton's default for a float32 tl.dot on the GPU, about 3e-4). bfloat16: logits rounded to 8 bits of mantissa
# by whichever matmul produced them shift each token's log-prob by ~1e-2 and the gradients by about as much;
# a real bug (a wrong group, a forgotten term) is off by O(1).
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def _make(task: dict, num_seqs: int, seq_len: int, seed: int) -> P.Inputs:
    shape = task["shape"]
    return P.make_inputs(task["path"], num_seqs, seq_len, shape["vocab"], shape.get("hidden", 0),
                         DTYPES[task["dtype"]], task["device"], task["group_size"], seed=seed)


def _loss_and_grads(fn, inp: P.Inputs):
    """Run fn() once with fresh gradients: (loss as a float, [gradient of each leaf])."""
    for leaf in inp.leaves():
        leaf.grad = None
    loss = fn()
    loss.backward()
    return float(loss.detach()), [None if leaf.grad is None else leaf.grad.detach() for leaf in inp.leaves()]


def _reference(inp: P.Inputs):
    """The oracle's loss and gradients on clones of the same inputs."""
    leaves = [leaf.detach().clone().requires_grad_() for leaf in inp.leaves()]
    kwargs = dict(group_size=inp.group_size, ref_logprobs=inp.ref_logprobs, beta=P.BETA)
    if inp.path == "linear":
        loss = gk.reference.linear_gvpo_loss(leaves[0], leaves[1], inp.labels, inp.rewards, **kwargs)
    else:
        loss = gk.reference.gvpo_loss(leaves[0], inp.labels, inp.rewards, **kwargs)
    loss.backward()
    return float(loss.detach()), [leaf.grad.detach() for leaf in leaves]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


GRAD_NAMES = {"linear": ["d_hidden", "d_weight"], "logits": ["d_logits"]}


def check(provider: P.Provider, task: dict) -> dict:
    """Step 1: {"status": "ok" | "mismatch" | "different loss", "errors": {...}, "reason": str}."""
    inp = _make(task, task["check_seqs"], task["check_len"], seed=task["seed"] + 1)
    ref_loss, ref_grads = _reference(inp)
    loss, grads = _loss_and_grads(provider.build(inp, task["device"]), inp)
    names = GRAD_NAMES[task["path"]]
    bad = [n for n, g, r in zip(names, grads, ref_grads)
           if g is None or g.shape != r.shape or not bool(torch.isfinite(g).all())]
    if provider.computes != P.GVPO:
        if bad or loss != loss:
            return {"status": "mismatch", "errors": {}, "reason": f"non-finite or missing gradients: {bad}"}
        return {"status": "different loss", "errors": {"loss_value": loss, "gvpo_reference_loss": ref_loss},
                "reason": f"computes {provider.computes.upper()}, not GVPO: timed for cost only"}
    errors = {"loss": abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)}
    errors.update({n: (float("inf") if n in bad else _rel(g, r)) for n, g, r in zip(names, grads, ref_grads)})
    tol = TOLERANCE[DTYPES[task["dtype"]]]
    worst = max(errors, key=errors.get)
    if errors[worst] > tol or errors[worst] != errors[worst]:
        return {"status": "mismatch", "errors": errors,
                "reason": f"{worst} off the reference by {errors[worst]:.2e} (> {tol:g}): not timed"}
    return {"status": "ok", "errors": errors, "reason": ""}


# -- memory ----------------------------------------------------------------------------------------------------

def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) / 1024


def peak_memory_mib(call, device: str, leaves: list[torch.Tensor]) -> tuple[float, float]:
    """Step 3: the peak memory of one call() above what was allocated before it, in MiB, with the leaves'
    gradients released before the baseline is read (so the fresh gradients count); and the call's time in ms
    (on the CPU it counts as the first timed repeat)."""
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0)
        return (torch.cuda.max_memory_allocated() - before) / 2**20, ms
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    before = _proc_status_mib("VmRSS")
    t0 = time.perf_counter()
    call()
    ms = 1e3 * (time.perf_counter() - t0)
    return _proc_status_mib("VmHWM") - before, ms


# -- time ------------------------------------------------------------------------------------------------------

def time_ms(call, task: dict, first: float | None = None) -> dict:
    """Step 4: {"median": ms, "p20": ms, "p80": ms, "reps": n} for call(); on the CPU ``first`` (the time of a
    call already made, the memory measurement's) counts as the first repeat."""
    if task["device"] == "cuda":
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(call, warmup=task["warmup_ms"], rep=task["rep_ms"], quantiles=[0.2, 0.5, 0.8])
        return {"median": p50, "p20": p20, "p80": p80, "reps": None}
    times = [] if first is None else [first]
    start = time.perf_counter()
    least = task.get("min_reps", 3)
    while len(times) < task["reps"] and (len(times) < least or time.perf_counter() - start < task["max_time_s"]):
        t0 = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"median": statistics.median(times), "p20": q[0], "p80": q[3], "reps": len(times)}


# -- one task --------------------------------------------------------------------------------------------------

def _find(task: dict) -> P.Provider:
    for provider in P.all_providers():
        if provider.name == task["provider"] and provider.path == task["path"]:
            return provider
    raise KeyError(f"no provider {task['provider']!r} on the {task['path']} path")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(task: dict) -> dict:
    """Check, warm up, measure memory and time for one provider at one shape; never raises."""
    provider = _find(task)
    result = {"path": task["path"], "shape": task["shape"]["name"], "provider": provider.name,
              "computes": provider.computes, "note": provider.note, "status": "", "reason": ""}
    reason = provider.unavailable(task["device"])
    if reason:
        return dict(result, status="skipped", reason=reason)
    try:
        result.update(check(provider, task))
    except RuntimeError as exc:
        if "cannot run" in str(exc):  # gvpo_kernels: a backend asked for by name that cannot run says why
            return dict(result, status="skipped", reason=str(exc))
        return dict(result, status="failed", reason=f"check: {type(exc).__name__}: {_first_line(exc)}")
    except Exception as exc:
        return dict(result, status="failed", reason=f"check: {type(exc).__name__}: {_first_line(exc)}",
                    traceback=traceback.format_exc(limit=4))
    if result["status"] == "mismatch":
        return result
    for attempt in (1, 2):
        try:
            result.update(_measure_full(provider, task))
            return result
        except Exception as exc:
            if _is_oom(exc):
                return dict(result, status="out of memory", reason=_oom_reason(task))
            error = f"{type(exc).__name__}: {_first_line(exc)}"
            if attempt == 2:
                return dict(result, status="failed", reason=error, traceback=traceback.format_exc(limit=4))
            # Once more, from fresh inputs: a peer's torch.compile can fail once in a process when a new shape
            # makes a dimension dynamic (seen with Liger's compiled loss: "sources must not be empty for symbol")
            # and compile fine on the next call.
            result["retried_after"] = error
            gc.collect()
            if task["device"] == "cuda":
                torch.cuda.empty_cache()


def _measure_full(provider: P.Provider, task: dict) -> dict:
    shape = task["shape"]
    inp = _make(task, shape["num_seqs"], shape["seq_len"], seed=task["seed"])
    fn = provider.build(inp, task["device"])
    leaves = inp.leaves()

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
    _sync(task)
    peak, first_ms = peak_memory_mib(call, task["device"], leaves)
    out = {"peak_mib": peak}
    timing = time_ms(call, task, first=first_ms)
    if restore is not None:
        copy = time_ms(restore, task)
        out["subtracted_copy_ms"] = copy["median"]
        timing = {k: (v - copy["median"] if k != "reps" else v) for k, v in timing.items()}
    out.update(time_ms=timing["median"], time_p20_ms=timing["p20"], time_p80_ms=timing["p80"], reps=timing["reps"])
    return out


def _sync(task):
    if task["device"] == "cuda":
        torch.cuda.synchronize()


def _oom_reason(task: dict) -> str:
    if task["device"] == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        return f"does not fit in this GPU's {total:.0f} GiB"
    return "out of memory"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def main(argv: list[str]) -> int:
    """argv[1]: a JSON list of tasks (one provider's shapes, smallest first); one RESULT line per task."""
    for task in json.loads(argv[1]):
        torch.manual_seed(task["seed"])
        print("RESULT " + json.dumps(measure(task)), flush=True)
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
