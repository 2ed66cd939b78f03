"""Output buffers for the backends: uninitialised, or NaN-filled under test so an unwritten element fails loudly."""

import torch

POISON = False  # tests switch this on (tests/conftest.py)


def empty(shape, *, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out
