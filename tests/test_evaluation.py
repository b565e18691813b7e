"""The three evaluations: knn_top1, probe_top1 and linear_top1 (common.linear_eval, the standard
protocol: crops and flips through a frozen backbone, SGD)."""

import json
import os

import pytest
import torch
import torch.nn as nn

from conftest import tiny

import common
import simclr


def colour_data(tmp_path, n_train=512, n_test=256, seed=0):
    """8 classes, one per corner of the RGB cube: each image a flat colour (with noise) near its corner.
    Crops and flips keep the colour, so a frozen backbone that sees the mean colour separates them."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.tensor([[r, gr, b] for r in (0.1, 0.9) for gr in (0.1, 0.9) for b in (0.1, 0.9)])

    def images(n):
        y = torch.randint(0, 8, (n,), generator=g)
        x = corners[y].view(n, 3, 1, 1) + 0.05 * torch.randn(n, 3, 16, 16, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    cfg = tiny(simclr.Config, tmp_path, batch_size=64)
    rt = common.setup(cfg)
    classes = [str(i) for i in range(8)]
    return common.Data("colours", images(n_train), images(n_train), images(n_test), classes, rt, 64, 0), rt


def frozen_backbone():
    """A 1x1 conv, BatchNorm and average pooling: in eval mode, an affine map of each image's mean colour."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():  # BN statistics that are not the identity, so that a train-mode pass would move them
        net[1].running_mean.uniform_(-0.5, 0.5), net[1].running_var.uniform_(0.5, 2.0)
    return net


def test_linear_eval_trains_on_augmented_views_of_a_frozen_backbone(tmp_path):
    data, rt = colour_data(tmp_path)
    net = frozen_backbone()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []

    def features(x):  # records what the backbone is shown
        seen.append(x.clone())
        return net(common.normalize(common.to_float(x)))

    out = common.evaluate(net, features, data, rt, probe_epochs=0, linear_epochs=6)
    assert out["linear_top1"] >= 0.95 and out["probe_top1"] is None and out["knn_top1"] > 0.9
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the backbone or its BN statistics changed"
    assert net.training  # evaluate() hands the model back in training mode
    train_x, test_x = data.train[0], data.test[0]
    crops = [x for x in seen if not any(x.shape == y.shape and torch.equal(x, y) for y in (train_x, test_x))]
    assert sum(len(x) for x in crops) == 6 * 512  # 6 epochs of the 512 training images, as crops
    assert all(x.dtype == torch.uint8 and x.shape[1:] == (3, 16, 16) for x in crops)  # at the test images' side
    assert any(torch.equal(x, test_x) for x in seen)  # the test images as they are


def test_linear_eval_sees_other_crops_each_epoch_and_with_another_seed(tmp_path):
    data, rt = colour_data(tmp_path, n_train=256, n_test=64)
    net = frozen_backbone().eval()

    def crops_of(seed, epochs):
        seen = []
        common.linear_eval(lambda x: seen.append(x.clone()) or net(common.to_float(x)), data, rt, epochs, seed=seed)
        return [x for x in seen if len(x) == 256]  # the training chunks (the test images come first, 64)

    run = crops_of(0, 2)
    assert len(run) == 2 and not torch.equal(run[0], run[1])  # epoch 2 is not epoch 1 again
    assert torch.equal(crops_of(0, 1)[0], run[0])  # the same seed, the same crops
    assert not torch.equal(crops_of(1, 1)[0], run[0])  # another seed, other crops
    x = data.train[0]
    assert not any(torch.equal(c, x[:256]) for c in run)  # crops, not the images


def test_linear_eval_lr_is_per_256_images_and_drops_at_60_and_80_percent(tmp_path, monkeypatch):
    """lr is given per 256 images (the linear scaling rule: batches of 64 train at a quarter of it), dropped 10x at
    60% and again at 80% of the epochs."""
    data, rt = colour_data(tmp_path, n_train=256, n_test=64)
    net = frozen_backbone().eval()
    real_set_lr = common.set_lr
    for batch_size, epochs, expected in [(256, 10, [0.1] * 6 + [0.01] * 2 + [0.001] * 2), (64, 1, [0.025])]:
        lrs = []
        monkeypatch.setattr(common, "set_lr", lambda opt, lr, **kw: lrs.append(lr) or real_set_lr(opt, lr, **kw))
        common.linear_eval(lambda x: net(common.to_float(x)), data, rt, epochs=epochs, batch_size=batch_size, lr=0.1)
        assert lrs == pytest.approx(expected), batch_size


def test_evaluate_names_and_nulls(tmp_path, capsys):
    data, rt = colour_data(tmp_path, n_train=256, n_test=64)
    net = frozen_backbone()
    features = lambda x: net(common.to_float(x))  # noqa: E731
    out = common.evaluate(net, features, data, rt)
    assert set(out) == {"knn_top1", "probe_top1", "linear_top1"} and out["probe_top1"] is None is out["linear_top1"]
    out = common.evaluate(net, features, data, rt, probe_epochs=100, linear_epochs=-1)  # -1 on the CPU: not run
    assert out["probe_top1"] > 0.9 and out["linear_top1"] is None
    assert "linear_top1 not run: on the CPU only when asked" in capsys.readouterr().out


def test_smoke_run_with_one_linear_epoch_writes_all_three(tmp_path):
    cfg = tiny(simclr.Config, tmp_path, max_steps=2, probe_epochs=1, linear_epochs=1)
    results = simclr.train(cfg)
    saved = json.load(open(os.path.join(cfg.out_dir, "results.json")))
    assert all(isinstance(saved[k], float) and 0 <= saved[k] <= 1 for k in ("knn_top1", "probe_top1", "linear_top1"))
    assert saved == results


def test_knn_votes_among_the_training_images_not_their_flips(tmp_path, monkeypatch):
    """With the probe on, the training features come with their flips' (2N rows); kNN votes among the N images."""
    data, rt = colour_data(tmp_path, n_train=256, n_test=64)
    net = frozen_backbone()
    features = lambda x: net(common.to_float(x))  # noqa: E731
    seen, real_knn = [], common.knn_accuracy
    monkeypatch.setattr(common, "knn_accuracy", lambda train, *args: seen.append(train) or real_knn(train, *args))
    common.evaluate(net, features, data, rt, probe_epochs=1)
    net.eval()  # evaluate handed it back in training mode
    with torch.no_grad():
        torch.testing.assert_close(seen[0], features(data.train[0]))


def test_linear_eval_batch_is_at_most_the_training_set(tmp_path, monkeypatch):
    """Fewer training images (128) than batch_size (256): a batch is the whole set, one step per epoch at lr
    0.1 * 128 / 256, on crops of all 128 images (a batch of 256 would take no step at all)."""
    data, rt = colour_data(tmp_path, n_train=128, n_test=64)
    net, lrs, seen = frozen_backbone().eval(), [], []
    real_set_lr = common.set_lr
    monkeypatch.setattr(common, "set_lr", lambda opt, lr, **kw: lrs.append(lr) or real_set_lr(opt, lr, **kw))
    common.linear_eval(lambda x: seen.append(len(x)) or net(common.to_float(x)), data, rt, epochs=1, lr=0.1)
    assert lrs == pytest.approx([0.05]) and seen == [64, 128]  # the 64 test images, then one chunk of crops


def test_evaluate_runs_100_linear_epochs_on_cuda_for_minus_1(monkeypatch):
    """linear_epochs=-1 means the standard 100 epochs on a CUDA device (none on the CPU): the call evaluate makes,
    with the feature extraction and kNN stubbed (no GPU needed)."""
    asked = []
    monkeypatch.setattr(common, "extract_features", lambda *a, **k: (torch.eye(4), torch.arange(4)))
    monkeypatch.setattr(common, "knn_accuracy", lambda *args: 0.5)
    monkeypatch.setattr(common, "linear_eval", lambda features, data, rt, epochs=0: asked.append(epochs) or 0.7)

    class Data:
        labels = staticmethod(lambda split: torch.arange(4))

    rt = common.Runtime(0, 1, torch.device("cuda"), torch.float32, False)
    assert common.evaluate(nn.Linear(2, 2), None, Data(), rt, linear_epochs=-1)["linear_top1"] == 0.7
    assert asked == [100]
