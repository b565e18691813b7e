"""rotnet.py: rotations and their labels, the crop augmentation, the backbones, and the training loop's
contract on CPU."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (assert_each_image_or_its_mirror, assert_nan_stops_the_run, assert_resumes_exactly,
                      assert_smoke_run, few_test_images, read_log, tiny)

import common
import rotnet

# ------------------------------------------------------------------------------------ rotations


def test_rotate_batch_labels_and_order():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 5)
    images, labels = rotnet.rotate_batch(x)
    assert images.shape == (12, 2, 5, 5) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for i in range(12):  # row i is image i % B turned by its label (DESIGN: label k = torch.rot90(x, k, dims=(2, 3)))
        k = labels[i].item()
        assert torch.equal(images[i], torch.rot90(x[i % 3], k, dims=(1, 2)))


def test_rotation_direction_by_hand():
    """One quarter turn is counter-clockwise, as np.rot90 and the official code's rotate_img(img, 90)."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    images, _ = rotnet.rotate_batch(x)
    assert images[1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]  # the top row's right end moves to the top-left
    assert images[2, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]]  # half a turn
    assert images[3, 0].tolist() == [[3.0, 1.0], [4.0, 2.0]]
    hwc = np.arange(12.0).reshape(2, 2, 3)  # the official rotate_img(img, 90) = flipud(transpose) on HWC
    official = np.flipud(np.transpose(hwc, (1, 0, 2)))
    ours = rotnet.rotate_batch(torch.from_numpy(hwc.copy()).permute(2, 0, 1)[None])[0][1].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, official)


def test_rotations_invert():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    images, labels = rotnet.rotate_batch(x)
    for k in range(4):  # turned by k, then by 4 - k: unchanged
        assert torch.equal(torch.rot90(images[labels == k], 4 - k, dims=(2, 3)), x)
    # the four rotations of a generic image are four different images
    distinct = {tuple(images[k * 4].flatten().tolist()) for k in range(4)}
    assert len(distinct) == 4


def test_random_crop_is_a_window_of_the_zero_padded_image():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    out = rotnet.random_crop(x, 2)
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(16):
        hits = [(t, s) for t in range(5) for s in range(5) if torch.equal(out[i], padded[i, :, t:t + 8, s:s + 8])]
        assert hits, i
        offsets.add(hits[0])
    assert len(offsets) > 4  # offsets vary per image
    assert torch.equal(rotnet.random_crop(x, 0), x)


def test_rotnet_view_flips_about_half_the_images(tmp_path):
    """Without the crop (crop_pad=0) the view is the normalized image, mirrored left-right or not, per image."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = rotnet.rotnet_view(x, tiny(rotnet.Config, tmp_path, crop_pad=0))
    plain = common.normalize(common.to_float(x))
    assert_each_image_or_its_mirror(out, plain, rtol=1e-5, atol=1e-8)


def test_rotation_accuracy_shows_the_four_rotations_equally_often():
    """pretext_top1 turns test image i (not image 0) by i % 4 quarter turns: a model that always answers 0 scores
    exactly 1/4, one that reads the turn off a marked corner (k turns move the top-left to TL, BL, BR, TR) 1."""
    x = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    x[1:, :, 0, 0] = 255  # a white top-left corner on black; image 0, all black, reads as turn 0 (its own)
    y = torch.zeros(8, dtype=torch.long)
    rt = common.Runtime(0, 1, torch.device("cpu"), torch.float32, False)
    data = common.Data("corner", (x, y), (x, y), (x, y), ["0"], rt, 8, 0)

    class Corner(torch.nn.Module):
        def __init__(self, oracle):
            super().__init__()
            self.oracle = oracle

        def forward(self, im):  # (b, 4) logits
            corners = torch.stack([im[:, 0, 0, 0], im[:, 0, -1, 0], im[:, 0, -1, -1], im[:, 0, 0, -1]], 1)
            return corners if self.oracle else torch.eye(4)[[0] * len(im)]

    assert rotnet.rotation_accuracy(Corner(False), data, rt, 32) == 0.25
    assert rotnet.rotation_accuracy(Corner(True), data, rt, 32) == 1.0


# ---------------------------------------------------------------------------------------- model


def test_backbones_and_intermediate_features():
    x = torch.randn(4, 3, 32, 32)
    for arch, width, mid_width, name in [("tiny", 128, 64, "conv3"), ("nin", 192, 192, "block2"),
                                         ("resnet18", 512, 256, "layer3")]:
        model = rotnet.RotNet(arch, True, 4)
        assert model(x).shape == (4, 4) and model.backbone(x).shape == (4, width), arch
        assert model.mid_features(x).shape == (4, mid_width) and model.mid_name == name, arch
    backbone, width = rotnet.nin(4)  # the official 4-block NIN: 4 blocks of 3 conv layers (+ pooling, flatten)
    assert width == 192 and len(backbone) == 6
    assert sum(isinstance(m, torch.nn.Conv2d) for m in backbone.modules()) == 12
    # NIN block 2 ends in the 3x3 stride-2 average pool: 32 -> 16 -> 8 px, 192 channels
    assert backbone[:2](x).shape == (4, 192, 8, 8)


def test_rotation_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 3.0, 0.0]])
    labels = torch.tensor([0, 1])
    expected = (-(2 - math.log(math.exp(2) + 3)) - (1 - math.log(2 + math.e + math.exp(3)))) / 2
    assert rotnet.rotation_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert rotnet.rotation_loss(torch.zeros(8, 4), torch.arange(8) % 4).item() == pytest.approx(math.log(4), rel=1e-6)
    assert rotnet.rotation_loss(logits.bfloat16(), labels).dtype == torch.float32


def test_step_schedule_is_the_papers():
    """lr / 5 after epochs 30, 60 and 80 of 100 (paper Sec. 3.1; official LUT_lr: 60, 120, 160 of 200)."""
    assert rotnet.Config().schedule == "step" and rotnet.Config().epochs == 100
    spe = 391  # steps per epoch of CIFAR-10 at batch 128
    lr = [rotnet.step_lr(epoch * spe, 100 * spe, 0, 0.1) for epoch in (0, 29, 30, 59, 60, 79, 80, 99)]
    assert lr == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008])
    assert rotnet.step_lr(30 * spe - 1, 100 * spe, 0, 0.1) == 0.1  # the drop comes after epoch 30, not before
    assert [rotnet.step_lr(s, 100, 4, 0.1) for s in range(4)] == pytest.approx([0, 0.025, 0.05, 0.075])  # warmup


def test_config_checks():
    assert rotnet.Config(arch="nin").arch == "nin"
    with pytest.raises(ValueError, match="--schedule=linear"):
        rotnet.Config(schedule="linear")
    with pytest.raises(ValueError, match="--nin_blocks=2"):
        rotnet.Config(nin_blocks=2)
    with pytest.raises(ValueError, match="--arch=vit"):
        rotnet.Config(arch="vit")
    with pytest.raises(ValueError, match="--crop_pad"):
        rotnet.Config(crop_pad=-1)


# -------------------------------------------------------------------------------------- training


def test_smoke_run_writes_log_ckpt_results(tmp_path):
    mid_keys = ("knn_top1_mid", "probe_top1_mid", "linear_top1_mid")  # the three evaluations of the intermediate block
    cfg, results = assert_smoke_run(rotnet, tmp_path, extra_keys=("pretext_top1", *mid_keys))
    assert results["steps"] == 16 and results["mid_features"] == "conv3"
    assert all(0 <= results[k] <= 1 for k in ("pretext_top1", *mid_keys)), results
    log = read_log(cfg)
    assert all("pretext_acc" in r for r in log if "loss" in r)
    assert any("pretext_top1" in r and r.get("epoch") == 1 for r in log)  # the monitor reports rotation accuracy too
    assert os.path.exists(os.path.join(cfg.out_dir, "encoder.pt"))


def test_resume_is_exact(tmp_path):
    assert_resumes_exactly(rotnet, tmp_path)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(rotnet, "rotation_loss", monkeypatch, tmp_path)


def test_training_shows_every_image_in_all_four_rotations(tmp_path, monkeypatch):
    """Paper Sec. 3.1 (and the docstring): each image of the batch appears in all four rotations in the same step,
    rows k*B .. k*B + B - 1 labelled k: the batch of 64 images is one of 256 rotated images, the classes balanced."""
    seen, real_loss = [], rotnet.rotation_loss

    def loss(logits, labels):
        seen.append(labels)
        return real_loss(logits, labels)

    monkeypatch.setattr(rotnet, "rotation_loss", loss)
    with few_test_images():
        rotnet.train(tiny(rotnet.Config, tmp_path, max_steps=1, probe_epochs=0))
    assert seen[0].tolist() == [0] * 64 + [1] * 64 + [2] * 64 + [3] * 64


def test_training_follows_the_step_schedule_from_the_lr_of_its_images(tmp_path):
    """train() runs step_lr (lr / 5 after 30%, 60% and 80% of the steps, paper Sec. 3.1) from the base lr scaled by
    the images, not their rotated copies: 0.2 * 64 / 256 = 0.05. One epoch of 8 steps: drops at steps 3, 5 and 7."""
    cfg = tiny(rotnet.Config, tmp_path, probe_epochs=0)
    with few_test_images():
        rotnet.train(cfg)
    log = read_log(cfg)
    lrs = {r["step"]: r["lr"] for r in log if "loss" in r}  # the record after step s holds the lr of step s - 1
    assert lrs == pytest.approx({1: 0.05, 2: 0.05, 4: 0.01, 6: 0.002, 8: 0.0004})


def test_mid_evaluations_read_the_pooled_intermediate_block(tmp_path, monkeypatch):
    """The docstring's evaluated features: knn/probe/linear_top1 on the pooled trunk output (tiny: 128-d), the *_mid
    ones on the pooled intermediate block (tiny: its third conv, the first 9 modules, 64-d), in that order."""
    calls = []
    monkeypatch.setattr(common, "evaluate", lambda model, features, *a, **k: calls.append((model, features))
                        or {"knn_top1": 0.0, "probe_top1": None, "linear_top1": None})
    with few_test_images():
        rotnet.train(tiny(rotnet.Config, tmp_path, max_steps=1, probe_epochs=0))
    (model, features), (_, mid) = calls
    x = common.make_synthetic(4, 32, seed=5)[0]  # (4, 3, 32, 32) uint8
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(features(x), model.backbone(common.normalize(common.to_float(x))))
        torch.testing.assert_close(mid(x), model.backbone[:9](common.normalize(common.to_float(x))).mean((2, 3)))


def test_nin_mid_features_are_block_2_pooled():
    """The paper's NIN features are best at block 2 (Table 1; the official Conv2_feats config), which ends in the
    average pool. Blocks 3 and 4 are 192 wide too: only the values tell which block is read."""
    torch.manual_seed(0)
    model = rotnet.RotNet("nin", True, 4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.mid_features(x), model.backbone[:2](x).mean((2, 3)))


# ------------------------------------------------------------------------------------- learning
