"""The embedded default: a character tokenizer, a tiny Llama-style model and the built-in "add" task, all in code.

Nothing is downloaded. The task is small additions, ``"3+4="`` -> ``"7"``, scored by the last number in the
completion. A freshly initialised model samples characters almost uniformly, so it hits the right number in a few
percent of its samples: rare, but frequent enough in groups of 8 for GVPO to find and reinforce it from the reward
alone. It has to learn both to emit digits and which digits answer which prompt.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = "0123456789+=? "
MAX_OPERAND = 4  # operands 0..4: 25 prompts, answers 0..8


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of CHARS plus <pad>, <s> (prepended to every text), </s> (EOS) and <unk>."""
    vocab = {token: i for i, token in enumerate(SPECIALS + tuple(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_model(tokenizer, seed: int, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 64, 4 heads, ~0.1M parameters), initialised from ``seed``."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         attn_implementation=attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def task_rows(demonstrations: bool = False) -> list[dict]:
    """The built-in task: every ``"a+b="`` with a, b in 0..MAX_OPERAND, answer ``str(a + b)``; with
    ``demonstrations`` (``--demos``), each row's ``demonstration`` too: the answer as the policy would write it (the
    trainer adds the EOS)."""
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b), **({"demonstration": str(a + b)} if demonstrations else {})}
            for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
