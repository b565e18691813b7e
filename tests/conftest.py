"""Shared test helpers: tiny CPU configs, torchrun launcher, the real-data switch, and the checks of
the method-file contract (DESIGN.md) that every method's tests run the same way."""

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ["rotnet", "jigsaw", "context_pred", "colorization", "inpainting", "splitbrain", "simclr", "moco", "byol",
           "simsiam", "barlow", "swav", "cpc", "mae", "clip"]
RESULT_KEYS = {"method", "dataset", "arch", "epochs", "steps", "knn_top1", "probe_top1", "linear_top1", "train_seconds",
               "images_per_second"}


def tiny(Config, tmp_path, **overrides):
    """A Config for a seconds-long CPU run: tiny trunk, synthetic data, small batch, no warmup."""
    base = dict(dataset="synthetic", arch="tiny", subset=512, batch_size=64, epochs=1, eval_every=0,
                probe_epochs=2, linear_epochs=0, log_every=2, warmup_epochs=0, device="cpu",
                out_dir=str(tmp_path / "out"))
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in {**base, **overrides}.items() if k in fields or k in overrides})


def torchrun(args, nproc=2, timeout=900, cwd=ROOT):
    """Run `torchrun --standalone --nproc_per_node=nproc args` on CPU; return the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


# the cross-process checks of the quick loop, one torchrun launch for all (tests/dist_all.py); each test reads its own
DIST_SCRIPTS = ["dist_simclr_step.py", "dist_moco_queue.py:{tmp}", "dist_swav_sinkhorn.py", "dist_barlow_step.py",
                "dist_barlow_official.py", "dist_cpc_step.py", "dist_clip_step.py", "dist_inpainting_step.py",
                "dist_common.py"]


@pytest.fixture(scope="session")
def dist_scripts(tmp_path_factory):
    """stdout(script): what a DIST_SCRIPTS script printed on both processes (rank 0's, then rank 1's), once it
    finished on both; the launch runs them all, at the first test that asks."""
    tmp = tmp_path_factory.mktemp("dist")
    scripts = [s.format(tmp=tmp) for s in DIST_SCRIPTS]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "tests/dist_all.py", str(tmp), *scripts], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    reports = [json.load(open(f)) if os.path.exists(f := tmp / f"rank{r}.json") else {} for r in range(2)]

    def stdout(script):
        runs = [report.get(script) for report in reports]
        assert all(run and run["ok"] for run in runs), (
            f"{script} did not finish on both processes (torchrun exit {p.returncode}):\n"
            + "\n".join(run["error"] or "" if run else "not run" for run in runs) + p.stderr[-4000:])
        return "".join(run["stdout"] for run in runs)

    return stdout


def cifar10_root():
    """The folder SSL_DATA names if it holds cifar10.npz, else ""."""
    root = os.environ.get("SSL_DATA", "")
    return root if root and os.path.exists(os.path.join(root, "cifar10.npz")) else ""


def cifar10_dir():
    """The folder that holds cifar10.npz (from SSL_DATA), or skip with how to enable the test."""
    root = cifar10_root()
    if not root:
        pytest.skip("real-data test: set SSL_DATA to a folder holding cifar10.npz (e.g. SSL_DATA=../shared/data)")
    return root


def read_log(cfg, steps=False):
    """The records of out_dir/log.jsonl; with steps, only the training steps' (those with a loss)."""
    records = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "log.jsonl"))]
    return [r for r in records if "loss" in r] if steps else records


def load_ckpt(cfg):
    return torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)


def first_test_images(load_data, n):
    """common.load_data, but the test split keeps only its first n images (cheaper evaluations)."""
    def load(cfg, rt):
        data = load_data(cfg, rt)
        if isinstance(data.test, tuple):  # tensors; a folder's test set stays whole
            data.test = tuple(t[:n] for t in data.test)
        return data
    return load


@contextlib.contextmanager
def few_test_images(n=256):
    """Within: every run's test split keeps its first n images (the contract checks need no more)."""
    import common
    real = common.load_data
    common.load_data = first_test_images(real, n)
    try:
        yield
    finally:
        common.load_data = real


def learning_run(module, tmp_path, probe_epochs=0, test_images=0, **overrides):
    """A fixed-seed run whose monitor evaluates the random initialisation (step 0) and whose final
    evaluation scores the trained encoder on the same images. With probe_epochs, the monitor runs the
    linear probe too (common.evaluate is wrapped for the run); with test_images, every evaluation
    scores the first test_images test images only (common.load_data is wrapped). Prints both and
    returns (init record, results, training-step records)."""
    epochs = overrides.pop("epochs")
    cfg = tiny(module.Config, tmp_path, epochs=epochs, eval_every=epochs, probe_epochs=probe_epochs, **overrides)
    common = module.common
    real_evaluate, real_load = common.evaluate, common.load_data

    def evaluate(model, features, data, rt, probe=0, linear=0):
        return real_evaluate(model, features, data, rt, probe or probe_epochs, linear)

    common.evaluate = evaluate if probe_epochs else real_evaluate
    common.load_data = first_test_images(real_load, test_images) if test_images else real_load
    try:
        results = module.train(cfg)
    finally:
        common.evaluate, common.load_data = real_evaluate, real_load
    log = read_log(cfg)
    init = next(r for r in log if r["step"] == 0)
    # the training records every log_every steps (the first step's record, and any written because 30 s passed,
    # are left out: at step 1 MoCo's queue still holds random keys, and the step includes compilation)
    steps = [r for r in log if "loss" in r and (r["step"] % cfg.log_every == 0 or r["step"] == results["steps"])]
    own = tuple(k for k in init if k.endswith(("top1", "mse", "auc", "_loss")))  # the method's own metrics
    shown = [k for k in ("knn_top1", "probe_top1", "linear_top1") + own
             if init.get(k) is not None and isinstance(results.get(k), float)]
    print(f"{module.__name__} on {cfg.dataset}, {results['steps']} steps: " +
          ", ".join(f"{k} {init[k]:.4f} -> {results[k]:.4f}" for k in dict.fromkeys(shown)) +
          f"; loss {steps[0]['loss']:.4g} -> {steps[-1]['loss']:.4g}; {results['train_seconds']:.0f} s training")
    return init, results, steps


def evaluation_inputs(module, cfg, monkeypatch):
    """Train a run whose final evaluation is replaced by a recorder: (model, features, data) it was given."""
    got = {}

    def evaluate(model, features, data, rt, probe_epochs=0, linear_epochs=0):
        got.update(model=model, features=features, data=data)
        return {"knn_top1": 0.0, "probe_top1": None, "linear_top1": None}

    monkeypatch.setattr(module.common, "evaluate", evaluate)
    with few_test_images():
        module.train(cfg)
    return got["model"], got["features"], got["data"]


def assert_features_and_encoder_are_the_backbone(module, cfg, monkeypatch):
    """The three evaluations score model.backbone's pooled output of the normalized image (not a head's, not a
    target's or key encoder's), in eval mode, and encoder.pt holds exactly that backbone's weights."""
    common = module.common
    model, features, data = evaluation_inputs(module, cfg, monkeypatch)
    x = data.test[0][:8]
    model.eval()  # as common.evaluate runs it
    with torch.no_grad():
        torch.testing.assert_close(features(x), model.backbone(common.normalize(common.to_float(x))))
    encoder = torch.load(os.path.join(cfg.out_dir, "encoder.pt"), weights_only=True)
    trained = model.backbone.state_dict()
    assert encoder.keys() == trained.keys() and all(torch.equal(encoder[k], trained[k]) for k in trained)


def assert_warmup_then_cosine(module, tmp_path, **overrides):
    """The logged lr of a run of 3 epochs of 4 steps, 1 of them warmup, stopped after 6 steps: linear from 0 over
    warmup_epochs x steps per epoch, then the cosine over the run's epochs: 0, lr/4, lr/2, 3lr/4, lr,
    lr (1 + cos(pi/8)) / 2, with lr the base lr x 32 / 256."""
    cfg = tiny(module.Config, tmp_path, subset=128, batch_size=32, epochs=3, warmup_epochs=1, max_steps=6,
               log_every=1, probe_epochs=0, **overrides)
    module.train(cfg)
    lrs = [r["lr"] for r in read_log(cfg, steps=True)]
    lr = cfg.lr * 32 / 256
    assert lrs == pytest.approx([0, lr / 4, lr / 2, 3 * lr / 4, lr, lr * (1 + math.cos(math.pi / 8)) / 2])


def assert_each_image_or_its_mirror(views, images, **tolerance):
    """Each view (64 of them) is its image or the image mirrored left-right, and 17 to 47 are mirrored: a flip
    with probability 1/2. Compared exactly, or with torch.allclose(**tolerance)."""
    close = (lambda a, b: torch.allclose(a, b, **tolerance)) if tolerance else torch.equal
    same = [close(v, x) for v, x in zip(views, images, strict=True)]
    mirrored = [close(v, x.flip(-1)) for v, x in zip(views, images)]
    assert all(s or m for s, m in zip(same, mirrored)) and 16 < sum(mirrored) < 48


def assert_features_see_image_size(module, tmp_path, monkeypatch, expected):
    """As rotnet.py: a run at image_size 64 on 32 px data evaluates features(uint8 x) = expected(model, x resized
    to 64 px, float in [0, 1]): the trunk sees the training scale whatever the data's size, for any batch and side
    (linear_eval feeds crops at the test images' side)."""
    import common
    cfg = tiny(module.Config, tmp_path, image_size=64, max_steps=1, probe_epochs=0)
    model, features, data = evaluation_inputs(module, cfg, monkeypatch)
    x = data.test[0][:4]  # uint8 (4, 3, 32, 32)
    assert x.shape[-1] == 32 and x.dtype == torch.uint8
    model.eval()
    with torch.no_grad():
        want = expected(model, F.interpolate(common.to_float(x), size=(64, 64), mode="bilinear", antialias=True))
        torch.testing.assert_close(features(x), want)
        assert features(x[:3, :, :24, :24]).shape == want[:3].shape  # any batch, any side


# ------------------------------------------------------------------------ the method-file contract


def assert_smoke_run(module, tmp_path, extra_keys=(), **overrides):
    """2 epochs with the kNN monitor after each and the three final evaluations (one epoch of the standard
    linear one): log.jsonl, ckpt.pt and results.json as DESIGN.md says."""
    cfg = tiny(module.Config, tmp_path, epochs=2, eval_every=1, **{"linear_epochs": 1, **overrides})
    with few_test_images():
        results = module.train(cfg)
    assert RESULT_KEYS | set(extra_keys) <= set(results), set(results)
    assert results["method"] == module.__name__
    assert all(0 <= results[k] <= 1 for k in ("knn_top1", "probe_top1", "linear_top1")), results
    assert json.load(open(os.path.join(cfg.out_dir, "results.json"))) == results
    log = read_log(cfg)
    steps = [r for r in log if "loss" in r]
    assert steps and steps[-1]["step"] == results["steps"]
    assert all({"loss", "lr", "images_per_second", "eta_seconds"} <= set(r) for r in steps)
    assert any("knn_top1" in r and r.get("epoch") == 1 for r in log)  # the kNN monitor ran after epoch 1
    assert load_ckpt(cfg)["step"] == results["steps"]
    for name in ("config.json", f"{module.__name__}.py"):
        assert os.path.exists(os.path.join(cfg.out_dir, name))
    return cfg, results


def assert_resumes_exactly(module, tmp_path, **overrides):
    """N steps straight == N/2 steps, stop (mid-epoch), resume to N: identical weights and state."""
    kw = {**dict(subset=320, epochs=2, eval_every=1, probe_epochs=0), **overrides}
    straight = tiny(module.Config, tmp_path / "a", max_steps=8, **kw)
    resumed = tiny(module.Config, tmp_path / "b", max_steps=8, resume=True, **kw)
    with few_test_images():
        module.train(straight)
        module.train(tiny(module.Config, tmp_path / "b", max_steps=4, **kw))
        module.train(resumed)
    a, b = load_ckpt(straight), load_ckpt(resumed)
    assert a["step"] == b["step"] == 8
    assert_same(a, b)


def assert_same(a, b, path="ckpt"):
    """Two checkpoints (nested dicts/lists of tensors and plain values) are identical."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k != "config":
                assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def assert_nan_stops_the_run(module, loss_name, monkeypatch, tmp_path, **overrides):
    """A loss that turns NaN at the 11th step stops the run naming that step; the checkpoint of
    epoch 1 (step 8) stays, with finite weights."""
    calls = []
    real_loss = getattr(module, loss_name)

    def diverging(*args, **kwargs):  # the loss (or the first of the values the loss function returns) turns NaN
        calls.append(1)
        out = real_loss(*args, **kwargs)
        if len(calls) < 11:
            return out
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")

    monkeypatch.setattr(module, loss_name, diverging)
    cfg = tiny(module.Config, tmp_path, epochs=3, log_every=4, **overrides)  # 8 steps per epoch
    with pytest.raises(module.common.RunError, match="at step 11;"):
        module.train(cfg)
    state = load_ckpt(cfg)
    assert state["step"] == 8
    tensors = [v for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point()]
    assert tensors and all(torch.isfinite(v).all() for v in tensors)
