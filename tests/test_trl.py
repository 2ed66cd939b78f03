"""TRL plug-in: GVPOTrainer against the reference GVPO loss, on a tiny Llama and a word-level tokenizer built here.

Nothing is downloaded. The reference side never goes through the plug-in's code: it runs the model's plain forward
for the full logits, takes the groups from identical prompts and the rewards from the decoded completions.
"""

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[trl]')")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from trl import GRPOTrainer  # noqa: E402

from gvpo_kernels import reference  # noqa: E402
from gvpo_kernels.integrations.trl import (  # noqa: E402
    GVPOConfig, GVPOTrainer, group_rewards, shuffle_whole_groups, warn_inapplicable_options)

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"]
NUM_GENERATIONS = 2
TEMPERATURE = 0.7
BETA = 0.5


def rel_err(got, want):
    got, want = got.detach().double(), want.detach().double()
    scale = want.norm().item()
    return (got - want).norm().item() / scale if scale > 0 else (got - want).norm().item()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")


def make_model(vocab_size):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # sharper distributions: log-probs that move visibly in two steps
    return model


def reward_from_text(completions, **kwargs):
    """Deterministic and varied: the reference recomputes it from the decoded completions."""
    return [float(sum((i + 1) * (3 + WORDS.index(w) if w in WORDS else 1) for i, w in enumerate(c.split())) % 7)
            for c in completions]


def make_trainer(tmp_path, trainer_cls=GVPOTrainer, model_dtype=torch.float32, model=None, **overrides):
    tokenizer = make_tokenizer()
    prompts = [" ".join(WORDS[i:i + 3]) for i in range(8)]  # 8 distinct prompts
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=NUM_GENERATIONS,
                   steps_per_generation=2, gradient_accumulation_steps=1, max_steps=2, max_completion_length=6,
                   learning_rate=0.05, temperature=TEMPERATURE, gvpo_beta=BETA, report_to="none", use_cpu=True,
                   logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, bf16=False)
    options.update(overrides)
    args = GVPOConfig(**options)
    model = make_model(len(tokenizer)) if model is None else model
    return trainer_cls(model=model.to(model_dtype), reward_funcs=reward_from_text, args=args,
                       train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)


def reference_loss(model, tokenizer, inputs, group_ids=None, anchor="old", temperature=TEMPERATURE, beta=BETA):
    """GVPO of one micro-batch from the model's full logits, with groups and rewards derived independently."""
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    mask = inputs["completion_mask"].bool()
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    num_completion = completion_ids.size(1)
    logits = logits[:, -num_completion - 1:-1]
    if group_ids is None:  # same prompt <=> same group
        keys = [tuple(p[m.bool()].tolist()) for p, m in zip(prompt_ids, inputs["prompt_mask"])]
        group_ids = torch.tensor([sorted(set(keys)).index(k) for k in keys])
    texts = [tokenizer.decode(ids[m], skip_special_tokens=True) for ids, m in zip(completion_ids, mask)]
    rewards = torch.tensor(reward_from_text(texts))
    ref_logprobs = None if anchor is None else inputs.get(f"{anchor}_per_token_logps")
    return reference.gvpo_loss(logits, completion_ids, rewards, group_ids=group_ids, mask=mask,
                               ref_logprobs=ref_logprobs, beta=beta, temperature=temperature), group_ids, rewards


class RecordingTrainer(GVPOTrainer):
    """Records, for every micro-batch, the plug-in's loss and the reference under the same parameters."""

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        with torch.no_grad():
            ref, group_ids, rewards = reference_loss(model, self.processing_class, inputs)
            wrong_groups, *_ = reference_loss(model, self.processing_class, inputs,
                                              group_ids=torch.zeros_like(group_ids))
            no_anchor, *_ = reference_loss(model, self.processing_class, inputs, anchor=None)
        self.records.append(dict(loss=loss.detach().clone(), ref=ref, wrong_groups=wrong_groups, no_anchor=no_anchor,
                                 group_ids=group_ids, rewards=rewards, inputs=inputs))
        return loss


def test_two_training_steps_match_reference_and_move_parameters(tmp_path):
    trainer = make_trainer(tmp_path, trainer_cls=RecordingTrainer)
    trainer.records = []
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    assert len(trainer.records) == 2
    for step, rec in enumerate(trainer.records):
        inputs = rec["inputs"]
        # The plug-in's columns agree with what the reference derived on its own.
        torch.testing.assert_close(inputs["gvpo_rewards"], rec["rewards"].float())
        ids = inputs["gvpo_group_ids"]
        same_plugin = ids[:, None] == ids[None, :]
        same_prompt = rec["group_ids"][:, None] == rec["group_ids"][None, :]
        assert torch.equal(same_plugin, same_prompt), f"step {step}: group ids do not follow the prompts"
        counts = torch.unique(ids, return_counts=True)[1]
        assert torch.all(counts == NUM_GENERATIONS), f"step {step}: a micro-batch holds part of a group: {ids}"
        assert "old_per_token_logps" in inputs  # steps_per_generation > gradient_accumulation_steps

        torch.testing.assert_close(rec["loss"], rec["ref"].float(), rtol=1e-5, atol=1e-6)
        # The reference is sensitive to what the plug-in must get right, so a wrong plug-in fails above.
        assert not math.isclose(rec["wrong_groups"].item(), rec["ref"].item(), rel_tol=1e-3)
    # Step 2 runs after one update on completions sampled before it: the anchor matters there.
    last = trainer.records[-1]
    assert not math.isclose(last["no_anchor"].item(), last["ref"].item(), rel_tol=1e-3)
    assert abs(last["loss"].item() - last["no_anchor"].item()) > 1e-4

    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "lm_head.weight" in moved and any("layers.0" in n for n in moved)
    logged = [h for h in trainer.state.log_history if "gvpo/loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["gvpo/loss"]) for h in logged)
    assert not any("policy_loss" in h or "entropy_coef" in h for h in trainer.state.log_history)  # no bonus: as TRL


def test_fixed_batch_loss_and_gradients_equal_reference(tmp_path):
    """A hand-built micro-batch: groups of sizes 3, 2, 1 in shuffled order, a padded and a fully masked completion,
    a perturbed anchor; the loss and the gradients of every parameter equal the reference's."""
    trainer = make_trainer(tmp_path)
    model, tok = trainer.model, trainer.processing_class
    g = torch.Generator().manual_seed(1)
    batch, prompt_len, completion_len = 6, 4, 5
    prompt_ids = torch.randint(3, len(tok), (batch, prompt_len), generator=g)
    prompt_mask = torch.ones(batch, prompt_len, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    prompt_ids[1, :2] = 0
    completion_ids = torch.randint(3, len(tok), (batch, completion_len), generator=g)
    completion_mask = torch.ones(batch, completion_len, dtype=torch.long)
    completion_mask[2, 3:] = 0  # right padding
    completion_ids[2, 3:] = 0
    completion_mask[4] = 0  # nothing scored (e.g. a truncated completion with mask_truncated_completions)
    group_ids = torch.tensor([7, 3, 7, 9, 3, 7])
    rewards = torch.tensor([1.0, -2.0, 0.5, 4.0, 3.0, 2.5])
    old = -torch.rand(batch, completion_len, generator=g) * 3
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, old_per_token_logps=old, gvpo_rewards=rewards,
                  gvpo_group_ids=group_ids, advantages=torch.zeros(batch), num_items_in_batch=completion_mask.sum())

    model.eval()  # eval: no division by gradient-accumulation steps
    loss = trainer.compute_loss(model, inputs)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    def reference_run(net, dtype):
        logits = net(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                     attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits[:, -completion_len - 1:-1]
        ref = reference.gvpo_loss(logits, completion_ids, rewards.to(dtype), group_ids=group_ids,
                                  mask=completion_mask.bool(), ref_logprobs=old.to(dtype), beta=BETA,
                                  temperature=TEMPERATURE)
        return logits, ref, torch.autograd.grad(ref, list(net.parameters()), allow_unused=True)

    # Tolerance policy of tests/cases.py: no worse than the float32 reference against the float64 one, + 1e-5.
    logits, baseline, baseline_grads = reference_run(model, torch.float32)
    twin = make_model(len(tok))  # not a deepcopy: TRL's patched forward would still call the original model
    twin.load_state_dict(model.state_dict())
    _, oracle, oracle_grads = reference_run(twin.double(), torch.float64)
    names = ["loss"] + [name for name, _ in model.named_parameters()]
    for name, got, base, want in zip(names, [loss, *grads], [baseline, *baseline_grads], [oracle, *oracle_grads]):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0, name
            continue
        err, base_err = rel_err(got, want), rel_err(base, want)
        assert err <= base_err + 1e-5, f"{name}: error {err:.3g} vs the float32 reference's {base_err:.3g}"
    ref = baseline

    # What a wrong plug-in would produce differs from the reference: contiguous groups, no anchor, temperature 1.
    for wrong in (dict(group_size=2), dict(group_ids=group_ids, ref_logprobs=None),
                  dict(group_ids=group_ids, ref_logprobs=old, temperature=1.0)):
        kwargs = {**dict(mask=completion_mask.bool(), beta=BETA, temperature=TEMPERATURE, ref_logprobs=old), **wrong}
        other = reference.gvpo_loss(logits.detach(), completion_ids, rewards, **kwargs)
        assert not math.isclose(other.item(), ref.item(), rel_tol=1e-3), wrong


def test_default_mixed_precision_step(tmp_path):
    """TRL's default bf16=True (CPU autocast here): the LM head runs in bfloat16 like the model's own, one step runs."""
    trainer = make_trainer(tmp_path, max_steps=1, bf16=True)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    logged = [h for h in trainer.state.log_history if "gvpo/loss" in h]
    assert len(logged) == 1 and math.isfinite(logged[0]["gvpo/loss"])
    assert not torch.equal(before, trainer.model.lm_head.weight.detach())


class HeadPrecisionTrainer(GVPOTrainer):
    """Records, for every micro-batch, the plug-in's sequence log-probs s_i, TRL's own (its fused LM head, the path
    of GRPOTrainer's log-probs and so of the anchor) and those of an LM head run in bfloat16, same parameters."""

    def _log_gvpo_metrics(self, mode, loss, stats, mask):
        super()._log_gvpo_metrics(mode, loss, stats, mask)
        self.records.append(dict(ours=stats.seq_logprob))

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], mask], dim=1)
        num_completion = completion_ids.size(1)
        with torch.no_grad():
            trl_logps, _, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask, num_completion)
            with self.accelerator.autocast():
                hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = torch.nn.functional.linear(hidden[:, -num_completion - 1:-1].bfloat16(),
                                                model.lm_head.weight.bfloat16()).float() / TEMPERATURE
            bf16_logps = logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        self.records[-1].update(trl=(trl_logps * mask).sum(1), bf16=(bf16_logps * mask).sum(1),
                                hidden_dtype=hidden.dtype)
        return loss


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=["fp32-model", "bf16-model"])
def test_fp32_lm_head_under_mixed_precision(tmp_path, model_dtype):
    """TRL's cast_lm_head_to_fp32 with bf16=True (the default): the head runs in float32 on upcast hidden states,
    as TRL's fused head does; the plug-in's s_i equal TRL's to float32 rounding, not a bfloat16 head's."""
    trainer = make_trainer(tmp_path, trainer_cls=HeadPrecisionTrainer, model_dtype=model_dtype, max_steps=2,
                           bf16=True, cast_lm_head_to_fp32=True)
    trainer.records = []
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()

    assert trainer.model.lm_head.weight.dtype == torch.float32
    assert not torch.equal(before, trainer.model.lm_head.weight.detach())
    assert len(trainer.records) == 2
    for step, rec in enumerate(trainer.records):
        assert rec["hidden_dtype"] == model_dtype
        torch.testing.assert_close(rec["ours"], rec["trl"], rtol=1e-5, atol=1e-5, msg=f"step {step}")
        assert (rec["ours"] - rec["bf16"]).abs().max() > 1e-3, f"step {step}: a bfloat16 head would pass too"
    logged = [h for h in trainer.state.log_history if "gvpo/loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["gvpo/loss"]) for h in logged)
    # step 1 scores the batch before any update, with TRL's old log-probs as the anchor: r_i = 0 to rounding
    assert abs(logged[0]["gvpo/implicit_reward"]) < 1e-5


class ModelCalls:
    """The keyword arguments of every call of a model (``calls``), except those made inside :func:`trl_own_logps`."""

    in_trl_own = False

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if not ModelCalls.in_trl_own:
            self.calls.append(dict(kwargs))


def trl_own_logps(trainer, model, input_ids, attention_mask, logits_to_keep, **kwargs):
    """TRL 1.16's own GRPOTrainer._get_per_token_logps_and_entropies (its fused LM head), on the same trainer."""
    ModelCalls.in_trl_own = True
    try:
        return GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, input_ids, attention_mask,
                                                              logits_to_keep, **kwargs)
    finally:
        ModelCalls.in_trl_own = False


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp32-head"])
def test_logprob_pass_equals_trl_fused_head(tmp_path, precision):
    """GVPOTrainer's _get_per_token_logps_and_entropies (TRL's old/ref pass) against TRL's own on one batch: left-
    and right-padded rows, a row with nothing scored, batches of 2 over 5 rows (a short last one); same shapes,
    dtypes, zeros and None, and log-probs and entropies no further from a float64 head than TRL's own."""
    options = dict(fp32=dict(bf16=False), bf16=dict(bf16=True),
                   **{"fp32-head": dict(bf16=True, cast_lm_head_to_fp32=True)})[precision]
    trainer = make_trainer(tmp_path, **options)
    model = trainer.model
    g = torch.Generator().manual_seed(4)
    rows, prompt_len, completion_len = 5, 4, 6
    input_ids = torch.randint(3, len(trainer.processing_class), (rows, prompt_len + completion_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding of a prompt
    attention_mask[2, prompt_len + 3:] = 0  # right padding of a completion
    attention_mask[4, prompt_len:] = 0  # a completion with nothing scored
    args = (input_ids, attention_mask, completion_len)
    with torch.no_grad():
        recorder = ModelCalls(model)
        ours = trainer._get_per_token_logps_and_entropies(model, *args, batch_size=2, compute_entropy=True)
        ours_no_entropy = trainer._get_per_token_logps_and_entropies(model, *args, batch_size=2)
        recorder.handle.remove()
        calls = recorder.calls
        theirs = trl_own_logps(trainer, model, *args, batch_size=2, compute_entropy=True)
        with trainer.accelerator.autocast():
            hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # The fused path ran the model for the last position's logits only, never TRL's fused head.
    assert len(calls) == 6 and all(c.get("logits_to_keep") == 1 and not c.get("fused_lm_head") for c in calls)
    assert ours_no_entropy[1] is None and ours[2] is None and theirs[2] is None
    torch.testing.assert_close(ours_no_entropy[0], ours[0], rtol=0, atol=0)

    # float64 oracle from the same hidden states and the head's inputs in the precision both paths use
    head_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    logits = (hidden[:, :-1][:, -completion_len:].to(head_dtype).double()
              @ model.lm_head.weight.to(head_dtype).double().T) / TEMPERATURE
    labels, scored = input_ids[:, -completion_len:], attention_mask[:, -completion_len:].bool()
    logp = logits.log_softmax(-1)
    oracle = (logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * scored,
              -(logp.exp() * logp).sum(-1) * scored)
    for name, got, trl_value, want in zip(("log-probs", "entropies"), ours, theirs, oracle):
        assert got.shape == trl_value.shape == labels.shape and got.dtype == trl_value.dtype == torch.float32
        assert torch.all(got[~scored] == 0) and torch.all(trl_value[~scored] == 0), name
        err, trl_err = rel_err(got, want), rel_err(trl_value, want)
        assert err <= trl_err + 1e-5, f"{name}: error {err:.3g} vs TRL's {trl_err:.3g}"
        if precision != "bf16":
            torch.testing.assert_close(got, trl_value, rtol=1e-5, atol=1e-5, msg=name)


class LogprobPassTrainer(GVPOTrainer):
    """Records, for each generation batch, its old/ref log-probs and TRL's own for the same rows and parameters;
    for each micro-batch, the logged entropy and TRL's own, and the loss and the reference's with each anchor."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with torch.no_grad():
            own = {name: trl_own_logps(self, net, input_ids, attention_mask, output["completion_ids"].size(1),
                                       batch_size=self.args.per_device_train_batch_size)[0]
                   for name, net in (("old", self.model), ("ref", self.ref_model))}
        self.generations.append(dict(output=output, own=own))
        return output

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        with torch.no_grad():
            _, entropies, _ = trl_own_logps(self, model, input_ids, torch.cat([inputs["prompt_mask"], mask], dim=1),
                                            mask.size(1), compute_entropy=True)
            refs = {anchor: reference_loss(model, self.processing_class, inputs, anchor=anchor)[0]
                    for anchor in ("old", "ref")}
        self.steps.append(dict(loss=loss.detach().clone(), refs=refs, entropy=self._metrics[mode]["entropy"][-1],
                               trl_entropy=((entropies * mask).sum() / mask.sum()).item()))
        return loss


@pytest.mark.parametrize("anchor", ["old", "ref"])
def test_run_with_two_iterations_and_a_reference_model(tmp_path, anchor):
    """num_iterations=2 (TRL computes old log-probs) and beta != 0 (TRL loads a reference model, here another
    checkpoint than the policy): old and ref log-probs equal TRL's own, the loss takes the anchor gvpo_anchor names,
    TRL's entropy metric is logged and equals TRL's own, and TRL's fused head is never called."""
    reference_model = make_model(len(make_tokenizer()))
    reference_model.save_pretrained(tmp_path / "ref")
    policy = make_model(len(make_tokenizer()))
    with torch.no_grad():
        policy.lm_head.weight.add_(torch.randn(policy.lm_head.weight.shape, generator=torch.Generator().manual_seed(5)))
    policy.config._name_or_path = str(tmp_path / "ref")  # where TRL loads the reference model from
    trainer = make_trainer(tmp_path / "out", trainer_cls=LogprobPassTrainer, model=policy, num_iterations=2,
                           beta=0.04, gvpo_anchor=anchor)
    trainer.generations, trainer.steps = [], []
    calls, ref_calls = ModelCalls(trainer.model).calls, ModelCalls(trainer.ref_model).calls
    trainer.train()

    assert len(trainer.generations) == 1 and len(trainer.steps) == 2
    rec = trainer.generations[0]
    for name in ("old", "ref"):
        got = rec["output"][f"{name}_per_token_logps"]
        torch.testing.assert_close(got, rec["own"][name], rtol=1e-5, atol=1e-5, msg=name)
    assert (rec["own"]["old"] - rec["own"]["ref"]).abs().max() > 1e-2  # the two anchors differ
    assert not any(c.get("fused_lm_head") for c in calls + ref_calls)
    assert sum(c.get("logits_to_keep") == 1 for c in ref_calls) == 2  # 8 completions in batches of 4
    other = "ref" if anchor == "old" else "old"
    for step in trainer.steps:
        torch.testing.assert_close(step["loss"], step["refs"][anchor].float(), rtol=1e-5, atol=1e-6)
        assert not math.isclose(step["refs"][other].item(), step["refs"][anchor].item(), rel_tol=1e-3)
        assert step["entropy"] > 0 and math.isclose(step["entropy"], step["trl_entropy"], rel_tol=1e-5)
    logged = [h for h in trainer.state.log_history if "entropy" in h]
    assert len(logged) == 2 and all(math.isfinite(h["entropy"]) for h in logged)


def test_group_rewards_follow_trl_layout():
    per_func = torch.tensor([[1.0, float("nan")], [2.0, 1.0], [float("nan")] * 2, [4.0, 0.0],
                             [float("nan")] * 2, [float("nan")] * 2])
    weights = torch.tensor([1.0, 2.0])
    rewards, ids = group_rewards(per_func, weights, group_size=2, start=0, count=6)
    # weighted nansum; an unscored completion takes its group's mean; an all-unscored group gets 0
    torch.testing.assert_close(rewards, torch.tensor([1.0, 4.0, 4.0, 4.0, 0.0, 0.0]))
    assert ids.tolist() == [0, 0, 1, 1, 2, 2]
    rewards, ids = group_rewards(per_func, weights, group_size=3, start=3, count=3)  # process 1 of 2
    assert ids.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="group size"):
        group_rewards(per_func, weights, group_size=4, start=0, count=6)


def test_shuffle_keeps_groups_whole_and_rows_aligned():
    torch.manual_seed(3)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    batch = {"gvpo_group_ids": ids, "x": torch.arange(12) * 10, "names": [f"r{i}" for i in range(12)],
             "scalar": torch.tensor(5), "none": None}
    out = shuffle_whole_groups(batch, ids)
    assert out["scalar"].item() == 5 and out["none"] is None
    assert torch.equal(out["x"], out["gvpo_group_ids"] * 0 + torch.tensor([int(n[1:]) * 10 for n in out["names"]]))
    runs = out["gvpo_group_ids"].view(4, 3)
    assert torch.all(runs == runs[:, :1]), "a group was split"
    assert sorted(runs[:, 0].tolist()) == [0, 1, 2, 3]


def test_inapplicable_options_warn_and_bad_options_raise(tmp_path):
    args = GVPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2, epsilon=0.3,
                      scale_rewards="none", loss_type="grpo", report_to="none", use_cpu=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        named = warn_inapplicable_options(args)
    assert named == ["epsilon", "loss_type", "scale_rewards"]
    assert len([w for w in caught if "GVPOTrainer ignores" in str(w.message)]) == 3
    args = GVPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2, entropy_coef=0.1,
                      use_adaptive_entropy=True, entropy_target=1.0, report_to="none", use_cpu=True)
    assert warn_inapplicable_options(args) == []  # TRL's entropy options are honoured
    with pytest.raises(ValueError, match="gvpo_beta"):
        GVPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2, gvpo_beta=0.0,
                   report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="gvpo_anchor"):
        GVPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2, gvpo_anchor="new",
                   report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="beta"):  # "ref" needs the reference model that TRL loads for beta != 0
        GVPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2, gvpo_anchor="ref",
                   report_to="none", use_cpu=True)
    for anchor, warned in (("old", ["beta"]), ("ref", [])):
        args = GVPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2, beta=0.04,
                          gvpo_anchor=anchor, report_to="none", use_cpu=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert warn_inapplicable_options(args) == warned
    with pytest.raises(TypeError, match="GVPOConfig"):
        GVPOTrainer(model=make_model(8), reward_funcs=reward_from_text,
                    args=trl.GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2,
                                        report_to="none", use_cpu=True))
