"""The Triton backend (gvpo_kernels.backend.Backend), assembled from its kernel modules: logprob.py (token stage),
linear.py (linear path's chunk kernels), group.py (group stage). Imported on first use only."""

from . import unavailable_reason  # noqa: F401
from .group import group_stage  # noqa: F401
from .linear import linear_work  # noqa: F401
from .logprob import token_backward, token_forward  # noqa: F401

name = "triton"
