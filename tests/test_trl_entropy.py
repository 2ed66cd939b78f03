"""TRL's entropy options through GVPOTrainer: the static bonus (``entropy_coef``), the adaptive controller
(``use_adaptive_entropy``), their logs (``policy_loss``, ``entropy_coef``) and checkpointed state.

Two kinds of tests, on tiny models built here (nothing is downloaded):
- TRL's own entropy scenarios of tests/test_grpo_trainer.py (static, adaptive, adaptive with gradient accumulation,
  entropy bonus scale), with TRL's options and assertions, run against GVPOTrainer;
- GVPOTrainer side by side with TRL's GRPOTrainer (the control) on the same micro-batches: the bonus, its gradient
  under gradient accumulation, the controller's gating, updates and logs equal TRL's.
"""

import json
import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[trl]')")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from test_trl import WORDS, make_tokenizer, reward_from_text, rel_err  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from gvpo_kernels import reference  # noqa: E402
from gvpo_kernels.integrations.trl import GVPOConfig, GVPOTrainer  # noqa: E402

BETA = 0.5


def make_qwen2(vocab_size):
    """A tiny Qwen2 (TRL's scenarios run trl-internal-testing/tiny-Qwen2ForCausalLM-2.5)."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                                      tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    return model


def twin(model):
    """An independent copy (not a deepcopy: TRL's patched forward would still call the original model)."""
    other = type(model)(model.config)
    other.load_state_dict(model.state_dict())
    return other


def scenario_trainer(tmp_path, trainer_cls=GVPOTrainer, model=None, **options):
    """TRL's scenario options (lr 0.1, batches of 3, 3 generations, 8 completion tokens, report_to none) on our tiny
    model and prompts, a few steps on the CPU in float32."""
    tokenizer = make_tokenizer()
    args = dict(output_dir=str(tmp_path), learning_rate=0.1, per_device_train_batch_size=3, num_generations=3,
                max_completion_length=8, report_to="none", use_cpu=True, bf16=False, max_steps=4,
                save_strategy="no", disable_tqdm=True, seed=0)
    args.update(options)
    config = (GVPOConfig(gvpo_beta=BETA, **args) if issubclass(trainer_cls, GVPOTrainer)
              else GRPOConfig(**args))
    model = make_qwen2(len(tokenizer)) if model is None else model
    prompts = [" ".join(WORDS[i:i + 3]) for i in range(8)]
    return trainer_cls(model=model, reward_funcs=reward_from_text, args=config, processing_class=tokenizer,
                       train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))


def assert_every_parameter_changed(trainer, previous):
    for n, param in previous.items():
        assert not torch.equal(param, trainer.model.get_parameter(n)), f"Parameter {n} has not changed."


# ---- TRL's scenarios (tests/test_grpo_trainer.py), against GVPOTrainer ---------------------------------------------

def test_trl_static_entropy(tmp_path):
    """TRL's test_train_with_static_entropy; and no warning says the option is ignored."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = scenario_trainer(tmp_path, entropy_coef=0.1)
    assert not [w for w in caught if "ignores" in str(w.message)]
    previous = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert trainer.state.log_history[-1]["policy_loss"] is not None
    assert trainer.state.log_history[-1]["entropy_coef"] is not None
    assert_every_parameter_changed(trainer, previous)
    assert trainer.entropy_coef == 0.1  # static: never moves


def test_trl_adaptive_entropy(tmp_path):
    """TRL's test_train_with_adaptive_entropy."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = scenario_trainer(tmp_path, entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=15.0)
    assert not [w for w in caught if "ignores" in str(w.message)]
    previous = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert trainer.state.log_history[-1]["policy_loss"] is not None
    assert trainer.state.log_history[-1]["entropy_coef"] is not None
    assert trainer.entropy_coef > 0.01  # entropy < target throughout: the coefficient increased
    assert_every_parameter_changed(trainer, previous)


def test_trl_adaptive_entropy_gradient_accumulation(tmp_path):
    """TRL's test_train_with_adaptive_entropy_gradient_accumulation: one controller update per optimizer step; and,
    logged at every step, the coefficient after each update (TRL's logging point)."""
    trainer = scenario_trainer(tmp_path, gradient_accumulation_steps=2, entropy_coef=0.01, use_adaptive_entropy=True,
                               entropy_target=15.0, entropy_coef_delta=0.005, logging_steps=1)
    previous = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    expected_coef = min(0.01 + 0.005 * trainer.state.global_step, 1.0)
    assert trainer.entropy_coef == pytest.approx(expected_coef, abs=1e-6)
    assert_every_parameter_changed(trainer, previous)
    steps = [h for h in trainer.state.log_history if "entropy_coef" in h]
    assert [h["step"] for h in steps] == list(range(1, trainer.state.global_step + 1))
    assert [h["entropy_coef"] for h in steps] == pytest.approx([0.01 + 0.005 * s for s in range(1, 5)], abs=1e-9)
    assert all("policy_loss" in h for h in steps)


def test_trl_entropy_bonus_scale(tmp_path):
    """TRL's test_entropy_bonus_scale (its loss_type parametrization does not apply: GVPO has one loss): with
    gradient_accumulation_steps=1 the logged (policy_loss - loss) / entropy is entropy_coef, TRL's rel=0.3 on the
    median; here each step to the rounding of the logged loss."""
    entropy_coef = 0.5
    trainer = scenario_trainer(tmp_path, max_completion_length=16, gradient_accumulation_steps=1, logging_steps=1,
                               entropy_coef=entropy_coef)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "policy_loss" in h and "loss" in h and h.get("entropy")]
    assert len(logs) == 4
    ratios = sorted((h["policy_loss"] - h["loss"]) / h["entropy"] for h in logs)
    assert ratios[len(ratios) // 2] == pytest.approx(entropy_coef, rel=0.3)
    for h in logs:
        assert abs(h["policy_loss"] - h["loss"] - entropy_coef * h["entropy"]) < 1e-5, h
        assert h["policy_loss"] == h["gvpo/loss"]


# ---- side by side with GRPOTrainer -----------------------------------------------------------------------------

def micro_batches(vocab_size, rewards):
    """Two hand-built micro-batches of 3 completions (one group each), different scored-token counts (a padded
    completion, a fully masked one), the same columns for GRPOTrainer (advantages 0: its policy term has no
    gradient, only its entropy bonus does) and GVPOTrainer."""
    g = torch.Generator().manual_seed(7)
    batches = []
    for b, (pad, masked) in enumerate(((2, None), (0, 1))):
        prompt_ids = torch.randint(3, vocab_size, (3, 3), generator=g)
        completion_ids = torch.randint(3, vocab_size, (3, 5 + b), generator=g)
        completion_mask = torch.ones_like(completion_ids)
        if pad:
            completion_mask[0, -pad:] = 0
        if masked is not None:
            completion_mask[masked] = 0
        batches.append(dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids),
                            completion_ids=completion_ids, completion_mask=completion_mask,
                            advantages=torch.zeros(3), num_items_in_batch=completion_mask.sum(),
                            gvpo_rewards=torch.tensor(rewards[b], dtype=torch.float32),
                            gvpo_group_ids=torch.full((3,), b)))
    return batches


def entropy_oracle(model, batch, temperature):
    """float64: the micro-batch's mean over its scored tokens of the entropy of softmax(logits / T), TRL's bonus
    term, and the logits."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = batch["completion_mask"].double()
    num_completion = batch["completion_ids"].size(1)
    logits = model(input_ids=input_ids,
                   attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)).logits
    logits = logits[:, -num_completion - 1:-1]
    logp = (logits.double() / temperature).log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (entropy * mask).sum() / mask.sum().clamp(min=1.0), logits


def accumulate(trainer, batches, accumulation=2):
    """The training loss of each micro-batch of one accumulation window and the accumulated gradients."""
    model = trainer.model
    model.train()
    model.zero_grad()
    trainer.current_gradient_accumulation_steps = accumulation
    losses = []
    for i, batch in enumerate(batches):
        trainer.accelerator.sync_gradients = i == len(batches) - 1
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        losses.append(loss.detach())
    trainer.accelerator.sync_gradients = True
    return losses, [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("rewards", ["equal", "varied"])
def test_bonus_and_its_gradient_under_accumulation_equal_trls(tmp_path, rewards):
    """Two micro-batches of different token counts in one accumulation window (gradient_accumulation_steps=2).
    'equal' rewards in each group: GVPO's part is 0 with no gradient, so GVPOTrainer's losses and accumulated
    gradients are TRL's entropy bonus alone, compared with GRPOTrainer's (advantages 0) and with a float64 oracle of
    TRL's formula sum_b -c * mean_b(H) / 2 (a per-micro-batch token mean, each micro-batch weighing the same).
    'varied': the oracle adds GVPO's reference loss of each micro-batch, halved."""
    coef = 0.3
    vocab = len(make_tokenizer())
    values = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]] if rewards == "equal" else [[1.0, 3.0, 0.0], [2.0, -1.0, 0.5]]
    batches = micro_batches(vocab, values)
    options = dict(gradient_accumulation_steps=2, entropy_coef=coef)
    ours = scenario_trainer(tmp_path / "gvpo", **options)
    base = ours.model
    losses, grads = accumulate(ours, batches)

    # float64 oracle on an independent copy of the same parameters
    oracle_model = twin(base).double()
    oracle_losses = []
    for b, batch in enumerate(batches):
        entropy, logits = entropy_oracle(oracle_model, batch, ours.temperature)
        gvpo = reference.gvpo_loss(logits, batch["completion_ids"], batch["gvpo_rewards"].double(), group_size=3,
                                   mask=batch["completion_mask"].bool(), beta=BETA,
                                   temperature=ours.temperature)
        oracle_losses.append((gvpo - coef * entropy) / 2)
    oracle_grads = torch.autograd.grad(sum(oracle_losses), list(oracle_model.parameters()), allow_unused=True)
    # float32 baseline: the same formula on the float32 model (PyTorch's own error at this dtype)
    base_model = twin(base)
    base_losses = []
    for b, batch in enumerate(batches):
        entropy, logits = entropy_oracle(base_model, batch, ours.temperature)
        gvpo = reference.gvpo_loss(logits, batch["completion_ids"], batch["gvpo_rewards"], group_size=3,
                                   mask=batch["completion_mask"].bool(), beta=BETA,
                                   temperature=ours.temperature)
        base_losses.append((gvpo.float() - coef * entropy.float()) / 2)
    base_grads = torch.autograd.grad(sum(base_losses), list(base_model.parameters()), allow_unused=True)

    names = [n for n, _ in base.named_parameters()]
    for got, base_value, want in zip(losses, base_losses, oracle_losses):
        assert rel_err(got, want) <= rel_err(base_value, want) + 1e-5
    for name, got, base_value, want in zip(names, grads, base_grads, oracle_grads):
        assert rel_err(got, want) <= rel_err(base_value, want) + 1e-5, name

    if rewards == "equal":  # TRL's own GRPOTrainer on the same parameters and micro-batches
        control = scenario_trainer(tmp_path / "grpo", trainer_cls=GRPOTrainer, model=twin(base), **options)
        control_losses, control_grads = accumulate(control, batches)
        for got, theirs in zip(losses, control_losses):
            torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-6)
        for name, got, theirs in zip(names, grads, control_grads):
            torch.testing.assert_close(got, theirs, rtol=1e-4, atol=1e-6, msg=name)
        assert all(abs(loss.item()) > 1e-2 for loss in losses)  # the bonus is not negligible here


def test_adaptive_controller_equals_trls_step_by_step(tmp_path):
    """The adaptive controller side by side with GRPOTrainer's, same parameters, same micro-batches, no optimizer
    step (so the entropies stay put): windows of two micro-batches whose entropy is above, then below, then above
    the target. After every micro-batch the coefficient, the last window entropy, the applied bonus (the loss) and
    the logged policy_loss / entropy_coef lists equal TRL's; an evaluation micro-batch applies the bonus without
    moving the controller or logging entropy_coef."""
    vocab = len(make_tokenizer())
    batches = micro_batches(vocab, [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    options = dict(gradient_accumulation_steps=2, entropy_coef=0.05, use_adaptive_entropy=True,
                   entropy_coef_delta=0.02, entropy_coef_min=0.01, entropy_coef_max=0.08)
    ours = scenario_trainer(tmp_path / "gvpo", **options)
    control = scenario_trainer(tmp_path / "grpo", trainer_cls=GRPOTrainer, model=twin(ours.model), **options)
    trainers = (ours, control)
    high, low = batches[0], batches[1]
    with torch.no_grad():
        h_high, h_low = (entropy_oracle(twin(ours.model), b, ours.temperature)[0].item() for b in batches)
    if h_high < h_low:
        high, low, h_high, h_low = low, high, h_low, h_high
    assert h_high - h_low > 1e-3
    for t in trainers:
        t.args.entropy_target = (h_high + h_low) / 2  # read at every step, as TRL does
        t.current_gradient_accumulation_steps = 2
        t.model.train()

    windows = [(high, high), (low, low), (low, low), (low, low), (high, low), (high, high)]
    applied_any = False
    for window in windows:
        for i, batch in enumerate(window):
            results = []
            for t in trainers:
                t.accelerator.sync_gradients = i == 1
                with torch.no_grad():
                    loss = t.compute_loss(t.model, batch)
                results.append((loss.item(), t.entropy_coef, t._last_world_entropy,
                                list(t._metrics["train"]["policy_loss"]), list(t._metrics["train"]["entropy_coef"])))
            (loss, coef, last, policy, logged), (c_loss, c_coef, c_last, c_policy, c_logged) = results
            assert loss == pytest.approx(c_loss, rel=1e-5, abs=1e-7)
            assert coef == pytest.approx(c_coef, abs=1e-12)
            assert last == c_last or last == pytest.approx(c_last, rel=1e-5)
            assert len(policy) == len(c_policy) and logged == pytest.approx(c_logged, abs=1e-12)
            applied_any |= abs(loss) > 1e-6
    assert applied_any and 0.01 <= ours.entropy_coef <= 0.08
    assert len(ours._metrics["train"]["entropy_coef"]) == len(windows)

    for t in trainers:
        t.accelerator.sync_gradients = True
        t._last_world_entropy = 0.0  # gate open
        t.model.eval()
    state = [(t.entropy_coef, t._last_world_entropy, len(t._metrics["train"]["entropy_coef"])) for t in trainers]
    with torch.no_grad():
        eval_losses = [t.compute_loss(t.model, high).item() for t in trainers]
    assert eval_losses[0] == pytest.approx(eval_losses[1], rel=1e-5) and eval_losses[0] < 0
    assert [(t.entropy_coef, t._last_world_entropy, len(t._metrics["train"]["entropy_coef"]))
            for t in trainers] == state
    assert "entropy_coef" not in ours._metrics["eval"] and len(ours._metrics["eval"]["policy_loss"]) == 1


def test_adaptive_state_saved_and_restored_with_checkpoints(tmp_path):
    """TRL's checkpointed controller state: entropy_ctrl_state.json in each checkpoint holds the coefficient and the
    last window entropy of that step; resuming from it restores them exactly, and the run goes on from there."""
    options = dict(entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=15.0, entropy_coef_delta=0.005,
                   max_steps=2, save_strategy="steps", save_steps=1)
    trainer = scenario_trainer(tmp_path, **options)
    trainer.train()
    saved = [json.loads((tmp_path / f"checkpoint-{s}" / "entropy_ctrl_state.json").read_text()) for s in (1, 2)]
    assert saved[1] == {"entropy_coef": trainer.entropy_coef, "last_world_entropy": trainer._last_world_entropy}
    assert saved[0]["entropy_coef"] == pytest.approx(0.015) and saved[1]["entropy_coef"] == pytest.approx(0.02)
    assert 0 < saved[0]["last_world_entropy"] < 15 and math.isfinite(saved[1]["last_world_entropy"])

    resumed = scenario_trainer(tmp_path / "resumed", trainer_cls=RestoreRecorder, **options)
    assert resumed.entropy_coef == 0.01 and resumed._last_world_entropy == float("inf")
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.restored == (saved[0]["entropy_coef"], saved[0]["last_world_entropy"])
    assert resumed.state.global_step == 2 and resumed.entropy_coef == pytest.approx(saved[1]["entropy_coef"])


class RestoreRecorder(GVPOTrainer):
    """Records the controller's state right after TRL restores it from a checkpoint."""

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        self.restored = (self.entropy_coef, self._last_world_entropy)
