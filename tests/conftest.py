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


# ----------------------------------------------------------------------------------------------------------------
# the backends: one list, with the reason each one is skipped where it cannot run


def _backend_param(name):
    from gvpo_kernels import backend

    reason = backend.unavailable_reason(name, DEVICE)
    return pytest.param(name, id=name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


BACKENDS = [_backend_param(name) for name in ("torch", "cpu", "triton")]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend that can run here, by name (one test per backend)."""
    return request.param


@pytest.fixture
def small_chunks_of(monkeypatch):
    """small_chunks_of(name): backend ``name`` cuts the linear path into chunks of a few rows and its blocks into a
    few vocabulary rows, so that every merge (chunks, threads, tiles, splits) is exercised on small inputs."""
    def apply(name):
        from gvpo_kernels import cpu
        monkeypatch.setattr(torch_impl, "CHUNK_BYTES", 4 * 7 * 64)
        if name == "cpu":
            monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * 300 * 20)
            monkeypatch.setattr(cpu, "CHUNK_HIDDEN_BYTES", 1)
            monkeypatch.setattr(cpu, "BLOCK_BYTES", 4 * 16 * 7)
        if name == "triton":
            from gvpo_kernels.triton import linear
            monkeypatch.setattr(linear, "CHUNK_BYTES", 1)
    return apply
