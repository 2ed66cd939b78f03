"""The trainer: a smoke run, exact resume, rewards, and the update's loss against the reference on full logits.

Everything runs the tiny built-in model on the CPU (a few seconds per run); needs the ``train`` extra.
"""

import math
import shutil

import pytest
import torch

pytest.importorskip("transformers")

import gvpo_kernels as gk  # noqa: E402
from gvpo_kernels.trainer import TrainConfig, data, rewards, tiny, train, update  # noqa: E402
from gvpo_kernels.trainer.models import eos_ids, load_policy  # noqa: E402
from gvpo_kernels.trainer.report import read_metrics  # noqa: E402
from gvpo_kernels.trainer.rollout import sample  # noqa: E402

FIELDS = ("step", "reward_mean", "reward_std", "loss", "implicit_reward", "kl", "entropy", "grad_seq_abs",
          "completion_len", "grad_norm", "lr", "tokens_per_s", "step_time", "peak_mem_mb")
TIMING = ("tokens_per_s", "step_time", "peak_mem_mb")


def small(tmp_path, **overrides) -> TrainConfig:
    settings = dict(output_dir=str(tmp_path), steps=3, prompts_per_step=3, k=4, lr=1e-2, warmup_steps=1,
                    num_samples=1, progress=False, plot=False, device="cpu")
    return TrainConfig(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------------- runs


def test_smoke_run_writes_metrics_plot_and_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = train(small(tmp_path, plot=True))
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert lines == metrics and [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert set(FIELDS) <= set(m) and all(math.isfinite(m[f]) for f in FIELDS)
        assert 0 <= m["reward_mean"] <= 1 and 1 <= m["completion_len"] <= 3
        # a fresh model samples its 18 tokens almost uniformly; the 'old' anchor is the policy itself on one pass
        assert 2.0 < m["entropy"] <= math.log(18) and abs(m["kl"]) < 1e-5
        assert m["kl"] == pytest.approx(m["implicit_reward"] / 0.1, rel=1e-6, abs=1e-12)
    assert (tmp_path / "metrics.png").stat().st_size > 0
    assert "samples after training" in (tmp_path / "samples.txt").read_text()

    ckpt = tmp_path / "checkpoint-3"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert tokenizer("1+2=")["input_ids"] == tiny.build_tokenizer()("1+2=")["input_ids"]
    initial = tiny.build_model(tokenizer, seed=0)
    changed = [name for name, p in model.state_dict().items() if not torch.equal(p, initial.state_dict()[name])]
    assert changed, "three steps at lr 1e-2 left every weight unchanged"


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    full = train(small(tmp_path, steps=4, save_every=2))
    final = {k: v.clone() for k, v in load_policy(str(tmp_path / "checkpoint-4"), torch.device("cpu"), seed=0,
                                                   attn_implementation=None)[0].state_dict().items()}
    shutil.rmtree(tmp_path / "checkpoint-4")  # as if the run had died after step 2's checkpoint
    with pytest.raises(ValueError, match=r"holds an earlier run .*--resume .*--overwrite"):
        train(small(tmp_path, steps=4, save_every=2))  # not resumed: refused, nothing touched

    resumed = train(small(tmp_path, steps=4, save_every=2, resume="latest"))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for before, after in zip(full, resumed):
        assert {k: v for k, v in before.items() if k not in TIMING} == {
            k: v for k, v in after.items() if k not in TIMING}
    again = load_policy(str(tmp_path / "checkpoint-4"), torch.device("cpu"), seed=0, attn_implementation=None)[0]
    for name, value in again.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_a_bad_reward_function_stops_the_run_naming_it(tmp_path, monkeypatch):
    module = tmp_path / "my_rewards.py"
    module.write_text("def nan_reward(prompts, completions, **row):\n    return [float('nan')] * len(prompts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"'my_rewards:nan_reward' returned nan for completion 0"):
        train(small(tmp_path / "out", reward="my_rewards:nan_reward"))


# ------------------------------------------------------------------------------------------- rewards


def test_builtin_rewards():
    prompts = ["p"] * 6
    completions = ["so the answer is 1,000.", "#### 42", "x = \\boxed{\\frac{1}{2}} ok", "12 then 7", "", "-3"]
    answers = ["1000", "42", "\\frac{1}{2}", "7", "0", "-3.0"]
    assert rewards.last_number(prompts, completions, answers) == [1, 1, 0, 1, 0, 1]
    assert rewards.exact_match(prompts, completions, answers) == [0, 1, 0, 0, 0, 1]
    assert rewards.boxed(prompts, completions, answers) == [0, 0, 1, 0, 0, 0]
    assert rewards.last_number_in("a 1,234.5 b") == "1,234.5" and rewards.last_number_in("none") is None
    assert rewards.last_boxed("\\boxed{a{b}c} and \\boxed{d}") == "d"
    assert rewards.last_boxed("\\boxed{open") is None


def test_user_reward_function_gets_every_field_per_completion(tmp_path, monkeypatch):
    (tmp_path / "user_reward.py").write_text(
        "def by_length(prompts, completions, answer, target_len, **row):\n"
        "    return [float(len(c) == t) + 0.5 * (a == 'x') for c, a, t in zip(completions, answer, target_len)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = rewards.load_reward("user_reward:by_length")
    rows = [{"prompt": "a", "answer": "x", "target_len": 2}, {"prompt": "b", "answer": "y", "target_len": 1}]
    out = rewards.score(fn, "user_reward:by_length", ["a", "b"], ["zz", "zz"], rows)
    assert out.dtype == torch.float32 and out.tolist() == [1.5, 0.0]


@pytest.mark.parametrize("body, error, message", [
    ("return [1.0]", ValueError, r"'m:f' returned 1 values for 3 completions"),
    ("return [1.0, float('nan'), 0.0]", ValueError, r"'m:f' returned nan for completion 1"),
    ("return [1.0, float('inf'), 0.0]", ValueError, r"'m:f' returned inf for completion 1"),
    ("return [1.0, 'yes', 0.0]", TypeError, r"'m:f' returned 'yes' \(str\) for completion 1"),
    ("return None", TypeError, r"'m:f' returned a NoneType"),
    ("raise KeyError('answer')", RuntimeError, r"'m:f' raised KeyError"),
], ids=["wrong-length", "nan", "inf", "string", "none", "raises"])
def test_bad_reward_functions_raise_naming_them(body, error, message):
    namespace = {}
    exec(f"def f(prompts, completions, **row):\n    {body}\n", namespace)
    with pytest.raises(error, match=message):
        rewards.score(namespace["f"], "m:f", ["p"] * 3, ["c"] * 3, [{"prompt": "p", "answer": "1"}] * 3)


@pytest.mark.parametrize("spec, message", [
    ("nope", r"'nope' is neither a built-in"),
    ("no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz'"),
    ("math:no_such_function", r"module 'math' has no function 'no_such_function'"),
])
def test_unknown_reward_names_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        rewards.load_reward(spec)


# ------------------------------------------------------------------------------------------- prompts


def test_jsonl_rows_and_step_batches(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": 2, "level": "a"}\n\n{"prompt": "2+2=", "answer": "4"}\n'
                    '{"prompt": "3+3=", "answer": "6"}\n')
    rows = data.load_rows(str(path))
    assert rows[0] == {"prompt": "1+1=", "answer": 2, "level": "a"} and len(rows) == 3
    batches = [data.step_rows(rows, step, 2, seed=0) for step in range(3)]  # 6 picks = 2 passes over 3 rows
    assert sorted(r["prompt"] for b in batches for r in b) == ["1+1=", "1+1=", "2+2=", "2+2=", "3+3=", "3+3="]
    assert sorted(r["prompt"] for r in batches[0] + batches[1][:1]) == ["1+1=", "2+2=", "3+3="]
    assert data.step_rows(rows, 2, 2, seed=0) == batches[2]
    path.write_text('{"prompt": "ok"}\n{"answer": "1"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2 must be a JSON object with a string 'prompt'"):
        data.load_rows(str(path))


def test_prompts_go_through_the_chat_template_when_the_tokenizer_has_one():
    tokenizer = tiny.build_tokenizer()
    assert data.encode_prompts(tokenizer, ["1+2="], chat_template=True) == [[1, 5, 14, 6, 15]]  # <s> 1 + 2 =
    tokenizer.chat_template = ("{% for m in messages %}?{{ m['content'] }}?{% endfor %}"
                               "{% if add_generation_prompt %} {% endif %}")
    assert data.encode_prompts(tokenizer, ["1+2="], chat_template=True) == [[16, 5, 14, 6, 15, 16, 17]]
    assert data.encode_prompts(tokenizer, ["1+2="], chat_template=False) == [[1, 5, 14, 6, 15]]


# -------------------------------------------------------------------------------------- the update


def fixed_rollout(temperature=1.0):
    """A tiny model and a sampled batch of 3 groups of 4, prompts of different lengths (left padding), rewards."""
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, seed=1)
    model.generation_config.eos_token_id = eos_ids(model, tokenizer)
    torch.manual_seed(0)
    prompts = [tokenizer(p)["input_ids"] for p in ("1+2=", "12+3=", "4?")]
    batch = sample(model, prompts, k=4, max_new_tokens=5, temperature=temperature, top_p=1.0,
                   stop_ids=eos_ids(model, tokenizer), pad_id=tokenizer.pad_token_id)
    batch.rewards = torch.rand(12)
    return model, batch


def full_logits(model, batch):
    """(S, C, V): the completion positions' logits from the full model (the thing the update never builds)."""
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids).logits
    return logits[:, batch.prompt_len - 1:-1]


def test_rollout_masks_and_pads():
    _, batch = fixed_rollout()
    assert batch.input_ids.shape[0] == 12 and batch.num_groups == 3
    assert (batch.input_ids[:4, :batch.prompt_len] == batch.input_ids[0, :batch.prompt_len]).all()  # one prompt/group
    mask, ids = batch.completion_mask, batch.completion_ids
    assert mask[:, 0].all() and (mask[:, 1:] <= mask[:, :-1]).all(), "the mask is a prefix of each completion"
    assert (ids[~mask] == 0).all(), "tokens after the first EOS are padding"
    eos = ids == 2
    assert (eos & mask).sum(1).le(1).all() and not mask.all(), "at most one EOS is scored; some rows stopped early"


def test_anchor_logprobs_match_each_sequence_run_alone_without_padding():
    model, batch = fixed_rollout(temperature=0.7)
    batched, entropy = update.token_logprobs(model, batch, temperature=0.7, return_entropy=True)
    torch.testing.assert_close(update.token_logprobs(model, batch, temperature=0.7), batched, rtol=1e-6, atol=1e-6)
    for i in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[i][batch.attention_mask[i].bool()]  # prompt + scored completion, no padding
        n = int(batch.completion_mask[i].sum())
        with torch.no_grad():
            logp = (model(ids[None]).logits[0, -n - 1:-1] / 0.7).log_softmax(-1)
        expected = logp.gather(-1, ids[-n:, None]).squeeze(-1)
        torch.testing.assert_close(batched[i, :n], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy[i, :n], -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)
        assert (batched[i, n:] == 0).all() and (entropy[i, n:] == 0).all()


@pytest.mark.parametrize("temperature, entropy_coef", [(1.0, 0.0), (0.7, 0.0), (0.7, 0.3), (1.0, -0.2)],
                         ids=["T1", "T0.7", "T0.7-bonus", "T1-penalty"])
def test_update_loss_and_gradients_equal_the_reference_on_full_logits(temperature, entropy_coef):
    model, batch = fixed_rollout(temperature)
    other = tiny.build_model(tiny.build_tokenizer(), seed=2)  # a different anchor, so the loss is not constant
    batch.anchor = update.token_logprobs(other, batch, temperature)
    params = list(model.parameters())

    loss, stats = update.gvpo_loss(model, batch, beta=0.1, temperature=temperature, backend="torch",
                                   entropy_coef=entropy_coef)
    grads = torch.autograd.grad(loss, params)

    labels = batch.completion_ids.masked_fill(~batch.completion_mask, -100)
    expected, expected_stats = gk.reference.gvpo_loss(
        full_logits(model, batch), labels, batch.rewards, group_size=4, mask=batch.completion_mask,
        ref_logprobs=batch.anchor, beta=0.1, temperature=temperature, entropy_coef=entropy_coef, return_stats=True)
    if entropy_coef:  # the bonus is entropy_coef x the mean entropy over the scored tokens
        entropy = (stats.entropy * batch.completion_mask.sum(1)).sum() / batch.completion_mask.sum()
        torch.testing.assert_close(stats.entropy_bonus, entropy_coef * entropy, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loss, stats.gvpo_loss - stats.entropy_bonus, rtol=1e-6, atol=1e-7)
    expected_grads = torch.autograd.grad(expected, params)

    assert stats.gvpo_loss.item() > 1e-3
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    for got, want in zip(stats, expected_stats):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for param_grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(param_grad, want, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_gives_the_loss_one_dtype_and_the_old_anchor_matches_the_policy(monkeypatch):
    model, batch = fixed_rollout()
    seen = []

    def recording_loss(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return gk.linear_gvpo_loss(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(update, "linear_gvpo_loss", recording_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch.anchor = update.token_logprobs(model, batch, 1.0)
        loss, stats = update.gvpo_loss(model, batch, beta=0.1, temperature=1.0, backend="torch")
    loss.backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert model.lm_head.weight.grad.dtype == torch.float32 and model.lm_head.weight.grad.abs().sum() > 0
    # the anchor is the policy itself: r_i = beta (s_i - a_i) is 0 up to the torch backend's bf16 logits
    assert stats.implicit_reward.abs().max() < 1e-3


@pytest.mark.parametrize("entropy_coef", [0.0, 0.3], ids=["no-bonus", "bonus"])
def test_micro_batches_and_accumulation_give_the_full_batch_gradient_without_building_logits(entropy_coef):
    """One optimizer step over three micro-batches of one group each equals one step over the whole batch: the GVPO
    loss (each micro-batch weighted by its share of the groups) and the entropy bonus (each micro-batch's
    coefficient rescaled so that the step's is the mean over all its scored tokens, though the groups' completions
    have different lengths)."""
    def gradients(micro_batch_groups, grad_accum):
        model, batch = fixed_rollout()
        batch.anchor = update.token_logprobs(tiny.build_model(tiny.build_tokenizer(), seed=2), batch, 1.0)
        calls = []
        model.lm_head.register_forward_hook(lambda *args: calls.append(1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        stats = update.update(update.Policy(model), optimizer, scheduler, batch, beta=0.1, temperature=1.0,
                              backend="torch", update_epochs=1, micro_batch_groups=micro_batch_groups,
                              grad_accum=grad_accum, max_grad_norm=0.0, autocast=torch.autocast("cpu", enabled=False),
                              entropy_coef=entropy_coef)
        assert not calls, "the update called lm_head.forward: it built the full logits"
        return stats, [p.grad.clone() for p in model.parameters()], batch

    whole, whole_grads, batch = gradients(None, 1)
    split, split_grads, _ = gradients(1, 3)  # three micro-batches of one group, one optimizer step
    assert whole["grad_norm"] > 0
    keys = ("loss", "implicit_reward", "kl", "grad_seq_abs", "grad_norm")
    if entropy_coef:
        keys += ("gvpo_loss", "entropy_bonus")
        lengths = batch.completion_mask.sum(1).view(3, 4).sum(1)
        assert len(set(lengths.tolist())) > 1, "the groups have as many tokens: the rescaling is not tested"
        assert whole["loss"] == pytest.approx(whole["gvpo_loss"] - whole["entropy_bonus"], rel=1e-6)
    else:
        assert "gvpo_loss" not in whole and "entropy_bonus" not in whole
    for key in keys:
        assert split[key] == pytest.approx(whole[key], rel=1e-5), key
    for a, b in zip(whole_grads, split_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_cli_help_and_config_errors(capsys):
    from gvpo_kernels.trainer.cli import build_parser, main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--anchor" in out and "--overwrite" in out and "--fsdp" in out
    assert "--entropy-coef ENTROPY_COEF entropy bonus: the loss becomes GVPO's minus this" in out
    assert build_parser().parse_args(["--entropy-coef", "0.05"]).entropy_coef == 0.05
    assert build_parser().parse_args(["--entropy-coef=-1e-3"]).entropy_coef == -1e-3
    assert "(less memory, ~30% slower)" in out and "about 30 s" in out, "help text garbled or stale"
    with pytest.raises(SystemExit):
        main(["--k", "1"])
    assert "k must be >= 2" in capsys.readouterr().err


# ------------------------------------------------ checks before anything is loaded (one line, exit 2)


def cli_error(capsys, monkeypatch, *argv) -> str:
    """Run gvpo-train with ``argv``; assert it exits 2 without loading a model; return its one stderr line."""
    from gvpo_kernels.trainer import loop
    from gvpo_kernels.trainer.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(loop, "load_policy", no_model)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("gvpo-train: error: "), err
    return err


@pytest.mark.parametrize("beta", ["0", "-0.1"])
def test_cli_refuses_beta_that_is_not_positive(beta, capsys, monkeypatch):
    assert "beta must be > 0" in cli_error(capsys, monkeypatch, "--beta", beta)


def test_cli_refuses_bad_data_reward_and_backend_before_loading_a_model(tmp_path, capsys, monkeypatch):
    out = ["--output-dir", str(tmp_path / "out")]
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    assert "row 2 has no 'answer'" in cli_error(capsys, monkeypatch, *out, "--data", str(no_answer))
    assert "no such file" in cli_error(capsys, monkeypatch, *out, "--data", str(tmp_path / "missing.jsonl"))
    assert "cannot import file './nowhere.py'" in cli_error(capsys, monkeypatch, *out, "--reward", "./nowhere.py:f")
    (tmp_path / "narrow.py").write_text("def f(prompts, completions):\n    return [0.0] * len(prompts)\n")
    assert "cannot be called as f(prompts, completions, answer=...)" in cli_error(
        capsys, monkeypatch, *out, "--reward", f"{tmp_path / 'narrow.py'}:f")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "'triton' cannot run" in cli_error(capsys, monkeypatch, *out, "--backend", "triton", "--device", "cpu")
    assert not (tmp_path / "out").exists(), "a refused run wrote its output dir"


def test_reward_from_a_file_path(tmp_path):
    (tmp_path / "file_reward.py").write_text("def f(prompts, completions, **row):\n    return [1.0] * len(prompts)\n")
    fn = rewards.load_reward(f"{tmp_path / 'file_reward.py'}:f")
    assert rewards.score(fn, "f", ["p"], ["c"], [{"prompt": "p"}]).tolist() == [1.0]


def test_a_pretrained_model_with_the_demo_task_defaults_is_warned_about(tmp_path):
    from gvpo_kernels.trainer import checks, parallel

    tokenizer = tiny.build_tokenizer()
    tiny.build_model(tokenizer, seed=0).save_pretrained(tmp_path / "model")  # a saved model: checked, not loaded
    cfg = TrainConfig(model=str(tmp_path / "model"), output_dir=str(tmp_path / "out"))
    with pytest.warns(UserWarning, match=r"built-in addition task .*--lr 1e-3, --max-new-tokens 3: the tiny demo"):
        checks.prepare(cfg, parallel.World(), torch.device("cpu"))


def test_output_dir_reuse_needs_resume_or_overwrite_and_resume_keeps_the_schedule(tmp_path):
    from gvpo_kernels.trainer import checks

    train(small(tmp_path, steps=3))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(checks.ConfigError, match=r"--steps 5 \(the checkpoint's run: 3\).*schedule would jump"):
        train(small(tmp_path, steps=5, resume="latest"))
    with pytest.raises(checks.ConfigError, match=r"--lr 0.1 \(the checkpoint's run: 0.01\)"):
        train(small(tmp_path, steps=3, lr=0.1, resume="latest"))
    with pytest.raises(checks.ConfigError, match=r"has done all 3 steps"):
        train(small(tmp_path, steps=3, resume="latest"))
    metrics = train(small(tmp_path, steps=2, overwrite=True))  # a new run: the old one's files are gone
    assert [m["step"] for m in metrics] == [1, 2] and not (tmp_path / "checkpoint-3").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine", "--overwrite deleted a file the trainer did not write"


def test_the_ref_anchor_logs_a_growing_kl_and_the_policy_entropy(tmp_path):
    metrics = train(small(tmp_path / "ref", anchor="ref", steps=3))
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 1: the policy is still the reference
    assert abs(metrics[-1]["kl"]) > 1e-4 and all(2.0 < m["entropy"] <= math.log(18) for m in metrics)
    # the entropy from the loss's statistics (ref anchor) equals the anchor pass's (old anchor) at step 1, where
    # both see the same rollout and the policy before its first optimizer step
    first = train(small(tmp_path / "old", steps=1))[0]
    assert metrics[0]["entropy"] == pytest.approx(first["entropy"], rel=1e-5)


# ------------------------------------------------------------------------------------------- entropy bonus


def test_the_entropy_bonus_lowers_the_logged_loss_by_coef_times_the_entropy(tmp_path):
    """Step 1 samples the same completions with and without the bonus (same seed, no update yet); the GVPO part is
    the loss of the run without it, and the loss is lower by entropy_coef x the policy's mean entropy over the scored
    tokens (the 'old' anchor's pass measures it on the same policy). The run without the bonus logs neither part."""
    plain = train(small(tmp_path / "plain", steps=1))[0]
    bonus = train(small(tmp_path / "bonus", steps=1, entropy_coef=0.5))[0]
    assert "gvpo_loss" not in plain and "entropy_bonus" not in plain
    assert bonus["reward_mean"] == plain["reward_mean"] and bonus["entropy"] == plain["entropy"]
    assert bonus["gvpo_loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert bonus["entropy_bonus"] == pytest.approx(0.5 * bonus["entropy"], rel=1e-5)
    assert bonus["loss"] == pytest.approx(plain["loss"] - 0.5 * bonus["entropy"], rel=1e-5)
    assert bonus["loss"] == pytest.approx(bonus["gvpo_loss"] - bonus["entropy_bonus"], rel=1e-6)
    assert bonus["grad_norm"] != plain["grad_norm"], "the bonus did not reach the gradient"


def test_resume_with_the_entropy_bonus_continues_exactly(tmp_path):
    full = train(small(tmp_path, steps=4, save_every=2, entropy_coef=0.2, micro_batch_groups=1, grad_accum=3))
    assert all({"gvpo_loss", "entropy_bonus"} <= set(m) for m in full)
    shutil.rmtree(tmp_path / "checkpoint-4")  # as if the run had died after step 2's checkpoint
    resumed = train(small(tmp_path, steps=4, save_every=2, entropy_coef=0.2, micro_batch_groups=1, grad_accum=3,
                          resume="latest"))
    for before, after in zip(full, resumed, strict=True):
        assert {k: v for k, v in before.items() if k not in TIMING} == {
            k: v for k, v in after.items() if k not in TIMING}
    with pytest.warns(UserWarning, match=r"differ from the checkpoint's run: entropy_coef 0.2 -> 0.0"):
        again = train(small(tmp_path / "again", steps=4, resume=str(tmp_path / "checkpoint-2")))
    assert [m["step"] for m in again] == [3, 4] and "entropy_bonus" not in again[0]
