"""The autograd layer: one module per entry point, each with its eager autograd.Functions and the torch.library
custom ops (namespace ``gvpo``) that torch.compile traces as single nodes.

    logits.py   the GVPO loss from logits            linear.py   the GVPO loss from hidden states + LM head
    stats.py    per-token log-probs and entropies    select.py   which backend runs a call
    common.py   Options (a call's non-tensor options, one frozen object), Data, the stage, guards

Eager calls go through plain autograd.Functions: calling a custom op imports torch's compile machinery (sympy, fake
tensors: ~900 modules, ~150 MB), which an eager caller should not pay for. Under torch.compile the ops run, so the
compiler sees only their fake implementations and the autograd formulas registered with them. Either way the same
implementation runs: layout.build (the checks that read values), then the backend (backend.py's contract).
"""

from .common import Data, Options
from .linear import linear_gvpo_loss
from .logits import gvpo_loss
from .select import select_backend
from .stats import linear_token_stats, token_stats

__all__ = ["Data", "Options", "gvpo_loss", "linear_gvpo_loss", "token_stats", "linear_token_stats", "select_backend"]
