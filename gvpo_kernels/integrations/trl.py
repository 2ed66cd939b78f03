"""TRL plug-in: ``GVPOTrainer``, a ``trl.GRPOTrainer`` whose loss is the fused GVPO loss.

A TRL user changes two lines::

    from gvpo_kernels.integrations.trl import GVPOConfig, GVPOTrainer
    trainer = GVPOTrainer(model=model, reward_funcs=reward_fn, args=GVPOConfig(..., gvpo_beta=0.1),
                          train_dataset=dataset, processing_class=tokenizer)

Everything before the loss is TRL's own (generation, rewards, tools, logging). What changes: the batch carries the
raw weighted rewards and each completion's prompt group; the buffered batch is shuffled by whole groups; the loss
runs the model for its last hidden state only and calls :func:`gvpo_kernels.linear_gvpo_loss` with TRL's mask,
temperature, the model's logit transform (``integrations.hf``: soft-cap, scale), TRL's entropy bonus (static or
adaptive, with TRL's semantics) and the anchor ``gvpo_anchor`` ("old": the sampling policy, the official recipe's;
"ref": TRL's frozen reference); TRL's old-policy and reference log-prob passes call
:func:`gvpo_kernels.linear_token_logprobs`. The LM head runs in the precision of TRL's own fused head
(:func:`lm_head_dtype`). docs/trl.md says each step, which GRPOConfig options do not apply (with a warning), which
metrics are logged, and the limits (ZeRO-3 and a PEFT adapter on the LM head are refused).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

from ..functional import linear_gvpo_loss, linear_token_logprobs
# The logit transform lives in the TRL-free hf module (the minimal trainer reads it too); re-exported here.
from .hf import (LOGITS_SCALING_DIVIDES, LOGITS_SCALING_MULTIPLIES, MULTIPLIER_FIELDS,  # noqa: F401
                 SOFTCAP_FIELD, LogitTransform, logit_transform)

# Options of GRPOConfig that GVPOTrainer ignores; a value other than GRPOConfig's default gets a warning.
INAPPLICABLE_OPTIONS = {
    "epsilon": "GVPO has no importance ratio to clip",
    "epsilon_high": "GVPO has no importance ratio to clip",
    "delta": "GVPO has no importance ratio to clip",
    "loss_type": "the loss is always GVPO",
    "importance_sampling_level": "GVPO has no importance ratio",
    "scale_rewards": "GVPO centres rewards within each group and never divides by a standard deviation",
    "multi_objective_aggregation": "GVPO uses the weighted sum of the reward functions",
    "beta": "TRL's KL penalty is not added; GVPO's KL coefficient is gvpo_beta, and with gvpo_anchor='old' the "
            "reference model TRL loads for beta != 0 is unused (leave beta=0)",
    "top_entropy_quantile": "every scored completion token enters the loss and the entropy bonus",
    "off_policy_mask_threshold": "no off-policy sequence mask is applied",
}

@dataclass
class GVPOConfig(GRPOConfig):
    """A ``GRPOConfig`` with the GVPO options. See :mod:`gvpo_kernels.integrations.trl` for the GRPO options that do
    not apply. ``temperature``, ``num_generations``, ``num_iterations``, ``steps_per_generation``,
    ``gradient_accumulation_steps``, ``mask_truncated_completions``, ``reward_weights`` and the generation options
    keep their TRL meaning.

    Args:
        gvpo_beta: the KL coefficient of GVPO, scale of the implicit reward ``beta * (log pi - log pi_anchor)``
            (the paper and its official recipe use 0.1).
        gvpo_backend: the backend of :func:`gvpo_kernels.linear_gvpo_loss` and of the log-prob passes
            (:func:`gvpo_kernels.linear_token_logprobs`): "auto" (CUDA tensors -> the Triton kernels, CPU tensors
            -> the C++ kernels, built on first use, other devices -> the chunked torch backend; where the first
            choice cannot run, a warning and the torch backend), "triton", "cpu" or "torch" (these three raise
            when they cannot run).
        gvpo_anchor: the anchor policy pi' of the implicit reward. "old" (default, the official recipe): the
            policy that sampled the completions (TRL's ``old_per_token_logps``, or the policy itself on-policy).
            "ref": TRL's frozen reference model (``ref_per_token_logps``); TRL loads it only when ``beta != 0``, so
            "ref" needs a non-zero ``beta`` (its value has no other effect).
    """

    gvpo_beta: float = field(default=0.1, metadata={"help": "GVPO's KL coefficient beta (official recipe: 0.1)."})
    gvpo_backend: str = field(default="auto", metadata={"help": "Backend of linear_gvpo_loss: auto/triton/cpu/torch."})
    gvpo_anchor: str = field(default="old", metadata={"help": "Anchor of the implicit reward: old (the sampling "
                                                              "policy) or ref (TRL's reference model, beta != 0)."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.gvpo_beta, bool) or not isinstance(self.gvpo_beta, (int, float)):
            raise TypeError(f"gvpo_beta must be a float, got {type(self.gvpo_beta).__name__}")
        if not (math.isfinite(self.gvpo_beta) and self.gvpo_beta > 0):
            raise ValueError(f"gvpo_beta must be a finite float > 0, got {self.gvpo_beta}")
        if self.gvpo_backend not in ("auto", "triton", "cpu", "torch"):
            raise ValueError(f"gvpo_backend must be one of auto, triton, cpu, torch; got {self.gvpo_backend!r}")
        if self.gvpo_anchor not in ("old", "ref"):
            raise ValueError(f"gvpo_anchor must be 'old' or 'ref', got {self.gvpo_anchor!r}")
        if self.gvpo_anchor == "ref" and self.beta == 0.0:
            raise ValueError("gvpo_anchor='ref' needs TRL's reference model, which TRL loads only when beta != 0: "
                             "set beta to any non-zero value (GVPOTrainer adds no KL penalty; gvpo_beta is GVPO's)")


def warn_inapplicable_options(args: GRPOConfig) -> list[str]:
    """Warn once for each GRPOConfig option in :data:`INAPPLICABLE_OPTIONS` set to a non-default value.

    Returns the names warned about (for tests and callers that want to log them).
    """
    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    named = []
    for name, why in INAPPLICABLE_OPTIONS.items():
        if name == "beta" and getattr(args, "gvpo_anchor", "old") == "ref":
            continue  # beta != 0 loads the reference model that the "ref" anchor reads
        if name in defaults and getattr(args, name, defaults[name]) != defaults[name]:
            named.append(name)
            warnings.warn(f"GVPOTrainer ignores {name}={getattr(args, name)!r}: {why}.", UserWarning, stacklevel=3)
    return named


class GVPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the fused GVPO loss; same constructor, ``args`` must be a :class:`GVPOConfig`.

    Adds two columns to TRL's generation batch (``gvpo_rewards`` (B,) float32 and ``gvpo_group_ids`` (B,) int64),
    keeps groups whole when it shuffles that batch into micro-batches, replaces ``_compute_loss`` and the LM head
    of TRL's log-prob passes. See the module docstring for what is and is not used from GRPOConfig.
    """

    _tag_names = ["trl", "gvpo"]
    _name = "GVPO"

    def __init__(self, model, reward_funcs=None, args: GVPOConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = GVPOConfig(f"{str(name).split('/')[-1]}-GVPO")
        if not isinstance(args, GVPOConfig):
            raise TypeError(f"GVPOTrainer needs args=GVPOConfig(...), got {type(args).__name__}")
        warn_inapplicable_options(args)
        if args.per_device_train_batch_size % args.num_generations != 0:
            warnings.warn(
                f"per_device_train_batch_size ({args.per_device_train_batch_size}) is not a multiple of "
                f"num_generations ({args.num_generations}): micro-batches will hold parts of groups, and GVPO will "
                "centre each part on its own. Use a multiple for the exact GVPO loss.", UserWarning, stacklevel=2)
        _refuse_zero3()
        super().__init__(model, reward_funcs, args=args, **kwargs)
        for net in (self.model, self.ref_model):
            if net is not None:
                _check_lm_head(self.accelerator.unwrap_model(net))
        self._gvpo_rewards_per_func = None
        self._gvpo_heads_checked = set()  # id() of the causal LMs whose hidden state was checked against logits

    # ---- batch: rewards before TRL's normalisation, and group ids -------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gvpo_rewards_per_func = rewards_per_func  # (B_global, num_reward_funcs), gathered over processes
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._gvpo_rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        if self._gvpo_rewards_per_func is None:
            raise RuntimeError("GVPOTrainer: TRL produced completions without calling _calculate_rewards; this TRL "
                               "version is not supported (tested: trl 1.16)")
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = self._gvpo_rewards_per_func
        weights = self.reward_weights.to(rewards.device)
        local = output["completion_ids"].size(0)
        start = self.accelerator.process_index * local
        output["gvpo_rewards"], output["gvpo_group_ids"] = group_rewards(rewards, weights, group_size, start, local)
        output["gvpo_rewards"] = output["gvpo_rewards"].to(output["completion_ids"].device)
        output["gvpo_group_ids"] = output["gvpo_group_ids"].to(output["completion_ids"].device)
        self._gvpo_rewards_per_func = None
        return output

    def _prepare_inputs(self, generation_batch):
        """TRL's buffering (generate every ``steps_per_generation * num_iterations`` steps, hand out one slice per
        step), with the shuffle done over whole groups instead of rows."""
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = split_pixel_values_by_grid(batch)
            batch = shuffle_whole_groups(batch, batch["gvpo_group_ids"])
            slices = split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(s) for s in slices]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # ---- the loss ------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        """GVPO on one micro-batch (mean over its groups) minus TRL's entropy bonus (the applied coefficient times the
        mean entropy over the micro-batch's scored tokens), divided by the gradient-accumulation steps in training."""
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        model_inputs = {"input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
                        "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1)}
        for key in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids"):
            if inputs.get(key) is not None:
                model_inputs[key] = inputs[key]
        if self.aux_loss_enabled:
            model_inputs["output_router_logits"] = True
        num_completion = completion_ids.size(1)

        hidden, head, aux_loss = self._last_hidden_state(model, model_inputs)
        hidden = hidden[:, -num_completion - 1 : -1]  # hidden[:, t] scores completion token t
        anchor = inputs.get("old_per_token_logps") if self.args.gvpo_anchor == "old" else inputs["ref_per_token_logps"]
        entropy_coef = self._applied_entropy_coef()
        with _no_autocast(hidden.device.type):
            loss, stats = linear_gvpo_loss(
                hidden.to(head.dtype), head.weight.to(head.dtype), completion_ids, inputs["gvpo_rewards"],
                bias=None if head.bias is None else head.bias.to(head.dtype), group_ids=inputs["gvpo_group_ids"],
                mask=mask.bool(), ref_logprobs=anchor, beta=self.args.gvpo_beta, temperature=self.temperature,
                softcap=head.transform.softcap, logit_scale=head.transform.logit_scale, entropy_coef=entropy_coef,
                reduction="mean", backend=self.args.gvpo_backend, return_stats=True)

        # As TRL: the whole loss, entropy bonus included, is divided by the accumulation steps (not in evaluation)
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        self._log_gvpo_metrics(mode, loss, stats, mask)
        loss = loss / normalizer
        if self.aux_loss_enabled and aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args,
                                           compute_entropy=False, **kwargs):
        """TRL's per-token log-probs (and entropies) of the last ``logits_to_keep`` tokens, fused.

        TRL's own function (its batching by ``batch_size``, its slicing of multimodal inputs, its autocast, its MoE
        auxiliary loss) runs unchanged, on a stand-in for ``model`` that runs the model for the last hidden state
        only and scores it with :func:`gvpo_kernels.linear_token_logprobs`, in :func:`lm_head_dtype`'s precision.
        Returns TRL's ``(logps (B, logits_to_keep) float32, entropies same shape or None, aux_loss or None)``, 0
        where ``attention_mask`` is 0; differentiable when called with gradients enabled.
        """
        fused = _FusedTokenLogprobs(self, model, logits_to_keep, compute_entropy)
        return super()._get_per_token_logps_and_entropies(fused, input_ids, attention_mask, logits_to_keep, *args,
                                                          compute_entropy=compute_entropy, **kwargs)

    def _last_hidden_state(self, model, model_inputs):
        """One forward through the (possibly wrapped) model with ``logits_to_keep=1``, so that the LM head computes
        logits at the last position only: the last hidden state (B, T, H) (the backbone's output, caught by a
        forward hook, so that no other layer's output is kept), the LM head (:class:`_Head`: weight (V, H), bias
        (V,) or None, the dtype to run it in, the model's logit transform) and the MoE auxiliary loss or None. The
        first call on each model checks the transformed head on its hidden state against its own last-position
        logits."""
        net = _causal_lm(self.accelerator.unwrap_model(model))
        caught = []
        hook = net.base_model.register_forward_hook(lambda module, args, output: caught.append(output))
        try:
            with self.accelerator.autocast():
                device_type = model_inputs["input_ids"].device.type
                autocast_dtype = None
                if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
                    autocast_dtype = torch.get_autocast_dtype(device_type)
                outputs = model(**model_inputs, logits_to_keep=1, use_cache=False)
        finally:
            hook.remove()
        if not caught:
            raise RuntimeError("GVPOTrainer: the model's forward did not call its backbone (model.base_model)")
        hidden = caught[-1].last_hidden_state if hasattr(caught[-1], "last_hidden_state") else caught[-1][0]
        weight, bias = _lm_head_params(net)
        dtype = lm_head_dtype(self.args.cast_lm_head_to_fp32, autocast_dtype, weight.dtype)
        transform = logit_transform(net.config)
        if id(net) not in self._gvpo_heads_checked:
            # The model's own forward ran its head under autocast even when TRL cast it to fp32 (TRL's fp32 forward
            # does not leave autocast; only its fused head, and so the anchor, does): check in that precision.
            _check_hidden_matches_logits(hidden[:, -1], weight, bias, outputs.logits[:, -1],
                                         autocast_dtype or weight.dtype, transform)
            self._gvpo_heads_checked.add(id(net))
        return hidden, _Head(weight, bias, dtype, transform), getattr(outputs, "aux_loss", None)

    # ---- TRL's entropy bonus -------------------------------------------------------------------------------

    def _applied_entropy_coef(self) -> float:
        """The coefficient of this micro-batch's entropy bonus, as TRL applies it: 0 without a bonus; the static
        ``entropy_coef``; with ``use_adaptive_entropy``, the controller's coefficient while the entropy measured at
        the last optimizer step is at or below ``entropy_target`` (none measured yet: +inf, no bonus), else 0. The
        same for every micro-batch of an accumulation window: the controller moves only at its end."""
        if not self._entropy_bonus_enabled:
            return 0.0
        if self.use_adaptive_entropy and not self._last_world_entropy <= self.args.entropy_target:
            return 0.0
        return float(self.entropy_coef)

    def _update_entropy_controller(self, mode, entropy_sum, token_count) -> None:
        """TRL's adaptive entropy control: add the micro-batch's (entropy sum, scored-token count) to the window's;
        at an optimizer-step boundary of training, measure the window's token mean over all processes, move the
        coefficient by ``entropy_coef_delta`` toward more bonus when it is at or below ``entropy_target`` (less
        otherwise) within ``[entropy_coef_min, entropy_coef_max]``, remember the measurement and reset the window.
        TRL's ``_save_checkpoint`` / ``_load_optimizer_and_scheduler`` save and restore ``entropy_coef`` and
        ``_last_world_entropy``. Evaluation never moves the controller."""
        if not (self.use_adaptive_entropy and mode == "train"):
            return
        local = torch.stack([entropy_sum, token_count]).detach().float()
        window = self._entropy_window_stats
        self._entropy_window_stats = local if window is None else window + local
        if not self.accelerator.sync_gradients:
            return
        totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
        args = self.args
        if world_entropy <= args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None

    def _log_gvpo_metrics(self, mode, loss, stats, mask):
        """The gvpo/* metrics (``gvpo/loss``: the GVPO part of the loss, before the division by the accumulation
        steps), TRL's ``entropy`` (the mean over all processes' scored tokens, ``mask`` (B, C), of the policy's
        entropy, from the per-sequence means of :class:`gvpo_kernels.GVPOStats`) and, with an entropy bonus, TRL's
        ``policy_loss`` (the same GVPO part) and ``entropy_coef`` (at optimizer-step boundaries of training, after
        the adaptive controller moved); moves the adaptive controller."""
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        metrics["gvpo/loss"].append(gather(stats.gvpo_loss).mean().item())
        metrics["gvpo/implicit_reward"].append(gather(stats.implicit_reward).mean().item())
        metrics["gvpo/grad_seq_logprob_abs"].append(gather(stats.grad_seq_logprob.abs()).mean().item())
        counts = mask.sum(dim=1).float()
        local = torch.stack([(stats.entropy * counts).sum(), counts.sum()])
        totals = self.accelerator.reduce(local.clone(), reduction="sum")
        metrics["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        if self._entropy_bonus_enabled:
            metrics["policy_loss"].append(gather(stats.gvpo_loss).nanmean().item())
            self._update_entropy_controller(mode, local[0], local[1])
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)


class _FusedTokenLogprobs:
    """What GVPOTrainer hands TRL's ``_get_per_token_logps_and_entropies`` as its model: called as TRL calls its
    fused LM head (``model(**inputs, labels=labels, fused_lm_head=True)``, labels (b, T) int64, -100 where not
    scored), it returns ``log_probs`` and ``entropy`` (b, logits_to_keep) float32 (0 where not scored; entropy
    None unless asked for), the positions TRL keeps, and ``aux_loss``."""

    def __init__(self, trainer: GVPOTrainer, model, logits_to_keep: int, compute_entropy: bool):
        self.trainer, self.model, self.keep, self.compute_entropy = trainer, model, logits_to_keep, compute_entropy

    def __call__(self, *, labels, fused_lm_head=False, **model_inputs):
        if not fused_lm_head:
            raise RuntimeError("GVPOTrainer: TRL's _get_per_token_logps_and_entropies did not call the model with "
                               "fused_lm_head=True; this TRL version is not supported (tested: trl 1.16)")
        trainer = self.trainer
        hidden, head, aux_loss = trainer._last_hidden_state(self.model, model_inputs)
        hidden, labels = hidden[:, :-1][:, -self.keep:], labels[:, 1:][:, -self.keep:]  # hidden[:, t] scores t + 1
        dtype = head.dtype
        with _no_autocast(hidden.device.type):
            out = linear_token_logprobs(hidden.to(dtype), head.weight.to(dtype), labels,
                                        bias=None if head.bias is None else head.bias.to(dtype),
                                        temperature=trainer.temperature, softcap=head.transform.softcap,
                                        logit_scale=head.transform.logit_scale, return_entropy=self.compute_entropy,
                                        backend=trainer.args.gvpo_backend)
        log_probs, entropy = out if self.compute_entropy else (out, None)
        return SimpleNamespace(log_probs=log_probs, entropy=entropy, aux_loss=aux_loss)


class _Head(NamedTuple):
    """The LM head as the fused calls run it: weight (V, H), bias (V,) or None, the dtype to run it in, and the
    model's :class:`LogitTransform`."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype
    transform: LogitTransform


def lm_head_dtype(cast_lm_head_to_fp32: bool, autocast_dtype: torch.dtype | None,
                  weight_dtype: torch.dtype) -> torch.dtype:
    """The precision TRL 1.16's fused LM head computes the logits in, so that the loss's log-probs and TRL's
    (``old_per_token_logps``, the anchor) come from the same head.

    float32 with ``cast_lm_head_to_fp32`` (TRL upcasts the hidden states, bf16 under ``bf16=True`` with a bf16
    model, and leaves autocast); the autocast dtype under mixed precision when the weight is float32; otherwise
    the weight's dtype. Accumulation is float32 in every case.
    """
    if cast_lm_head_to_fp32:
        return torch.float32
    if autocast_dtype is not None and weight_dtype == torch.float32:
        return autocast_dtype
    return weight_dtype


def group_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor, group_size: int, start: int, count: int):
    """This process's rewards and group ids from TRL's gathered per-function rewards.

    Args:
        rewards_per_func: (B_global, F) float, NaN where a reward function returned None; B_global is a multiple
            of group_size, consecutive runs of group_size rows share a prompt (TRL's layout).
        weights: (F,) reward weights.
        group_size: completions per prompt (TRL's num_generations, or num_generations_eval in evaluation).
        start, count: this process's rows, ``[start, start + count)``.

    Returns:
        rewards (count,) float32: the weighted sum over functions (NaN entries skipped, as TRL does); a completion
        that no function scored gets its group's mean, so that its centred reward is 0 (TRL gives it advantage 0);
        group_ids (count,) int64: global row index // group_size.
    """
    total = rewards_per_func.size(0)
    if total % group_size != 0:
        raise ValueError(f"the gathered batch ({total} completions) is not a multiple of the group size {group_size}")
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    unscored = torch.isnan(rewards_per_func).all(dim=1)
    if unscored.any():
        grouped = rewards.masked_fill(unscored, float("nan")).view(-1, group_size)
        fill = torch.nan_to_num(torch.nanmean(grouped, dim=1, keepdim=True), nan=0.0).expand_as(grouped)
        rewards = torch.where(torch.isnan(grouped), fill, grouped).reshape(-1)
    rows = torch.arange(start, start + count, device=rewards.device)
    return rewards[rows].float(), (rows // group_size).long()


def shuffle_whole_groups(batch: dict[str, Any], group_ids: torch.Tensor) -> dict[str, Any]:
    """Shuffle a TRL batch dict along its first dimension, keeping the rows of each group together.

    Groups come out in random order (torch's global generator, as TRL's own shuffle), their rows in their original
    order. Tensors with a first dimension and lists are permuted; scalars (0-dim tensors) and None pass through.
    """
    group_ids = group_ids.cpu()
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    group_rank = torch.empty_like(unique)
    group_rank[torch.randperm(unique.numel())] = torch.arange(unique.numel())
    rows = torch.argsort(group_rank[inverse] * group_ids.numel() + torch.arange(group_ids.numel()))

    def permute(value):
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        if isinstance(value, torch.Tensor):
            return value[rows.to(value.device)]
        return [value[i] for i in rows.tolist()]

    return {key: permute(value) for key, value in batch.items()}


def _causal_lm(model):
    """The transformers model under a PEFT wrapper (``get_base_model()``), else ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lm_head_params(model):
    """(weight (V, H), bias (V,) or None) of the output embedding; FSDP2 DTensors gathered (differentiably)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError("GVPOTrainer: the model has no output embedding (lm_head) with a weight")
    weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):  # torch.distributed.tensor.DTensor (FSDP2)
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None and hasattr(bias, "full_tensor") else bias
    return weight, bias


def _check_lm_head(model) -> None:
    """Refuse a model whose logit transform :func:`logit_transform` cannot read, and an LM head with a PEFT
    adapter."""
    try:
        logit_transform(_causal_lm(model).config)
    except ValueError as err:
        raise ValueError(f"GVPOTrainer: {err}") from None
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "base_layer"):
        raise ValueError("GVPOTrainer: the lm_head carries a PEFT adapter; remove lm_head from the adapter's "
                         "target modules")


def _check_hidden_matches_logits(hidden_last, weight, bias, model_logits, dtype,
                                 transform: LogitTransform = LogitTransform()) -> None:
    """First step only: the hidden state and the transform we feed the fused loss must give the model's own logits.

    hidden_last (B, H), model_logits (B, V); dtype: the precision the model's own forward ran its LM head in (the
    autocast dtype under mixed precision, else the weight's): the check recomputes the head's output in it, applies
    ``transform`` in float32, with a tolerance of a few roundings of that dtype. Catches a model whose
    ``hidden_states[-1]`` is not the LM head's input (no final norm applied), that transforms its logits in a way
    its config does not announce, or that ignores a transform its config announces.
    """
    with torch.no_grad(), _no_autocast(hidden_last.device.type):
        ours = transform.apply(torch.nn.functional.linear(hidden_last.to(dtype), weight.to(dtype),
                                                          None if bias is None else bias.to(dtype)))
        theirs = model_logits.float()
        scale = theirs.abs().max().clamp(min=1.0)
        tol = 1e-3 if dtype in (torch.float32, torch.float64) and model_logits.dtype != torch.bfloat16 else 3e-2
        if not torch.allclose(ours, theirs, rtol=tol, atol=tol * scale.item()):
            err = (ours - theirs).abs().max().item()
            raise RuntimeError(
                f"GVPOTrainer: {transform.describe()}, with hidden the backbone's last hidden state, does not "
                f"reproduce the model's logits (max abs difference {err:.3g}); this model's LM head input is not its "
                "last hidden state, or it transforms its logits in a way its config does not say (its config "
                "announces the transform above), and linear_gvpo_loss cannot be used with it")


def _refuse_zero3() -> None:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return
    if is_deepspeed_zero3_enabled():
        raise ValueError("GVPOTrainer does not support DeepSpeed ZeRO-3: the fused loss reads lm_head.weight "
                         "outside the module and again in the backward; use ZeRO-2 or FSDP2")


def _no_autocast(device_type: str):
    """A context with autocast off on ``device_type`` (a null context where autocast does not exist)."""
    return torch.autocast(device_type, enabled=False) if _autocast_available(device_type) else nullcontext()


def _autocast_available(device_type: str) -> bool:
    try:
        return torch.amp.is_autocast_available(device_type)
    except AttributeError:  # torch < 2.4
        return device_type in ("cuda", "cpu")
