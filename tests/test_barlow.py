"""barlow.py: the loss against hand computation and its identities, the 2-process equality and the
official code's 2-process step, the recipe's optimizer and blur, and the training loop's contract on CPU."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from conftest import (assert_features_and_encoder_are_the_backbone, assert_nan_stops_the_run, assert_resumes_exactly,
                      assert_smoke_run, assert_warmup_then_cosine, load_ckpt, read_log, tiny)

import barlow
import common

# ------------------------------------------------------------------------------------------- loss


def test_barlow_twins_loss_hand_computed():
    # N = 3 images, D = 2 dimensions; columns standardized by hand with the biased std (as BatchNorm1d)
    z1 = [[1.0, 2.0], [2.0, 0.0], [6.0, 1.0]]
    z2 = [[0.0, 1.0], [1.0, 1.0], [1.0, 4.0]]
    lambd, N, eps = 0.5, 3, 1e-5

    def standardized(z, j):
        col = [row[j] for row in z]
        mean = sum(col) / N
        var = sum((v - mean) ** 2 for v in col) / N
        return [(v - mean) / math.sqrt(var + eps) for v in col]

    a = [standardized(z1, j) for j in range(2)]
    b = [standardized(z2, j) for j in range(2)]
    C = [[sum(a[i][n] * b[j][n] for n in range(N)) / N for j in range(2)] for i in range(2)]
    expected = (1 - C[0][0]) ** 2 + (1 - C[1][1]) ** 2 + lambd * (C[0][1] ** 2 + C[1][0] ** 2)
    loss = barlow.barlow_twins_loss(torch.tensor(z1), torch.tensor(z2), lambd)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_barlow_twins_loss_equals_batchnorm_formulation():
    """The official code's form: BatchNorm1d(affine=False) in training mode, C = bn(z1).T bn(z2) / N."""
    torch.manual_seed(0)
    z1, z2, lambd = torch.randn(32, 16), torch.randn(32, 16), 5e-3
    bn = torch.nn.BatchNorm1d(16, affine=False)
    c = bn(z1).T @ bn(z2) / 32
    off = c - torch.diag(torch.diagonal(c))
    expected = (torch.diagonal(c) - 1).pow(2).sum() + lambd * off.pow(2).sum()
    torch.testing.assert_close(barlow.barlow_twins_loss(z1, z2, lambd), expected)


def test_barlow_twins_loss_identities():
    # identical views whose dimensions are already standardized and decorrelated: C = I, loss 0
    z = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])  # orthogonal columns
    assert barlow.barlow_twins_loss(z, z, 0.5).item() == pytest.approx(0.0, abs=1e-4)  # eps of the BN only
    # a perfectly correlated pair of dimensions costs lambd * 2 * 1^2 exactly (both off-diagonal entries are 1)
    zc = torch.stack([z[:, 0], z[:, 0]], 1)
    assert barlow.barlow_twins_loss(zc, zc, 0.5).item() == pytest.approx(0.5 * 2, rel=1e-4)
    # invariant to a per-dimension affine map of either view (standardized inside), symmetric in the views
    torch.manual_seed(0)
    z1, z2 = torch.randn(64, 8), torch.randn(64, 8)
    loss = barlow.barlow_twins_loss(z1, z2, 5e-3)
    scale, shift = torch.rand(8) * 5 + 0.5, torch.randn(8) * 10
    torch.testing.assert_close(barlow.barlow_twins_loss(z1 * scale + shift, z2, 5e-3), loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(barlow.barlow_twins_loss(z2, z1, 5e-3), loss)


def test_barlow_twins_loss_gradient_vanishes_at_optimum_only():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], requires_grad=True)
    barlow.barlow_twins_loss(z, z.detach() * 1.0, 0.1).backward()
    assert z.grad.abs().max() < 1e-4  # C = I: a minimum
    torch.manual_seed(0)
    z1 = torch.randn(16, 4, requires_grad=True)
    barlow.barlow_twins_loss(z1, torch.randn(16, 4), 0.1).backward()
    assert z1.grad.abs().max() > 1e-3


def test_two_processes_equal_one_process_on_the_global_batch(dist_scripts):
    """Global batch statistics and the all-reduced C: 2-process loss and gradients == 1 process."""
    out = dist_scripts("dist_barlow_step.py")
    assert out.count("max grad diff") == 2, out


def test_the_stated_flags_take_the_official_step_on_two_processes(dist_scripts):
    """main.py on 2 processes steps on half the global gradient; the docstring's flags for the official
    run (loss_scale 1/W, its LARS) take that very step (tests/dist_barlow_official.py)."""
    out = dist_scripts("dist_barlow_official.py")
    assert out.count("official gradient = global gradient / 2") == 2, out
    assert out.count("the same LARS step") == 2, out


# ------------------------------------------------------------------------------------- the recipe


def test_blur_is_main_py_pil_blur_sized_by_sigma(monkeypatch):
    """--blur is main.py's: PIL's GaussianBlur(radius=sigma), sigma ~ U(0.1, 2). At sigma 2 PIL spreads a
    32 px impulse over +-5 px, centre weight 0.035 (measured); a kernel of 10% of the side (3 taps) would
    keep it within +-1 px at 0.131. The view is driven with every other augmentation off."""
    real_blur = common.gaussian_blur
    for name in ("random_resized_crop", "random_flip", "color_jitter", "random_grayscale", "solarize"):
        monkeypatch.setattr(common, name, lambda x, *args, **kwargs: x)
    monkeypatch.setattr(common, "gaussian_blur", lambda x, p, sigma=(0.1, 2.0), kernel="side": real_blur(
        x, 1.0, (2.0, 2.0), kernel))  # blur on, sigma 2, the kernel the file asks for
    impulse = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    impulse[..., 16, 16] = 255
    view = barlow.barlow_view(impulse, barlow.Config(blur=True), blur_p=1.0, solarize_p=0.0)[0, 0]
    blurred = view * common.STD[0] + common.MEAN[0]  # (32, 32): back to [0, 1]
    pil = np.asarray(Image.fromarray(impulse[0, 0].numpy()).filter(ImageFilter.GaussianBlur(radius=2))) / 255
    assert (blurred[16, 11:22] > 1e-3).all() and (pil[16, 11:22] > 0).all()  # beyond +-3 px, as PIL's
    assert abs(blurred[16, 16].item() - pil[16, 16]) < 0.01, (blurred[16, 16].item(), pil[16, 16])


def test_default_optimizer_is_solo_learn_lars_and_the_official_one_a_flag_away(tmp_path):
    """solo-learn's cifar/barlow.yaml: its LARS (solo/utils/lars.py, form "larc"), eta 0.02, clip_lr,
    exclude_bias_n_norm (biases and BN: no adaptation, no decay), lr 0.3, wd 1e-4, loss x 0.1;
    main.py: form "byol", eta 0.001, no clipping."""
    cfg = barlow.Config()
    assert (cfg.lr, cfg.weight_decay, cfg.loss_scale, cfg.lambd, cfg.proj_dim) == (0.3, 1e-4, 0.1, 0.0051, 2048)
    for flags, form, eta, clip in [({}, "larc", 0.02, True), (dict(lars_form="byol", lars_eta=0.001, lars_clip=False),
                                                              "byol", 0.001, False)]:
        run = tiny(barlow.Config, tmp_path / form, max_steps=2, probe_epochs=0, **FAST, **flags)
        barlow.train(run)
        groups = {g["name"]: g for g in load_ckpt(run)["opt"]["param_groups"]}
        assert (groups["weights"]["form"], groups["weights"]["eta"], groups["weights"]["clip"]) == (form, eta, clip)
        assert groups["biases"]["lars_exclude"] and groups["biases"]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="--lars_form"):
        barlow.Config(lars_form="lamb")


# -------------------------------------------------------------------------------------- training

FAST = dict(proj_dim=256)  # the loop's contract does not need the 2048-wide projector: a third less CPU time


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="--lambd"):
        barlow.Config(lambd=-1.0)
    with pytest.raises(ValueError, match="--batch_size"):
        barlow.Config(batch_size=0)


def test_smoke_run_writes_log_ckpt_results(tmp_path):
    cfg, results = assert_smoke_run(barlow, tmp_path, **FAST)
    assert results["steps"] == 16
    log = read_log(cfg)
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    assert all(0 < r["z_std"] <= 1 and math.isfinite(r["loss"]) for r in steps)
    # lr_biases = 0 (solo-learn): biases and BN share the weights' lr; neither is decayed
    groups = {g["name"]: g for g in load_ckpt(cfg)["opt"]["param_groups"]}
    assert groups["biases"]["lr"] == pytest.approx(groups["weights"]["lr"]) and groups["weights"]["lr"] > 0
    assert groups["weights"]["weight_decay"] == cfg.weight_decay and groups["biases"]["weight_decay"] == 0.0


def test_own_lr_of_biases_follows_the_schedule(tmp_path):
    """lr_biases > 0 (the paper's 0.0048 with 0.2): the biases' lr is the weights' lr times lr_biases / lr."""
    cfg = tiny(barlow.Config, tmp_path, lr=0.2, lr_biases=0.0048, max_steps=3, probe_epochs=0, **FAST)
    barlow.train(cfg)
    groups = {g["name"]: g for g in load_ckpt(cfg)["opt"]["param_groups"]}
    assert groups["biases"]["lr"] == pytest.approx(groups["weights"]["lr"] * 0.0048 / 0.2)
    assert groups["weights"]["lr"] > 0


def test_resume_is_exact(tmp_path):
    assert_resumes_exactly(barlow, tmp_path, **FAST)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(barlow, "barlow_twins_loss", monkeypatch, tmp_path, **FAST)


# ---------------------------------------------------------------------------------------- learning


def test_training_minimizes_the_scaled_loss_of_asymmetric_views_down_to_the_final_lr(tmp_path, monkeypatch):
    """Per step: view 1 blurred always, never solarized; view 2 blurred with p 0.1, solarized with p 0.2 (BYOL's
    recipe); the loss minimized (and logged) is loss_scale x barlow_twins_loss; the cosine ends at
    lr x final_lr_ratio."""
    views, losses, real_view, real_loss = [], [], barlow.barlow_view, barlow.barlow_twins_loss

    def recording_loss(z1, z2, lambd):
        losses.append(real_loss(z1, z2, lambd))
        return losses[-1]

    monkeypatch.setattr(barlow, "barlow_view", lambda x, cfg, **kw: views.append(kw) or real_view(x, cfg, **kw))
    monkeypatch.setattr(barlow, "barlow_twins_loss", recording_loss)
    cfg = tiny(barlow.Config, tmp_path, subset=96, batch_size=32, final_lr_ratio=0.5, log_every=1, probe_epochs=0,
               **FAST)  # 3 steps, no warmup
    barlow.train(cfg)
    log = read_log(cfg, steps=True)
    assert views == [dict(blur_p=1.0, solarize_p=0.0), dict(blur_p=0.1, solarize_p=0.2)] * 3
    assert [r["loss"] for r in log] == pytest.approx([0.1 * loss.item() for loss in losses], rel=1e-6)
    lr = cfg.lr * cfg.batch_size / 256
    assert [r["lr"] for r in log] == pytest.approx([common.cosine_lr(k, 3, 0, lr, final_lr=0.5 * lr) for k in range(3)])


# ---------------------------------------------------------------------- schedule, evaluated features


def test_lr_warms_up_over_warmup_epochs_then_follows_the_cosine_of_all_the_epochs(tmp_path):
    """P 2.2 and C main.py adjust_learning_rate (warmup_steps = 10 x len(loader)): linear warmup from 0 over
    warmup_epochs x steps per epoch, then cosine at epochs x steps per epoch. 4 steps per epoch, 3 epochs, 1 of warmup,
    stopped after 6 steps, final lr 0 (S)."""
    assert_warmup_then_cosine(barlow, tmp_path, **FAST)


def test_evaluated_features_and_encoder_pt_are_the_backbones_h(tmp_path, monkeypatch):
    """P 3.1 (linear evaluation on the frozen ResNet's output): the three evaluations score the backbone's pooled h,
    not the projector's output, and encoder.pt holds that backbone."""
    cfg = tiny(barlow.Config, tmp_path, max_steps=2, probe_epochs=0, **FAST)
    assert_features_and_encoder_are_the_backbone(barlow, cfg, monkeypatch)
