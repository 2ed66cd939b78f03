"""Check the arguments of a GVPO call and flatten any layout into tokens, sequences and groups.

Two layouts reach the losses: padded, where row b of a (B, T) labels tensor is sequence b, and packed, where
(N,) tokens are cut into sequences by ``cu_seqlens`` (as in flash-attn varlen). Both become one :class:`Layout`:
N flat tokens, each with its target id (or -1 when the token is not scored) and its sequence index, and S
sequences, each with its reward and group. Every backend consumes a ``Layout`` and nothing else.

Every bad argument raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape or value) with a
message that names the argument and says what was expected.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

BACKENDS = ("auto", "triton", "cpu", "torch")
REDUCTIONS = ("mean", "sum")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
_FLOAT32_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32: beta and temperature stay normal
_FLOAT32_MAX = 1.0 / _FLOAT32_TINY  # 2^126 ~ 8.5e37, so that 1 / value is a normal float32 too


class GVPOStats(NamedTuple):
    """Per-sequence statistics of a GVPO call (``return_stats=True``), each (S,) float32 and detached.

    seq_logprob:      s_i, the sum of the scored tokens' log-probs under the policy
    implicit_reward:  r_i = beta * (s_i - a_i)
    grad_seq_logprob: dL/ds_i, the coefficient that scales each token's (onehot - softmax) in the backward
    entropy:          the mean over the sequence's scored tokens of the policy's entropy at each of them,
                      -sum_v p_v log p_v of softmax(logits / T), in nats (0 for a sequence with no scored token);
                      from the loss's own pass over the logits (one more running sum)
    gvpo_loss:        () the GVPO part of the loss (the loss when entropy_coef = 0)
    entropy_bonus:    () entropy_coef times the mean token entropy over the call's scored tokens: the loss is
                      gvpo_loss - entropy_bonus
    """

    seq_logprob: torch.Tensor
    implicit_reward: torch.Tensor
    grad_seq_logprob: torch.Tensor
    entropy: torch.Tensor
    gvpo_loss: Optional[torch.Tensor] = None
    entropy_bonus: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Layout:
    """Flat view of one GVPO call: N tokens, S sequences, G groups, all on the inputs' device.

    target:        (N,) int64, the label of each scored token, -1 for tokens that are not scored
    token_seq:     (N,) int64, the sequence each token belongs to
    token_ref:     (N,) float32 anchor log-probs (0 where not scored), or None for on-policy
    cu_seqlens:    (S + 1,) int64, tokens of sequence i are cu_seqlens[i]:cu_seqlens[i + 1]
    rewards:       (S,) float32
    seq_group:     (S,) int64 group of each sequence, in [0, G)
    group_order:   (S,) int64 sequences sorted by group; group g is group_order[group_ptr[g]:group_ptr[g + 1]]
    group_ptr:     (G + 1,) int64
    max_group_size: the largest group's size
    scale:         1 / G for reduction="mean", 1 for "sum"
    """

    target: torch.Tensor
    token_seq: torch.Tensor
    token_ref: Optional[torch.Tensor]
    cu_seqlens: torch.Tensor
    rewards: torch.Tensor
    seq_group: torch.Tensor
    group_order: torch.Tensor
    group_ptr: torch.Tensor
    max_group_size: int
    scale: float

    @property
    def num_tokens(self) -> int:
        return self.target.numel()

    @property
    def num_seqs(self) -> int:
        return self.rewards.numel()

    @property
    def num_groups(self) -> int:
        return self.group_ptr.numel() - 1


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) padded or (N, D) packed -> a (B', T', D) view whose flat row n is token n.

    Kernels address row n as (n // T', n % T'), so a padded tensor sliced along T (``logits[:, :-1]``) is read
    in place, without the copy that flattening it would need. The last dimension is made contiguous.
    """
    x = x if x.dim() == 3 else x.unsqueeze(0)
    return x if x.stride(-1) == 1 else x.contiguous()


def flat_rows(rows: torch.Tensor) -> torch.Tensor:
    """The (N, D) view of (B', T', D) rows (a copy only where the strides do not allow a view); D may be 0."""
    return rows.reshape(rows.shape[0] * rows.shape[1], rows.shape[-1])


# ----------------------------------------------------------------------------------------------------------------
# argument checks


def check_options(*, beta, temperature, reduction, ignore_index, backend, softcap=None, logit_scale=1.0,
                  entropy_coef=0.0) -> None:
    """Check the scalar keyword arguments shared by both losses (and the token statistics, which pass beta=None)."""
    if beta is not None:
        _check_positive_float32("beta", beta, "GVPO's beta is a KL coefficient: 0 gives no gradient and a "
                                "negative one trains the policy away from the reward")
    _check_positive_float32("temperature", temperature, "the logits are divided by it")
    if softcap is not None:
        _check_positive_float32("softcap", softcap, "the logits are softcap * tanh(logits / softcap); None for none")
    _check_positive_float32("logit_scale", logit_scale, "the logits are multiplied by it (1.0 for none)")
    if softcap is None and not _FLOAT32_TINY <= float(logit_scale) / float(temperature) <= _FLOAT32_MAX:
        raise ValueError(f"logit_scale / temperature must lie in [{_FLOAT32_TINY:.3g}, {_FLOAT32_MAX:.3g}] to be "
                         f"computed in float32, got {logit_scale} / {temperature}")
    _check_finite_float("entropy_coef", entropy_coef)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_int64("ignore_index", ignore_index)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_flag(name, value) -> None:
    """A boolean option: ``True`` or ``False`` (or a numpy bool), never a truthy string or number."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not isinstance(value, bool) and not numpy_bool:
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_process_group(name, value) -> None:
    """None or a torch.distributed ProcessGroup."""
    if value is None:
        return
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(value, dist.ProcessGroup)):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {type(value).__name__}")


def check_int64(name, value) -> None:
    """An integer option (numpy integers too, not bool) that fits in int64, as the kernels hold it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -(2**63) <= int(value) < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")


def check_count(name, value) -> None:
    """A positive integer option that fits in int64 (group_size)."""
    check_int64(name, value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_positive_float32(name, value, why: str) -> None:
    """A real number > 0 that float32 holds as a normal number with a finite reciprocal, as the kernels use it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large to represent as a float (an int of {len(str(abs(value)))} digits)"
                         ) from None
    if not math.isfinite(as_float):
        raise ValueError(f"{name} must be finite, got {value}")
    if not as_float > 0:
        raise ValueError(f"{name} must be > 0 ({why}), got {value}")
    if not _FLOAT32_TINY <= as_float <= _FLOAT32_MAX:
        raise ValueError(f"{name} must lie in [{_FLOAT32_TINY:.3g}, {_FLOAT32_MAX:.3g}] to be computed in float32, "
                         f"got {value:.3g}")


def _check_finite_float(name, value) -> None:
    """A finite real number (any sign) that float32 holds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large to represent as a float") from None
    if not math.isfinite(as_float) or abs(as_float) > _FLOAT32_MAX:
        raise ValueError(f"{name} must be finite and at most {_FLOAT32_MAX:.3g} in magnitude, got {value}")


def check_logits(logits, labels) -> int:
    """Check logits (B, T, V) or (N, V) against labels (B, T) or (N,); return V."""
    _check_tensor("logits", logits)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (B, T, V) padded or (N, V) packed, got shape {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError("logits must have a vocabulary dimension V >= 1")
    _check_labels(labels, logits.shape[:-1], "logits", logits.device)
    return logits.shape[-1]


def check_linear(hidden, weight, bias, labels) -> int:
    """Check hidden (B, T, H) or (N, H), weight (V, H), bias (V,) or None against labels; return V."""
    _check_tensor("hidden", hidden)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (B, T, H) padded or (N, H) packed, got shape {tuple(hidden.shape)}")
    _check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H) as in nn.Linear, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight and hidden must share a dtype, got {weight.dtype} and {hidden.dtype} "
                        "(cast one of them, e.g. hidden.to(weight.dtype))")
    _check_device("weight", weight, hidden.device)
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},), one per vocabulary row, got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        _check_device("bias", bias, hidden.device)
    _check_labels(labels, hidden.shape[:-1], "hidden", hidden.device)
    return weight.shape[0]


def _check_labels(labels, shape, against: str, device) -> None:
    _check_tensor("labels", labels)
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must have shape {tuple(shape)} to match {against}, got {tuple(labels.shape)}")
    _check_device("labels", labels, device)


def has_overlap(x: torch.Tensor) -> bool:
    """Whether two elements of ``x`` may share memory (an ``expand``ed or overlapping ``as_strided`` view).

    Exact for the usual layouts: sorted by stride, each dimension must step past everything the smaller ones span.
    """
    if x.numel() == 0:
        return False
    span = 0  # the largest offset reachable through the dimensions seen so far
    for stride, size in sorted((abs(st), n) for st, n in zip(x.stride(), x.shape) if n > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def _check_tensor(name, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_device(name, tensor, device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the logits/hidden states are on {device}")


# ----------------------------------------------------------------------------------------------------------------
# flattening


def build(
    labels: torch.Tensor,
    rewards: torch.Tensor,
    *,
    vocab_size: int,
    group_size=None,
    group_ids=None,
    mask=None,
    cu_seqlens=None,
    ref_logprobs=None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Layout:
    """Check the per-token and per-sequence arguments and flatten them into a :class:`Layout`.

    ``labels`` is (B, T) for padded input or (N,) for packed input with ``cu_seqlens``; its shape and dtype have
    already been checked against the logits or hidden states (:func:`check_logits`). The device of ``labels`` is
    the device of the call.
    """
    device = labels.device
    packed = labels.dim() == 1
    num_tokens = labels.numel()

    # sequences ------------------------------------------------------------------------------------------------
    cu_host = _packed_offsets(labels, cu_seqlens)
    if packed:
        num_seqs = cu_host.numel() - 1
        lengths = (cu_host[1:] - cu_host[:-1]).to(device, non_blocking=True)
        cu = cu_host.to(device, non_blocking=True)
        token_seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths, output_size=num_tokens)
    else:
        num_seqs, seq_len = labels.shape
        cu = torch.arange(num_seqs + 1, device=device) * seq_len
        token_seq = torch.arange(num_tokens, device=device) // max(seq_len, 1)
    _check_tensor("rewards", rewards)
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
    if tuple(rewards.shape) != (num_seqs,):
        raise ValueError(f"rewards must have shape ({num_seqs},), one per sequence, got {tuple(rewards.shape)}")
    _check_device("rewards", rewards, device)

    # groups -----------------------------------------------------------------------------------------------------
    seq_group, group_order, group_ptr, max_group_size = _groups(group_size, group_ids, num_seqs, device)

    # tokens -----------------------------------------------------------------------------------------------------
    flat_labels, scored, target, mask_ok, labels_ok = _scored_targets(labels, mask, ignore_index, vocab_size)

    token_ref = None
    ref_ok = torch.ones((), dtype=torch.bool, device=device)
    if ref_logprobs is not None:
        _check_tensor("ref_logprobs", ref_logprobs)
        if not ref_logprobs.is_floating_point():
            raise TypeError(f"ref_logprobs must be a floating-point tensor, got {ref_logprobs.dtype}")
        if tuple(ref_logprobs.shape) != tuple(labels.shape):
            raise ValueError(
                f"ref_logprobs must have the shape of labels {tuple(labels.shape)}, got {tuple(ref_logprobs.shape)}"
            )
        _check_device("ref_logprobs", ref_logprobs, device)
        flat_ref = ref_logprobs.detach().reshape(-1).float()
        ref_ok = ~(scored & ~torch.isfinite(flat_ref)).any()
        token_ref = torch.where(scored, flat_ref, torch.zeros_like(flat_ref))

    rewards32 = rewards.detach().float().contiguous()  # kernels read it through a raw pointer
    # One device sync for every value check; the details are worked out only on the error path.
    mask_ok, labels_ok, ref_ok, rewards_ok = torch.stack(
        [mask_ok, labels_ok, ref_ok, torch.isfinite(rewards32).all()]
    ).tolist()
    _raise_token_errors(mask_ok, labels_ok, flat_labels, scored, vocab_size, ignore_index)
    if not ref_ok:
        raise ValueError("ref_logprobs must be finite at every scored position")
    if not rewards_ok:
        raise ValueError("rewards must be finite (found NaN or inf)")

    num_groups = group_ptr.numel() - 1
    return Layout(
        target=target,
        token_seq=token_seq,
        token_ref=token_ref,
        cu_seqlens=cu,
        rewards=rewards32,
        seq_group=seq_group,
        group_order=group_order,
        group_ptr=group_ptr,
        max_group_size=max_group_size,
        scale=1.0 / max(num_groups, 1) if reduction == "mean" else 1.0,
    )



def token_targets(labels, *, vocab_size: int, mask=None, cu_seqlens=None, ignore_index: int = -100) -> torch.Tensor:
    """(N,) int64 target of each flat token (-1 where not scored), with the per-token checks of :func:`build`
    (mask, labels in range at scored positions, cu_seqlens for packed input): what the token statistics need."""
    _packed_offsets(labels, cu_seqlens)
    flat_labels, scored, target, mask_ok, labels_ok = _scored_targets(labels, mask, ignore_index, vocab_size)
    mask_ok, labels_ok = torch.stack([mask_ok, labels_ok]).tolist()
    _raise_token_errors(mask_ok, labels_ok, flat_labels, scored, vocab_size, ignore_index)
    return target


def _scored_targets(labels, mask, ignore_index, vocab_size):
    """-> flat labels, scored (N,) bool, target (N,) int64 (-1 where not scored), and the two value checks as
    device booleans (mask holds 0/1, scored labels lie in [0, V)) for the caller's one sync."""
    device = labels.device
    flat_labels = labels.reshape(-1).long()
    scored = flat_labels != ignore_index
    mask_ok = torch.ones((), dtype=torch.bool, device=device)
    if mask is not None:
        _check_tensor("mask", mask)
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask must have the shape of labels {tuple(labels.shape)}, got {tuple(mask.shape)}")
        _check_device("mask", mask, device)
        flat_mask = mask.reshape(-1)
        if flat_mask.dtype != torch.bool:
            if flat_mask.is_complex():
                raise TypeError("mask must be bool or hold 0/1 values, got a complex tensor")
            mask_ok = ((flat_mask == 0) | (flat_mask == 1)).all()
            flat_mask = flat_mask != 0
        scored = scored & flat_mask
    labels_ok = ~(scored & ((flat_labels < 0) | (flat_labels >= vocab_size))).any()
    target = torch.where(scored, flat_labels, torch.full_like(flat_labels, -1))
    return flat_labels, scored, target, mask_ok, labels_ok


def _raise_token_errors(mask_ok, labels_ok, flat_labels, scored, vocab_size, ignore_index) -> None:
    if not mask_ok:
        raise ValueError("mask must be bool or hold only 0 and 1")
    if not labels_ok:
        bad = (scored & ((flat_labels < 0) | (flat_labels >= vocab_size))).nonzero()[0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) at scored positions; flat position {bad} holds "
            f"{flat_labels[bad].item()} (mark it with ignore_index={ignore_index} or mask=False to skip it)"
        )

def _packed_offsets(labels, cu_seqlens):
    """The checked (S + 1,) int64 offsets on the host for packed (N,) labels; None for padded (B, T) ones, which
    take no cu_seqlens."""
    if labels.dim() == 1:
        if cu_seqlens is None:
            raise ValueError("cu_seqlens is required for packed (N, ...) input: pass the (S + 1,) sequence offsets")
        return _check_cu_seqlens(cu_seqlens, labels.numel(), labels.device)
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens applies to packed (N, ...) input only; this input is padded (B, T, ...)")
    return None


def _check_cu_seqlens(cu_seqlens, num_tokens: int, device) -> torch.Tensor:
    _check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in INDEX_DTYPES:
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with S + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    _check_device("cu_seqlens", cu_seqlens, device)
    cu = cu_seqlens.to("cpu", torch.int64).contiguous()  # kernels read it through a raw pointer
    if cu[0].item() != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0].item()}")
    if (cu[1:] < cu[:-1]).any():
        raise ValueError("cu_seqlens must be non-decreasing")
    if cu[-1].item() != num_tokens:
        raise ValueError(f"cu_seqlens must end at the number of tokens N={num_tokens}, got {cu[-1].item()}")
    return cu


def _groups(group_size, group_ids, num_seqs: int, device):
    """Return (seq_group, group_order, group_ptr, max_group_size) on ``device``; bookkeeping runs on the host."""
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (consecutive runs of k sequences) or group_ids (S,)")
    if group_size is not None:
        check_count("group_size", group_size)
        group_size = int(group_size)
        if num_seqs % group_size:
            raise ValueError(f"the number of sequences S={num_seqs} is not divisible by group_size={group_size}")
        seq_group = torch.arange(num_seqs) // group_size
        order = torch.arange(num_seqs)
        counts = torch.full((num_seqs // group_size,), group_size)
    else:
        _check_tensor("group_ids", group_ids)
        if group_ids.dtype not in INDEX_DTYPES:
            raise TypeError(f"group_ids must be an int64 (or int32) tensor, got {group_ids.dtype}")
        if tuple(group_ids.shape) != (num_seqs,):
            raise ValueError(f"group_ids must have shape ({num_seqs},), one per sequence, got {tuple(group_ids.shape)}")
        _check_device("group_ids", group_ids, device)
        _, seq_group, counts = torch.unique(group_ids.cpu(), return_inverse=True, return_counts=True)
        order = torch.argsort(seq_group, stable=True)
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=ptr[1:])
    to = dict(device=device, dtype=torch.int64, non_blocking=True)
    return seq_group.to(**to), order.to(**to), ptr.to(**to), int(counts.max()) if counts.numel() else 0


# ----------------------------------------------------------------------------------------------------------------
# per-token log-probs (gvpo_loss_from_logprobs): no logits, no labels


def check_token_logprobs(token_logprobs, **same_device) -> torch.Tensor:
    """Check ``token_logprobs``, (B, T) padded or (N,) packed and floating-point, and that every tensor in
    ``same_device`` (name=value; None skipped) is on its device, with mask and ref_logprobs of its shape.

    Returns the int64 zeros of its shape that stand for the labels in :func:`build` with ``vocab_size=1``: every
    position holds the one valid id, so the mask alone decides which positions are scored.
    """
    _check_tensor("token_logprobs", token_logprobs)
    if token_logprobs.dtype not in FLOAT_DTYPES:
        raise TypeError(f"token_logprobs must be float32, bfloat16, float16 or float64, got {token_logprobs.dtype}")
    if token_logprobs.dim() not in (1, 2):
        raise ValueError(f"token_logprobs must be (B, T) padded or (N,) packed, got shape "
                         f"{tuple(token_logprobs.shape)}")
    shape, device = tuple(token_logprobs.shape), token_logprobs.device
    for name, value in same_device.items():
        if not isinstance(value, torch.Tensor):
            continue  # None, or a wrong kind that build() names
        if name in ("mask", "ref_logprobs") and tuple(value.shape) != shape:
            raise ValueError(f"{name} must have the shape of token_logprobs {shape}, got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but token_logprobs is on {device}")
    return torch.zeros(shape, dtype=torch.int64, device=device)
