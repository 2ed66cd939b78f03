"""The trainer on models whose logits are not lm_head(hidden): soft-capped (Gemma-2), scaled (Cohere), divided
(Granite), each built tiny here with the trainer's own tokenizer and saved to a temporary directory (nothing is
downloaded).

The oracle is the model's own forward: the log_softmax of its logits at the sampling temperature, the scores
``generate`` sampled from, and the GVPO reference loss on its full logits. Each check also shows that ignoring the
transform would fail it.
"""

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gvpo_kernels as gk  # noqa: E402
from gvpo_kernels.integrations.hf import LogitTransform, logit_transform  # noqa: E402
from gvpo_kernels.trainer import TrainConfig, checks, tiny, train, update  # noqa: E402
from gvpo_kernels.trainer.models import check_logit_transform, eos_ids, load_policy  # noqa: E402
from gvpo_kernels.trainer.rollout import sample  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)
# name -> (model type, config keywords, LM head sharpening (logits large enough for the transform to matter), the
# transform transformers' modeling code applies). Gemma-2 and Cohere tie the head to the input embeddings.
FAMILIES = {
    "gemma2-softcap": ("gemma2", dict(head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=5.0), 10.0,
                       LogitTransform(5.0)),
    "cohere-scale": ("cohere", dict(logit_scale=0.125), 20.0, LogitTransform(None, 0.125)),
    "granite-divisor": ("granite", dict(logits_scaling=8.0), 20.0, LogitTransform(None, 0.125)),
}
TEMPERATURE = 0.7
CPU = torch.device("cpu")


def build(name):
    model_type, options, sharpen, _ = FAMILIES[name]
    tokenizer = tiny.build_tokenizer()
    config = transformers.AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **SMALL, **options,
                                               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    return model, tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> the directory of that tiny model and the trainer's tokenizer (save_pretrained's)."""
    paths = {}
    for name in FAMILIES:
        path = tmp_path_factory.mktemp(name)
        model, tokenizer = build(name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def full_logits(model, batch):
    """(S, C, V): the model's own logits at the completion positions (its forward: the transform applied)."""
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids).logits
    return logits[:, batch.prompt_len - 1:-1]


def sampled_batch(model, tokenizer):
    """A rollout by the trainer's ``sample`` (3 groups of 4, prompts of different lengths), and (S, C, V) the scores
    ``generate`` sampled each completion token from."""
    real = model.generate
    scores = []

    def recording_generate(**kwargs):
        out = real(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, 1))
        return out.sequences

    model.generate = recording_generate
    torch.manual_seed(0)
    prompts = [tokenizer(p)["input_ids"] for p in ("1+2=", "12+3=", "4?")]
    batch = sample(model, prompts, k=4, max_new_tokens=5, temperature=TEMPERATURE, top_p=1.0,
                   stop_ids=eos_ids(model, tokenizer), pad_id=tokenizer.pad_token_id)
    del model.generate
    return batch, scores[0]


def logprobs_and_entropy(logits, batch, temperature=TEMPERATURE):
    """Float64 oracle: (S, C) log-probs of the completion tokens and entropies, 0 where not scored."""
    logp = (logits.double() / temperature).log_softmax(-1)
    scored = batch.completion_mask
    token = logp.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    return (token * scored).float(), (-(logp.exp() * logp).sum(-1) * scored).float()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_trainers_logprobs_are_the_models_own_and_what_it_samples(saved, name):
    """update.token_logprobs (the anchor pass and the entropy metric) on a model loaded by the trainer: its
    log-probs and entropies equal the log_softmax of the model's own logits / T, and the scores ``generate`` drew
    the completions from; the plain head would give others."""
    model, tokenizer = load_policy(str(saved[name]), CPU, seed=0, attn_implementation=None)
    assert logit_transform(model.config) == FAMILIES[name][3]
    batch, scores = sampled_batch(model, tokenizer)
    ours, entropy = update.token_logprobs(model, batch, TEMPERATURE, return_entropy=True)
    with torch.no_grad():
        logits = full_logits(model, batch)
        plain = model.get_output_embeddings()(update.completion_hidden(model, batch))
    own, own_entropy = logprobs_and_entropy(logits, batch)
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, own_entropy, rtol=1e-5, atol=1e-5)
    # generate's scores are the (transformed) logits / T at each step: the completions were sampled from the
    # distribution the loss scores (top-k and top-p off)
    assert scores.shape[:2] == batch.completion_ids.shape
    drawn, _ = logprobs_and_entropy(scores, batch, temperature=1.0)
    torch.testing.assert_close(ours, drawn, rtol=1e-5, atol=1e-5)
    wrong, _ = logprobs_and_entropy(plain, batch)
    assert (wrong - own).abs().max() > 1e-2, "the transform does not matter for this model: the test proves nothing"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_update_loss_and_gradients_equal_the_reference_on_the_models_own_logits(saved, name):
    """update.gvpo_loss (with an entropy bonus and a foreign anchor, the C++ backend) against the reference GVPO
    loss on the model's full, transformed logits: loss, statistics and every parameter's gradient."""
    model, tokenizer = load_policy(str(saved[name]), CPU, seed=0, attn_implementation=None)
    batch, _ = sampled_batch(model, tokenizer)
    batch.rewards = torch.rand(12, generator=torch.Generator().manual_seed(1))
    anchor = update.token_logprobs(model, batch, TEMPERATURE)
    batch.anchor = anchor - 0.3 * torch.rand(anchor.shape, generator=torch.Generator().manual_seed(2)) * \
        batch.completion_mask
    params = [p for p in model.parameters() if p.requires_grad]
    loss, stats = update.gvpo_loss(model, batch, beta=0.1, temperature=TEMPERATURE, entropy_coef=0.05)
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    labels = batch.completion_ids.masked_fill(~batch.completion_mask, -100)
    expected, expected_stats = gk.reference.gvpo_loss(
        full_logits(model, batch), labels, batch.rewards, group_size=4, mask=batch.completion_mask,
        ref_logprobs=batch.anchor, beta=0.1, temperature=TEMPERATURE, entropy_coef=0.05, return_stats=True)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    assert stats.gvpo_loss.item() > 1e-3 and stats.entropy_bonus.item() > 1e-3
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    for got, want in zip(stats, expected_stats):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:--model .*the tiny demo's defaults")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_trains_through_the_trainer(saved, name, tmp_path):
    """Two steps of gvpo-train's loop, entropy bonus on: finite metrics, the entropy of the transformed
    distribution (below log V), the 'old' anchor equal to the policy (the anchor pass and the loss apply the same
    transform), and a checkpoint that moved and keeps the transform in its config."""
    metrics = train(TrainConfig(model=str(saved[name]), output_dir=str(tmp_path), steps=2, prompts_per_step=2, k=4,
                                lr=1e-2, warmup_steps=0, max_new_tokens=4, temperature=TEMPERATURE,
                                entropy_coef=0.01, num_samples=0, progress=False, plot=False, device="cpu"))
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
        assert 0 < m["entropy"] < math.log(18) and abs(m["kl"]) < 1e-4
        assert m["loss"] == pytest.approx(m["gvpo_loss"] - m["entropy_bonus"], rel=1e-6, abs=1e-9)
        assert m["entropy_bonus"] == pytest.approx(0.01 * m["entropy"], rel=1e-4)
    trained, _ = load_policy(str(tmp_path / "checkpoint-2"), CPU, seed=0, attn_implementation=None)
    assert logit_transform(trained.config) == FAMILIES[name][3]
    initial, _ = load_policy(str(saved[name]), CPU, seed=0, attn_implementation=None)
    initial = initial.state_dict()
    assert any(not torch.equal(p, initial[n]) for n, p in trained.state_dict().items())


class DoubledLogits(transformers.LlamaForCausalLM):
    """A model that transforms its logits without saying so in its config."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


@pytest.mark.filterwarnings("ignore:--model .*the tiny demo's defaults")
def test_a_transform_the_model_does_not_apply_is_refused_when_it_loads(tmp_path, capsys):
    """A Llama whose config sets logit_scale (which Llama's code ignores) passes the config check but not the
    load: one line, exit status 2, before any step; a model that doubles its logits without a config field is
    refused by the same check."""
    from gvpo_kernels.trainer.cli import main

    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, seed=0)
    model.config.logit_scale = 0.5
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "its config says its logits are lm_head(hidden) * 0.5 of its decoder's last hidden state, but its own " \
        "logits differ" in err, err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()

    doubled = DoubledLogits(tiny.build_model(tokenizer, seed=0).config)
    check_logit_transform(tiny.build_model(tokenizer, seed=0), "plain")  # the built-in model passes
    with pytest.raises(checks.ConfigError, match=r"'doubled': its config says its logits are lm_head\(hidden\) of"):
        check_logit_transform(doubled, "doubled")
