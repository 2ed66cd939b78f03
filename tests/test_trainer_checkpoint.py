"""Checkpoints that survive a run killed or out of disk while saving, and damaged files.

A checkpoint is written beside its final name and renamed, so a save that fails leaves no ``checkpoint-N``;
``--resume latest`` takes the newest complete checkpoint and says which ones it skipped and why; a damaged file is
one line, never a traceback; a torn last line of metrics.jsonl is dropped. One 3-step run with a checkpoint
after every step is made once; each test damages a copy of it and resumes (one step, on the tiny model).
"""

import errno
import json
import re
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from test_trainer import TIMING, cli_error  # noqa: E402

from gvpo_kernels.trainer import TrainConfig, checkpoint, checks, train  # noqa: E402
from gvpo_kernels.trainer.models import load_policy  # noqa: E402
from gvpo_kernels.trainer.report import read_metrics  # noqa: E402


def config(out, **overrides) -> TrainConfig:
    settings = dict(output_dir=str(out), steps=3, save_every=1, prompts_per_step=2, k=4, lr=1e-2, warmup_steps=1,
                    num_samples=0, progress=False, plot=False, device="cpu")
    return TrainConfig(**{**settings, **overrides})


def weights(path):
    return load_policy(str(path), torch.device("cpu"), seed=0, attn_implementation=None)[0].state_dict()


def strip(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An uninterrupted run: its directory (checkpoints 1, 2, 3), its metrics and its final weights."""
    out = tmp_path_factory.mktemp("base") / "run"
    metrics = train(config(out))
    return out, metrics, weights(out / "checkpoint-3")


@pytest.fixture
def run(base, tmp_path):
    """A copy of the base run to damage."""
    out = tmp_path / "run"
    shutil.copytree(base[0], out)
    return out


def resumes_exactly_from_2(out, base, match):
    """--resume latest warns ``match``, runs step 3 from checkpoint-2, and ends where the base run ended."""
    with pytest.warns(UserWarning, match=match):
        resumed = train(config(out, resume="latest"))
    assert strip(resumed) == strip(base[1])
    assert not list(out.glob("checkpoint-3.*")), "a leftover of the replaced checkpoint stayed"
    assert checkpoint.problem(out / "checkpoint-3") is None
    for name, value in weights(out / "checkpoint-3").items():
        assert torch.equal(value, base[2][name]), name


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("damage, reason", [
    ("no run.json", r"it has no run.json \(a save that was interrupted, or one by an older version\)"),
    ("torn run.json", r"its run.json is not valid JSON \(truncated\?\)"),
    ("torn trainer_state.pt", r"its trainer_state.pt has \d+ bytes, \d+ when it was written \(truncated\?\)"),
    ("torn model.safetensors", r"its model.safetensors has \d+ bytes, \d+ when it was written \(truncated\?\)"),
    ("no tokenizer.json", r"its tokenizer.json is missing"),
])
def test_resume_latest_skips_an_incomplete_checkpoint_says_why_and_continues_exactly(run, base, damage, reason):
    newest = run / "checkpoint-3"
    if damage == "no run.json":  # what a save killed before it finished left before saves were atomic
        (newest / "run.json").unlink()
    elif damage.startswith("torn"):
        truncate(newest / damage.split()[1])
    else:
        (newest / damage.split()[1]).unlink()
    resumes_exactly_from_2(run, base, rf"resume: skipped checkpoint-3 \({reason}\); resuming from checkpoint-2")


def test_a_save_that_runs_out_of_disk_leaves_the_previous_checkpoint_and_stops_with_one_line(
        base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        if "checkpoint-3" in str(path):  # half a file, then ENOSPC, as a full disk does
            real_save(obj, path, *args, **kwargs)
            truncate(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_is_full)
    from gvpo_kernels.trainer.cli import main

    argv = ["--output-dir", str(out), "--steps", "3", "--save-every", "1", "--prompts-per-step", "2", "--k", "4",
            "--lr", "1e-2", "--warmup-steps", "1", "--num-samples", "0", "--no-progress", "--no-plot",
            "--device", "cpu"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    assert "gvpo-train: error: checkpoint: could not write" in err and "No space left on device" in err
    assert f"the newest complete checkpoint is '{out / 'checkpoint-2'}'" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    monkeypatch.setattr(checkpoint.torch, "save", real_save)

    resumed = train(config(out, resume="latest"))  # nothing to skip: the failed save left nothing behind
    assert strip(resumed) == strip(base[1])


def test_a_leftover_partial_save_is_ignored_and_overwrite_removes_it(run, base):
    shutil.copytree(run / "checkpoint-3", run / "checkpoint-3.partial")
    shutil.rmtree(run / "checkpoint-3")
    resumed = train(config(run, resume="latest"))
    assert strip(resumed) == strip(base[1]) and not (run / "checkpoint-3.partial").exists()
    shutil.copytree(run / "checkpoint-3", run / "checkpoint-9.partial")
    (run / ".metrics.jsonl.tmp").write_text("{")  # a run killed while rewriting its metrics
    assert {"checkpoint-9.partial", ".metrics.jsonl.tmp"} <= set(checks.previous_run(str(run)))
    checks.clear(str(run))
    assert not list(run.glob("checkpoint-*")) and not (run / ".metrics.jsonl.tmp").exists()


def test_a_checkpoint_from_before_run_json_listed_files_still_resumes(run, base):
    for step in (2, 3):
        path = run / f"checkpoint-{step}" / "run.json"
        run_json = json.loads(path.read_text())
        del run_json["files"]
        path.write_text(json.dumps(run_json))
    truncate(run / "checkpoint-3" / "trainer_state.pt")
    resumes_exactly_from_2(run, base, r"skipped checkpoint-3 \(its trainer_state.pt is truncated\)")


def test_damage_resume_cannot_skip_is_one_line(run, capsys, monkeypatch):
    """An explicit --resume of a damaged checkpoint, or no complete checkpoint at all: exit 2 before loading."""
    out = ["--output-dir", str(run), "--steps", "3", "--prompts-per-step", "2", "--k", "4", "--lr", "1e-2",
           "--warmup-steps", "1"]
    truncate(run / "checkpoint-2" / "trainer_state.pt")
    err = cli_error(capsys, monkeypatch, *out, "--resume", str(run / "checkpoint-2"))
    assert f"resume: '{run / 'checkpoint-2'}' is not a complete checkpoint: its trainer_state.pt has" in err
    for step in (1, 3):
        (run / f"checkpoint-{step}" / "run.json").write_text('{"step": ')
    err = cli_error(capsys, monkeypatch, *out, "--resume")
    assert f"resume: no complete checkpoint-* directory in '{run}' (skipped checkpoint-3 (its run.json is not " \
           "valid JSON (truncated?)); checkpoint-2 (its trainer_state.pt has" in err
    assert "checkpoint-1 (its run.json is not valid JSON" in err


@pytest.mark.parametrize("name, message", [
    ("trainer_state.pt", r"resume: cannot read '.*checkpoint-2/trainer_state.pt': damaged \(not the zip"),
    ("model.safetensors", r"resume: cannot load the model in '.*checkpoint-2' \("),
])
def test_a_damaged_file_of_the_right_size_stops_the_resume_with_one_line(run, name, message, capsys):
    shutil.rmtree(run / "checkpoint-3")
    damaged = run / "checkpoint-2" / name
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # the size run.json recorded: only reading finds it
    from gvpo_kernels.trainer.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(run), "--steps", "3", "--prompts-per-step", "2", "--k", "4", "--lr", "1e-2",
              "--warmup-steps", "1", "--num-samples", "0", "--no-progress", "--no-plot", "--device", "cpu",
              "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    assert re.search("gvpo-train: error: " + message, err), err


def test_a_torn_last_metrics_line_is_dropped_and_a_torn_middle_line_is_refused(run, base, capsys, monkeypatch):
    shutil.rmtree(run / "checkpoint-3")  # killed while writing step 3's metrics line, before its checkpoint
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    assert read_metrics(metrics) == base[1][:2]
    resumed = train(config(run, resume="latest"))
    assert strip(resumed) == strip(base[1]) and strip(read_metrics(metrics)) == strip(base[1])

    metrics.write_text(lines[0] + "\n" + lines[1][:25] + "\n" + lines[2] + "\n")
    shutil.rmtree(run / "checkpoint-3")
    err = cli_error(capsys, monkeypatch, "--output-dir", str(run), "--steps", "3", "--prompts-per-step", "2",
                    "--k", "4", "--lr", "1e-2", "--warmup-steps", "1", "--resume")
    assert f"resume: {metrics}: line 2 is not JSON" in err
