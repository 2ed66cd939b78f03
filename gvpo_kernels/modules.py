"""nn.Module wrappers that hold the loss's hyper-parameters; the per-batch tensors go to forward()."""

from __future__ import annotations

import torch

from .functional import gvpo_loss, linear_gvpo_loss


class GVPOLoss(torch.nn.Module):
    """``GVPOLoss(beta=0.1, temperature=1.0, softcap=None, logit_scale=1.0, entropy_coef=0.0, reduction="mean",
    ignore_index=-100, backend="auto", inplace_backward=False)(logits, labels, rewards, group_size=k, ...)``:
    :func:`gvpo_kernels.gvpo_loss`.

    forward takes logits (B, T, V) or (N, V), labels (B, T) or (N,), rewards (S,) and the per-batch keywords
    group_size / group_ids, mask, cu_seqlens, ref_logprobs, return_stats.
    """

    def __init__(self, beta: float = 0.1, temperature: float = 1.0, softcap: float | None = None,
                 logit_scale: float = 1.0, entropy_coef: float = 0.0, reduction: str = "mean",
                 ignore_index: int = -100, backend: str = "auto", inplace_backward: bool = False):
        super().__init__()
        self.beta, self.temperature, self.reduction = beta, temperature, reduction
        self.softcap, self.logit_scale, self.entropy_coef = softcap, logit_scale, entropy_coef
        self.ignore_index, self.backend, self.inplace_backward = ignore_index, backend, inplace_backward

    def forward(self, logits, labels, rewards, **batch):
        return gvpo_loss(logits, labels, rewards, beta=self.beta, temperature=self.temperature, softcap=self.softcap,
                         logit_scale=self.logit_scale, entropy_coef=self.entropy_coef, reduction=self.reduction,
                         ignore_index=self.ignore_index, backend=self.backend,
                         inplace_backward=self.inplace_backward, **batch)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")


class LinearGVPOLoss(torch.nn.Module):
    """``LinearGVPOLoss(beta=0.1, temperature=1.0, softcap=None, logit_scale=1.0, entropy_coef=0.0,
    reduction="mean", ignore_index=-100, backend="auto")(hidden, weight, labels, rewards, group_size=k, ...)``:
    :func:`gvpo_kernels.linear_gvpo_loss`.

    forward takes hidden (B, T, H) or (N, H), weight (V, H), labels (B, T) or (N,), rewards (S,) and the
    per-batch keywords bias, group_size / group_ids, mask, cu_seqlens, ref_logprobs, return_stats.
    """

    def __init__(self, beta: float = 0.1, temperature: float = 1.0, softcap: float | None = None,
                 logit_scale: float = 1.0, entropy_coef: float = 0.0, reduction: str = "mean",
                 ignore_index: int = -100, backend: str = "auto"):
        super().__init__()
        self.beta, self.temperature, self.reduction = beta, temperature, reduction
        self.softcap, self.logit_scale, self.entropy_coef = softcap, logit_scale, entropy_coef
        self.ignore_index, self.backend = ignore_index, backend

    def forward(self, hidden, weight, labels, rewards, **batch):
        return linear_gvpo_loss(hidden, weight, labels, rewards, beta=self.beta, temperature=self.temperature,
                                softcap=self.softcap, logit_scale=self.logit_scale, entropy_coef=self.entropy_coef,
                                reduction=self.reduction, ignore_index=self.ignore_index, backend=self.backend,
                                **batch)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
