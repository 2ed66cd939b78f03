"""The logits-path and group-stage launches that tests/helpers/aot.py compiles: the package's own plans on meta tensors of
real model shapes (nothing is allocated, nothing runs). The logits kernels also as their ENTROPY variants
(token_logprobs(return_entropy=True), an entropy bonus: labels "fwd-entropy ..." / "bwd-entropy ...") and, in
bf16, their SOFTCAP variants (Gemma-2's soft-capped logits: "...-softcap ...").

N = 16384 tokens; V = 152064 (Qwen2.5) and 128256 (Llama-3); bf16 and fp32 logits; padded (16 x 1025 logits read
in place as ``logits[:, :-1]``) and packed ((N, V) -> (1, N, V)); N x V = 2.5e9 at V = 152064, past 2^31, so the
packed batch stride is an int64. V = 32003 (not a multiple of 8) checks the scalar-load variant still compiles.
"""

import dataclasses

import torch

from gvpo_kernels.backend import Coefs, LogitSpec, TokenStats
from gvpo_kernels.layout import Layout
from gvpo_kernels.triton import group, logprob

N_TOKENS = 16384
LOGITS_VOCABS = (152064, 128256)
ODD_VOCAB = 32003
NUM_SEQS = 64


def meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def token_layout(num_tokens=N_TOKENS, num_seqs=NUM_SEQS, group_size=8, with_ref=False) -> Layout:
    """A Layout of meta tensors: what layout.build would hand the kernels."""
    i64, f32 = torch.int64, torch.float32
    return Layout(target=meta((num_tokens,), i64), token_seq=meta((num_tokens,), i64),
                  token_ref=meta((num_tokens,), f32) if with_ref else None,
                  cu_seqlens=meta((num_seqs + 1,), i64), rewards=meta((num_seqs,), f32),
                  seq_group=meta((num_seqs,), i64), group_order=meta((num_seqs,), i64),
                  group_ptr=meta((num_seqs // group_size + 1,), i64), max_group_size=group_size,
                  scale=group_size / num_seqs)


def _rows(layout_name, vocab, dtype):
    if layout_name == "padded":
        return meta((16, N_TOKENS // 16 + 1, vocab), dtype)[:, :-1]
    return meta((N_TOKENS, vocab), dtype).unsqueeze(0)


def logits_plans(device):
    """Forward, backward into a fresh buffer, and in-place backward (padded) for every shape, dtype and layout; the
    forward and backward with entropy too, and (bf16) the soft-capped variants of both."""
    f32 = torch.float32
    cases = [(v, d, lay) for v in LOGITS_VOCABS for d in (torch.bfloat16, f32) for lay in ("padded", "packed")]
    cases.append((ODD_VOCAB, torch.bfloat16, "padded"))
    plans = []
    for vocab, dtype, layout_name in cases:
        tag = f"V={vocab} {str(dtype).split('.')[-1]} {layout_name}"
        rows, lay = _rows(layout_name, vocab, dtype), token_layout()
        specs = [("", LogitSpec())] + ([("-softcap", LogitSpec(1.0, 30.0))] if dtype == torch.bfloat16 else [])
        for suffix, spec in specs:
            for entropy in (False, True):
                name = ("-entropy" if entropy else "") + suffix
                per_token = [meta((N_TOKENS,), f32) for _ in range(3)]
                out = TokenStats(per_token[0], meta((2, N_TOKENS), f32), per_token[1] if entropy else None)
                coefs = Coefs(*per_token) if entropy else Coefs(per_token[0])
                fwd = logprob.forward_plan(rows, lay.target, out, spec, device)
                bwd = logprob.backward_plan(rows, lay.target, out.norm, coefs, spec, meta(rows.shape, dtype), device)
                plans += [dataclasses.replace(fwd, label=f"fwd{name} {tag}"),
                          dataclasses.replace(bwd, label=f"bwd{name} {tag}")]
                if layout_name == "padded" and not entropy and not suffix:  # inplace_backward: over the logits
                    inplace = logprob.backward_plan(rows, lay.target, out.norm, coefs, spec, rows, device)
                    plans.append(dataclasses.replace(inplace, label=f"bwd-inplace {tag}"))
    return plans


def group_plans(device):
    """The group stage on-policy and with an anchor, groups of 8 and of 64."""
    plans = []
    f32 = torch.float32
    for group_size in (8, 64):
        for with_ref in (False, True):
            lay = token_layout(num_seqs=2 * group_size, group_size=group_size, with_ref=with_ref)
            outs = [meta((lay.num_seqs,), f32) for _ in range(3)] + [meta((lay.num_groups,), f32)]
            plan = group.group_plan(meta((N_TOKENS,), f32), lay, 0.1, *outs, device)
            plans.append(dataclasses.replace(plan, label=f"group k={group_size} ref={with_ref}"))
    return plans


def is_logits(label: str) -> bool:
    return label.startswith(("fwd ", "bwd ", "bwd-inplace ", "fwd-entropy", "bwd-entropy", "fwd-softcap",
                             "bwd-softcap"))


def vectorisable(label: str) -> bool:
    """A logits case whose rows start 16-byte aligned (V a multiple of 8), so its row loads must be 16 bytes wide."""
    return is_logits(label) and f"V={ODD_VOCAB} " not in label
