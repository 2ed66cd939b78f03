"""Triton backend (CUDA GPUs; the CPU only under TRITON_INTERPRET=1).

This file only answers whether the backend can run; the kernels live in ``logprob.py`` (token stage),
``group.py`` (group stage) and ``linear.py`` (linear path), imported when the backend is first used so that the
package imports without Triton. Each launcher there is a pure plan (``plan.py``: shapes, dtypes, device -> Plan)
and a launch of it; tests/helpers/aot.py compiles the same plans for every NVIDIA and AMD generation in use (sm_80 to
sm_120, gfx90a to gfx950) on a machine without a GPU. On ROCm torch calls the GPU "cuda": the same kernels run
there, with plans sized from the device's own facts (``plan.device_of``).
"""

import os

import torch


OLDEST_TRITON = (3, 5)  # the oldest release the kernels are compiled and checked with (scripts/aot-oldest-triton.sh)


def unavailable_reason(device: torch.device):
    """None when the Triton kernels can run on tensors on ``device``, else a sentence saying why not."""
    try:
        import triton
    except ImportError as exc:
        return f"Triton is not installed ({exc}); `pip install triton` on Linux"
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if version < OLDEST_TRITON:
        return (f"Triton {triton.__version__} is older than {'.'.join(map(str, OLDEST_TRITON))}, the oldest release "
                "these kernels are checked with")
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"the tensors are on {device.type}, and Triton kernels run on CUDA GPUs; on the CPU they run only in "
        "Triton's interpreter, with TRITON_INTERPRET=1 set before triton is first imported"
    )
