"""TRL plug-in on models whose logits are not lm_head(hidden): soft-capped (Gemma-2), scaled (Cohere), divided
(Granite), each built here tiny (nothing is downloaded).

The oracle is always the model's own forward: its logits' log_softmax (at TRL's temperature), TRL's own fused LM
head, and the GVPO reference loss on the model's own logits. Each check also shows that ignoring the transform
would fail it.
"""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[trl]')")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from test_trl import (  # noqa: E402
    TEMPERATURE, WORDS, RecordingTrainer, make_model, make_tokenizer, make_trainer, reward_from_text, trl_own_logps)

from gvpo_kernels.integrations.hf import LogitTransform, logit_transform  # noqa: E402
from gvpo_kernels.integrations.trl import GVPOConfig, GVPOTrainer, _check_hidden_matches_logits  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)
TOKENS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=None)

# model type -> (config keywords, the transform transformers' modeling code applies)
FAMILIES = {
    "gemma2": (dict(head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=3.0), LogitTransform(3.0, 1.0)),
    "gemma3_text": (dict(head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=3.0), LogitTransform(3.0)),
    "vaultgemma": (dict(head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=3.0), LogitTransform(3.0)),
    "nanochat": (dict(final_logit_softcapping=3.0), LogitTransform(3.0)),
    "cohere": (dict(logit_scale=4.0), LogitTransform(None, 4.0)),
    "cohere2": (dict(logit_scale=4.0), LogitTransform(None, 4.0)),
    "granite": (dict(logits_scaling=0.25), LogitTransform(None, 4.0)),  # divides
    "granitemoe": (dict(logits_scaling=0.25, num_local_experts=2, num_experts_per_tok=1), LogitTransform(None, 4.0)),
    "hyperclovax": (dict(logits_scaling=4.0), LogitTransform(None, 4.0)),  # multiplies
    "falcon_h1": (dict(lm_head_multiplier=4.0), LogitTransform(None, 4.0)),
    "minicpm3": (dict(num_key_value_heads=4, dim_model_base=8, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=8, v_head_dim=8, head_dim=16), LogitTransform(None, 0.25)),  # 32 / 8, divides
    "llama": (dict(), LogitTransform()),
}


def tiny(model_type, vocab_size, sharpen=20.0, **overrides):
    """A tiny causal LM of ``model_type`` built from its config, LM head sharpened (logits large enough for the
    transform to matter)."""
    options, _ = FAMILIES[model_type]
    config = transformers.AutoConfig.for_model(model_type, vocab_size=vocab_size,
                                               **{**SMALL, **options, **TOKENS, **overrides})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    return model


def backbone_and_logits(model, input_ids, attention_mask=None):
    """(the backbone's last hidden state, the model's own logits) of one forward."""
    caught = []
    hook = model.base_model.register_forward_hook(lambda module, args, output: caught.append(output))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        hook.remove()
    out = caught[-1]
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]), logits


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_logit_transform_is_what_the_model_computes(model_type):
    """For each family, the transform read from the config, applied to the LM head on the backbone's output, gives
    the model's own logits (transformers' modeling code is the oracle); the plain head does not."""
    model = tiny(model_type, vocab_size=40).eval()
    expected = FAMILIES[model_type][1]
    got = logit_transform(model.config)
    assert got.softcap == expected.softcap and got.logit_scale == pytest.approx(expected.logit_scale, rel=1e-12)
    with torch.no_grad():
        hidden, logits = backbone_and_logits(model, torch.randint(3, 40, (2, 5), generator=torch.Generator()
                                                                  .manual_seed(0)))
        head = model.get_output_embeddings()(hidden)
    torch.testing.assert_close(got.apply(head), logits.float(), rtol=1e-5, atol=1e-5)
    _check_hidden_matches_logits(hidden[:, -1], model.get_output_embeddings().weight, None, logits[:, -1],
                                 torch.float32, got)
    if expected != LogitTransform():
        assert (head.float() - logits.float()).abs().max() > 1.0
        with pytest.raises(RuntimeError, match="does not reproduce the model's logits"):
            _check_hidden_matches_logits(hidden[:, -1], model.get_output_embeddings().weight, None, logits[:, -1],
                                         torch.float32, LogitTransform())


def test_logit_transform_of_multimodal_and_other_configs():
    """Composite configs are read through their text config; configs it cannot interpret are refused, naming the
    field."""
    auto = transformers.AutoConfig.for_model
    glimmer = logit_transform(auto("muse_glimmer"))  # output_multiplier before the soft-cap
    assert glimmer.softcap == 20.0 and glimmer.logit_scale == pytest.approx(0.19611613513818404)
    assert logit_transform(auto("aya_vision")) == LogitTransform(None, 0.0625)  # its Cohere2 text model
    assert logit_transform(auto("granite_docling")) == LogitTransform(None, 0.25)  # divides by 4
    assert logit_transform(auto("mpt")) == LogitTransform()  # logit_scale None: no transform
    assert logit_transform(auto("gemma2", final_logit_softcapping=None)) == LogitTransform()

    with pytest.raises(ValueError, match="logit_scale='inv_sqrt_d_model'"):
        logit_transform(auto("mpt", logit_scale="inv_sqrt_d_model"))
    with pytest.raises(ValueError, match="logits_scaling=4.0.*type llama"):  # divides or multiplies?
        logit_transform(auto("llama", logits_scaling=4.0))
    with pytest.raises(ValueError, match="logit_scale=2.0, lm_head_multiplier=3.0"):
        logit_transform(auto("cohere", logit_scale=2.0, lm_head_multiplier=3.0))
    for bad in (0.0, -1.0, float("inf"), True):  # strict transformers configs refuse some of these themselves
        with pytest.raises(ValueError, match="final_logit_softcapping"):
            logit_transform(SimpleNamespace(model_type="gemma2", final_logit_softcapping=bad))
    # A multiplier of 1 is no transform, and may sit beside another one.
    assert logit_transform(auto("falcon_h1", lm_head_multiplier=1.0, logit_scale=2.0)) == LogitTransform(None, 2.0)


# The three families of soft-capped or scaled logits, as the trainer sees them: a Gemma-2 with a cap that bites, a Cohere with a
# non-default scale, a Granite that divides.
# (Gemma-2 ties its LM head to its input embeddings: a milder sharpening keeps its samples varied.)
TRAINED = {
    "gemma2-softcap": ("gemma2", dict(final_logit_softcapping=5.0, sharpen=10.0)),
    "cohere-scale": ("cohere", dict(logit_scale=0.125)),
    "granite-divisor": ("granite", dict(logits_scaling=8.0)),
}


def trained_model(name):
    model_type, overrides = TRAINED[name]
    return tiny(model_type, len(make_tokenizer()), **overrides)


@pytest.mark.parametrize("name", list(TRAINED))
def test_logprob_pass_equals_the_models_own_logits(tmp_path, name):
    """TRL's old/ref log-prob pass, through the plug-in: log-probs and entropies equal the log_softmax of the
    model's own logits / T and TRL's own fused head (which reads the same config); without the transform they
    would not."""
    trainer = make_trainer(tmp_path, model=trained_model(name))
    model = trainer.model
    g = torch.Generator().manual_seed(4)
    rows, prompt_len, completion_len = 5, 4, 6
    input_ids = torch.randint(3, len(trainer.processing_class), (rows, prompt_len + completion_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    attention_mask[2, prompt_len + 3:] = 0
    args = (input_ids, attention_mask, completion_len)
    with torch.no_grad():
        ours, ours_entropy, _ = trainer._get_per_token_logps_and_entropies(model, *args, batch_size=2,
                                                                            compute_entropy=True)
        theirs, theirs_entropy, _ = trl_own_logps(trainer, model, *args, batch_size=2, compute_entropy=True)
        hidden, logits = backbone_and_logits(model, input_ids, attention_mask)
    scored = attention_mask[:, -completion_len:].bool()
    labels = input_ids[:, -completion_len:]

    def logprobs_and_entropy(z):
        logp = (z.double() / TEMPERATURE).log_softmax(-1)
        return (logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * scored).float(), \
            (-(logp.exp() * logp).sum(-1) * scored).float()

    own, own_entropy = logprobs_and_entropy(logits[:, -completion_len - 1:-1])
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_entropy, own_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_entropy, theirs_entropy, rtol=1e-5, atol=1e-5)
    plain, _ = logprobs_and_entropy(model.get_output_embeddings()(hidden[:, -completion_len - 1:-1]))
    assert (plain - own).abs().max() > 1e-2, "the transform does not matter for this model: the test proves nothing"


@pytest.mark.parametrize("name", list(TRAINED))
def test_trains_and_matches_reference_on_the_models_own_logits(tmp_path, name):
    """Two steps through GVPOTrainer (old log-probs from the plug-in's pass, so the anchor goes through it too):
    each micro-batch's loss equals the GVPO reference on the model's own (transformed) logits; parameters move."""
    trainer = make_trainer(tmp_path, trainer_cls=RecordingTrainer, model=trained_model(name))
    trainer.records = []
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert len(trainer.records) == 2
    for rec in trainer.records:
        assert "old_per_token_logps" in rec["inputs"]
        torch.testing.assert_close(rec["loss"], rec["ref"].float(), rtol=1e-5, atol=1e-6)
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any("layers.0" in n for n in moved) and any("embed" in n or "lm_head" in n for n in moved)
    logged = [h for h in trainer.state.log_history if "gvpo/loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["gvpo/loss"]) for h in logged)
    # step 1 scores the batch before any update with the plug-in's own old log-probs: r_i = 0 to rounding
    assert abs(logged[0]["gvpo/implicit_reward"]) < 1e-5


def test_trl_gemma2_cast_lm_head_to_fp32_scenario(tmp_path):
    """TRL's test_train_with_cast_lm_head_to_fp32[tiny-Gemma2ForCausalLM] as a scenario of ours: a tiny bfloat16
    Gemma-2 (tied embeddings, TRL's default soft-cap 30), TRL's options (bf16 mixed precision by default,
    cast_lm_head_to_fp32, lr 0.1, batches of 3, 3 generations, 8 completion tokens) and TRL's assertions: a training
    loss, a float32 LM head, every parameter changed."""
    tokenizer = make_tokenizer()
    config = transformers.Gemma2Config(vocab_size=len(tokenizer), hidden_size=8, num_attention_heads=4,
                                       num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32,
                                       head_dim=8, query_pre_attn_scalar=8, **TOKENS)
    assert config.final_logit_softcapping == 30.0 and config.tie_word_embeddings
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).to(torch.bfloat16)
    args = GVPOConfig(output_dir=str(tmp_path), learning_rate=0.1, per_device_train_batch_size=3, num_generations=3,
                      max_completion_length=8, report_to="none", cast_lm_head_to_fp32=True, use_cpu=True,
                      max_steps=3, save_strategy="no", disable_tqdm=True, seed=0)
    assert args.bf16  # TRL's default
    prompts = [" ".join(WORDS[i:i + 3]) for i in range(6)]
    trainer = GVPOTrainer(model=model, reward_funcs=reward_from_text, args=args, processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))
    previous = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert trainer.model.lm_head.weight.dtype == torch.float32
    for n, p in previous.items():
        assert not torch.equal(p, trainer.model.get_parameter(n)), f"Parameter {n} has not changed."


def test_refuses_a_config_it_cannot_interpret(tmp_path):
    """At construction: logits_scaling on a model type whose use of it is unknown, a non-numeric transform."""
    for field, value, match in (("logits_scaling", 4.0, "logits_scaling=4.0"),
                                ("logit_scale", "inv_sqrt_d_model", "logit_scale='inv_sqrt_d_model'")):
        model = make_model(len(make_tokenizer()))
        setattr(model.config, field, value)
        with pytest.raises(ValueError, match=match):
            make_trainer(tmp_path, model=model)


class DoubledLogits(transformers.LlamaForCausalLM):
    """A model that transforms its logits without saying so in its config."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


@pytest.mark.parametrize("case", ["announced-but-not-applied", "applied-but-not-announced"])
def test_refuses_a_transform_nobody_recognises_before_any_update(tmp_path, case):
    """A Llama whose config sets logit_scale (which Llama ignores), and a model that doubles its logits without a
    config field: the first forward's check raises a clear error naming the transform it expected, before any
    parameter moves."""
    model = make_model(len(make_tokenizer()))
    if case == "announced-but-not-applied":
        model.config.logit_scale = 0.5
        expected = r"lm_head\(hidden\) \* 0\.5"
    else:
        doubled = DoubledLogits(model.config)
        doubled.load_state_dict(model.state_dict())
        model, expected = doubled, r"lm_head\(hidden\),"
    trainer = make_trainer(tmp_path, model=model)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(RuntimeError, match=expected + ".*does not reproduce the model's logits"):
        trainer.train()
    assert all(torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())
