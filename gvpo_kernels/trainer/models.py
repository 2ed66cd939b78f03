"""Load the policy and its tokenizer: a Hugging Face causal LM by name or path, or the built-in tiny model.

Also the few model facts the rest of the trainer needs: the autocast context, the EOS ids, the decoder / LM head
split that lets the loss run on hidden states instead of logits, and the model's logit transform (Gemma-2's
soft-cap, Cohere's scale, Granite's divisor: :func:`gvpo_kernels.integrations.hf.logit_transform`), checked
against the model's own logits when it loads.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging

from ..integrations.hf import LogitTransform, logit_transform
from . import tiny
from .checks import ConfigError


def autocast(device: torch.device, bf16: bool | None):
    """bf16 autocast on CUDA (``bf16`` None = on with CUDA), otherwise a no-op context."""
    enabled = (device.type == "cuda") if bf16 is None else bf16
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def attention_kernel(device: torch.device, requested: str | None, model_class=None) -> str:
    """``requested`` if given, else flash_attention_2 when CUDA and flash_attn are present, else sdpa; each only
    where ``model_class`` (a transformers model class; None: any) supports it, else eager (Gemma-2, whose
    attention soft-cap sdpa does not take)."""
    if requested:
        return requested

    def supports(flag: str) -> bool:
        return model_class is None or bool(getattr(model_class, flag, True))

    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None and supports(
            "_supports_flash_attn"):
        return "flash_attention_2"
    return "sdpa" if supports("_supports_sdpa") else "eager"


def causal_lm_class(name_or_path: str):
    """The class AutoModelForCausalLM loads ``name_or_path`` as (read from its config), or None when unknown."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(name_or_path))]
    except Exception:  # the checks read this config already; whatever fails here, from_pretrained will say
        return None


def load_policy(name_or_path: str | None, device: torch.device, *, seed: int, attn_implementation: str | None):
    """(model, tokenizer): the tiny built-in model when ``name_or_path`` is None, else AutoModelForCausalLM.

    The model is float32 (the optimizer's master weights; bf16 comes from autocast), on ``device``, with a clean
    generation config (only the special token ids) so that a checkpoint's sampling defaults (top_k,
    repetition_penalty, ...) never change the distribution the loss assumes.
    """
    if name_or_path is None:
        tokenizer = tiny.build_tokenizer()
        model = tiny.build_model(tokenizer, seed, attention_kernel(device, attn_implementation))
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        bar_was_on = logging.is_progress_bar_enabled()
        if bar_was_on:
            logging.disable_progress_bar()  # transformers' "Loading weights" bar: noise before the run's own
        try:
            attention = attention_kernel(device, attn_implementation,
                                         None if attn_implementation else causal_lm_class(name_or_path))
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32,
                                                         attn_implementation=attention)
        finally:
            if bar_was_on:
                logging.enable_progress_bar()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stop_ids = eos_ids(model, tokenizer)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids,
                                               pad_token_id=tokenizer.pad_token_id)
    model = model.to(device)
    if name_or_path is not None:  # the built-in model is a plain Llama
        check_logit_transform(model, name_or_path)
    return model, tokenizer


def check_logit_transform(model, name: str) -> LogitTransform:
    """The logit transform ``model``'s config announces (:func:`logit_transform`), once one forward on a few tokens
    shows that it is what the model computes: the decoder's last hidden state through the LM head and the transform
    gives the model's own logits. ConfigError otherwise: a transform field the model's code ignores, or logits
    transformed in a way the config does not say (the loss would score other log-probs than the model samples).
    Runs without gradient and without randomness (the model's training mode is restored), in float32, or under
    bf16 autocast with flash_attention_2 (which takes no float32); the head's output is the same computation on
    both sides, so the tolerance only covers the transform's rounding (a few bf16 roundings under autocast)."""
    transform = logit_transform(model.config)
    try:
        decoder, head = decoder_and_head(model)
    except TypeError as err:
        raise ConfigError(f"model: {name!r}: {err}") from None
    caught = []
    hook = decoder.register_forward_hook(lambda module, args, output: caught.append(output))
    ids = (torch.arange(1, 9, device=head.weight.device) % head.weight.shape[0])[None]
    half = "flash" in str(getattr(model.config, "_attn_implementation", None) or "")
    tol = 3e-2 if half else 1e-4
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(ids.device, half):
            logits = model(input_ids=ids, use_cache=False).logits.float()
            if not caught:
                raise ConfigError(f"model: {name!r}: its forward does not run its decoder (get_decoder()), so the "
                                  "loss cannot take its hidden states")
            hidden = caught[-1].last_hidden_state if hasattr(caught[-1], "last_hidden_state") else caught[-1][0]
            ours = transform.apply(head(hidden))
    finally:
        hook.remove()
        model.train(was_training)
    if not torch.allclose(ours, logits, rtol=tol, atol=tol * max(1.0, logits.abs().max().item())):
        raise ConfigError(f"model: {name!r}: its config says its logits are {transform.describe()} of its decoder's "
                          f"last hidden state, but its own logits differ from that by up to "
                          f"{(ours - logits).abs().max().item():.3g}: it ignores a transform its config sets, or "
                          "transforms its logits in a way its config does not say, and the loss would score other "
                          "log-probs than the model samples")
    return transform


def eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the model's generation config's EOS ids and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("model: neither its generation config nor its tokenizer defines an EOS token")
    return ids


def decoder_and_head(model):
    """(decoder, lm_head): the model without its head (returns last_hidden_state), and the head (an nn.Linear).
    The model's logits are ``logit_transform(model.config).apply(lm_head(last_hidden_state))``."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or not isinstance(head, torch.nn.Linear):
        raise TypeError(f"model: {type(model).__name__} has no decoder / nn.Linear LM head to split, so the loss "
                        "cannot run on hidden states")
    return decoder, head
