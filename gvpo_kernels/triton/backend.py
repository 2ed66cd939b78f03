"""The Triton backend (gvpo_kernels.backend.Backend), assembled from its modules: logprob.py (token stage), group.py
(group stage), linear.py (the linear path's kernels and plans) driven by linear_work.py. Imported on first use."""

from . import unavailable_reason  # noqa: F401
from .group import group_stage  # noqa: F401
from .linear_work import linear_work  # noqa: F401
from .logprob import token_backward, token_forward  # noqa: F401

name = "triton"
