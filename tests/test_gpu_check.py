"""tests/gpu_check.py cannot rot: its dry run (the same plan on the CPU: tiny trunk, synthetic data, a few
steps) passes every part and writes its report."""

import os
import subprocess
import sys

import pytest

from conftest import METHODS, ROOT


@pytest.mark.slow  # about two minutes on 2 cores
def test_gpu_check_dry_run_passes_every_part(tmp_path):
    report = tmp_path / "results.md"
    p = subprocess.run([sys.executable, "tests/gpu_check.py", "--dry-run", f"--out={report}"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    text = report.read_text()
    assert "Every part passed: True." in text
    for name in METHODS:
        assert f"| {name} | 0 |" in text, name  # each recipe ran and exited 0
    assert "## 3. SimCLR" in text and "| knn_top1 | probe_top1 | linear_top1 |" in text
