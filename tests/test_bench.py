"""The benchmark's own check: every provider that runs on this machine computes what it claims, at the quick shapes
(a peer or one of our providers that fails or drifts would otherwise surface only as a FAIL row in a results file)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_loss_checks_pass(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench", "loss", "--device", "cpu", "--quick", "--check-only",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"{summary}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    assert " 0 failed" in summary and "passed" in summary, summary
