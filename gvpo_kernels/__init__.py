"""gvpo-kernels: fused kernels for the GVPO (Group Variance Policy Optimization) loss.

    import gvpo_kernels as gk
    loss = gk.gvpo_loss(logits, labels, rewards, group_size=k, ref_logprobs=old_logprobs, beta=0.1)
    loss = gk.linear_gvpo_loss(hidden, lm_head.weight, labels, rewards, group_size=k, ...)  # no logits at all
    logprob, entropy = gk.token_logprobs(logits, labels, return_entropy=True)    # per token, fused
    loss = gk.gvpo_loss_from_logprobs(token_logprobs, rewards, group_size=k, mask=response_mask)  # no logits

``gk.reference`` holds the plain PyTorch oracle with the same signature.
"""

from . import reference
from .functional import gvpo_loss, linear_gvpo_loss, linear_token_logprobs, token_logprobs
from .layout import GVPOStats
from .logprob_loss import gvpo_loss_from_logprobs
from .modules import GVPOLoss, LinearGVPOLoss

__all__ = ["gvpo_loss", "linear_gvpo_loss", "token_logprobs", "linear_token_logprobs", "GVPOLoss", "LinearGVPOLoss",
           "gvpo_loss_from_logprobs", "GVPOStats", "reference"]
__version__ = "0.1.0"
