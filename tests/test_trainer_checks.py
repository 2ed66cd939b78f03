"""gvpo-train's settings: every one is checked before a model loads, and a bad one is one line on stderr, exit 2.

Each case here used to load the model and then fail with a traceback (or worse, run: ``--max-grad-norm nan``
turned clipping off, ``--min-lr-ratio nan`` trained with a NaN learning rate). No model is loaded in this file.
"""

import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

from test_trainer import cli_error  # noqa: E402

from gvpo_kernels.trainer import TrainConfig, tiny  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr=-1e-3"], "--lr must be >= 0, got -0.001"),
    (["--min-lr-ratio", "nan"], "--min-lr-ratio must be a finite number"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio must be in [0, 1]"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number (0 = no clipping), got nan"),
    (["--max-grad-norm", "inf"], "--max-grad-norm must be a finite number (0 = no clipping), got inf"),
    (["--beta", "inf"], "--beta must be a finite number"),
    (["--beta", "1e-40"], "--beta must be in [1.17549e-38, 8.50706e+37]"),
    (["--beta", "1e40"], "--beta must be in [1.17549e-38, 8.50706e+37]"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--top-p", "nan"], "--top-p must be a finite number"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--seed", "100000000000000000000"], "--seed must be in [0, 9223372036854775807], got 100000000000000000000"),
    (["--seed", "-1"], "--seed must be in [0, 9223372036854775807], got -1"),
    (["--seed", "1e20"], "argument --seed: invalid int value: '1e20' (see --help)"),
    (["--save-every", "-1"], "--save-every must be >= 0 (0 = only at the end), got -1"),
    (["--micro-batch-groups", "0"], "--micro-batch-groups must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--resume", ""], "--resume must name a checkpoint directory or 'latest'"),
    (["--output-dir", ""], "--output-dir must not be empty"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag (see --help)"),
    (["--anchor", "new"], "argument --anchor: invalid choice: 'new'"),
    (["--entropy-coef", "nan"], "--entropy-coef must be a finite number (the entropy bonus's coefficient; 0 = off), "
                                "got nan"),
    (["--entropy-coef", "inf"], "--entropy-coef must be a finite number"),
    (["--entropy-coef=-inf"], "--entropy-coef must be a finite number"),
    (["--entropy-coef", "1e30"], "--entropy-coef must be in [-1.84467e+19, 1.84467e+19]"),
    (["--entropy-coef", "lots"], "argument --entropy-coef: invalid float value: 'lots'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_value_is_one_line_before_any_model_loads(argv, message, tmp_path, capsys, monkeypatch):
    err = cli_error(capsys, monkeypatch, "--output-dir", str(tmp_path / "out"), *argv)
    assert message in err, err
    assert not (tmp_path / "out").exists(), "a refused run wrote its output dir"


def test_the_python_api_refuses_wrong_types_naming_the_setting():
    with pytest.raises(TypeError, match=r"--steps must be an int, got float 2.5"):
        TrainConfig(steps=2.5)
    with pytest.raises(TypeError, match=r"--lr must be a float, got str '1e-3'"):
        TrainConfig(lr="1e-3")
    with pytest.raises(TypeError, match=r"--plot must be a bool, got int 1"):
        TrainConfig(plot=1)
    with pytest.raises(TypeError, match=r"--k must be an int, got bool True"):
        TrainConfig(k=True)
    with pytest.raises(ValueError, match=r"--lr must be a finite number"):
        TrainConfig(lr=10**400)  # an int too large for a float
    assert TrainConfig(lr=1, seed=2**63 - 1).lr == 1  # an int where a float goes is fine


@pytest.mark.parametrize("device, message", [
    ("bogus", "device: 'bogus' is not a torch device (cpu, cuda, cuda:1, ...)"),
    ("meta", "device: 'meta' holds no data"),
    ("cuda:99", "only"),
    ("cuda", "no CUDA device is visible"),
    ("xpu", "this torch has no available xpu device"),
])
def test_a_device_that_does_not_exist_is_refused(device, message, tmp_path, capsys, monkeypatch):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if device == "cuda:99" and not torch.cuda.is_available():
        message = "no CUDA device is visible"
    if device == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        pytest.skip("an XPU is available here")
    assert message in cli_error(capsys, monkeypatch, "--output-dir", str(tmp_path / "out"), "--device", device)


def test_a_model_path_that_does_not_exist_or_is_not_a_model_is_refused(tmp_path, capsys, monkeypatch):
    out = ["--output-dir", str(tmp_path / "out")]
    assert "model: no such directory '/nonexistent/model'" in cli_error(
        capsys, monkeypatch, *out, "--model", "/nonexistent/model")
    assert "model: no such directory './no-such-model'" in cli_error(
        capsys, monkeypatch, *out, "--model", "./no-such-model")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    assert "is a file; expected a model directory" in cli_error(
        capsys, monkeypatch, *out, "--model", str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    assert "has no config.json: not a directory save_pretrained wrote" in cli_error(
        capsys, monkeypatch, *out, "--model", str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "no-such-architecture"')
    assert "model: cannot read the config of" in cli_error(
        capsys, monkeypatch, *out, "--model", str(tmp_path / "broken"))
    from transformers import T5Config

    T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=1).save_pretrained(
        tmp_path / "encoder")
    assert "is a T5Config, which AutoModelForCausalLM does not load" in cli_error(
        capsys, monkeypatch, *out, "--model", str(tmp_path / "encoder"))



@pytest.mark.parametrize("fields, message", [
    (dict(logits_scaling=4.0), "sets logits_scaling=4.0, which divides the logits in Granite's family"),
    (dict(logit_scale="inv_sqrt_d_model"), "sets logit_scale='inv_sqrt_d_model', which is understood only as a "
                                           "finite number > 0"),
    (dict(logit_scale=2.0, lm_head_multiplier=3.0), "sets logit_scale=2.0, lm_head_multiplier=3.0: no known model "
                                                    "combines them"),
    (dict(final_logit_softcapping=-1.0), "sets final_logit_softcapping=-1.0"),
], ids=["logits_scaling-on-llama", "not-a-number", "two-multipliers", "negative-softcap"])
def test_a_logit_transform_nobody_recognises_is_refused_before_loading(fields, message, tmp_path, capsys,
                                                                        monkeypatch):
    """A saved model whose config announces a logit transform that cannot be read is refused from its config alone
    (the transforms that can be read are trained: tests/test_trainer_models.py)."""
    model = tiny.build_model(tiny.build_tokenizer(), seed=0)
    for name, value in fields.items():
        setattr(model.config, name, value)
    model.save_pretrained(tmp_path / "model")
    err = cli_error(capsys, monkeypatch, "--output-dir", str(tmp_path / "out"), "--model", str(tmp_path / "model"))
    assert f"model: '{tmp_path / 'model'}': the model's config {message}" in err, err
    assert "the trainer would score other log-probs than the model samples" in err


def test_a_logit_scale_that_float32_cannot_take_with_the_temperature_is_refused(tmp_path, capsys, monkeypatch):
    model = tiny.build_model(tiny.build_tokenizer(), seed=0)
    model.config.logit_scale = 1e-30
    model.save_pretrained(tmp_path / "model")
    err = cli_error(capsys, monkeypatch, "--output-dir", str(tmp_path / "out"), "--model", str(tmp_path / "model"),
                    "--temperature", "1e10")
    assert "logits are lm_head(hidden) * 1e-30, which with --temperature 1e+10 the loss cannot take: logit_scale " \
        "/ temperature must lie in" in err, err


def test_an_output_dir_that_cannot_be_written_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("")
    assert f"output_dir: '{tmp_path / 'a_file'}' is a file, not a directory" in cli_error(
        capsys, monkeypatch, "--output-dir", str(tmp_path / "a_file"))
    assert f"cannot be created: '{tmp_path / 'a_file'}' is a file" in cli_error(
        capsys, monkeypatch, "--output-dir", str(tmp_path / "a_file" / "out"))
    if sys.platform == "linux":  # a directory nobody may create files in, root included
        assert "output_dir: cannot write in '/proc'" in cli_error(
            capsys, monkeypatch, "--output-dir", "/proc/gvpo-no-such-dir/out")
    if os.geteuid() != 0:  # root writes in a read-only directory anyway
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            assert f"output_dir: cannot write in '{locked}' (Permission denied)" in cli_error(
                capsys, monkeypatch, "--output-dir", str(locked / "out"))
        finally:
            locked.chmod(0o755)
