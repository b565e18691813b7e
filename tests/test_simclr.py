"""simclr.py: the loss against hand computation, and the training loop's contract on CPU."""

import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from conftest import (assert_features_and_encoder_are_the_backbone, assert_nan_stops_the_run, assert_resumes_exactly,
                      assert_smoke_run, assert_warmup_then_cosine, cifar10_dir, first_test_images, load_ckpt, read_log,
                      tiny)

import common
import simclr

# ------------------------------------------------------------------------------------------- loss


def test_nt_xent_hand_computed():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z2 = torch.tensor([[1.0, 1.0], [3.0, -3.0]])
    T = 0.5
    # normalized: z1[0], z1[1], z2[0], z2[1]
    u = [(a / math.hypot(a, b), b / math.hypot(a, b)) for a, b in [(1, 0), (0, 1), (1, 1), (1, -1)]]
    cos = lambda a, b: a[0] * b[0] + a[1] * b[1]  # noqa: E731
    total = 0.0
    for i, pos in [(0, 2), (1, 3), (2, 0), (3, 1)]:
        denom = sum(math.exp(cos(u[i], u[k]) / T) for k in range(4) if k != i)
        total += -math.log(math.exp(cos(u[i], u[pos]) / T) / denom)
    assert simclr.nt_xent_loss(z1, z2, T).item() == pytest.approx(total / 4, rel=1e-6)


def test_nt_xent_equals_cross_entropy_with_positive_first():
    torch.manual_seed(0)
    z1, z2, T = torch.randn(8, 16), torch.randn(8, 16), 0.2
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    losses = []
    for anchors, others in [(a, b), (b, a)]:  # each anchor: [positive, N-1 same-view negatives, N-1 other-view]
        for i in range(8):
            negatives = torch.cat([anchors[torch.arange(8) != i], others[torch.arange(8) != i]])
            logits = torch.cat([(anchors[i] @ others[i]).view(1), negatives @ anchors[i]]) / T
            losses.append(F.cross_entropy(logits.view(1, -1), torch.tensor([0])))
    torch.testing.assert_close(simclr.nt_xent_loss(z1, z2, T), torch.stack(losses).mean())


def test_nt_xent_identities():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    loss = simclr.nt_xent_loss(z1, z2, 0.5)
    torch.testing.assert_close(simclr.nt_xent_loss(z2, z1, 0.5), loss)  # symmetric in the two views
    torch.testing.assert_close(simclr.nt_xent_loss(3 * z1, 0.1 * z2, 0.5), loss)  # scale-free (normalized inside)
    # perfect alignment with orthogonal negatives: each anchor has 1 positive at cos 1, 2N-2 negatives at cos 0
    e = torch.eye(6)
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 10))
    assert simclr.nt_xent_loss(e, e, 0.5).item() == pytest.approx(expected, rel=1e-6)


def official_objective(z1, z2, T):
    """google-research/simclr v1, objective.py, written out: loss_a + loss_b, each the mean cross-entropy of
    [logits_ab | logits_aa] (resp. [logits_ba | logits_bb]) with the self-similarities masked by -1e9."""
    h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    N, mask = len(z1), torch.eye(len(z1)) * 1e9
    labels = torch.arange(N)
    loss_a = F.cross_entropy(torch.cat([h1 @ h2.T / T, h1 @ h1.T / T - mask], 1), labels)
    loss_b = F.cross_entropy(torch.cat([h2 @ h1.T / T, h2 @ h2.T / T - mask], 1), labels)
    return loss_a + loss_b


def test_training_loss_is_the_official_objective(tmp_path, monkeypatch):
    """train() minimizes the official code's loss_a + loss_b (twice the paper's mean), on which its lr was tuned."""
    seen = []
    real = simclr.nt_xent_loss
    monkeypatch.setattr(simclr, "nt_xent_loss",
                        lambda z1, z2, T: seen.append((z1.detach(), z2.detach())) or real(z1, z2, T))
    cfg = tiny(simclr.Config, tmp_path, max_steps=1, probe_epochs=0, log_every=1)
    simclr.train(cfg)
    logged = read_log(cfg, steps=True)[0]["loss"]
    z1, z2 = seen[0]
    assert logged == pytest.approx(official_objective(z1, z2, cfg.temperature).item(), rel=1e-5)
    assert logged == pytest.approx(2 * real(z1, z2, cfg.temperature).item(), rel=1e-5)


# -------------------------------------------------------------------------------------- training


def test_smoke_run_writes_log_ckpt_results(tmp_path):
    cfg, results = assert_smoke_run(simclr, tmp_path)
    assert results["steps"] == 16
    log = read_log(cfg)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 4, 6, 8, 10, 12, 14, 16]  # the first step, then every 2
    assert "z_std" in log[1] and log[0]["step"] == 0  # log[0]: the monitor at random initialisation


def test_resume_is_exact(tmp_path):
    assert_resumes_exactly(simclr, tmp_path)


def test_resume_refuses_other_settings(tmp_path):
    simclr.train(tiny(simclr.Config, tmp_path, max_steps=2, probe_epochs=0))
    with pytest.raises(common.RunError, match="temperature=0.5"):
        simclr.train(tiny(simclr.Config, tmp_path, temperature=0.2, resume=True))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(simclr, "nt_xent_loss", monkeypatch, tmp_path)


@pytest.mark.slow  # bf16 is emulated on CPUs without AVX-512 BF16: ~10x slower than float32
def test_bfloat16_autocast_on_cpu(tmp_path):
    results = simclr.train(tiny(simclr.Config, tmp_path, dtype="bfloat16", max_steps=3, probe_epochs=0))
    assert results["steps"] == 3 and math.isfinite(results["knn_top1"])


@pytest.mark.slow
def test_compiled_run_checkpoint_loads_into_plain_model(tmp_path):
    cfg = tiny(simclr.Config, tmp_path, compile="true", max_steps=2, probe_epochs=0)
    simclr.train(cfg)
    state = load_ckpt(cfg)
    assert not any("_orig_mod" in k for k in state["model"])
    simclr.SimCLR("tiny", True, cfg.proj_dim).load_state_dict(state["model"])  # strict: no renaming


@pytest.mark.slow
def test_encoder_loads_into_torchvision_resnet18(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "load_data", first_test_images(common.load_data, 64))  # a cheap final evaluation
    cfg = tiny(simclr.Config, tmp_path, arch="resnet18", subset=16, batch_size=8, max_steps=1, probe_epochs=0)
    simclr.train(cfg)
    # the two lines of the README
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool, net.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    net.load_state_dict(torch.load(os.path.join(cfg.out_dir, "encoder.pt"), weights_only=True))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


# ------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_cifar10_loads_through_the_user_path(tmp_path):
    cfg = tiny(simclr.Config, tmp_path, dataset="cifar10", data_dir=cifar10_dir(), subset=0)
    data = common.load_data(cfg, common.setup(cfg))
    (xtr, ytr), (xte, yte) = data.train, data.test
    assert xtr.shape == (50000, 3, 32, 32) and xte.shape == (10000, 3, 32, 32) and xtr.dtype == torch.uint8
    assert ytr.bincount().tolist() == [5000] * 10 and yte.bincount().tolist() == [1000] * 10
    assert data.classes[0] == "airplane" and data.steps_per_epoch == 50000 // 64


@pytest.mark.parametrize("arch, blocks", [("resnet18", 8), ("resnet50", 16)])
def test_each_residual_block_starts_as_the_identity_as_the_official_resnet(arch, blocks):
    # official resnet.py: init_zero=True on the last BatchNorm of every block; the stem's BN keeps scale 1
    model = simclr.SimCLR(arch, True, 128)
    last = [m.bn3 if hasattr(m, "bn3") else m.bn2 for m in model.backbone.modules()
            if isinstance(m, (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck))]
    assert len(last) == blocks and all((bn.weight == 0).all() for bn in last)
    assert (model.backbone.bn1.weight == 1).all()


def test_views_are_the_papers_recipe(monkeypatch):
    """App. A at strength s = 1: jitter (0.8s, 0.8s, 0.8s, 0.2s) on 80% of the views, grayscale on 20%, and with
    --blur a blur on half of them; the order as the paper's: crop, flip, jitter, grayscale, blur."""
    calls = []
    for name in ("random_resized_crop", "random_flip", "color_jitter", "random_grayscale", "gaussian_blur"):
        monkeypatch.setattr(common, name, lambda x, *args, _name=name, **kw: calls.append((_name, args, kw)) or x)
    simclr.simclr_view(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), simclr.Config(jitter_strength=1.0, blur=True))
    assert calls == [("random_resized_crop", (32,), dict(scale=(0.08, 1.0))), ("random_flip", (), {}),
                     ("color_jitter", (0.8, 0.8, 0.8, 0.2), dict(p=0.8)), ("random_grayscale", (), dict(p=0.2)),
                     ("gaussian_blur", (), dict(p=0.5))]


def test_lars_lr_is_scaled_by_the_batch_and_spares_biases_and_bn(tmp_path):
    """The official LARS ("simclr" form) at lr x batch / 256 (linear scaling, paper App. B.1); weight decay and
    the trust ratio on weights only, not on biases and BN (C lars_optimizer.py's exclusions)."""
    cfg = tiny(simclr.Config, tmp_path, subset=64, batch_size=32, max_steps=1, probe_epochs=0)
    simclr.train(cfg)
    opt = load_ckpt(cfg)["opt"]
    groups = {g["name"]: g for g in opt["param_groups"]}
    assert groups["weights"]["lr"] == groups["biases"]["lr"] == pytest.approx(cfg.lr * 32 / 256)  # no warmup: step 0
    assert groups["weights"]["weight_decay"] == cfg.weight_decay and not groups["weights"]["lars_exclude"]
    assert groups["biases"]["weight_decay"] == 0.0 and groups["biases"]["lars_exclude"]
    assert {g["form"] for g in opt["param_groups"]} == {"simclr"}


# -------------------------------------------------------------------- schedule, head, evaluated features


def test_lr_warms_up_over_warmup_epochs_then_follows_the_cosine_of_all_the_epochs(tmp_path):
    """C model_util.py: linear warmup from 0 over warmup_epochs x steps per epoch, then cosine to 0 at epochs x steps
    per epoch, wherever max_steps stops the run. 4 steps per epoch, 3 epochs, 1 of warmup, stopped after 6 steps."""
    assert_warmup_then_cosine(simclr, tmp_path)


def test_max_steps_beyond_the_epochs_ends_the_run_with_the_epochs(tmp_path):
    """max_steps only shortens a run: 1 epoch of 4 steps with max_steps=10 stops after step 4."""
    cfg = tiny(simclr.Config, tmp_path, subset=128, batch_size=32, max_steps=10, probe_epochs=0)
    assert simclr.train(cfg)["steps"] == 4 and load_ckpt(cfg)["step"] == 4


def test_head_is_fc_bn_relu_fc_bn_and_its_last_bn_scales_but_never_shifts():
    """C model_util.py (v1 head, as the docstring says): fc (trunk width), BN, ReLU, fc (proj_dim), BN, no fc biases;
    the last BN has no shift (center=False): its bias is left out of the optimizer's groups, its scale is in."""
    model = simclr.SimCLR("tiny", True, 16)  # the tiny trunk: 128 wide
    assert [type(m) for m in model.projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    fcs = [(m.in_features, m.out_features, m.bias) for m in model.projector[::3]]
    assert fcs == [(128, 128, None), (128, 16, None)]
    trained = {id(p) for g in common.param_groups(model, 1e-6) for p in g["params"]}
    last = model.projector[4]
    assert id(last.weight) in trained and id(last.bias) not in trained and id(model.projector[1].bias) in trained


def test_evaluated_features_and_encoder_pt_are_the_backbones_h(tmp_path, monkeypatch):
    """Paper Sec. 2.1: after training g is thrown away and h = f(x) is the representation: the three evaluations
    score the backbone's pooled output (not g's), and encoder.pt holds f alone, as trained."""
    cfg = tiny(simclr.Config, tmp_path, max_steps=2, probe_epochs=0)
    assert_features_and_encoder_are_the_backbone(simclr, cfg, monkeypatch)
