"""Shared test helpers: tiny CPU configs, torchrun launcher, the real-data switch."""

import dataclasses
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tiny(Config, tmp_path, **overrides):
    """A Config for a seconds-long CPU run: tiny trunk, synthetic data, small batch, no warmup."""
    base = dict(dataset="synthetic", arch="tiny", subset=512, batch_size=64, epochs=1, eval_every=0,
                probe_epochs=2, log_every=2, warmup_epochs=0, device="cpu", out_dir=str(tmp_path / "out"))
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in {**base, **overrides}.items() if k in fields or k in overrides})


def torchrun(args, nproc=2, timeout=600, cwd=ROOT):
    """Run `torchrun --standalone --nproc_per_node=nproc args` on CPU; return the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def cifar10_dir():
    """The folder that holds cifar10.npz (from SSL_DATA), or skip with how to enable the test."""
    root = os.environ.get("SSL_DATA", "")
    if not os.path.exists(os.path.join(root, "cifar10.npz")):
        pytest.skip("real-data test: set SSL_DATA to a folder holding cifar10.npz (e.g. SSL_DATA=../shared/data)")
    return root
