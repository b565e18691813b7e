"""Multi-process behaviour under `torchrun --nproc_per_node=2` on CPU (gloo)."""

import json
import os

import pytest

from conftest import METHODS, ROOT, torchrun


def test_two_processes_equal_one_process_on_the_global_batch(dist_scripts):
    """SimCLR: loss and gradients of a 2-process step equal those of 1 process on the global batch."""
    out = dist_scripts("dist_simclr_step.py")
    assert out.count("max grad diff") == 2, out


def test_simclr_command_line_under_torchrun(tmp_path):
    out = tmp_path / "out"
    p = torchrun(["simclr.py", "--dataset=synthetic", "--arch=tiny", "--subset=256", "--batch_size=32", "--epochs=1",
                  "--probe_epochs=1", "--log_every=4", "--device=cpu", f"--out_dir={out}"])
    results = json.load(open(out / "results.json"))
    assert results["steps"] == 8 and 0 <= results["knn_top1"] <= 1
    assert "2 process(es) on cpu" in p.stdout and "per-process BatchNorm" in p.stdout
    assert p.stdout.count("results:") == 1  # only rank 0 prints


@pytest.mark.slow  # one launch, 15 runs: a minute
def test_every_method_trains_under_torchrun(tmp_path):
    """One launch, every method file that exists: a 4-step run on 2 processes writes its results."""
    present = [m for m in METHODS if os.path.exists(os.path.join(ROOT, f"{m}.py"))]
    p = torchrun(["tests/dist_smoke.py", str(tmp_path), *present])
    for m in present:
        assert f"SMOKE OK {m} " in p.stdout, (m, p.stdout[-2000:])
