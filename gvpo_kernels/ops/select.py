"""Which backend runs a call: by name, or for backend="auto" by the tensors' device (gvpo_kernels/backend.py's
registry holds the backends).

"auto": Triton on CUDA (ROCm GPUs report "cuda" too), the C++ kernels on the CPU, torch elsewhere; where the first
choice cannot run it warns once per reason and runs the torch backend. A backend named explicitly that cannot run
raises a RuntimeError that says why.

A run never crashes on a kernel that this GPU or this Triton cannot compile or launch: :func:`attempt` runs a
call's work and, on a ``triton.plan.LaunchError``, runs it again on the torch backend under "auto" (one warning per
kernel and device; the failed kernel is never compiled again in the process), or raises a RuntimeError that names
the kernel, the device and Triton's error under backend="triton". The contract's normaliser and coefficients are
the same on every backend, so a backward may run on torch after a Triton forward. :func:`last_backend` says which
backend the last call of this thread ran on.
"""

from __future__ import annotations

import threading
import warnings

import torch

from .. import backend
from ..backend import Backend
from ..layout import Layout
from ..triton.plan import LaunchError

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


_last = threading.local()


def last_backend() -> str | None:
    """The name of the backend the last call of this thread ran on (after any fallback), or None before one."""
    return getattr(_last, "name", None)


def attempt(name: str, impl: Backend, work):
    """``work(impl)``, and where a kernel fails to compile or launch, under "auto" ``work`` on the torch backend
    (after one warning per kernel and device); a named backend raises RuntimeError. ``name``: the backend asked
    for."""
    try:
        result = work(impl)
    except LaunchError as error:
        if name != "auto":
            raise RuntimeError(f"backend={name!r} cannot run here: {error}") from error
        if (error.kernel, error.device) not in _warned:
            _warned.add((error.kernel, error.device))
            warnings.warn(f"gvpo_kernels: {error}. backend='auto' runs the torch backend instead, for this call and "
                          "every later one that needs this kernel (results are the same; it is slower)",
                          stacklevel=4)
        impl = backend.get("torch")
        result = work(impl)
    _last.name = impl.name
    return result
