"""Which backend runs a call: by name, or for backend="auto" by the tensors' device (gvpo_kernels/backend.py's
registry holds the backends).

"auto": Triton on CUDA (ROCm GPUs report "cuda" too), the C++ kernels on the CPU, torch elsewhere; where the first
choice cannot run it warns once per reason and runs the torch backend. A backend named explicitly that cannot run
raises a RuntimeError that says why.
"""

from __future__ import annotations

import warnings

import torch

from .. import backend
from ..backend import Backend
from ..layout import Layout

AUTO = {"cuda": "triton", "cpu": "cpu"}  # device type -> the backend "auto" tries first

_warned: set = set()


def select_backend(name: str, device: torch.device) -> Backend:
    """The backend for ``name`` on ``device``."""
    device = torch.device(device)
    if name == "auto":
        preferred = AUTO.get(device.type)
        if preferred is not None:
            reason = backend.unavailable_reason(preferred, device)
            if reason is None:
                return backend.get(preferred)
            if reason not in _warned:
                _warned.add(reason)
                warnings.warn(f"gvpo_kernels: backend='auto' runs the slower torch backend on {device.type} "
                              f"because {reason}", stacklevel=4)
        return backend.get("torch")
    reason = backend.unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run: {reason}")
    return backend.get(name)


def backend_for(name: str, device: torch.device, lay: Layout | None = None, num_tokens: int | None = None) -> Backend:
    """The backend of a call; an empty call (no token or no sequence) runs the torch backend, whose ops take empty
    tensors as they come, once the named backend has been checked to be able to run."""
    impl = select_backend(name, device)
    if lay is not None and (lay.num_tokens == 0 or lay.num_seqs == 0):
        return backend.get("torch")
    if num_tokens == 0:
        return backend.get("torch")
    return impl
