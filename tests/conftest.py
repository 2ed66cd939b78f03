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
from gvpo_kernels import torch_impl  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer a backend allocates starts as NaN, so an element that a kernel never writes fails loudly."""
    monkeypatch.setattr(gvpo_kernels._alloc, "POISON", True)


@pytest.fixture
def small_chunks(monkeypatch):
    """Make the torch backend cut every input into chunks of 7 rows (mid-sequence and across sequences)."""
    def chunk_bytes_for(vocab):
        monkeypatch.setattr(torch_impl, "CHUNK_BYTES", 4 * vocab * 7)
    return chunk_bytes_for
