"""python -m gvpo_kernels.check (gvpo-check), the self-check users run: its table, its JSON, and its exit status
when a path is wrong (a mismatch injected through the public API it calls) or fails."""

import json
import os
import re
import sys

import pytest
import torch
from helpers.cases import ENTROPY_FLOOR, SLACK

import gvpo_kernels
from gvpo_kernels import check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (check.Shape("small", 8, 5, 37, 16), check.Shape("realistic", 8, 9, 300, 32))


@pytest.fixture
def tiny(monkeypatch):
    """The check at tiny shapes (the same rows; seconds instead of tens of them)."""
    monkeypatch.setitem(check.SHAPES, "cpu", TINY)
    monkeypatch.setitem(check.SHAPES, "cuda", TINY)


def _run(capsys, tmp_path, *args):
    out = tmp_path / "check.json"
    status = check.main(["--device", "cpu", "--json", str(out), *args])
    return status, capsys.readouterr().out, json.loads(out.read_text())


def _table_rows(text):
    return [line for line in text.splitlines() if line.startswith(check.PATHS)]


def test_the_tolerances_are_the_test_suites():
    assert check.ENTROPY_FLOOR == ENTROPY_FLOOR
    assert all(check.SLACK[dtype] == SLACK[dtype] for dtype in check.DTYPES.values())


def test_every_path_passes_and_is_reported(tiny, capsys, tmp_path):
    status, text, report = _run(capsys, tmp_path)
    assert status == 0 and report["ok"]
    rows = _table_rows(text)
    assert len(rows) == len(report["rows"]) == len(check.plan_rows(full=False)) == 32
    assert all(re.search(r"\sok\s", line) for line in rows), text
    head = text.splitlines()[1]
    for column in ("path", "dtype", "shape", "backend", "ok", "err/tol", "ms", "% floor", "peak MiB"):
        assert column in head
    seen = {(r["path"], r["dtype"], r["layout"], r["anchored"], r["shape"].split()[0]) for r in report["rows"]}
    for path in check.PATHS:
        for dtype in ("bf16", "fp32"):
            for layout in ("padded", "packed"):
                anchors = (False, True) if path.startswith("loss") else (None,)
                assert all((path, dtype, layout, a, "small") in seen for a in anchors)
            assert any(s[:2] == (path, dtype) and s[4] == "realistic" for s in seen)
    assert {r["anchored"] for r in report["rows"] if r["shape"].startswith("realistic")} == {True, False, None}
    for r in report["rows"]:
        assert r["err_tol"] <= 1 and r["ms"] > 0 and r["floor_ms"] > 0 and r["pct_floor"] > 0
        assert r["errors"] and all(err <= tol for err, tol in r["errors"].values())
        assert r["backend"] == check.backend_name(torch.device("cpu"))
    assert report["floors"]["copy_gbps"] > 0 and report["floors"]["mm_tflops"]
    assert re.search(r"32 of 32 rows ok, 0 failed", text)


def test_a_wrong_loss_fails_its_rows_and_exits_1(tiny, capsys, tmp_path, monkeypatch):
    """A loss 5% off (bf16 allows PyTorch's own error + 1%, fp32 its own + 1e-5) fails every loss(logits) row and
    only those."""
    right = gvpo_kernels.gvpo_loss

    def wrong(*args, **kwargs):
        loss, stats = right(*args, **kwargs)
        return loss + 0.05 * loss.detach(), stats  # the value 5% off, its gradient intact

    monkeypatch.setattr(gvpo_kernels, "gvpo_loss", wrong)
    status, text, report = _run(capsys, tmp_path)
    assert status == 1 and not report["ok"]
    for r in report["rows"]:
        assert r["ok"] == (r["path"] != "loss(logits)"), r
        if not r["ok"]:
            assert r["worst"] == "loss" and r["err_tol"] > 1
    failed = [line for line in _table_rows(text) if " FAIL " in line]
    assert failed and all(line.startswith("loss(logits)") for line in failed)
    assert f"{32 - len(failed)} of 32 rows ok, {len(failed)} failed" in text


def test_a_wrong_gradient_is_caught(tiny, capsys, tmp_path, monkeypatch):
    """An entropy whose gradient is dropped (detached) fails the rows of the log-prob paths from logits."""
    right = gvpo_kernels.token_logprobs

    def detached_entropy(*args, **kwargs):
        logprob, entropy = right(*args, **kwargs)
        return logprob, entropy.detach().clone()

    monkeypatch.setattr(gvpo_kernels, "token_logprobs", detached_entropy)
    status, _, report = _run(capsys, tmp_path)
    assert status == 1
    bad = [r for r in report["rows"] if not r["ok"]]
    assert bad and all(r["path"] == "logprobs+entropy(logits)" and r["worst"] == "grad_logits" for r in bad)


def test_a_path_that_raises_fails_with_the_error(tiny, capsys, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected launch failure")

    monkeypatch.setattr(gvpo_kernels, "linear_token_logprobs", broken)
    status, text, report = _run(capsys, tmp_path)
    assert status == 1
    bad = [r for r in report["rows"] if not r["ok"]]
    assert {r["path"] for r in bad} == {"logprobs+entropy(hidden)"}
    assert all("injected launch failure" in r["note"] for r in bad)
    assert "error: RuntimeError: injected launch failure" in text


def test_the_console_script_and_module_entry_point():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert re.search(r'^gvpo-check = "gvpo_kernels\.check:main"$', text, flags=re.MULTILINE)
    assert check.main.__module__ == "gvpo_kernels.check"
    with pytest.raises(SystemExit) as exc:
        check.main(["--help"])
    assert exc.value.code == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of --device cuda without a GPU")
def test_cuda_without_a_gpu_says_so(capsys):
    assert check.main(["--device", "cuda"]) == 2
    assert "no GPU" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
