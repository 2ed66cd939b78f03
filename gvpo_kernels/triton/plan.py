"""A kernel launch as data: what a launcher decided (kernel, grid, arguments, meta-parameters), apart from running it.

Every launcher in this package is split in two: a pure *plan* function (shapes, dtypes, device properties ->
:class:`Plan`; it reads no tensor values and launches nothing) and :func:`launch`, which executes a plan. The GPU
runs plans; the ahead-of-time compile test (tests/test_aot.py) compiles the very same plans, built on meta tensors
of real model shapes, for sm_80 to sm_120 and gfx90a to gfx950 without a GPU. Nothing has to be patched to see
what a launcher would do.

A plan knows the GPU through :class:`Device` (vendor, architecture, SM / CU count, shared memory / LDS per block:
:func:`device_of` reads them from torch, :func:`device_for` from the ARCHITECTURES table for meta / AOT use), and
the device-dependent choices are made here: :func:`linear_tiles` (tiles, warps, stages per device family),
:func:`dot_precision`, :func:`row_options`. docs/gpu-plans.md has the measured compile-time table behind them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional, Union


# One row per architecture a plan knows by name (for meta / ahead-of-time use, and where torch does not report a
# fact): the GPU that stands for it, its SM (CU) count, and the most shared memory (LDS) one block may use, in bytes
# (CUDA's opt-in maximum, cudaDevAttrMaxSharedMemoryPerBlockOptin; AMD's LDS per workgroup).
ARCHITECTURES = {
    "sm_80": ("A100", 108, 166912),
    "sm_86": ("RTX 3090 / A40", 84, 101376),
    "sm_87": ("Jetson AGX Orin", 16, 166912),
    "sm_89": ("L40S / RTX 4090", 142, 101376),
    "sm_90": ("H100 SXM / H200", 132, 232448),
    "sm_100": ("B200", 148, 232448),
    "sm_103": ("B300", 148, 232448),
    "sm_120": ("RTX 5090 / RTX PRO 6000", 170, 101376),
    "sm_121": ("DGX Spark (GB10)", 48, 101376),
    "gfx90a": ("MI250X (one GCD) / MI210", 110, 65536),
    "gfx942": ("MI300X / MI325X", 304, 65536),
    "gfx950": ("MI355X / MI350X", 256, 163840),
}


@dataclass(frozen=True)
class Device:
    """What a plan may know of the GPU (see :func:`device_of` and :func:`device_for`).

    vendor:         "cuda" (NVIDIA) or "hip" (AMD ROCm; torch calls its devices "cuda" too)
    arch:           CUDA: the compute capability, major * 10 + minor (80, 90, 120); HIP: the gfx name ("gfx942")
    sm_count:       streaming multiprocessors (CUDA) or compute units (HIP)
    shared_memory:  the most shared memory (LDS) one block may use, in bytes; None: the ARCHITECTURES row of
                    ``arch``, else the least of its family (99 KB from sm_80 on, 48 KB before; 64 KB on AMD)
    interpreter:    True under TRITON_INTERPRET=1 on the CPU (plans may then pick interpreter-friendly choices)
    """

    arch: Union[int, str]
    sm_count: int
    interpreter: bool = False
    vendor: str = "cuda"
    shared_memory: Optional[int] = None

    def __post_init__(self):
        if self.vendor not in ("cuda", "hip"):
            raise ValueError(f"vendor must be 'cuda' or 'hip', got {self.vendor!r}")
        if self.vendor == "hip" and not (isinstance(self.arch, str) and self.arch.startswith("gfx")):
            raise ValueError(f"a HIP device's arch is its gfx name (e.g. 'gfx942'), got {self.arch!r}")
        if self.vendor == "cuda" and not isinstance(self.arch, int):
            raise ValueError(f"a CUDA device's arch is its compute capability as an int (e.g. 90), got {self.arch!r}")
        if self.shared_memory is None:
            row = ARCHITECTURES.get(self.name)
            default = 65536 if self.is_hip else 101376 if self.arch >= 80 else 49152
            object.__setattr__(self, "shared_memory", row[2] if row else default)

    @property
    def is_hip(self) -> bool:
        return self.vendor == "hip"

    @property
    def name(self) -> str:
        """"sm_90", "gfx942": the target's name as compilers spell it."""
        return self.arch if self.is_hip else f"sm_{self.arch}"

    @property
    def capability(self) -> int:
        """The CUDA compute capability (major * 10 + minor); 0 on HIP and in the interpreter."""
        return 0 if self.is_hip else self.arch

    @property
    def warp_size(self) -> int:
        """Threads per warp: 32 on NVIDIA and RDNA (gfx10+), 64 on CDNA (gfx9: MI200, MI300, MI350)."""
        return 64 if self.is_hip and self.arch.startswith("gfx9") else 32


# ----------------------------------------------------------------------------------------------------------------
# configs from device facts (the measured table behind each rule: docs/gpu-plans.md, compile-time facts)

REGISTERS_PER_SM = 65536  # 32-bit registers per SM on every NVIDIA GPU from sm_80 to sm_120


def mma_kind(device: Device) -> str:
    """The tensor-core instructions a 16-bit ``tl.dot`` compiles to on ``device`` (Triton 3.6 to 3.9): "wgmma"
    (sm_90), "tcgen05" (sm_100 / sm_103 / sm_110, data-centre Blackwell), "mma.sync" (sm_80 to sm_89, and sm_120 /
    sm_121: consumer Blackwell has neither wgmma nor TMEM), "mfma" (CDNA: gfx9), "wmma" (RDNA 3 / 4), or "fma"."""
    if device.interpreter:
        return "fma"
    if device.is_hip:
        return "mfma" if device.arch.startswith("gfx9") else "wmma" if device.arch[3:5] in ("11", "12") else "fma"
    cc = device.capability
    if cc in (90,):
        return "wgmma"
    if 100 <= cc < 120:
        return "tcgen05"
    return "mma.sync" if cc >= 80 else "fma"


def dot_precision(wide: bool, device: Device) -> str:
    """``input_precision`` of the linear tiles' tl.dot: "ieee" everywhere. fp32 operands must not go through TF32
    (fp32's tolerance is 1e-5); 16-bit operands are exact in every MMA and the setting does not change their code,
    but Triton checks it against the target's list, and "tf32" is refused on gfx90a and gfx950."""
    return "ieee"


def _tile_shared_bytes(config: dict, itemsize: int, device: Device) -> int:
    """Shared memory / LDS the pipelined operand tiles of a linear kernel take (the epilogue's few bytes aside):
    one buffer per stage with wgmma / tcgen05 (the MMA reads its operands from shared memory) and on gfx950 (loads
    straight into LDS), one fewer with mma.sync and on the older AMD GPUs (the newest stage waits in registers),
    as the AOT matrix measures them."""
    per_stage = (config["BLOCK_N"] + config["BLOCK_V"]) * config["BLOCK_H"] * itemsize
    stages = config["num_stages"]
    whole = mma_kind(device) in ("wgmma", "tcgen05") or (device.is_hip and device.arch.startswith("gfx95"))
    return (stages if whole else max(1, stages - 1)) * per_stage


def linear_tiles(itemsize: int, hidden_size: int, device: Device, store: bool = False, heavy: str = "") -> dict:
    """Tiles, warps, stages (and compile options) of the linear path's logits tiles on ``device``, for operands of
    ``itemsize`` bytes (2: bf16 / fp16; 4: fp32 and fp64, computed in fp32). Never depends on the number of tokens.

    16-bit operands, per family (why: docs/gpu-plans.md):
      - sm_90 (wgmma) and sm_100 / sm_103 (tcgen05): 128 tokens x 128 vocabulary x 64 of H, 8 warps, 4 stages
        (128 KB of the 227 KB); on tcgen05 ``maxnreg=255``: by default ptxas trims the forward storing
        exponentials and the entropy backward to 128 registers (two CTAs per SM) and spills; without the cap they
        take 166 and 255 registers and spill nothing (one CTA per SM: the backward's 128 KB allows no second);
      - mma.sync (sm_80, sm_86, sm_89, sm_120, sm_121): 128 x 128 x 32, 8 warps, 4 stages (48 KB, within the
        99 KB of sm_86 / sm_89 / sm_120); x 64 of H with 3 stages spilled the entropy forward on sm_86 / sm_89 /
        sm_120 and held most others at 248-255 registers;
      - AMD CDNA (gfx90a, gfx942, gfx950; wave64): 128 x 128 x 64, 8 waves, 2 stages (one 32 KB LDS buffer, within
        the 64 KB of gfx90a / gfx942, where Triton's AMD pipeliner streams the next tile through registers; two on
        gfx950, 64 of its 160 KB);
    ``store`` (the forward that also writes exponentials): 64 vocabulary rows instead of 128. ``heavy``, "forward"
    or "backward": that kernel with an entropy term and a soft-cap in one epilogue, 64 vocabulary rows too where
    128 spilled (AOT): the backward on mma.sync (sm_120, Triton 3.9: 16 bytes) and on tcgen05 (sm_100, Triton 3.5:
    16 bytes), the forward on AMD (gfx950 with a bias, Triton 3.9: 2 bytes); not the other way round, where 64
    spilled and 128 did not (the mma.sync forward). Where a
    device's shared memory is smaller than the table's rule needs, stages come off first, then H halves.
    fp32: 64 x 64 x 32, 4 warps, 2 stages on every device (IEEE fp32 dots; not in the AOT matrix).
    """
    if itemsize >= 4:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=max(16, min(32, _next_power_of_2(hidden_size))), num_warps=4,
                    num_stages=2)
    kind = mma_kind(device)
    if device.interpreter:
        config = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
    elif kind in ("wgmma", "tcgen05"):
        config = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=4)
    elif device.is_hip:
        config = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=2)
    else:
        config = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=4)
    narrow = heavy == ("forward" if device.is_hip else "backward" if kind in ("mma.sync", "tcgen05") else None)
    if store or (narrow and not device.interpreter):
        config["BLOCK_V"] = 64
    config["BLOCK_H"] = max(16, min(config["BLOCK_H"], _next_power_of_2(hidden_size)))
    if not device.interpreter:
        while config["num_stages"] > 2 and _tile_shared_bytes(config, itemsize, device) > device.shared_memory:
            config["num_stages"] -= 1
        while config["BLOCK_H"] > 16 and _tile_shared_bytes(config, itemsize, device) > device.shared_memory:
            config["BLOCK_H"] //= 2
    if kind == "tcgen05":
        config["maxnreg"] = 255
    return config


def row_options(device: Device, num_warps: int) -> dict:
    """Compile options of the memory-bound row kernels (token stage) on ``device``: none, except on sm_120 /
    sm_121, where ptxas trims the forward of a vocabulary that is not a multiple of 8 to 64 registers and spills;
    there ``maxnreg`` lets it use what two CTAs per SM leave (128 at 8 warps)."""
    if device.interpreter or device.is_hip or device.capability < 120:
        return {}
    return dict(maxnreg=REGISTERS_PER_SM // (2 * num_warps * 32))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class Plan:
    """One kernel launch: ``kernel[grid](*args, **meta)``.

    kernel: a ``@triton.jit`` function
    grid:   the launch grid, a tuple of 1 to 3 ints
    args:   the runtime arguments in the kernel's order (tensors, ints, floats)
    meta:   the constexpr meta-parameters and ``num_warps`` / ``num_stages``
    label:  a short name for reports ("token_fwd V=152064 bf16")
    """

    kernel: Any
    grid: tuple
    args: tuple
    meta: dict = field(default_factory=dict)
    label: str = ""


class LaunchError(RuntimeError):
    """A kernel that could not be compiled or launched on this device (OutOfResources, a CompilationError, an API
    the installed Triton lacks, device facts that cannot be read): ``kernel`` and ``device`` name it, ``__cause__``
    is Triton's own error. gvpo_kernels.ops.select turns it into a fallback to the torch backend under "auto"."""

    def __init__(self, kernel: str, device: str, error: BaseException):
        self.kernel, self.device, self.error = kernel, device, error
        super().__init__(f"the Triton kernel {kernel} cannot run on {device}: {type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}")


_FAILED: dict = {}  # (kernel name, device) -> the LaunchError of its first failure: never compiled again


def launch(plan: Plan) -> None:
    """Run ``plan`` on the current device (or in Triton's interpreter); a grid with no program launches nothing.
    A compile or launch failure raises :class:`LaunchError` (and the kernel is not tried again on that device)."""
    if not all(plan.grid):
        return
    name = getattr(plan.kernel, "__name__", None) or getattr(getattr(plan.kernel, "fn", None), "__name__", "kernel")
    where = _current_device_name()
    failed = _FAILED.get((name, where))
    if failed is not None:
        raise failed
    try:
        _run(plan)
    except Exception as exc:  # noqa: BLE001  (any failure of Triton's compile or launch: see LaunchError)
        error = LaunchError(name, where, exc)
        _FAILED[(name, where)] = error
        raise error from exc


def _run(plan: Plan) -> None:
    """Compile (first time) and launch: the one place a Triton kernel is called."""
    plan.kernel[plan.grid](*plan.args, **plan.meta)


def _current_device_name() -> str:
    """The device a launch runs on, as a user reads it ("NVIDIA H100 80GB HBM3 (cuda:0)", or the interpreter)."""
    import os

    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return "the Triton interpreter"
    index = torch.cuda.current_device()
    return f"{torch.cuda.get_device_name(index)} (cuda:{index})"


def check_flat(name: str, tensor, dtype) -> None:
    """What a kernel that reads ``tensor`` through a raw pointer at ``ptr + i`` needs: the dtype, and consecutive
    elements (stride 1; a strided, transposed or stride-0 view would be misread). Raises ValueError naming it."""
    if tensor.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} for the Triton kernels, got {tensor.dtype}")
    if tensor.dim() > 1 or (tensor.numel() > 1 and tensor.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous 0-D or 1-D tensor for the Triton kernels, got shape "
                         f"{tuple(tensor.shape)} with strides {tensor.stride()} (make it contiguous first)")


def device_for(target: Union[int, str]) -> Device:
    """The :class:`Device` a GPU of ``target`` ("sm_90", 90, "gfx942") reports, from ARCHITECTURES: what the
    ahead-of-time compile test plans for (tests/helpers/aot.py). An architecture not in the table gets its family's
    least shared memory and one SM."""
    if isinstance(target, int) or str(target).isdigit():
        target = f"sm_{int(target)}"
    target = str(target)
    row = ARCHITECTURES.get(target)
    sm_count = row[1] if row else 1
    if target.startswith("gfx"):
        return Device(arch=target, sm_count=sm_count, vendor="hip")
    if not target.startswith("sm_") or not target[3:].isdigit():
        raise ValueError(f"target must be 'sm_<capability>' or a gfx name, got {target!r}")
    return Device(arch=int(target[3:]), sm_count=sm_count)


_INTERPRETER = Device(arch=0, sm_count=1, interpreter=True, shared_memory=1 << 30)


def device_of(device) -> Device:
    """The :class:`Device` of a torch device: the GPU's own properties (cached per device), or the interpreter on
    the CPU. On ROCm torch calls the GPU "cuda" and names its architecture in ``gcnArchName``."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return _INTERPRETER
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return _gpu_device(index)
    except Exception as exc:  # noqa: BLE001  (facts a plan cannot be sized from: no kernel can be planned)
        raise LaunchError("(device facts)", f"cuda:{index}", exc) from exc


@functools.lru_cache(maxsize=None)
def _gpu_device(index: int) -> Device:
    import torch

    props = torch.cuda.get_device_properties(index)
    # torch >= 2.5 reports the opt-in maximum; ROCm builds may report 0 there and the LDS in shared_memory_per_block
    shared = getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 0)
    if getattr(torch.version, "hip", None):
        arch = (getattr(props, "gcnArchName", "") or "").split(":")[0]
        if not arch.startswith("gfx"):
            raise RuntimeError(f"ROCm device {index} reports no gfx architecture (gcnArchName={arch!r})")
        return Device(arch=arch, sm_count=props.multi_processor_count, vendor="hip", shared_memory=shared or None)
    return Device(arch=props.major * 10 + props.minor, sm_count=props.multi_processor_count,
                  shared_memory=shared or None)
