"""Multi-process behaviour under `torchrun --nproc_per_node=2` on CPU (gloo)."""

import json
import os

from conftest import torchrun


def test_two_processes_equal_one_process_on_the_global_batch():
    p = torchrun(["tests/dist_simclr_step.py"])
    assert p.stdout.count("max grad diff") == 2, p.stdout


def test_simclr_smoke_run_under_torchrun(tmp_path):
    out = tmp_path / "out"
    p = torchrun(["simclr.py", "--dataset=synthetic", "--arch=tiny", "--subset=256", "--batch_size=32", "--epochs=1",
                  "--probe_epochs=1", "--log_every=4", "--device=cpu", f"--out_dir={out}"])
    results = json.load(open(out / "results.json"))
    assert results["steps"] == 8 and 0 <= results["knn_top1"] <= 1
    assert "2 process(es) on cpu" in p.stdout and "per-process BatchNorm" in p.stdout
    assert p.stdout.count("results:") == 1  # only rank 0 prints
