"""Shared test setup: Triton runs in its interpreter on machines without CUDA, and outputs are NaN-poisoned."""

import os

import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported and when kernels are decorated, so set it, then import.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401
    except ImportError:
        pass

import pytest  # noqa: E402

import gvpo_kernels._alloc  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer a backend allocates starts as NaN, so an element that a kernel never writes fails loudly."""
    monkeypatch.setattr(gvpo_kernels._alloc, "POISON", True)
