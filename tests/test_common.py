"""common.py: config parsing, colour conversion, augmentations, models, optimizers, evaluation, I/O."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
import torchvision.transforms.v2.functional as TF

from conftest import ROOT, tiny

import common
import simclr


# ----------------------------------------------------------------------------------------- config


def parse(argv):
    return common.parse_config(simclr.Config, argv)


def test_parse_config_types_and_values():
    cfg = parse(["--batch_size=256", "--lr=0.3", "--dataset=synthetic", "--blur=true", "--resume"])
    assert (cfg.batch_size, cfg.lr, cfg.dataset, cfg.blur, cfg.resume) == (256, 0.3, "synthetic", True, True)
    assert isinstance(cfg.lr, float) and isinstance(cfg.batch_size, int)


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=256"], "did you mean --batch_size"),  # unknown key
    (["--batch_size=abc"], "--batch_size expects an integer"),  # bad type
    (["--blur=maybe"], "--blur expects true or false"),
    (["--batch_size=-4"], "--batch_size=-4 is impossible"),  # impossible values
    (["--dataset=imagenet"], "--dataset=imagenet is impossible"),
    (["--temperature=0"], "--temperature must be > 0"),
    (["--lr"], "--lr needs a value"),
])
def test_parse_config_errors_exit_2_with_one_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_batch_must_divide_world_size(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        parse(["--batch_size=512"])
    assert "divisible by the 3 processes" in capsys.readouterr().err


def test_help_lists_every_field_with_default_and_comment():
    p = subprocess.run([sys.executable, "simclr.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0
    for f in dataclasses.fields(simclr.Config):
        line = next(line for line in p.stdout.splitlines() if line.strip().startswith(f"--{f.name}="))
        assert str(f.default) in line and len(line.split(maxsplit=1)) == 2, line  # default, then a comment
    assert "# optim" in p.stdout


def test_config_is_read_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        simclr.Config().lr = 2.0


def test_parse_config_bool_words():
    """A bool reads true/yes/1 and false/no/0 in any case, and a bare --key is true."""
    for word, value in [("true", True), ("Yes", True), ("1", True), ("false", False), ("NO", False), ("0", False)]:
        assert parse([f"--blur={word}"]).blur is value, word
    assert parse(["--blur"]).blur is True


@pytest.mark.parametrize("key, lowest, below", [
    ("batch_size", "1", "0"), ("epochs", "1", "0"), ("lr", "1e-09", "0.0"), ("image_size", "8", "7"),
    ("linear_epochs", "-1", "-2"), ("log_every", "1", "0"), ("weight_decay", "0.0", "-0.5")])
def test_check_config_at_each_limit(key, lowest, below, capsys):
    """Each shared rule at its edge: the lowest allowed value passes, the next one below exits 2 naming the key."""
    assert str(getattr(parse([f"--{key}={lowest}"]), key)) == lowest
    with pytest.raises(SystemExit):
        parse([f"--{key}={below}"])
    assert f"--{key}={below} is impossible" in capsys.readouterr().err


def test_device_cuda_without_a_gpu_is_refused(monkeypatch, capsys):
    """--device=cuda where torch sees no CUDA GPU exits 2 before any work, not at the first tensor."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        parse(["--device=cuda"])
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_an_uncaught_run_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """After parse_config, an uncaught RunError (the input's fault) prints `error: ...` only; any other exception
    reaches the previous hook (the traceback)."""
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: seen.append(args))
    parse([])
    sys.excepthook(common.RunError, common.RunError("no data"), None)
    assert capsys.readouterr().err == "error: no data\n" and seen == []
    bug = ZeroDivisionError("x")
    sys.excepthook(ZeroDivisionError, bug, None)
    assert seen == [(ZeroDivisionError, bug, None)]


def test_setup_precision_compile_and_seed(tmp_path):
    """On the CPU dtype and compile "auto" mean float32 and no compile; bfloat16 and compile=TRUE (any case) are
    taken as asked; the seed seeds torch's generator (the initial weights)."""
    rt = common.setup(tiny(simclr.Config, tmp_path))
    assert (rt.dtype, rt.compile) == (torch.float32, False)
    rt = common.setup(tiny(simclr.Config, tmp_path, dtype="bfloat16", compile="TRUE", seed=7))
    drawn = torch.rand(3)
    torch.manual_seed(7)
    assert (rt.dtype, rt.compile) == (torch.bfloat16, True) and torch.equal(drawn, torch.rand(3))
    assert common.setup(tiny(simclr.Config, tmp_path, compile="false")).compile is False


def test_config_json_holds_every_setting(tmp_path):
    """out_dir/config.json is the whole Config (the run folder reproduces itself), not a part of it."""
    cfg = tiny(simclr.Config, tmp_path, seed=3)
    common.setup(cfg)
    assert json.load(open(os.path.join(cfg.out_dir, "config.json"))) == dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------- colour


def test_lab_known_colours():
    rgb = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5]], dtype=torch.float32)
    lab = common.rgb_to_lab(rgb.view(-1, 3, 1, 1)).view(-1, 3)
    expected = torch.tensor([[100, 0, 0], [0, 0, 0], [53.24, 80.09, 67.20], [87.73, -86.18, 83.18],
                             [32.30, 79.19, -107.86], [53.39, 0, 0]])  # standard sRGB/D65 values
    torch.testing.assert_close(lab, expected, atol=0.02, rtol=0)


def test_lab_round_trip_and_gamut():
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(common.lab_to_rgb(common.rgb_to_lab(x)), x, atol=1e-4, rtol=0)
    far = torch.tensor([50.0, 120.0, -120.0]).view(1, 3, 1, 1)  # out of the sRGB gamut
    assert common.lab_to_rgb(far, clamp=False).min() < 0 and common.lab_to_rgb(far).min() >= 0


# ----------------------------------------------------------------------------------- augmentation


@pytest.fixture
def images():
    torch.manual_seed(0)
    return common.to_float(common.make_synthetic(64, 32, seed=3)[0])


def test_augmentations_shapes_dtype_range(images):
    ops = [lambda x: common.random_resized_crop(x, 24), common.random_flip,
           lambda x: common.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8), lambda x: common.random_grayscale(x, 0.5),
           lambda x: common.gaussian_blur(x, 0.5), lambda x: common.solarize(x, 0.5)]
    for op in ops:
        y = op(images)
        assert y.dtype == torch.float32 and y.shape[:2] == images.shape[:2]
        assert y.min() >= -1e-6 and y.max() <= 1 + 1e-6
    assert common.random_resized_crop(images, 24).shape == (64, 3, 24, 24)
    view = simclr.simclr_view(common.make_synthetic(64, 32, seed=3)[0], simclr.Config(image_size=32))
    assert view.shape == (64, 3, 32, 32) and view.dtype == torch.float32


def test_random_resized_crop_is_per_sample(images):
    flat = torch.ones(64, 1, 32, 32) * torch.linspace(0, 1, 32)  # horizontal ramp: a crop's mean tells its position
    means = common.random_resized_crop(flat, 32).mean((1, 2, 3))
    assert means.std() > 0.05  # different crops for different images
    full = common.random_resized_crop(flat, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(full, flat, atol=1e-5, rtol=0)  # the whole image, resampled on its own grid


def test_flip_grayscale_solarize_probabilities(images):
    torch.manual_seed(1)
    flipped = (common.random_flip(images) != images).flatten(1).any(1).float().mean()
    gray = common.random_grayscale(images, 0.5)
    is_gray = (gray[:, 0] == gray[:, 1]).flatten(1).all(1).float().mean()
    assert 0.25 < flipped < 0.75 and 0.25 < is_gray < 0.75
    assert torch.equal(common.solarize(images, 0.0), images)
    torch.testing.assert_close(common.solarize(images, 1.0), torch.where(images >= 0.5, 1 - images, images))


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_color_jitter_matches_torchvision_per_image(images, op):
    """One adjustment at a time: each image equals torchvision's op with that image's own factor."""
    kwargs = {**dict(brightness=0, contrast=0, saturation=0, hue=0), op: 0.5}
    y = common.color_jitter(images, **kwargs)
    fn = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}[op]
    factors = []
    for x_i, y_i in zip(images, y):  # recover the factor by a fine search, then compare whole images
        grid = torch.linspace(0.5, 1.5, 1001)
        errors = torch.stack([(fn(x_i, float(f)) - y_i).abs().max() for f in grid[::10]])
        coarse = grid[::10][errors.argmin()]
        fine = grid[(grid - coarse).abs() <= 0.011]
        errors = torch.stack([(fn(x_i, float(f)) - y_i).abs().max() for f in fine])
        assert errors.min() < 2e-3, (op, errors.min())
        factors.append(fine[errors.argmin()])
    assert torch.stack(factors).std() > 0.1  # factors are drawn per image, over [0.5, 1.5]


def test_hue_matches_torchvision(images):
    for shift in (-0.5, -0.2, 0.1, 0.45):
        ours = common._adjust_hue(images, torch.full((64, 1, 1, 1), shift))
        torch.testing.assert_close(ours, TF.adjust_hue(images, shift), atol=1e-5, rtol=0)


def test_color_jitter_probability_and_order(images):
    assert torch.equal(common.color_jitter(images, 0.4, 0.4, 0.4, 0.1, p=0.0), images)
    changed = (common.color_jitter(images, 0.4, 0.4, 0.4, 0.1, p=1.0) - images).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.95
    # per-image random order: hue then saturation differs from saturation then hue; a batch of the
    # same image, jittered with both, must show more than one order (different results)
    same = images[:1].expand(256, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    out = common.color_jitter(same, 0, 0, 1e-6, 0.5)  # saturation ~ identity: only hue's slot varies
    assert out.flatten(1).std(0).max() > 0.05  # shifts differ per image


@pytest.mark.parametrize("masked", [False, True])  # the CPU's indexed form, CUDA's masked one
def test_color_jitter_is_torchvision_image_by_image_with_the_same_draws(images, masked):
    """The batched form equals torchvision's four functional adjustments applied image by image, in each
    image's own order, with the factors, coin and order drawn as color_jitter draws them."""
    b, c, s, h, p = 0.4, 0.4, 0.4, 0.1, 0.8
    torch.manual_seed(5)
    ours = common.color_jitter(images, b, c, s, h, p, masked=masked)
    torch.manual_seed(5)
    B = len(images)
    factors = [torch.empty(B).uniform_(1 - v, 1 + v) for v in (b, c, s)] + [torch.empty(B).uniform_(-h, h)]
    on, order = torch.rand(B) < p, torch.rand(B, 4).argsort(1)
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i, x in enumerate(images):
        for k in order[i].tolist() if on[i] else []:
            x = adjust[k](x, float(factors[k][i]))
        torch.testing.assert_close(ours[i], x, atol=2e-5, rtol=0)
    assert len(set(map(tuple, order[on].tolist()))) > 12  # many of the 24 orders occur among ~51 images


def test_gaussian_blur_per_sample_sigma(images):
    torch.manual_seed(0)
    noise = torch.rand(64, 3, 32, 32)
    y = common.gaussian_blur(noise, p=1.0, sigma=(0.1, 2.0), kernel=9)
    smoothness = (y[..., 1:] - y[..., :-1]).abs().mean((1, 2, 3))
    assert smoothness.std() > 0.01  # sigma differs per image
    assert torch.allclose(common.gaussian_blur(noise, p=0.0), noise, atol=1e-6)
    assert common.gaussian_blur(noise, p=1.0).mean().sub(noise.mean()).abs() < 1e-3  # kernels sum to 1


def test_random_flip_is_horizontal():
    """A flip mirrors left and right (dim 3), never up and down: p=1 flips every image, p=0 none."""
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(common.random_flip(x, p=1.0), x.flip(3)) and torch.equal(common.random_flip(x, p=0.0), x)


def test_random_resized_crop_falls_back_to_the_whole_image():
    """Aspect 2 at 90-100% of the area never fits in a square (the width would pass the side), in none of the
    tries: torchvision's fallback, the whole image, not a crop reaching outside it."""
    ramp = torch.ones(8, 1, 32, 32) * torch.linspace(0, 1, 32)
    out = common.random_resized_crop(ramp, 32, scale=(0.9, 1.0), ratio=(2.0, 2.0))
    torch.testing.assert_close(out, ramp, atol=1e-5, rtol=0)


def test_gaussian_blur_kernel_sizes():
    """One bright pixel spreads over exactly the kernel's taps: "side" (H // 10) | 1, 3 at 32 px and 7 at 64 px;
    "sigma" 2 ceil(3 * 2) + 1 = 13 for sigma up to 2; an int, that many."""
    for side, kernel, taps in [(32, "side", 3), (64, "side", 7), (32, "sigma", 13), (32, 5, 5)]:
        x = torch.zeros(1, 3, side, side)
        x[..., side // 2, side // 2] = 1
        y = common.gaussian_blur(x, p=1.0, sigma=(1.0, 2.0), kernel=kernel)
        assert (y[0, 0] > 0).any(0).sum() == taps == (y[0, 0] > 0).any(1).sum(), (side, kernel)


def test_color_jitter_factors_are_never_negative_for_a_strength_above_1(images):
    """A strength s > 1 draws factors in [max(0, 1 - s), 1 + s] (torchvision's range), never below 0: a negative
    factor would black an image out (brightness), invert it around its grey (contrast) or invert each pixel's
    colour around the pixel's grey (saturation). Each output must still vary with its input, the same way."""
    torch.manual_seed(0)
    image_mean, pixel_mean = (lambda x: x.mean((1, 2, 3), keepdim=True)), (lambda x: x.mean(1, keepdim=True))
    for k, centre in enumerate([image_mean, image_mean, pixel_mean]):  # brightness, contrast, saturation
        y = common.color_jitter(images, *[2.0 if i == k else 0 for i in range(3)], 0)
        assert ((y - centre(y)) * (images - centre(images))).sum((1, 2, 3)).min() > 0, k


def test_random_grayscale_is_torchvisions_luma(images):
    """p=1: every image becomes torchvision's rgb_to_grayscale (ITU-R 601 luma) in its three channels."""
    torch.testing.assert_close(common.random_grayscale(images, 1.0), TF.rgb_to_grayscale(images, 3))


def test_resize_antialiases_when_it_shrinks():
    """A 1-pixel checkerboard shrunk 3x averages to grey (antialiasing); plain bilinear would sample single
    pixels, 0s and 1s (aliasing)."""
    board = ((torch.arange(12).view(-1, 1) + torch.arange(12)) % 2).float().expand(1, 3, 12, 12)
    assert (common.resize(board, 4) - 0.5).abs().max() < 0.05


# ----------------------------------------------------------------------------------------- models


def test_resnet_cifar_stem_loads_into_torchvision():
    net, width = common.resnet("resnet18", small_images=True)
    assert width == 512 and net(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    tv = torchvision.models.resnet18()
    tv.conv1, tv.maxpool, tv.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    tv.load_state_dict(net.state_dict())  # strict: same keys, same shapes
    net.eval(), tv.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tv(x), net(x))
    tiny_net, w = common.resnet("tiny")
    assert tiny_net(torch.randn(2, 3, 32, 32)).shape == (2, w)


def test_tiny_trunk_is_four_convs_ending_at_an_eighth_of_the_side():
    """tiny (the CPU runs of tests/results_cpu.md): 3x3 convs of 16, 32, 64, 128 channels at strides 1, 2, 2, 2 with
    BN: 9 (3*16 + 16*32 + 32*64 + 64*128) + 2 (16 + 32 + 64 + 128) = 97,680 parameters; 32 px -> 4 x 4 x 128."""
    net, width = common.resnet("tiny")
    assert width == 128 and sum(p.numel() for p in net.parameters()) == 97_680
    assert net[:-2](torch.randn(2, 3, 32, 32)).shape == (2, 128, 4, 4)


# ---------------------------------------------------------------------------------- optimization


def test_cosine_schedule_values():
    lr = [common.cosine_lr(s, 100, 10, 1.0) for s in range(100)]
    assert lr[0] == 0 and lr[5] == pytest.approx(0.5) and lr[9] == pytest.approx(0.9) and lr[10] == pytest.approx(1.0)
    assert lr[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr[99] < 1e-3 and all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert common.cosine_lr(100, 100, 10, 1.0, final_lr=0.2) == pytest.approx(0.2)


def test_lars_step_values():
    w = nn.Linear(4, 3)
    with torch.no_grad():
        w.weight.copy_(torch.arange(12.0).view(3, 4) / 10), w.bias.fill_(1.0)
    w0, b0 = w.weight.detach().clone(), w.bias.detach().clone()
    opt = common.LARS(common.param_groups(w, weight_decay=0.1), lr=0.5, momentum=0.9, eta=0.001)
    g_w, g_b = torch.full((3, 4), 2.0), torch.full((3,), 3.0)
    w.weight.grad, w.bias.grad = g_w.clone(), g_b.clone()
    opt.step()
    d = g_w + 0.1 * w0  # weight decay on the weights only
    trust = 0.001 * w0.norm() / d.norm()
    torch.testing.assert_close(w.weight.detach(), w0 - 0.5 * trust * d)
    torch.testing.assert_close(w.bias.detach(), b0 - 0.5 * g_b)  # bias: no decay, no adaptation
    w.weight.grad, w.bias.grad = g_w.clone(), g_b.clone()
    opt.step()  # momentum: buf = 0.9 * buf + lr * trust * d
    w1 = w0 - 0.5 * trust * d
    d1 = g_w + 0.1 * w1
    trust1 = 0.001 * w1.norm() / d1.norm()
    torch.testing.assert_close(w.weight.detach(), w1 - (0.9 * 0.5 * trust * d + 0.5 * trust1 * d1))


def test_lars_byol_and_larc_forms_by_hand():
    """"byol" (BYOL's optimizers.py, Barlow Twins' main.py): the lr applies after the momentum buffer, so a
    new lr scales the whole buffer; "larc" (solo-learn, apex LARC): trust = eta ||w|| / (||g|| + wd ||w||)."""
    g, wd, eta, m = torch.full((3, 4), 2.0), 0.1, 0.001, 0.9
    for form in ("byol", "larc"):
        w = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            w.weight.copy_(torch.arange(12.0).view(3, 4) / 10)
        w0 = w.weight.detach().clone()
        opt = common.LARS(common.param_groups(w, wd), lr=0.5, momentum=m, eta=eta, form=form)

        def trust(p):
            d = g + wd * p
            return eta * p.norm() / (d.norm() if form == "byol" else g.norm() + wd * p.norm()), d

        w.weight.grad = g.clone()
        opt.step()
        t0, d0 = trust(w0)
        w1 = w0 - 0.5 * t0 * d0
        torch.testing.assert_close(w.weight.detach(), w1)
        common.set_lr(opt, 0.25)  # the schedule moves: the whole buffer is taken at the new lr
        w.weight.grad = g.clone()
        opt.step()
        t1, d1 = trust(w1)
        torch.testing.assert_close(w.weight.detach(), w1 - 0.25 * (m * t0 * d0 + t1 * d1))
    with pytest.raises(ValueError, match="one of simclr, byol, larc"):
        common.LARS(nn.Linear(2, 2).parameters(), lr=0.1, form="adam")


def test_lars_larc_leaves_a_weight_with_zero_gradient_undecayed():
    """apex's LARC and solo-learn decay and adapt a layer only when ||w|| and ||g|| are both nonzero: a zero
    gradient moves a weight only by its momentum. The "byol" form (BYOL, Barlow Twins) decays it all the same."""
    for form, moved in [("larc", False), ("byol", True)]:
        w = nn.Linear(4, 3, bias=False)
        w0 = w.weight.detach().clone()
        opt = common.LARS(common.param_groups(w, 0.1), lr=0.5, eta=0.02, clip=True, form=form)
        w.weight.grad = torch.zeros(3, 4)
        opt.step()
        assert torch.equal(w.weight.detach(), w0) != moved, form


def test_lars_clip_caps_the_layer_lr_at_lr():
    """clip (LARC / solo-learn): a layer's lr is min(eta * ||w|| / ||d||, lr), not lr * eta * ratio."""
    for eta, lr, capped in [(0.02, 0.5, False), (0.02, 1e-4, True)]:
        w = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            w.weight.copy_(torch.arange(12.0).view(3, 4) / 10)
        w0 = w.weight.detach().clone()
        opt = common.LARS(common.param_groups(w, weight_decay=0.0), lr=lr, eta=eta, clip=True)
        w.weight.grad = torch.full((3, 4), 2.0)
        opt.step()
        adapted = eta * w0.norm() / w.weight.grad.norm()  # 0.02 * 1.945 / 6.93 = 5.6e-3
        assert (adapted > lr) == capped
        torch.testing.assert_close(w.weight.detach(), w0 - min(adapted, lr) * w.weight.grad)


def test_ema_update():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    expected = [0.9 * pa.detach() + 0.1 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    common.ema_update(a, b, 0.9)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


def test_lars_moves_a_zero_weight_by_plain_sgd():
    """An all-zero weight (||w|| = 0: no trust ratio) steps by lr * g in every form, as the official codes'
    where(||w|| > 0, eta ||w|| / ||d||, 1): a zero-initialised layer still learns."""
    for form in ("simclr", "byol", "larc"):
        w = nn.Linear(4, 3, bias=False)
        nn.init.zeros_(w.weight)
        opt = common.LARS(common.param_groups(w, 0.1), lr=0.5, form=form)
        w.weight.grad = torch.full((3, 4), 2.0)
        opt.step()
        torch.testing.assert_close(w.weight.detach(), torch.full((3, 4), -1.0), msg=form)


# ------------------------------------------------------------------------------------- evaluation


def test_knn_and_probe_on_separable_and_random_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g)
    ytr, yte = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (500,), generator=g)
    xtr = centres[ytr] + 0.3 * torch.randn(2000, 32, generator=g)
    xte = centres[yte] + 0.3 * torch.randn(500, 32, generator=g)
    assert common.knn_accuracy(xtr, ytr, xte, yte) > 0.98
    assert common.linear_probe(xtr, ytr, xte, yte, epochs=20) > 0.98
    rtr, rte = torch.randn(2000, 32, generator=g), torch.randn(500, 32, generator=g)  # no information
    assert abs(common.knn_accuracy(rtr, ytr, rte, yte) - 0.1) < 0.06
    assert abs(common.linear_probe(rtr, ytr, rte, yte, epochs=20) - 0.1) < 0.06


def test_knn_weighting_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.1]])
    # votes: class 0: exp(cos0/T); class 1: exp(cos1/T) + exp(cos2/T), cos from the normalized query
    q = test[0] / test[0].norm()
    v0, v1 = math.exp(q @ train[0] / 0.5), math.exp(q @ train[1] / 0.5) + math.exp(q @ train[2] / 0.5)
    assert common.knn_accuracy(train, labels, test, torch.tensor([0 if v0 > v1 else 1]), k=3, temperature=0.5) == 1.0
    assert common.knn_accuracy(train, labels, test, torch.tensor([0]), k=1) == 1.0  # nearest is train[0]


def test_knn_votes_weigh_exp_cos_over_0_1_by_default():
    """Two class-1 neighbours at cosine c outvote one class-0 neighbour at cosine 1 iff 2 exp(c / 0.1) > exp(1 / 0.1),
    i.e. c > 1 - 0.1 ln 2 = 0.931: c = 0.94 wins (not at T = 0.07), c = 0.6 loses (not with votes of cos / T)."""
    for c, winner in [(0.94, 1), (0.6, 0)]:
        s = math.sqrt(1 - c * c)
        train, labels = torch.tensor([[1.0, 0.0], [c, s], [c, -s]]), torch.tensor([0, 1, 1])
        assert common.knn_accuracy(train, labels, torch.tensor([[1.0, 0.0]]), torch.tensor([winner])) == 1.0, c


def test_linear_probe_standardizes_test_features_with_the_training_statistics():
    """A test feature is scored on its own: a test set of one class (whose mean is not the training mean) is
    classified as well as a mixed one."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g)
    ytr = torch.randint(0, 10, (2000,), generator=g)
    xtr = centres[ytr] + 0.3 * torch.randn(2000, 32, generator=g)
    xte = centres[3] + 0.3 * torch.randn(100, 32, generator=g)
    assert common.linear_probe(xtr, ytr, xte, torch.full((100,), 3), epochs=20) > 0.98


def test_extract_features_trims_the_padding_of_uneven_shares(monkeypatch):
    """2 processes, 5 images: shares of 3 and 2 rows, the second padded to 3 for all_gather (simulated here in one
    process) and trimmed after: the 5 images' features in order, with their labels, as on one process."""
    x, y = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8), torch.arange(5)
    features, sent = lambda u: u.float().mean((2, 3)), []  # noqa: E731

    def all_gather(t):  # rank 1 runs first: rank 0 then receives both processes' padded shares, in rank order
        sent.append(t)
        return torch.cat(sent[::-1]) if len(sent) == 2 else torch.cat([t, t])

    monkeypatch.setattr(common, "_distributed", lambda: True)
    monkeypatch.setattr(common, "all_gather", all_gather)
    for rank in (1, 0):
        rt = common.Runtime(rank, 2, torch.device("cpu"), torch.float32, False)
        feats, labels = common.extract_features(features, common.Data("5", (x, y), (x, y), (x, y), ["a"], rt, 2, 0),
                                                "test", rt)
    assert torch.equal(feats, features(x)) and torch.equal(labels, y)


# ------------------------------------------------------------------------------------------- data


def test_synthetic_is_deterministic_and_balanced():
    x1, y1 = common.make_synthetic(1000, 32, seed=5)
    common.make_synthetic.cache_clear()
    x2, y2 = common.make_synthetic(1000, 32, seed=5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.dtype == torch.uint8 and x1.shape == (1000, 3, 32, 32)
    assert y1.bincount(minlength=10).min() > 60
    assert not torch.equal(common.make_synthetic(1000, 32, seed=6)[0], x1)


def test_missing_dataset_offline_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(common, "_download", offline)
    monkeypatch.delenv("SSL_DATA", raising=False)
    cfg = tiny(simclr.Config, tmp_path, dataset="cifar100", data_dir=str(tmp_path / "nodata"))
    os.makedirs(cfg.data_dir)
    rt = common.setup(cfg)
    with pytest.raises(common.RunError, match="--dataset=synthetic"):
        common.load_data(cfg, rt)


def test_folder_dataset_streams_fixed_size_batches(tmp_path):
    for split in ("train", "val"):
        for c in range(2):
            os.makedirs(tmp_path / "tree" / split / f"class{c}")
            for i in range(6):
                img = (torch.rand(3, 40 + 7 * i, 50) * 255).to(torch.uint8)  # sizes differ
                torchvision.io.write_png(img, str(tmp_path / "tree" / split / f"class{c}" / f"{i}.png"))
    cfg = tiny(simclr.Config, tmp_path, dataset="folder", data_dir=str(tmp_path / "tree"), batch_size=4, subset=0,
               image_size=28)
    rt = common.setup(cfg)
    data = common.load_data(cfg, rt)
    assert data.steps_per_epoch == 3 and data.classes == ["class0", "class1"]
    batches = list(data.steps(0, 4))
    assert [s for s, _, _ in batches] == [0, 1, 2, 3]
    x = batches[0][1]
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32)  # 28 * 8 / 7: room for the random crop
    seen = torch.cat([y for _, _, y in batches[:3]])
    assert sorted(seen.tolist()) == [0] * 6 + [1] * 6  # one epoch: every image once


def test_steps_resume_mid_epoch_gives_the_same_batches(tmp_path):
    cfg = tiny(simclr.Config, tmp_path, batch_size=64, subset=256)
    rt = common.setup(cfg)
    data = common.load_data(cfg, rt)
    full = [(s, x.clone(), torch.rand(3)) for s, x, _ in data.steps(0, 7)]
    part = [(s, x.clone(), torch.rand(3)) for s, x, _ in data.steps(5, 7)]
    for (s1, x1, r1), (s2, x2, r2) in zip(full[5:], part):
        assert s1 == s2 and torch.equal(x1, x2) and torch.equal(r1, r2)  # same images, same random draws
    assert not torch.equal(full[0][1], full[4][1])  # epoch 2 reshuffles


def test_steps_draw_other_random_numbers_in_each_epoch(tmp_path):
    """Data.steps seeds each step from the global step: epoch 2's augmentations are not epoch 1's again."""
    cfg = tiny(simclr.Config, tmp_path, batch_size=64, subset=128)
    data = common.load_data(cfg, common.setup(cfg))
    draws = [torch.rand(3) for _ in data.steps(0, 4)]  # 2 steps per epoch
    assert not torch.equal(draws[0], draws[2]) and not torch.equal(draws[1], draws[3])


def test_ssl_data_replaces_only_the_default_data_dir(tmp_path, monkeypatch):
    """$SSL_DATA stands in for --data_dir's default ./data; a --data_dir given explicitly wins over it."""
    x, y = np.zeros((20, 8, 8, 3), np.uint8), np.arange(20) % 10
    for folder, n in (("env", 20), ("given", 10)):
        os.makedirs(tmp_path / folder)
        np.savez(tmp_path / folder / "cifar10.npz", x_train=x[:n], y_train=y[:n], x_test=x[:5], y_test=y[:5])
    monkeypatch.setenv("SSL_DATA", str(tmp_path / "env"))
    for data_dir, n in (("./data", 20), (str(tmp_path / "given"), 10)):
        cfg = tiny(simclr.Config, tmp_path, dataset="cifar10", data_dir=data_dir, subset=0, batch_size=5)
        assert len(common.load_data(cfg, common.setup(cfg)).labels("train")) == n, data_dir


def test_stl10_pretrains_on_its_training_then_unlabeled_images(tmp_path, monkeypatch):
    """STL-10's SSL protocol: the pretraining images are the 10 labelled training images then the 20 unlabeled
    ones, all with label -1, subset=N keeping the first N of those; train keeps its labels; STL-10's class names."""
    x, y = np.random.default_rng(0).integers(0, 255, (30, 8, 8, 3), dtype=np.uint8), np.arange(30) % 10
    np.savez(tmp_path / "stl10.npz", x_train=x[:10], y_train=y[:10], x_test=x[:5], y_test=y[:5], x_unlabeled=x[10:])
    monkeypatch.delenv("SSL_DATA", raising=False)
    for subset, n in ((0, 30), (15, 15)):
        cfg = tiny(simclr.Config, tmp_path, dataset="stl10", data_dir=str(tmp_path), subset=subset, batch_size=5)
        data = common.load_data(cfg, common.setup(cfg))
        assert torch.equal(data.pretrain[0], torch.from_numpy(x[:n]).permute(0, 3, 1, 2))
        assert data.labels("pretrain").tolist() == [-1] * n and data.labels("train").tolist() == y[:10].tolist()
    assert data.classes == common.CLASS_NAMES["stl10"]


def test_class_names_come_from_the_npz_else_are_the_label_numbers(tmp_path, monkeypatch):
    """cifar100 has no names here: those the download wrote into its .npz, else "0" to the largest label."""
    x, y = np.zeros((20, 8, 8, 3), np.uint8), np.arange(20) % 4
    monkeypatch.delenv("SSL_DATA", raising=False)
    for names in (["apple", "bee", "cup", "dog"], None):
        np.savez(tmp_path / "cifar100.npz", x_train=x, y_train=y, x_test=x, y_test=y,
                 **({"classes": np.array(names)} if names else {}))
        cfg = tiny(simclr.Config, tmp_path, dataset="cifar100", data_dir=str(tmp_path), subset=0, batch_size=5)
        assert common.load_data(cfg, common.setup(cfg)).classes == (names or ["0", "1", "2", "3"])


def test_eval_batches_of_chosen_rows_keep_their_order_and_are_shared_out():
    """eval_batches(split, b, rows) yields the images `rows` (not the whole split) in that order, b at a time;
    with 2 processes each takes its contiguous share of them: 3 and 2 of 5."""
    x, y = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(-1, 3, 2, 2), torch.arange(8)
    rows = torch.tensor([6, 1, 4, 0, 3])
    for rank, want in ((0, [[6, 1], [4]]), (1, [[0, 3]])):
        rt = common.Runtime(rank, 2, torch.device("cpu"), torch.float32, False)
        data = common.Data("8", (x, y), (x, y), (x, y), ["a"], rt, 2, 0)
        got = [(xb[:, 0, 0, 0].tolist(), yb.tolist()) for xb, yb in data.eval_batches("test", 2, rows)]
        assert got == [(w, w) for w in want], rank


# ------------------------------------------------------------------------------------ bookkeeping


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    cfg = tiny(simclr.Config, tmp_path, resume=True)
    os.makedirs(cfg.out_dir)
    with open(os.path.join(cfg.out_dir, "ckpt.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(common.RunError, match="unreadable"):
        common.load_checkpoint(cfg, common.setup(cfg))
    torch.save({"model": {}}, os.path.join(cfg.out_dir, "ckpt.pt"))  # a torch file, but not one of these scripts'
    with pytest.raises(common.RunError, match="unreadable.*KeyError"):
        common.load_checkpoint(cfg, common.setup(cfg))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write that dies midway (disk full, a kill) leaves the last checkpoint whole: save_checkpoint writes a
    temporary file, then renames it."""
    rt, path = common.Runtime(0, 1, torch.device("cpu"), torch.float32, False), str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"step": 1}, rt)

    def dies(state, f):
        open(f, "wb").write(b"half a checkp")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError):
        common.save_checkpoint(path, {"step": 2}, rt)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_resume_refuses_another_seed_and_allows_more_steps(tmp_path):
    """The seed fixes the batches and draws: a run resumes only with its own; max_steps may change."""
    cfg = tiny(simclr.Config, tmp_path, resume=True)
    rt = common.setup(cfg)
    common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {"config": dataclasses.asdict(cfg), "step": 3}, rt)
    with pytest.raises(common.RunError, match="seed=0"):
        common.load_checkpoint(dataclasses.replace(cfg, seed=1), rt)
    assert common.load_checkpoint(dataclasses.replace(cfg, max_steps=9), rt)["step"] == 3


def test_load_checkpoint_is_none_without_resume_or_before_the_first_checkpoint(tmp_path, capsys):
    """--resume before any checkpoint: None and a note (the run starts from scratch); without --resume: None
    even with a checkpoint there."""
    cfg = tiny(simclr.Config, tmp_path, resume=True)
    rt = common.setup(cfg)
    assert common.load_checkpoint(cfg, rt) is None and "resume: no checkpoint at" in capsys.readouterr().out
    common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {"config": dataclasses.asdict(cfg), "step": 3}, rt)
    assert common.load_checkpoint(dataclasses.replace(cfg, resume=False), rt) is None


def test_write_results_on_the_cpu_writes_exactly_the_results(tmp_path):
    """results.json holds the results as given, None as null, and no GPU memory entry on the CPU."""
    cfg = tiny(simclr.Config, tmp_path)
    results = {"knn_top1": 0.5, "probe_top1": None, "steps": 3}
    common.write_results(dict(results), cfg, common.setup(cfg))
    assert json.load(open(os.path.join(cfg.out_dir, "results.json"))) == results


def test_save_image_grid(tmp_path):
    rows = [torch.rand(5, 3, 16, 16), torch.zeros(5, 3, 16, 16)]
    common.save_image_grid(rows, str(tmp_path / "g.png"))
    img = torchvision.io.read_image(str(tmp_path / "g.png"))
    assert img.shape == (3, 2 * 18 + 2, 5 * 18 + 2)


def test_gather_and_reduce_are_identity_on_one_process():
    x = torch.randn(4, 3, requires_grad=True)
    assert common.gather_with_grad(x) is x and common.all_reduce_sum(x) is x


def test_logger_gather_and_linear_eval_across_two_processes(dist_scripts):
    """tests/dist_common.py: a clock-only progress line holds no collective and a NaN stops both processes at
    the same step, naming the earliest; gather_with_grad's backward leaves a shared gradient alone; linear_eval
    trains the same classifier on both processes."""
    out = dist_scripts("dist_common.py")
    assert out.count("stopped after step 15") == 2 and out.count("shared gradient untouched") == 2, out
    assert out.count("the same on both") == 2, out


def test_config_and_source_copied_to_out_dir(tmp_path):
    cfg = tiny(simclr.Config, tmp_path)
    common.setup(cfg)
    assert json.load(open(os.path.join(cfg.out_dir, "config.json")))["arch"] == "tiny"
    assert os.path.exists(os.path.join(cfg.out_dir, "simclr.py"))


def test_npz_format_round_trip(tmp_path, monkeypatch):
    """A <dataset>.npz in data_dir is read through the same path downloads write."""
    x = np.random.default_rng(0).integers(0, 255, (100, 32, 32, 3), dtype=np.uint8)
    y = np.arange(100) % 10
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    monkeypatch.delenv("SSL_DATA", raising=False)
    cfg = tiny(simclr.Config, tmp_path, dataset="cifar10", data_dir=str(tmp_path), subset=0, batch_size=10)
    data = common.load_data(cfg, common.setup(cfg))
    assert torch.equal(data.train[0][3], torch.from_numpy(x[3]).permute(2, 0, 1))
    assert data.steps_per_epoch == 10 and data.classes[0] == "airplane"


def test_read_image_in_a_fresh_process(tmp_path):
    """common alone must import what read_image needs (an earlier bug hid behind the tests' imports)."""
    torchvision.io.write_png((torch.rand(3, 40, 50) * 255).to(torch.uint8), str(tmp_path / "x.png"))
    png = str(tmp_path / "x.png")
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import common; "
            f"print(tuple(common.read_image({png!r}, 32).shape))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stdout.strip() == "(3, 32, 32)", p.stderr
