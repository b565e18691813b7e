"""simsiam.py: the loss against hand computation, the stop-gradient, the fixed predictor lr, and
the training loop's contract on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import (assert_features_and_encoder_are_the_backbone, assert_nan_stops_the_run, assert_resumes_exactly,
                      assert_smoke_run, assert_warmup_then_cosine, load_ckpt, read_log, tiny)

import common
import simsiam

SMALL = dict(proj_hidden=64, proj_dim=64, pred_hidden=16)  # narrow heads: quick CPU runs

# ------------------------------------------------------------------------------------------- loss


def test_simsiam_loss_hand_computed():
    p1, z2 = torch.tensor([[1.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 2.0], [4.0, 3.0]])  # cos 0, 24/25
    p2, z1 = torch.tensor([[1.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, -5.0]])  # cos 1/sqrt(2), -1
    expected = 0.5 * (-(0 + 24 / 25) / 2 - (1 / math.sqrt(2) - 1) / 2)
    assert simsiam.simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(expected, rel=1e-6)


def test_simsiam_loss_identities():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(16, 8) for _ in range(4))
    assert simsiam.simsiam_loss(z2, z1, z1, z2).item() == pytest.approx(-1.0, abs=1e-6)  # p == the other z
    assert simsiam.simsiam_loss(-z2, -z1, z1, z2).item() == pytest.approx(1.0, abs=1e-6)  # opposite
    loss = simsiam.simsiam_loss(p1, p2, z1, z2)
    assert -1 < loss.item() < 1
    torch.testing.assert_close(simsiam.simsiam_loss(p2, p1, z2, z1), loss)  # symmetric in the two views
    torch.testing.assert_close(simsiam.simsiam_loss(2 * p1, p2, 0.5 * z1, z2), loss)  # scale-free
    d = lambda p, z: -F.cosine_similarity(p, z, dim=1).mean()  # noqa: E731
    torch.testing.assert_close(loss, 0.5 * d(p1, z2) + 0.5 * d(p2, z1))  # paper Eq. 4


def test_stop_gradient_z_gets_no_gradient_from_its_own_term():
    """z enters the loss as a constant: the gradient reaching z comes only through p = h(z)."""
    torch.manual_seed(0)
    h = torch.nn.Linear(8, 8)
    z1, z2 = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    simsiam.simsiam_loss(h(z1), h(z2), z1, z2).backward()
    with_sg = z1.grad.clone()
    # the same loss where the z terms are fresh constants: identical gradient
    z1.grad = None
    simsiam.simsiam_loss(h(z1), h(z2), z1.detach().clone(), z2.detach().clone()).backward()
    torch.testing.assert_close(z1.grad, with_sg)
    # without the stop-gradient the gradient would differ: the check can fail
    z1.grad = None
    no_sg = -0.5 * (F.cosine_similarity(h(z1), z2, dim=1).mean() + F.cosine_similarity(h(z2), z1, dim=1).mean())
    no_sg.backward()
    assert (z1.grad - with_sg).abs().max() > 1e-3
    # and the projections alone receive nothing
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    p1, p2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    simsiam.simsiam_loss(p1, p2, a, b).backward()
    assert a.grad is None and b.grad is None and p1.grad.abs().sum() > 0


# -------------------------------------------------------------------------------- predictor lr


def test_param_groups_split_predictor_with_fixed_lr():
    model = simsiam.SimSiam("tiny", True, 2, 64, 64, 16)
    groups = simsiam.param_groups(model, 5e-4)
    assert [g["name"] for g in groups] == ["encoder", "predictor"]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.predictor.parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    opt = torch.optim.SGD(groups, lr=0.06, momentum=0.9)
    for step in range(0, 100, 10):  # drive the cosine schedule: the encoder decays, the predictor stays
        common.set_lr(opt, common.cosine_lr(step, 100, 0, 0.06), predictor=0.06)
        assert opt.param_groups[1]["lr"] == 0.06
    assert opt.param_groups[0]["lr"] < 0.01


def test_predictor_lr_stays_fixed_in_training_while_the_rest_decays(tmp_path):
    cfg = tiny(simsiam.Config, tmp_path, subset=128, batch_size=32, epochs=2, probe_epochs=0, **SMALL)  # 8 steps
    simsiam.train(cfg)
    lr = cfg.lr * cfg.batch_size / 256
    encoder, predictor = load_ckpt(cfg)["opt"]["param_groups"]
    assert predictor["lr"] == lr
    assert encoder["lr"] == pytest.approx(common.cosine_lr(7, 8, 0, lr)) and encoder["lr"] < 0.1 * lr
    log = read_log(cfg)
    lrs = [r["lr"] for r in log if "lr" in r]
    assert lrs[0] > lrs[-1]  # the logged (scheduled) lr decays


# -------------------------------------------------------------------------------------- training


def test_smoke_run_writes_log_ckpt_results(tmp_path):
    cfg, results = assert_smoke_run(simsiam, tmp_path, extra_keys=("z_std",), **SMALL)
    assert results["steps"] == 16 and 0 < results["z_std"] < 1
    log = read_log(cfg)
    steps = [r for r in log if "loss" in r]
    assert all(-1 <= r["loss"] <= 1 and "z_std" in r for r in steps)


def test_z_std_is_about_one_over_sqrt_d_for_random_z_and_zero_when_collapsed():
    """The monitor's two reference values (paper Sec. 4.1), computed as train() does."""
    torch.manual_seed(0)
    z_std = lambda z: F.normalize(z, dim=1).std(0).mean().item()  # noqa: E731
    assert z_std(torch.randn(4096, 256)) == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert z_std(torch.randn(1, 256).expand(64, 256) * 3) == pytest.approx(0.0, abs=1e-6)


def test_resume_is_exact(tmp_path):
    assert_resumes_exactly(simsiam, tmp_path, **SMALL)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(simsiam, "simsiam_loss", monkeypatch, tmp_path, **SMALL)


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="--proj_layers"):
        simsiam.Config(proj_layers=4)
    with pytest.raises(ValueError, match="--crop_min"):
        simsiam.Config(crop_min=1.5)


def test_three_layer_projector_for_imagenet():
    model = simsiam.SimSiam("tiny", True, 3, 64, 32, 8)
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert [lin.out_features for lin in linears] == [64, 64, 32]
    assert not model.projector[-1].affine  # output BN without scale and shift


# ---------------------------------------------------------------------------------- learning


def test_every_residual_block_starts_as_the_identity():
    """Paper App. A and the official builder.py (zero_init_residual=True): the last BN of each block has
    scale 0, so the block adds nothing at initialisation; the other BN scales stay 1."""
    for arch, last in [("resnet18", "bn2"), ("resnet50", "bn3")]:
        backbone = simsiam.SimSiam(arch, True, 2, 64, 64, 16).backbone
        blocks = [m for m in backbone.modules() if hasattr(m, last) and hasattr(m, "conv1")]
        assert len(blocks) == (8 if arch == "resnet18" else 16)
        assert all(torch.equal(getattr(b, last).weight, torch.zeros_like(getattr(b, last).weight)) for b in blocks)
        assert torch.equal(backbone.bn1.weight, torch.ones_like(backbone.bn1.weight))
        block = backbone.layer1[1].eval()  # no downsampling: at init, relu(x + 0)
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        torch.testing.assert_close(block(x), torch.relu(x))


def test_blur_is_the_official_loaders_pil_blur(tmp_path, monkeypatch):
    # loader.py: PIL's GaussianBlur(radius=sigma), sigma ~ U(0.1, 2), p 0.5: common's kernel sized by sigma
    calls, blur = [], common.gaussian_blur
    monkeypatch.setattr(common, "gaussian_blur", lambda x, **kw: calls.append(kw) or blur(x, **kw))
    simsiam.simsiam_view(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), tiny(simsiam.Config, tmp_path, blur=True))
    assert calls == [dict(p=0.5, sigma=(0.1, 2.0), kernel="sigma")]


def test_predictor_is_a_bottleneck_with_bn_and_relu_on_its_hidden_layer_only():
    """Paper Sec. 3 and builder.py: h = fc (d -> d/4, no bias), BN, ReLU, fc (d/4 -> d, with a bias); no BN at
    the output."""
    predictor = simsiam.SimSiam("tiny", True, 2, 64, 64, 16).predictor
    assert [type(m) for m in predictor] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
    assert (predictor[0].in_features, predictor[0].out_features, predictor[3].out_features) == (64, 16, 64)
    assert predictor[0].bias is None and predictor[3].bias is not None


def test_views_are_the_official_loaders(monkeypatch):
    """main_simsiam.py (MoCo v2's): crop of area (crop_min, 1), jitter (0.4, 0.4, 0.4, 0.1) on 80% of the views,
    grayscale on 20%, blur only with --blur, then the flip."""
    calls = []
    for name in ("random_resized_crop", "color_jitter", "random_grayscale", "gaussian_blur", "random_flip"):
        monkeypatch.setattr(common, name, lambda x, *args, _name=name, **kw: calls.append((_name, args, kw)) or x)
    simsiam.simsiam_view(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), simsiam.Config(crop_min=0.3))
    assert calls == [("random_resized_crop", (32,), dict(scale=(0.3, 1.0))),
                     ("color_jitter", (0.4, 0.4, 0.4, 0.1), dict(p=0.8)), ("random_grayscale", (), dict(p=0.2)),
                     ("random_flip", (), {})]


def test_a_training_step_crosses_the_views_and_decays_every_parameter(tmp_path, monkeypatch):
    """train() minimizes simsiam_loss(p1, p2, z1, z2) of one forward's outputs, D(p1, z2)/2 + D(p2, z1)/2 (Eq. 4),
    and its SGD decays every parameter, the predictor's too (official code: weight decay on all parameters)."""
    outs, args, real_forward, real_loss = [], [], simsiam.SimSiam.forward, simsiam.simsiam_loss
    monkeypatch.setattr(simsiam.SimSiam, "forward", lambda self, x1, x2: outs.append(real_forward(self, x1, x2))
                        or outs[-1])
    monkeypatch.setattr(simsiam, "simsiam_loss", lambda *a: args.append(a) or real_loss(*a))
    cfg = tiny(simsiam.Config, tmp_path, subset=64, batch_size=32, max_steps=1, probe_epochs=0, **SMALL)
    simsiam.train(cfg)
    assert len(outs) == len(args) == 1 and all(a is o for a, o in zip(args[0], outs[0], strict=True))
    assert [g["weight_decay"] for g in load_ckpt(cfg)["opt"]["param_groups"]] == [cfg.weight_decay] * 2


# ------------------------------------------------------------ schedule, projector, defaults, evaluated features


def test_lr_warms_up_over_warmup_epochs_then_follows_the_cosine_of_all_the_epochs(tmp_path):
    """--warmup_epochs (the paper warms up only for batches >= 1024: the Config's comment): linear from 0 over
    warmup_epochs x steps per epoch, then cosine to 0 at epochs x steps per epoch (P App. D). 4 steps per epoch,
    3 epochs, 1 of warmup, stopped after 6 steps."""
    assert_warmup_then_cosine(simsiam, tmp_path, **SMALL)


def test_two_layer_projector_is_fc_bn_relu_fc_bn_without_biases():
    """App. D (CIFAR: 2 fc layers) and Sec. 3 / C builder.py: BN on every fc, the output's included, ReLU on the
    hidden layer only, fc without biases."""
    projector = simsiam.SimSiam("tiny", True, 2, 64, 32, 8).projector  # the tiny trunk: 128 wide
    types = [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear, torch.nn.BatchNorm1d]
    assert [type(m) for m in projector] == types
    assert [(m.in_features, m.out_features, m.bias) for m in projector[::3]] == [(128, 64, None), (64, 32, None)]


def test_defaults_are_the_papers_cifar_recipe():
    """App. D: SGD, base lr 0.03 (x batch / 256), batch 512, weight decay 5e-4, 800 epochs, cosine without warmup,
    2 projector layers of 2048-d output; the predictor's hidden layer d/4 = 512 (Sec. 3)."""
    cfg = simsiam.Config()
    recipe = dict(lr=0.03, batch_size=512, weight_decay=5e-4, epochs=800, warmup_epochs=0, proj_layers=2,
                  proj_dim=2048, proj_hidden=2048, pred_hidden=512, fix_pred_lr=True, blur=False)
    assert {k: getattr(cfg, k) for k in recipe} == recipe


def test_evaluated_features_and_encoder_pt_are_the_backbones_h(tmp_path, monkeypatch):
    """Docstring (and P App. D, the kNN monitor and linear evaluation on the backbone): the three evaluations score
    the backbone's pooled h, before the projection MLP, and encoder.pt holds that backbone."""
    cfg = tiny(simsiam.Config, tmp_path, max_steps=2, probe_epochs=0, **SMALL)
    assert_features_and_encoder_are_the_backbone(simsiam, cfg, monkeypatch)
