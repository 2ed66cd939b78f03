"""A kernel launch as data: what a launcher decided (kernel, grid, arguments, meta-parameters), apart from running it.

Every launcher in this package is split in two: a pure *plan* function (shapes, dtypes, device properties ->
:class:`Plan`; it reads no tensor values and launches nothing) and :func:`launch`, which executes a plan. The GPU
runs plans; the ahead-of-time compile test (tests/test_aot.py) compiles the very same plans, built on meta tensors
of real model shapes, to cubin for sm_80 / sm_90 without a GPU. Nothing has to be patched to see what a launcher
would do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Device:
    """What a plan may know of the GPU: its compute capability (major * 10 + minor) and its SM count.

    ``interpreter`` is True under TRITON_INTERPRET=1 on the CPU (plans may then pick interpreter-friendly choices).
    """

    arch: int
    sm_count: int
    interpreter: bool = False


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


def launch(plan: Plan) -> None:
    """Run ``plan`` on the current device (or in Triton's interpreter); a grid with no program launches nothing."""
    if all(plan.grid):
        plan.kernel[plan.grid](*plan.args, **plan.meta)


def check_flat(name: str, tensor, dtype) -> None:
    """What a kernel that reads ``tensor`` through a raw pointer at ``ptr + i`` needs: the dtype, and consecutive
    elements (stride 1; a strided, transposed or stride-0 view would be misread). Raises ValueError naming it."""
    if tensor.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} for the Triton kernels, got {tensor.dtype}")
    if tensor.dim() > 1 or (tensor.numel() > 1 and tensor.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous 0-D or 1-D tensor for the Triton kernels, got shape "
                         f"{tuple(tensor.shape)} with strides {tensor.stride()} (make it contiguous first)")


def device_of(device) -> Device:
    """The :class:`Device` of a torch device: a CUDA GPU's properties, or the interpreter on the CPU."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return Device(arch=0, sm_count=1, interpreter=True)
    props = torch.cuda.get_device_properties(device)
    return Device(arch=props.major * 10 + props.minor, sm_count=props.multi_processor_count)
