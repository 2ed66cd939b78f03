"""Load the policy and its tokenizer: a Hugging Face causal LM by name or path, or the built-in tiny model.

Also the few model facts the rest of the trainer needs: the autocast context, the EOS ids, and the
decoder / LM head split that lets the loss run on hidden states instead of logits.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging

from . import tiny


def autocast(device: torch.device, bf16: bool | None):
    """bf16 autocast on CUDA (``bf16`` None = on with CUDA), otherwise a no-op context."""
    enabled = (device.type == "cuda") if bf16 is None else bf16
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def attention_kernel(device: torch.device, requested: str | None) -> str:
    """``requested`` if given, else flash_attention_2 when CUDA and flash_attn are present, else sdpa."""
    if requested:
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


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
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=torch.float32, attn_implementation=attention_kernel(device, attn_implementation))
        finally:
            if bar_was_on:
                logging.enable_progress_bar()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stop_ids = eos_ids(model, tokenizer)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids,
                                               pad_token_id=tokenizer.pad_token_id)
    return model.to(device), tokenizer


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
    """(decoder, lm_head): the model without its head (returns last_hidden_state), and the head (an nn.Linear)."""
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, name, None) not in (None, 1.0):
            raise ValueError(f"model: its config sets {name}, which the linear GVPO loss does not apply")
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or not isinstance(head, torch.nn.Linear):
        raise TypeError(f"model: {type(model).__name__} has no decoder / nn.Linear LM head to split, so the loss "
                        "cannot run on hidden states")
    return decoder, head
