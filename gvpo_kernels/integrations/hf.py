"""What a Hugging Face model's config says about its logits: :func:`logit_transform` reads how a transformers causal
LM transforms ``lm_head(hidden)`` before the softmax (Gemma-2's soft-cap, Cohere's scale, Granite's divisor, ...)
into a :class:`LogitTransform`, whose ``softcap`` / ``logit_scale`` are the keywords of the same names of
:func:`gvpo_kernels.linear_gvpo_loss` and :func:`gvpo_kernels.linear_token_logprobs`.

No TRL here (only ``torch``; a config is read by attribute): the TRL plug-in (``integrations/trl.py``) and the
minimal trainer (``gvpo_kernels/trainer``) both import it.

    transform = logit_transform(model.config)
    loss = gk.linear_gvpo_loss(hidden, model.lm_head.weight, labels, rewards, group_size=k, temperature=T,
                               softcap=transform.softcap, logit_scale=transform.logit_scale)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# How transformers 5.x's causal LMs transform lm_head(hidden) before the softmax, by config field (of the text config):
# logits = softcap * tanh(lm_head(hidden) * scale / softcap), or lm_head(hidden) * scale without a soft-cap.
SOFTCAP_FIELD = "final_logit_softcapping"  # Gemma-2/3/3n/4, VaultGemma, Nanochat, Mistral-Large-4, PaliGemma, ...
# Fields that multiply the logits: Cohere / Cohere2 / Cohere2-MoE / Aya Vision (logit_scale), Muse Glimmer / Spark
# (output_multiplier, before their soft-cap), Falcon-H1 (lm_head_multiplier).
MULTIPLIER_FIELDS = ("logit_scale", "output_multiplier", "lm_head_multiplier")
# logits_scaling divides in Granite's family and MiniCPM3 (which divides the bias-free head's input, the same thing)
# and multiplies in HyperCLOVA X: its meaning depends on the model type, and an unlisted type is refused.
LOGITS_SCALING_DIVIDES = frozenset({"granite", "granitemoe", "granitemoehybrid", "granitemoeshared", "granite_swa",
                                    "granitemoe_swa", "granite_docling_text", "granite4_vision_text", "minicpm3"})
LOGITS_SCALING_MULTIPLIES = frozenset({"hyperclovax"})


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to ``lm_head(hidden)`` before the softmax: the softmax sees
    ``softcap * tanh(z * logit_scale / softcap) / temperature`` (``z * logit_scale / temperature`` when ``softcap``
    is None). The keywords of the same names of :func:`gvpo_kernels.linear_gvpo_loss`."""

    softcap: float | None = None
    logit_scale: float = 1.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The transformed logits, in float32 math (any shape)."""
        z = logits.float() * self.logit_scale
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def describe(self) -> str:
        scaled = "lm_head(hidden)" if self.logit_scale == 1.0 else f"lm_head(hidden) * {self.logit_scale:g}"
        if self.softcap is None:
            return scaled
        return f"{self.softcap:g} * tanh({scaled} / {self.softcap:g})"


def logit_transform(config) -> LogitTransform:
    """The logit transform of a transformers model from its config (its text config for a multimodal one).

    Reads ``final_logit_softcapping`` (a soft-cap), ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``
    (multipliers) and ``logits_scaling`` (a divisor for Granite's family and MiniCPM3, a multiplier for HyperCLOVA
    X), as transformers' modeling code applies them and TRL's fused LM head reads them. A field that is absent or
    None, or a multiplier equal to 1, does nothing.

    Raises:
        ValueError: a value that is not a finite number > 0; ``logits_scaling`` on a model type whose use of it is
            not known; two multiplier fields set at once (no known model does; which one applies is unknown). The
            message starts with "the model's config sets" and names the field(s); callers may prefix who refuses.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_types = {getattr(text, "model_type", None), getattr(config, "model_type", None)} - {None, ""}

    def number(name):
        value = getattr(text, name, None)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"the model's config sets {name}={value!r}, which is understood only as a finite number "
                             "> 0 that transforms the logits")
        return float(value)

    softcap = number(SOFTCAP_FIELD)
    fields = {name: number(name) for name in (*MULTIPLIER_FIELDS, "logits_scaling")}
    fields = {name: value for name, value in fields.items() if value is not None and value != 1.0}
    if len(fields) > 1:
        raise ValueError(f"the model's config sets {', '.join(f'{n}={v!r}' for n, v in fields.items())}: no known "
                         "model combines them, so how its logits are computed cannot be told")
    scale = next(iter(fields.values()), 1.0)
    if "logits_scaling" in fields:
        if model_types & LOGITS_SCALING_DIVIDES:
            scale = 1.0 / scale
        elif not model_types & LOGITS_SCALING_MULTIPLIES:
            raise ValueError(
                f"the model's config sets logits_scaling={scale!r}, which divides the logits in Granite's family and "
                "MiniCPM3 and multiplies them in HyperCLOVA X; what it does in a model of type "
                f"{' / '.join(sorted(model_types)) or 'unknown'} is not known, so the model's log-probs cannot be "
                "reproduced")
    return LogitTransform(softcap=softcap, logit_scale=scale)


__all__ = ["LogitTransform", "logit_transform", "SOFTCAP_FIELD", "MULTIPLIER_FIELDS", "LOGITS_SCALING_DIVIDES",
           "LOGITS_SCALING_MULTIPLIES"]
