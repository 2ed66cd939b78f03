"""Ahead-of-time compile of kernel plans for NVIDIA and AMD GPUs, on a machine without one.

    python tests/helpers/aot.py [--targets sm_80,gfx942] [--jobs 2] [--json FILE] [--dump DIR] [--check]

prints one line per compiled kernel variant and target for every case of tests/helpers/aot_cases.py (logits path, group
stage) and tests/helpers/aot_linear.py (linear path, when that file is there), planned for the Device that each target's
GPU reports (``plan.device_for``: its SM / CU count and shared memory / LDS per block).

A :class:`~gvpo_kernels.triton.plan.Plan` is the launch a launcher would make (kernel, grid, arguments,
meta-parameters), built on meta tensors of real model shapes. :func:`compile_plan` hands it to Triton's own binder
(``JITFunction`` specialisation: dtypes, i32 / i64 ints, the divisible-by-16 and ==1 attributes, what
``do_not_specialize`` drops), so the specialisation is the one a real launch gets, then ``triton.compile`` runs the
whole pipeline: for ``GPUTarget("cuda", cc, 32)`` to PTX and, through the ptxas bundled with Triton, to cubin; for
``GPUTarget("hip", "gfx942", 64)`` to AMDGCN and, through the LLVM linked into Triton, to an hsaco (nothing from ROCm
is needed). Nothing is patched. From the result it reads

    regs                              registers per thread (ptxas -v; AMD: TotalNumVgprs, arch VGPRs + AGPRs)
    spill_st, spill_ld                NVIDIA: spill store / load bytes (ptxas -v); AMD: VGPRs / SGPRs spilled
    scratch                           AMD: scratch (private) bytes per lane, 0 without spills; NVIDIA: 0
    smem, smem_limit                  bytes of shared memory / LDS (kernel metadata); the target's per-block maximum
    mma                               the tensor-core instructions used: "tcgen05", "wgmma", "mma.sync", "mfma"
                                      (AMD), or "-"; wgmma, mma_sync, tcgen05, mfma: their counts
    cp_async, tma                     PTX counts of cp.async (16-byte async copies) and cp.async.bulk (TMA)
    ld16, ld8, ld4, ld2               global loads by width in bytes (16 = ld.global.v4.b32 / global_load_dwordx4)
    st16, st8, st4, st2               global stores by width
    ld_v4, ld_v2, ld_scalar           global loads by vector shape (.v4 / .v2 / none), as shared/tools/aot_check.py
                                      counts them; st_vec, st_scalar likewise for stores (NVIDIA only)
    ex2, bar                          exponentials (ex2.approx / v_exp_f32) and CTA barriers (bar.sync / s_barrier)
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

# what a GPU of each generation in use runs: A100; RTX 30xx / A40; L40S / RTX 40xx; H100 / H200; B200; RTX 50xx /
# RTX PRO 6000; MI250X / MI210; MI300X; MI355X
TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "gfx90a", "gfx942", "gfx950")
# the tensor-core instructions a 16-bit tile must use on each target (Triton puts sm_120's tiles on mma.sync: its
# tcgen05-free consumer Blackwell has neither wgmma nor TMEM)
MMA = {"sm_80": "mma.sync", "sm_86": "mma.sync", "sm_89": "mma.sync", "sm_90": "wgmma", "sm_100": "tcgen05",
       "sm_120": "mma.sync", "gfx90a": "mfma", "gfx942": "mfma", "gfx950": "mfma"}

_HERE = os.path.dirname(os.path.abspath(__file__))


def unavailable_reason(targets=TARGETS) -> Optional[str]:
    """None when this Triton can compile ahead of time for every target of ``targets``, else why not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as exc:
        return f"this Triton lacks the ahead-of-time API ({exc})"
    try:
        from triton._utils import find_paths_if, get_iterable_path  # noqa: F401  (_pack_args' helpers, 3.4+)
    except ImportError:
        if not hasattr(JITFunction, "_pack_args"):
            return f"triton {triton.__version__} has neither JITFunction._pack_args nor triton._utils.find_paths_if"
    names = [device(t).name for t in targets]
    if any(n.startswith("sm_") for n in names):
        try:
            from triton.backends.nvidia import compiler as nv

            try:
                nv.get_ptxas(90)  # Triton >= 3.6: a ptxas per architecture
            except TypeError:
                nv.get_ptxas()
        except Exception as exc:  # noqa: BLE001  (no NVIDIA backend or no bundled ptxas)
            return f"Triton's NVIDIA backend or its bundled ptxas is missing ({exc})"
    if any(n.startswith("gfx") for n in names):
        try:
            from triton.backends.amd import compiler as amd  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"Triton's AMD backend is missing ({exc})"
    return None


def device(target):
    """The :class:`Device` a plan sees for a target ("sm_90", 90, "gfx942", or a Device, returned as it is): the
    GPU of that architecture in plan.ARCHITECTURES, with its SM / CU count and shared memory per block."""
    from gvpo_kernels.triton.plan import Device, device_for

    return target if isinstance(target, Device) else device_for(target)


def gpu_target(dev):
    """Triton's GPUTarget for a Device."""
    from triton.backends.compiler import GPUTarget

    if dev.is_hip:
        return GPUTarget("hip", dev.arch, dev.warp_size)
    return GPUTarget("cuda", dev.arch, 32)


# ----------------------------------------------------------------------------------------------------------------
# specialise and compile


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise TypeError(f"plan.kernel must be a triton JITFunction, got {type(kernel).__name__} (compile in a process "
                        "without TRITON_INTERPRET=1)")
    return kernel


def _pack_args(kernel, backend, kwargs, bound_args, specialization, options):
    """JITFunction._pack_args (Triton >= 3.5), or what JITFunction.run of Triton 3.4 does inline in its place."""
    if hasattr(kernel, "_pack_args"):
        return kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    from triton._utils import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    sigvals = [x[0] for x in specialization]
    signature = dict(zip([x.name for x in kernel.params], sigvals))
    constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: get_iterable_path(list(bound_args.values()), path) for path in constexprs}
    attrvals = [x[1] for x in specialization]
    attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    return options, signature, constexprs, attrs


def specialise(plan, target):
    """What ``JITFunction.run`` does before it compiles: bind, specialise, pack, for ``target`` (a name, a compute
    capability or a Device). -> (spec, key); equal keys are the same compiled kernel."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _jit_function(plan.kernel)
    dev = device(target)
    target = gpu_target(dev)
    backend = make_backend(target)
    kwargs = dict(plan.meta)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    known = backend.parse_options({}).__dict__
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what run() adds, where this Triton has it
        if hasattr(knobs.compilation, name) and name in known:
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*plan.args, **kwargs)
    options, signature, constexprs, attrs = _pack_args(kernel, backend, kwargs, bound_args, specialization, options)
    key = json.dumps([kernel.__name__, dev.name, signature, sorted(map(str, constexprs.items())),
                      sorted(map(str, attrs.items())), sorted(map(str, options.__dict__.items()))])
    key = hashlib.sha1(key.encode()).hexdigest()[:12]
    return (kernel, signature, constexprs, attrs, target, options.__dict__, dev), key


def _accesses(op: str, ptx: str) -> list:
    """[(lanes, bytes)] of every global load (op 'ld') or store ('st') in the PTX."""
    out = []
    for mods in re.findall(rf"^\s*(?:@!?%p\d+\s+)?{op}\.global((?:\.[\w:]+)+)\s", ptx, flags=re.MULTILINE):
        parts = mods.split(".")
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bsuf]\d+", p)), 8)
        out.append((lanes, lanes * bits // 8))
    return out


_GCN_BYTES = {"dwordx4": 16, "b128": 16, "dwordx3": 12, "b96": 12, "dwordx2": 8, "b64": 8, "dword": 4, "b32": 4,
              "ushort": 2, "short": 2, "short_d16": 2, "short_d16_hi": 2, "u16": 2, "i16": 2, "b16": 2, "d16_b16": 2,
              "ubyte": 1, "sbyte": 1, "byte": 1, "u8": 1, "i8": 1, "b8": 1}


def _gcn_accesses(op: str, gcn: str) -> list:
    """[(1, bytes)] of every global / buffer load (op 'load') or store ('store') in AMDGCN assembly."""
    out = []
    for kind in re.findall(rf"^\s*(?:global|buffer)_{op}_(?:lds_)?(\w+)", gcn, flags=re.MULTILINE):
        out.append((1, _GCN_BYTES.get(kind, 0)))
    return out


def _access_counts(ptx: str, amd: bool = False) -> dict:
    loads, stores = ((_gcn_accesses("load", ptx), _gcn_accesses("store", ptx)) if amd
                     else (_accesses("ld", ptx), _accesses("st", ptx)))
    counts = {f"{op}{w}": sum(b == w for _, b in acc) for op, acc in (("ld", loads), ("st", stores))
              for w in (16, 8, 4, 2)}
    counts.update(ld_v4=sum(n == 4 for n, _ in loads), ld_v2=sum(n == 2 for n, _ in loads),
                  ld_scalar=sum(n == 1 for n, _ in loads), st_vec=sum(n > 1 for n, _ in stores),
                  st_scalar=sum(n == 1 for n, _ in stores))
    return counts


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, flags=re.MULTILINE))


def _resource_usage(cubin: bytes) -> str:
    """ptxas -v's two lines rebuilt from ``cuobjdump -res-usage`` of a cubin (Triton < 3.5 keeps no ptxas log): the
    registers, and the stack frame's bytes as spill stores and loads (a kernel of this package has no stack but
    for spills)."""
    import subprocess

    from triton import knobs

    tool = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return (f"Used {regs.group(1) if regs else '?'} registers\n"
            f"{stack.group(1) if stack else 0} bytes spill stores, {stack.group(1) if stack else 0} bytes spill loads")


def _nvidia_properties(compiled, log: str) -> dict:
    ptx = compiled.asm["ptx"]
    if "Used " not in log:
        log = _resource_usage(compiled.asm["cubin"])
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    counts = dict(wgmma=_count(r"^\s*wgmma\.mma_async", ptx), mma_sync=_count(r"^\s*mma\.sync", ptx),
                  tcgen05=_count(r"^\s*(?:@!?%p\d+\s+)?tcgen05\.mma", ptx), mfma=0)
    return dict(
        regs=int(regs.group(1)) if regs else None,
        spill_st=int(spill.group(1)) if spill else None, spill_ld=int(spill.group(2)) if spill else None, scratch=0,
        cp_async=_count(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.c[ag]", ptx),
        tma=_count(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.bulk", ptx),
        ex2=_count(r"^\s*(?:@!?%p\d+\s+)?ex2\.approx", ptx), bar=_count(r"^\s*(?:@!?%p\d+\s+)?bar\.sync", ptx),
        **counts, **_access_counts(ptx))


def _amd_properties(compiled) -> dict:
    gcn = compiled.asm["amdgcn"]

    def field(pattern):
        found = re.search(pattern, gcn, flags=re.MULTILINE)
        return int(found.group(1)) if found else None

    regs = field(r"^\s*; TotalNumVgprs:\s*(\d+)") or field(r"^\s*\.vgpr_count:\s*(\d+)")
    counts = dict(wgmma=0, mma_sync=0, tcgen05=0, mfma=_count(r"^\s*v_mfma_", gcn))
    return dict(
        regs=regs, sgprs=field(r"^\s*\.sgpr_count:\s*(\d+)"),
        spill_st=field(r"^\s*\.vgpr_spill_count:\s*(\d+)"), spill_ld=field(r"^\s*\.sgpr_spill_count:\s*(\d+)"),
        scratch=field(r"^\s*; ScratchSize:\s*(\d+)") or 0, occupancy=field(r"^\s*; Occupancy:\s*(\d+)"),
        cp_async=0, tma=0, ex2=_count(r"^\s*v_exp_f32", gcn), bar=_count(r"^\s*s_barrier\b", gcn),
        **counts, **_access_counts(gcn, amd=True))


def mma_kind(props: dict) -> str:
    """The tensor-core instructions of a compiled kernel: "tcgen05", "wgmma", "mma.sync", "mfma" or "-"."""
    for key, kind in (("tcgen05", "tcgen05"), ("wgmma", "wgmma"), ("mma_sync", "mma.sync"), ("mfma", "mfma")):
        if props.get(key):
            return kind
    return "-"


def compile_spec(spec, dump: Optional[str] = None) -> dict:
    """Compile one specialisation (from :func:`specialise`) to a GPU binary; its properties (module docstring)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    kernel, signature, constexprs, attrs, target, options, dev = spec
    pointers = sorted({v[1:] for v in signature.values() if isinstance(v, str) and v.startswith("*")})
    res = dict(name=kernel.__name__, target=dev.name, arch=dev.arch, pointers=pointers, ok=False,
               smem_limit=dev.shared_memory)
    t0 = time.time()
    log = io.StringIO()
    dump_log = hasattr(knobs.nvidia, "dump_ptxas_log")  # Triton >= 3.5; else cuobjdump reads the cubin
    cache, saved = tempfile.mkdtemp(prefix="gvpo_aot_"), (knobs.cache.dir, dump_log and knobs.nvidia.dump_ptxas_log)
    try:
        # a fresh cache: a kernel found in the cache would skip ptxas, and with it the register and spill counts
        knobs.cache.dir = cache
        if dump_log:
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed to stdout by Triton
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)
        res.update(ok=True, smem=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                   num_stages=compiled.metadata.num_stages,
                   **(_amd_properties(compiled) if dev.is_hip else _nvidia_properties(compiled, log.getvalue())))
        res["mma"] = mma_kind(res)
        if dump:
            stem = os.path.join(dump, f"{kernel.__name__}.{dev.name}.{abs(hash(str(signature))) % 10**6}")
            for ext in ("ttgir", "amdgcn" if dev.is_hip else "ptx"):
                with open(f"{stem}.{ext}", "w") as f:
                    f.write(compiled.asm[ext])
            if not dev.is_hip:
                with open(f"{stem}.ptxas.txt", "w") as f:
                    f.write(log.getvalue())
    except Exception as exc:  # noqa: BLE001  (reported as a failed compile)
        res["error"] = _describe(exc)
    finally:
        knobs.cache.dir = saved[0]
        if dump_log:
            knobs.nvidia.dump_ptxas_log = saved[1]
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


def compile_plan(plan, arch) -> dict:
    """Compile ``plan`` for ``arch`` (a target name, a compute capability or a Device) as a real launch would; its
    properties (see the module docstring), plus
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
    """[(target, plan)] -> [properties, as :func:`compile_plan` gives them] in the same order; each distinct
    specialisation is compiled once, ``jobs`` at a time in forked workers."""
    keys, pending = [], {}
    for target, plan in cases:
        spec, key = specialise(plan, target)
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
    """tests/helpers/aot_linear.py imported, or (None, why not)."""
    sys.path.insert(0, _HERE)
    try:
        import aot_linear
    except Exception as exc:  # noqa: BLE001  (missing or broken: the linear cases are skipped, with the reason)
        return None, f"tests/helpers/aot_linear.py could not be imported ({type(exc).__name__}: {exc})"
    return aot_linear, None


def all_cases(targets=TARGETS):
    """[(target, plan, source)] for every case (source: "logits", "group" or "linear"), planned for the Device of
    each target, and a list of notes (cases left out and why)."""
    sys.path.insert(0, _HERE)
    import aot_cases

    linear, why = linear_module()
    cases, notes = [], [] if why is None else [why]
    for target in targets:
        dev = device(target)
        cases += [(dev, plan, "logits") for plan in aot_cases.logits_plans(dev)]
        cases += [(dev, plan, "group") for plan in aot_cases.group_plans(dev)]
        if linear is not None:
            cases += [(dev, plan, "linear") for plan in linear.linear_plans(dev)]
    return cases, notes


COLUMNS = ("regs", "spill", "smem/limit KB", "mma", "cp.async", "ld 16/8/4/2", "st 16/8/4/2", "ex2", "bar", "w/s")


def _kb(n) -> str:
    return f"{n / 1024:g}"


def table(results) -> str:
    """The target x kernel table: one line per distinct compiled variant and target (registers, spills, shared
    memory / LDS against the target's limit, MMA kind, ...), with the labels of the plans it serves."""
    rows, seen = [], {}
    for r in results:
        ident = (r["name"], r["target"], r.get("key") or json.dumps({k: v for k, v in r.items() if k != "label"}))
        if ident in seen:
            seen[ident]["labels"].append(r["label"])
            continue
        seen[ident] = dict(r, labels=[r["label"]])
        rows.append(seen[ident])
    widths = (5, 7, 13, 8, 8, 11, 11, 5, 4, 4)
    head = f"{'target':7s} {'kernel':28s} " + " ".join(f"{c:>{w}s}" for c, w in zip(COLUMNS, widths)) + "  cases"
    lines = [head]
    for r in rows:
        labels = r["labels"][0] + (f" (+{len(r['labels']) - 1})" if len(r["labels"]) > 1 else "")
        name = r["name"].removesuffix("_kernel")
        if not r["ok"]:
            lines.append(f"{r['target']:7s} {name:28s} COMPILE FAILED  {labels}\n    {r['error']}")
            continue
        spill = f"{r['spill_st']}/{r['spill_ld']}" + (f"+{r['scratch']}" if r.get("scratch") else "")
        cells = [r["regs"], spill, f"{_kb(r['smem'])}/{_kb(r['smem_limit'])}", r["mma"], r["cp_async"],
                 "/".join(str(r[f"ld{w}"]) for w in (16, 8, 4, 2)), "/".join(str(r[f"st{w}"]) for w in (16, 8, 4, 2)),
                 r["ex2"], r["bar"], f"{r['num_warps']}/{r['num_stages']}"]
        lines.append(f"{r['target']:7s} {name:28s} " + " ".join(f"{c!s:>{w}s}" for c, w in zip(cells, widths))
                     + f"  {labels}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# criteria: tests/test_aot.py asserts each; --check applies them all. Each takes the results (with their "source")
# and returns one line per violation.


def _where(r) -> str:
    return f"{r['target']} {r['label']}"


def compile_errors(results) -> list:
    return [f"{_where(r)}: {r['error']}" for r in results if not r["ok"]]


def over_shared_memory(results) -> list:
    """Shared memory / LDS above what one block may use on the target: an OutOfResources at the first launch."""
    return [f"{_where(r)}: {r['smem']} > {r['smem_limit']} bytes" for r in results
            if r["ok"] and r["smem"] > r["smem_limit"]]


def spills(results) -> list:
    """A spill in a 16-bit kernel, or in any logits / group kernel (NVIDIA: ptxas's bytes; AMD: spilled VGPRs /
    SGPRs and scratch)."""
    return [f"{_where(r)}: {r['spill_st']}/{r['spill_ld']}+{r['scratch']}" for r in results
            if r["ok"] and ("bf16" in r["pointers"] or "fp16" in r["pointers"] or r["source"] != "linear")
            and (r["spill_st"] is None or r["spill_st"] + r["spill_ld"] + r["scratch"] > 0)]


def without_tensor_cores(results) -> list:
    """A 16-bit linear logits tile that does not run on its target's matrix instructions (MMA)."""
    from gvpo_kernels.triton.plan import mma_kind as planned

    return [f"{_where(r)}: {r['mma']}, want {MMA.get(r['target']) or planned(device(r['target']))}"
            for r in results if r["ok"] and r["source"] == "linear" and not r["label"].startswith("linear_grad")
            and ("bf16" in r["pointers"] or "fp16" in r["pointers"])
            and r["mma"] != (MMA.get(r["target"]) or planned(device(r["target"])))]


def narrow_row_accesses(results) -> list:
    """Where a row starts 16-byte aligned (V a multiple of 8), every load and store of logits and gradients is 16
    bytes wide. On NVIDIA, what remains narrower is one value per row: the forward's int64 target (8 bytes) and its
    three (four with entropy) float32 outputs (log-prob, the normaliser's shift and log-sum, entropy); the
    backward's target (8 bytes), shift, log-sum and c_lp (4 bytes), with entropy also H and c_ent (every variant:
    soft-capped too). On AMD the per-row values are scalar loads (s_load, not counted): row loads are 16 bytes
    wide, none 2 bytes, and the backward's row stores 16 bytes wide, none narrower."""
    sys.path.insert(0, _HERE)
    import aot_cases

    bad = []
    for r in results:
        if not (r["ok"] and r["source"] == "logits" and aot_cases.vectorisable(r["label"])):
            continue
        fwd = r["label"].startswith("fwd")
        entropy_bwd = r["label"].startswith("bwd-entropy")
        if r["target"].startswith("gfx"):
            want = dict(ld16=(1, None), ld2=(0, 0), st16=(0, 0) if fwd else (1, None), st8=(0, 0), st2=(0, 0))
        else:
            ld8 = (1, 1)
            ld4 = (0, 0) if fwd else (5, 5) if entropy_bwd else (3, 3)
            want = dict(ld16=(1, None), ld8=ld8, ld4=ld4, ld2=(0, 0),
                        st16=(0, 0) if fwd else (1, None), st8=(0, 0), st4=(0, None) if fwd else (0, 0), st2=(0, 0))
        for key, (lo, hi) in want.items():
            if r[key] < lo or (hi is not None and r[key] > hi):
                bad.append(f"{_where(r)}: {key}={r[key]}, want {lo}..{hi if hi is not None else ''}")
    return bad


def linear_violations(results) -> list:
    """What tests/helpers/aot_linear.py's check(label, target, props) says of each compiled linear plan."""
    linear, _ = linear_module()
    check = getattr(linear, "check", None)
    bad = []
    for r in results:
        if check is not None and r["ok"] and r["source"] == "linear":
            try:
                check(r["label"], r["target"], r)
            except AssertionError as exc:
                bad.append(str(exc))
    return bad


CRITERIA = (compile_errors, over_shared_memory, spills, without_tensor_cores, narrow_row_accesses, linear_violations)


def prepare_process():
    """Check this process can compile, and import the checkout's gvpo_kernels rather than an installed copy."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("tests/helpers/aot.py compiles real kernels: run it without TRITON_INTERPRET=1")
    # Triton 3.6 fuses a*b+c into FMA by default; newer ones do too but warn when this is unset
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))  # the checkout (tests/helpers/ -> .)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help=f"target names or compute capabilities (default {','.join(TARGETS)})")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles (default 2)")
    ap.add_argument("--json", help="write every case's properties here")
    ap.add_argument("--dump", help="write each variant's TTGIR, PTX and ptxas log into this folder")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on any violation of tests/test_aot.py's criteria (each listed), not only on a "
                         "compile error")
    args = ap.parse_args(argv)
    t0 = time.time()
    prepare_process()
    targets = tuple(args.targets.split(","))
    reason = unavailable_reason(targets)
    if reason:
        print(f"SKIP: {reason}")
        return 0
    import triton

    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    cases, notes = all_cases(targets)
    results = compile_all([(dev, plan) for dev, plan, _ in cases], args.jobs, args.dump)
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
    if args.check:
        violations = [line for criterion in CRITERIA for line in criterion(results)]
        for line in violations:
            print(f"# VIOLATION: {line}")
        failed = sum(any(criterion([r]) for criterion in CRITERIA) for r in results)
        print(f"# {len(violations)} violations of tests/test_aot.py's criteria")
        print(f"aot: {len(results) - failed} passed, {failed} failed")  # plans; a closing line CI reads
        return 1 if violations else 0
    return 1 if any(not r["ok"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
