"""Ahead-of-time compile of kernel plans for NVIDIA GPUs, on a machine without one.

    python tests/aot.py [--targets 80,90] [--jobs 2] [--json FILE] [--dump DIR]

prints one line per compiled kernel variant and target for every case of tests/aot_cases.py (logits path, group
stage) and tests/aot_linear.py (linear path, when that file is there).

A :class:`~gvpo_kernels.triton.plan.Plan` is the launch a launcher would make (kernel, grid, arguments,
meta-parameters), built on meta tensors of real model shapes. :func:`compile_plan` hands it to Triton's own binder
(``JITFunction`` specialisation: dtypes, i32 / i64 ints, the divisible-by-16 and ==1 attributes, what
``do_not_specialize`` drops), so the specialisation is the one a real launch gets, then
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole pipeline to PTX and, through
the ptxas bundled with Triton, to cubin. Nothing is patched. From the result it reads

    regs, spill_st, spill_ld          ptxas -v (registers per thread, spill store / load bytes)
    smem                              bytes of shared memory (kernel metadata)
    wgmma, mma_sync, cp_async, tma    PTX counts of wgmma.mma_async, mma.sync, cp.async (16-byte async copies),
                                      cp.async.bulk (TMA)
    ld16, ld8, ld4, ld2               global loads by width in bytes (16 = ld.global.v4.b32: a vectorised load)
    st16, st8, st4, st2               global stores by width
    ld_v4, ld_v2, ld_scalar           global loads by vector shape (.v4 / .v2 / none), as shared/tools/aot_check.py
                                      counts them; st_vec, st_scalar likewise for stores
    ex2, bar                          PTX counts of ex2.approx (exponentials) and bar.sync (CTA barriers)
    pointers                          the element types of the pointer arguments ("bf16" in it: a bf16 kernel)
    num_warps, num_stages, seconds

The kernels must be real ``JITFunction`` objects: run this in a process without TRITON_INTERPRET=1 (tests/test_aot.py
starts one).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Optional

TARGETS = (80, 90)
SM_COUNT = {80: 108, 90: 132}  # A100; H100 SXM / H200

_HERE = os.path.dirname(os.path.abspath(__file__))


def unavailable_reason() -> Optional[str]:
    """None when this Triton can compile ahead of time for CUDA, else why not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as exc:
        return f"this Triton lacks the ahead-of-time API ({exc})"
    if not hasattr(JITFunction, "_pack_args"):
        return f"triton {triton.__version__} has no JITFunction._pack_args"
    try:
        from triton.backends.nvidia import compiler as nv

        nv.get_ptxas(90)
    except Exception as exc:  # noqa: BLE001  (no NVIDIA backend or no bundled ptxas)
        return f"Triton's NVIDIA backend or its bundled ptxas is missing ({exc})"
    return None


def device(arch: int):
    """The :class:`Device` a plan sees for a compute capability: an A100 (80) or an H100 / H200 (90)."""
    from gvpo_kernels.triton.plan import Device

    return Device(arch=arch, sm_count=SM_COUNT.get(arch, 108))


# ----------------------------------------------------------------------------------------------------------------
# specialise and compile


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise TypeError(f"plan.kernel must be a triton JITFunction, got {type(kernel).__name__} (compile in a process "
                        "without TRITON_INTERPRET=1)")
    return kernel


def specialise(plan, arch: int):
    """What ``JITFunction.run`` does before it compiles: bind, specialise, pack. -> (spec, key); equal keys are the
    same compiled kernel."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _jit_function(plan.kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(plan.meta)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    known = backend.parse_options({}).__dict__
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what run() adds, where this Triton has it
        if hasattr(knobs.compilation, name) and name in known:
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*plan.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    key = json.dumps([kernel.__name__, arch, signature, sorted(map(str, constexprs.items())),
                      sorted(map(str, attrs.items())), sorted(map(str, options.__dict__.items()))])
    key = hashlib.sha1(key.encode()).hexdigest()[:12]
    return (kernel, signature, constexprs, attrs, target, options.__dict__), key


def _accesses(op: str, ptx: str) -> list:
    """[(lanes, bytes)] of every global load (op 'ld') or store ('st') in the PTX."""
    out = []
    for mods in re.findall(rf"^\s*(?:@!?%p\d+\s+)?{op}\.global((?:\.[\w:]+)+)\s", ptx, flags=re.MULTILINE):
        parts = mods.split(".")
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bsuf]\d+", p)), 8)
        out.append((lanes, lanes * bits // 8))
    return out


def _access_counts(ptx: str) -> dict:
    loads, stores = _accesses("ld", ptx), _accesses("st", ptx)
    counts = {f"{op}{w}": sum(b == w for _, b in acc) for op, acc in (("ld", loads), ("st", stores))
              for w in (16, 8, 4, 2)}
    counts.update(ld_v4=sum(n == 4 for n, _ in loads), ld_v2=sum(n == 2 for n, _ in loads),
                  ld_scalar=sum(n == 1 for n, _ in loads), st_vec=sum(n > 1 for n, _ in stores),
                  st_scalar=sum(n == 1 for n, _ in stores))
    return counts


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, flags=re.MULTILINE))


def compile_spec(spec, dump: Optional[str] = None) -> dict:
    """Compile one specialisation (from :func:`specialise`) to cubin; its properties (see the module docstring)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    kernel, signature, constexprs, attrs, target, options = spec
    pointers = sorted({v[1:] for v in signature.values() if isinstance(v, str) and v.startswith("*")})
    res = dict(name=kernel.__name__, arch=target.arch, pointers=pointers, ok=False)
    t0 = time.time()
    log = io.StringIO()
    cache, saved = tempfile.mkdtemp(prefix="gvpo_aot_"), (knobs.cache.dir, knobs.nvidia.dump_ptxas_log)
    try:
        # a fresh cache: a kernel found in the cache would skip ptxas, and with it the register and spill counts
        knobs.cache.dir = cache
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed to stdout by Triton
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)
        ptx, ptxas = compiled.asm["ptx"], log.getvalue()
        regs = re.search(r"Used (\d+) registers", ptxas)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
        res.update(
            ok=True, regs=int(regs.group(1)) if regs else None,
            spill_st=int(spill.group(1)) if spill else None, spill_ld=int(spill.group(2)) if spill else None,
            smem=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
            num_stages=compiled.metadata.num_stages,
            wgmma=_count(r"^\s*wgmma\.mma_async", ptx), mma_sync=_count(r"^\s*mma\.sync", ptx),
            cp_async=_count(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.c[ag]", ptx),
            tma=_count(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.bulk", ptx),
            ex2=_count(r"^\s*(?:@!?%p\d+\s+)?ex2\.approx", ptx), bar=_count(r"^\s*(?:@!?%p\d+\s+)?bar\.sync", ptx),
            **_access_counts(ptx),
        )
        if dump:
            stem = os.path.join(dump, f"{kernel.__name__}.sm{target.arch}.{abs(hash(str(signature))) % 10**6}")
            for ext in ("ttgir", "ptx"):
                with open(f"{stem}.{ext}", "w") as f:
                    f.write(compiled.asm[ext])
            with open(f"{stem}.ptxas.txt", "w") as f:
                f.write(ptxas)
    except Exception as exc:  # noqa: BLE001  (reported as a failed compile)
        res["error"] = _describe(exc)
    finally:
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = saved
        shutil.rmtree(cache, ignore_errors=True)
    res["seconds"] = round(time.time() - t0, 2)
    return res


def _describe(exc) -> str:
    """One line per exception of the cause chain: its type, first and last line (Triton echoes the source)."""
    parts = []
    while exc is not None and len(parts) < 4:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip() and line.strip() != "^"]
        text = lines[0] if len(lines) <= 1 else f"{lines[0]} ... {lines[-1]}"
        parts.append(f"{type(exc).__name__}: {text}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)[:800]


_compiled = {}  # key -> properties, so that a specialisation is compiled once per process


def compile_plan(plan, arch: int) -> dict:
    """Compile ``plan`` for sm_<arch> as a real launch would; its properties (see the module docstring), plus
    ``label`` (the plan's), ``key`` (equal for equal specialisations). ``ok`` is False and ``error`` says why when
    the compile failed; a plan that Triton's binder rejects raises."""
    spec, key = specialise(plan, arch)
    if key not in _compiled:
        _compiled[key] = compile_spec(spec)
    return dict(_compiled[key], label=plan.label, key=key)


_SPECS = []  # filled before the pool forks: workers read their job by index (kernels do not pickle)


def _compile_index(i):
    return compile_spec(*_SPECS[i])


def compile_all(cases, jobs: int = 2, dump: Optional[str] = None) -> list:
    """[(arch, plan)] -> [properties, as :func:`compile_plan` gives them] in the same order; each distinct
    specialisation is compiled once, ``jobs`` at a time in forked workers."""
    keys, pending = [], {}
    for arch, plan in cases:
        spec, key = specialise(plan, arch)
        keys.append(key)
        if key not in _compiled:
            pending.setdefault(key, (spec, dump))
    _SPECS[:] = pending.values()
    if jobs > 1 and len(_SPECS) > 1:
        with mp.get_context("fork").Pool(min(jobs, len(_SPECS))) as pool:
            results = pool.map(_compile_index, range(len(_SPECS)), chunksize=1)
    else:
        results = [_compile_index(i) for i in range(len(_SPECS))]
    _compiled.update(zip(pending, results))
    return [dict(_compiled[key], label=plan.label, key=key) for key, (_, plan) in zip(keys, cases)]


# ----------------------------------------------------------------------------------------------------------------
# the cases


def linear_module():
    """tests/aot_linear.py imported, or (None, why not)."""
    sys.path.insert(0, _HERE)
    try:
        import aot_linear
    except Exception as exc:  # noqa: BLE001  (missing or broken: the linear cases are skipped, with the reason)
        return None, f"tests/aot_linear.py could not be imported ({type(exc).__name__}: {exc})"
    return aot_linear, None


def all_cases(targets=TARGETS):
    """[(arch, plan, source)] for every case (source: "logits", "group" or "linear"), and a list of notes (cases
    left out and why)."""
    sys.path.insert(0, _HERE)
    import aot_cases

    linear, why = linear_module()
    cases, notes = [], [] if why is None else [why]
    for arch in targets:
        dev = device(arch)
        cases += [(arch, plan, "logits") for plan in aot_cases.logits_plans(dev)]
        cases += [(arch, plan, "group") for plan in aot_cases.group_plans(dev)]
        if linear is not None:
            cases += [(arch, plan, "linear") for plan in linear.linear_plans(dev)]
    return cases, notes


COLUMNS = ("regs", "spill", "smem", "wgmma", "mma", "cp.async", "ld 16/8/4/2", "st 16/8/4/2", "ex2", "bar", "w/s")


def table(results) -> str:
    """One line per distinct compiled variant and target, with the labels of the plans it serves."""
    rows, seen = [], {}
    for r in results:
        ident = (r["name"], r["arch"], r.get("key") or json.dumps({k: v for k, v in r.items() if k != "label"}))
        if ident in seen:
            seen[ident]["labels"].append(r["label"])
            continue
        seen[ident] = dict(r, labels=[r["label"]])
        rows.append(seen[ident])
    head = f"{'kernel':30s} {'sm':3s} " + " ".join(f"{c:>11s}" if c.startswith(("ld", "st")) else f"{c:>6s}"
                                                    for c in COLUMNS) + "  cases"
    lines = [head]
    for r in rows:
        labels = r["labels"][0] + (f" (+{len(r['labels']) - 1})" if len(r["labels"]) > 1 else "")
        if not r["ok"]:
            lines.append(f"{r['name']:30s} {r['arch']:<3d} COMPILE FAILED  {labels}\n    {r['error']}")
            continue
        cells = [r["regs"], f"{r['spill_st']}/{r['spill_ld']}", r["smem"], r["wgmma"], r["mma_sync"],
                 r["cp_async"], "/".join(str(r[f"ld{w}"]) for w in (16, 8, 4, 2)),
                 "/".join(str(r[f"st{w}"]) for w in (16, 8, 4, 2)), r["ex2"], r["bar"],
                 f"{r['num_warps']}/{r['num_stages']}"]
        lines.append(f"{r['name']:30s} {r['arch']:<3d} " + " ".join(
            f"{c!s:>11s}" if i in (6, 7) else f"{c!s:>6s}" for i, c in enumerate(cells)) + f"  {labels}")
    return "\n".join(lines)


def prepare_process():
    """Check this process can compile, and import the checkout's gvpo_kernels rather than an installed copy."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("tests/aot.py compiles real kernels: run it without TRITON_INTERPRET=1")
    # Triton 3.6 fuses a*b+c into FMA by default; newer ones do too but warn when this is unset
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, os.path.dirname(_HERE))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities (default 80,90)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles (default 2)")
    ap.add_argument("--json", help="write every case's properties here")
    ap.add_argument("--dump", help="write each variant's TTGIR, PTX and ptxas log into this folder")
    args = ap.parse_args(argv)
    t0 = time.time()
    prepare_process()
    reason = unavailable_reason()
    if reason:
        print(f"SKIP: {reason}")
        return 0
    import triton

    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    cases, notes = all_cases(tuple(int(t) for t in args.targets.split(",")))
    results = compile_all([(arch, plan) for arch, plan, _ in cases], args.jobs, args.dump)
    for r, (_, _, source) in zip(results, cases):
        r["source"] = source
    print(f"# triton {triton.__version__}, python {sys.version.split()[0]}; {len(cases)} plans, "
          f"{len({r['key'] for r in results})} variants")
    for note in notes:
        print(f"# NOTE: {note}")
    print(table(results))
    print(f"# {sum(not r['ok'] for r in results)} failed, {time.time() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, notes=notes, results=results), f, indent=1)
    return 1 if any(not r["ok"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
