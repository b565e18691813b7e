"""inpainting.py: the two recipes' defaults, masks and the hole-in-region geometry of the official code,
losses against hand computation, the lr rule, the alternating D / F steps (only with the adversarial
loss), the model's pieces, and the training loop's contract on CPU in both recipes."""

import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from conftest import (assert_nan_stops_the_run, assert_resumes_exactly, assert_smoke_run, few_test_images, load_ckpt,
                      read_log, tiny)

import common
import inpainting

SMALL_D = dict(d_width=16)  # a narrower discriminator than DCGAN's 64 keeps the CPU runs short
JOINT = dict(mask="center", overlap=1, adv_weight=0.001, **SMALL_D)  # the inpainting recipe: central hole, L2 + adv.


def test_defaults_are_the_feature_recipe():
    """Paper Sec. 3.3: random regions for every feature experiment; Sec. 5.2 and the official README: the
    features come from the reconstruction loss alone. The inpainting recipe stays a flag away."""
    cfg = inpainting.Config()
    assert cfg.mask == "regions" and cfg.adv_weight == 0
    assert cfg.overlap == 0  # train_random.lua's README command: useOverlapPred=0
    assert {"center", "regions"} == set(inpainting.MASKS)
    joint = inpainting.Config(**JOINT)  # train.lua's README command: overlapPred=4 at 128 px, wtl2=0.999
    assert joint.mask == "center" and joint.overlap == 1 and joint.adv_weight == 0.001


def test_defaults_are_the_official_recipe_scaled_to_32_px():
    """The docstring's table: train.lua's DCGAN settings (batch 64, Adam beta1 0.5, D's first conv 64 wide as ndf,
    500 epochs as niter, no weight decay) and band weight 10, on 32 px images with crops of 50-100% of the area."""
    cfg = inpainting.Config()
    assert (cfg.batch_size, cfg.beta1, cfg.d_width, cfg.epochs, cfg.weight_decay) == (64, 0.5, 64, 500, 0.0)
    assert (cfg.overlap_weight, cfg.image_size, cfg.crop_min) == (10.0, 32, 0.5)


# ------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("kind", inpainting.MASKS)
def test_predicted_regions_cover_exactly_a_quarter(kind, size):
    torch.manual_seed(0)
    m = inpainting.predicted_region(kind, 16, size)
    assert m.shape == (16, 1, size, size) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert (m.sum((1, 2, 3)) == size * size // 4).all()  # the stated area, exactly, in every image
    if kind == "center":
        q = size // 4
        assert m[:, :, q:size - q, q:size - q].all()  # the central (size/2)^2 square and nothing else
    else:
        assert len({tuple(r.flatten().tolist()) for r in m}) == 16  # every image draws its own region
        # blobs, not scattered pixels: few 4-neighbours differ (scattered: 2 * 0.25 * 0.75)
        changes = ((m[..., 1:, :] != m[..., :-1, :]).float().mean() + (m[..., 1:] != m[..., :-1]).float().mean()) / 2
        assert changes < 0.15, changes


def test_random_regions_repeat_with_a_seeded_generator():
    a = inpainting.random_regions(4, 32, generator=torch.Generator().manual_seed(3))
    b = inpainting.random_regions(4, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_hole_is_the_central_region_less_the_overlap_band_as_train_lua():
    """train.lua at fineSize 128, overlapPred 4: it predicts the central 64 px (rows 1 + 32 .. 64 + 32,
    1-based) and fills rows 1 + 32 + 4 .. 64 + 32 - 4 with the mean: a 56 px hole; scaled to 32 px, 14 of 16."""
    for size, overlap, lo, side in [(128, 4, 36, 56), (32, 1, 9, 14)]:
        region = inpainting.central_region(1, size)
        hole = inpainting.hole_in(region, overlap)
        expected = torch.zeros(1, 1, size, size)
        expected[..., lo:lo + side, lo:lo + side] = 1
        assert torch.equal(hole, expected)
        assert region.sum() == (size // 2) ** 2 and (hole <= region).all()
    assert torch.equal(inpainting.hole_in(region, 0), region)  # no band: the hole is the region


@pytest.mark.parametrize("overlap", [1, 2])
def test_hole_in_random_regions_keeps_a_band_of_overlap_px(overlap):
    """Every hole pixel's (2o+1)^2 neighbourhood lies in the region (pixels beyond the image's edge count as
    region); every band pixel has context within o px."""
    torch.manual_seed(0)
    region = inpainting.random_regions(8, 32)
    hole = inpainting.hole_in(region, overlap)
    k = 2 * overlap + 1
    context_near = F.max_pool2d(1 - region, k, stride=1, padding=overlap)  # 1 where context lies within o px
    assert torch.equal(hole, region * (1 - context_near))
    assert 0 < hole.sum() < region.sum()


def test_masked_input_has_the_fill_colour_in_the_hole_only():
    img, fill = torch.rand(2, 3, 32, 32), torch.tensor([0.1, 0.2, 0.3])
    hole = inpainting.hole_in(inpainting.random_regions(2, 32), 1)
    out = inpainting.mask_image(img, hole, fill)
    assert torch.equal(out * (1 - hole), img * (1 - hole))
    assert torch.equal(out * hole, fill.view(1, 3, 1, 1) * hole)


def test_training_step_removes_the_hole_and_weighs_the_region_as_train_lua(tmp_path, monkeypatch):
    """Inside train(), central mask at 32 px, 1 px overlap: F's input lacks the central 14 px only (the band
    around it shows the image), and the loss weighs squared errors 1 in those 14 px and 10 in the band of
    the 16 px region, divided by 3 * 16^2 per image (train.lua: MSE over the 64 px patch)."""
    inputs, losses = [], []

    class RecordedF(inpainting.ContextEncoder):
        def forward(self, x):
            if self.training:
                inputs.append(x.detach().clone())
            return super().forward(x)

    real_loss = inpainting.reconstruction_loss

    def recorded_loss(pred, target, *args):
        out = real_loss(pred, target, *args)
        losses.append((pred.detach().clone(), target.clone(), out.detach()))
        return out

    monkeypatch.setattr(inpainting, "ContextEncoder", RecordedF)
    monkeypatch.setattr(inpainting, "reconstruction_loss", recorded_loss)
    inpainting.train(tiny(inpainting.Config, tmp_path, mask="center", overlap=1, max_steps=1, probe_epochs=0))
    (x,), ((pred, target, loss),) = inputs, losses
    img = common.normalize((target + 1) / 2)  # the un-masked view F's input was made from, standardized
    hole = torch.zeros(1, 1, 32, 32)
    hole[..., 9:23, 9:23] = 1
    torch.testing.assert_close(x * (1 - hole), img * (1 - hole))  # all but the 14 px hole is the image
    inside = x[..., 9:23, 9:23].flatten(2)  # (B, 3, 196): one colour, the fill, not the image
    assert torch.equal(inside, inside[..., :1].expand_as(inside))
    assert not torch.allclose(inside, img[..., 9:23, 9:23].flatten(2))
    region = torch.zeros(1, 1, 32, 32)
    region[..., 8:24, 8:24] = 1
    err = (pred - target).square()
    expected = ((err * hole).sum((1, 2, 3)) + 10 * (err * (region - hole)).sum((1, 2, 3))) / (3 * 16 * 16)
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)


# ------------------------------------------------------------------------------------------- loss


def test_reconstruction_loss_hand_computed():
    region = inpainting.central_region(1, 8)  # rows/cols 2..5: 16 px; with a 1 px band the hole is 3..4: 4 px
    hole = inpainting.hole_in(region, 1)
    assert hole.sum() == 4
    target = torch.zeros(1, 3, 8, 8)
    pred = target.clone()
    pred[:, :, 3:5, 3:5] = 0.5  # error 0.5 on the 4 hole pixels, 3 channels
    pred[0, 0, 2, 2] = 0.2  # one band pixel, one channel: weight 10
    pred[0, 1, 0, 0] = 9.0  # context outside the region: weight 0
    expected = (4 * 3 * 0.25 + 10 * 0.2**2) / (3 * 16)
    assert inpainting.reconstruction_loss(pred, target, hole, region, 10.0).item() == pytest.approx(expected, rel=1e-6)
    assert inpainting.reconstruction_loss(pred, target, region, region, 10.0).item() == pytest.approx(
        (4 * 3 * 0.25 + 0.2**2) / (3 * 16), rel=1e-6)  # no band: every region pixel weighs 1


@pytest.mark.parametrize("kind", inpainting.MASKS)
def test_reconstruction_loss_sees_the_region_only(kind):
    torch.manual_seed(0)
    region = inpainting.predicted_region(kind, 4, 32)
    hole = inpainting.hole_in(region, 1)
    target = torch.rand(4, 3, 32, 32) * 2 - 1
    outside = 100 * torch.randn(4, 3, 32, 32) * (1 - region)  # anything at all outside the region
    loss = lambda p: inpainting.reconstruction_loss(p, target, hole, region, 10.0)  # noqa: E731
    assert loss(target + outside).item() == 0  # prediction = target inside the region: zero
    noisy = target + 0.3 * torch.randn_like(target)
    assert loss(noisy).item() > 0 and loss(noisy * region + outside).item() == loss(noisy).item()
    # per-image normalisation: the batch loss is the mean of the images' losses (same at any process count)
    each = [inpainting.reconstruction_loss(noisy[i:i + 1], target[i:i + 1], hole[i:i + 1], region[i:i + 1], 10.0)
            for i in range(4)]
    torch.testing.assert_close(loss(noisy), torch.stack(each).mean())


def test_band_weighs_ten_times_the_hole():
    region = inpainting.central_region(1, 32)
    hole = inpainting.hole_in(region, 2)
    band = region - hole
    assert band.sum() == 16**2 - 12**2  # a 2 px band inside the 16 px region
    target = torch.zeros(1, 3, 32, 32)
    in_band = inpainting.reconstruction_loss(target + band, target, hole, region, 10.0)  # error 1 on the band
    in_hole = inpainting.reconstruction_loss(target + hole, target, hole, region, 10.0)  # error 1 in the hole
    assert in_band.item() == pytest.approx(10 * in_hole.item() * band.sum().item() / hole.sum().item(), rel=1e-6)


def test_hole_mse_is_a_mean_over_the_holes_pixels_and_channels(tmp_path):
    """Flat test images of one colour c: F's output 0 (grey 0.5) scores mean over channels of (0.5 - c)^2, the fill
    f scores mean of (f - c)^2, whatever the holes: sums over the holes divided by 3 values per hole pixel."""
    rt = common.Runtime(0, 1, torch.device("cpu"), torch.float32, False)
    x = torch.tensor([51, 153, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(8, 3, 32, 32).contiguous()
    y = torch.zeros(8, dtype=torch.long)
    data = common.Data("flat", (x, y), (x, y), (x, y), ["0"], rt, 8, 0)

    class Zero(nn.Module):
        def forward(self, masked):
            return torch.zeros_like(masked)

    c, fill = torch.tensor([0.2, 0.6, 1.0]), torch.tensor([0.1, 0.2, 0.3])
    got = inpainting.hole_mse(Zero(), data, fill, tiny(inpainting.Config, tmp_path), rt)
    assert got["hole_mse"] == pytest.approx(((0.5 - c) ** 2).mean().item(), rel=1e-5)
    assert got["hole_mse_mean_fill"] == pytest.approx(((fill - c) ** 2).mean().item(), rel=1e-5)


def test_gan_losses_hand_computed_and_stable():
    z = torch.zeros(5)
    assert inpainting.discriminator_loss(z, z).item() == pytest.approx(2 * math.log(2), rel=1e-6)
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731  -log sigmoid(-v)
    expected_d = (softplus(-2.0) + softplus(1.0)) / 2 + (softplus(0.5) + softplus(-3.0)) / 2
    assert inpainting.discriminator_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert inpainting.adversarial_loss(fake).item() == pytest.approx((softplus(-0.5) + softplus(3.0)) / 2, rel=1e-6)
    # far-off logits: finite, no log(0)
    assert inpainting.adversarial_loss(torch.tensor([-200.0])).item() == pytest.approx(200.0)
    assert inpainting.discriminator_loss(torch.tensor([200.0]), torch.tensor([-200.0])).item() < 1e-6
    bf16 = torch.tensor([1.0], dtype=torch.bfloat16)
    assert inpainting.discriminator_loss(bf16, bf16).dtype == inpainting.adversarial_loss(bf16).dtype == torch.float32


# ------------------------------------------------------------------------------------------ model


def test_channelwise_fc_is_one_linear_map_per_channel():
    torch.manual_seed(0)
    layer = inpainting.ChannelwiseFC(5, 3)
    h = torch.randn(2, 5, 3, 3)
    out = layer(h)
    for c in range(5):
        torch.testing.assert_close(out[:, c].flatten(1), h[:, c].flatten(1) @ layer.weight[c])


@pytest.mark.parametrize("arch,size", [("tiny", 32), ("resnet18", 32), ("resnet18", 96)])
def test_decoder_paints_the_whole_image_from_the_evaluated_trunk(arch, size):
    torch.manual_seed(0)
    model = inpainting.ContextEncoder(arch, size <= 64, size).eval()
    x = torch.randn(2, 3, size, size)
    pred = model(x)
    assert pred.shape == (2, 3, size, size) and pred.abs().max() <= 1
    # the decoder reads the map whose average pool is the evaluated feature
    torch.testing.assert_close(inpainting.feature_map(model.backbone, x).mean((2, 3)), model.backbone(x))
    assert inpainting.Discriminator(size, 8)(pred).shape == (2,)


@pytest.mark.parametrize("arch,size,widths", [("tiny", 32, [64, 32, 16, 16]), ("resnet18", 32, [256, 128, 64, 32]),
                                              ("resnet50", 224, [512, 256, 128, 64, 32, 16])])
def test_decoder_widths_halve_from_half_the_trunk_width(arch, size, widths):
    """The 1x1 conv's width, then each up-convolution's: one up-convolution per halving of the side in the trunk."""
    model = inpainting.ContextEncoder(arch, size <= 64, size)
    convs = [m for m in model.decoder if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [m.out_channels for m in convs[:-1]] == widths and convs[-1].out_channels == 3
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in convs) == len(widths) - 1


# -------------------------------------------------------------------------------------- training


def run_recorded(tmp_path, **overrides):
    """One assert_smoke_run (2 epochs of 8 steps, kNN monitor after each), with a hook on every optimizer
    step that notes whose optimizer stepped (D's, F's or another, e.g. the linear evaluation's), its lr,
    and the parameters of both networks after it. -> (cfg, results, events, nets)."""
    nets, events = {}, []  # events: (None for the start | "D" | "F", lr, {"D": [params], "F": [params]})

    class RecordedF(inpainting.ContextEncoder):
        def __init__(self, *args):
            super().__init__(*args)
            nets["F"] = self

    class RecordedD(inpainting.Discriminator):
        def __init__(self, *args):
            super().__init__(*args)
            nets["D"] = self

    def snap():
        return {k: [p.detach().clone() for p in net.parameters()] for k, net in nets.items()}

    def owner(opt):
        mine = {id(p) for g in opt.param_groups for p in g["params"]}
        return next((k for k, net in nets.items() if {id(p) for p in net.parameters()} == mine), "other")

    def pre(opt, args, kwargs):
        if not events and owner(opt) != "other":
            events.append((None, None, snap()))

    def post(opt, args, kwargs):
        if owner(opt) != "other":
            events.append((owner(opt), opt.param_groups[0]["lr"], snap()))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inpainting, "ContextEncoder", RecordedF)
        mp.setattr(inpainting, "Discriminator", RecordedD)
        handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]  # every optimizer
        try:
            cfg, results = assert_smoke_run(inpainting, tmp_path, extra_keys=("hole_mse", "hole_mse_mean_fill"),
                                            **overrides)
        finally:
            for h in handles:
                h.remove()
    return cfg, results, events, nets


@pytest.fixture(scope="module")
def smoke_features(tmp_path_factory):
    return run_recorded(tmp_path_factory.mktemp("features"), **SMALL_D)


@pytest.fixture(scope="module")
def smoke_joint(tmp_path_factory):
    return run_recorded(tmp_path_factory.mktemp("joint"), **JOINT)


def test_default_run_builds_and_steps_no_discriminator(smoke_features):
    """L2 alone: no D is built, only F's optimizer steps (no wasted compute), every step moves all of F."""
    _, results, events, nets = smoke_features
    assert "D" not in nets
    assert [who for who, _, _ in events] == [None] + ["F"] * results["steps"]
    for (_, _, before), (_, _, after) in zip(events, events[1:]):
        assert all(not torch.equal(a, b) for a, b in zip(before["F"], after["F"])), "F's step missed parameters"


def test_joint_run_steps_d_then_f_each_moving_only_its_own_network(smoke_joint):
    """Inside train(): between consecutive optimizer steps, D's step changes every parameter of D and
    none of F (encoder + decoder), and F's step every parameter of F and none of D."""
    _, results, events, _ = smoke_joint
    assert [who for who, _, _ in events] == [None] + ["D", "F"] * results["steps"]  # D first, then F, every step
    for (_, _, before), (who, _, after) in zip(events, events[1:]):
        other = "F" if who == "D" else "D"
        assert all(not torch.equal(a, b) for a, b in zip(before[who], after[who])), f"{who}'s step missed parameters"
        assert all(torch.equal(a, b) for a, b in zip(before[other], after[other])), f"{who}'s step moved {other}"


def test_logged_loss_is_the_weighted_sum_of_l2_and_adversarial(smoke_features, smoke_joint):
    """The joint loss (paper Sec. 3.2; official wtl2 = 0.999): every step's loss is (1 - adv_weight) rec +
    adv_weight adv, here 0.999 rec + 0.001 adv; with L2 alone it is rec."""
    for (cfg, _, _, _), weight in [(smoke_joint, 0.001), (smoke_features, 0.0)]:
        steps = read_log(cfg, steps=True)
        assert len(steps) > 3 and cfg.adv_weight == weight
        for r in steps:
            assert r["loss"] == pytest.approx((1 - weight) * r["rec"] + weight * r.get("adv", 0.0), rel=1e-6)


def test_discriminator_sees_the_region_only(tmp_path, monkeypatch):
    """D's input is never the context (paper Sec. 3.2): real and painted images times the region, 0 outside the
    central 16 px, in D's step (real, painted) and in F's adversarial term (painted)."""
    inputs = []

    class RecordedD(inpainting.Discriminator):
        def forward(self, x):
            inputs.append(x.detach().clone())
            return super().forward(x)

    monkeypatch.setattr(inpainting, "Discriminator", RecordedD)
    inpainting.train(tiny(inpainting.Config, tmp_path, max_steps=1, probe_epochs=0, **JOINT))
    region = inpainting.central_region(1, 32)
    assert len(inputs) == 3 and all((x * (1 - region) == 0).all() and (x * region != 0).any() for x in inputs)


def test_adversarial_term_alone_moves_f(tmp_path, monkeypatch):
    """adv_weight=1 (no L2): F learns only from -log D(F(x)), so the gradient must reach F through D; F's step
    then moves every parameter of F (Adam leaves a parameter with a zero gradient where it is)."""
    nets = []

    class RecordedF(inpainting.ContextEncoder):
        def __init__(self, *args):
            super().__init__(*args)
            nets.append((self, [p.detach().clone() for p in self.parameters()]))

    monkeypatch.setattr(inpainting, "ContextEncoder", RecordedF)
    inpainting.train(tiny(inpainting.Config, tmp_path, max_steps=1, probe_epochs=0, **{**JOINT, "adv_weight": 1.0}))
    (net, before), = nets
    assert all(not torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_f_lr_is_ten_times_d_lr_under_the_joint_loss_only(smoke_features, smoke_joint, tmp_path):
    """train.lua: the generator's Adam lr is 10x the base lr (D's) when 0 < wtl2 < 1, i.e. under the joint
    loss; otherwise it is the base lr. The base lr is DCGAN's 2e-4; both follow the same schedule."""
    assert inpainting.Config().lr == 2e-4
    f_lrs = [lr for who, lr, _ in smoke_features[2] if who == "F"]
    assert f_lrs[0] == pytest.approx(2e-4)  # L2 alone: F at the base lr
    joint = smoke_joint[2][1:]
    d_lrs, f_lrs = [lr for who, lr, _ in joint if who == "D"], [lr for who, lr, _ in joint if who == "F"]
    assert d_lrs[0] == pytest.approx(2e-4) and f_lrs[0] == pytest.approx(2e-3)
    assert all(f == pytest.approx(10 * d) for f, d in zip(f_lrs, d_lrs))  # the same cosine schedule, 10x apart
    assert f_lrs[-1] < f_lrs[0]
    _, _, events, _ = run_recorded(tmp_path, adv_weight=1.0, **SMALL_D)  # the adversarial loss alone: 1x, as train.lua
    assert [lr for who, lr, _ in events[1:3]] == pytest.approx([2e-4, 2e-4])


@pytest.mark.parametrize("recipe", ["features", "joint"])
def test_smoke_run_writes_log_ckpt_results_and_pictures(recipe, smoke_features, smoke_joint):
    cfg, results, _, _ = smoke_features if recipe == "features" else smoke_joint
    assert results["steps"] == 16 and 0 < results["hole_mse"] and 0 < results["hole_mse_mean_fill"] < 1
    log = read_log(cfg)
    steps = [r for r in log if "loss" in r]
    ckpt = set(load_ckpt(cfg))
    if recipe == "joint":  # both players logged and saved
        assert all({"rec", "adv", "d_loss"} <= set(r) for r in steps) and {"model", "disc", "opt", "opt_d"} <= ckpt
    else:
        assert all("rec" in r and not {"adv", "d_loss"} & set(r) for r in steps)
        assert {"model", "opt"} <= ckpt and not {"disc", "opt_d"} & ckpt
    x_test = common.make_synthetic(2_000, 32, seed=1)[0]
    hole = inpainting.eval_hole(8, cfg, torch.Generator().manual_seed(cfg.seed))[0, 0].bool()  # image 0's hole
    for name in ("inpainting_epoch0001.png", "inpainting.png"):  # at the kNN monitor and at the end
        png = torchvision.io.read_image(os.path.join(cfg.out_dir, name))
        assert png.shape == (3, 3 * 34 + 2, 8 * 34 + 2)  # 3 rows (masked, prediction, truth) x 8 images, 2 px padding
        masked, truth = png[:, 2:34, 2:34], png[:, 2 + 68:34 + 68, 2:34]  # first column: test image 0
        assert torch.equal(truth, x_test[0])
        assert masked[:, hole].unique(dim=1).shape[1] == 1  # the hole is one colour (the mean)
        assert torch.equal(masked[:, ~hole], truth[:, ~hole])  # the rest is the image


def test_features_see_the_images_at_the_training_side(tmp_path, monkeypatch):
    """features(x) takes uint8 images at the dataset's side (here 32 px) and resizes them to image_size (64),
    the scale the trunk was trained at, as rotnet.py and context_pred.py do."""
    seen = []
    real_evaluate = common.evaluate

    def evaluate(model, features, *args, **kwargs):
        seen.append((model, features))
        return real_evaluate(model, features, *args, **kwargs)

    monkeypatch.setattr(common, "evaluate", evaluate)
    with few_test_images():
        inpainting.train(tiny(inpainting.Config, tmp_path, image_size=64, subset=64, max_steps=1, probe_epochs=0))
    (model, features), = seen
    x = common.make_synthetic(4, 32, seed=5)[0]  # (4, 3, 32, 32) uint8
    at_64 = F.interpolate(x.float() / 255, size=(64, 64), mode="bilinear", antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(features(x), model.backbone(common.normalize(at_64)))


def test_resume_is_exact_in_both_recipes(tmp_path):
    assert_resumes_exactly(inpainting, tmp_path / "features", **SMALL_D)
    assert not {"disc", "opt_d"} & set(load_ckpt(tiny(inpainting.Config, tmp_path / "features" / "b")))
    assert_resumes_exactly(inpainting, tmp_path / "joint", **JOINT)
    assert {"disc", "opt_d"} <= set(load_ckpt(tiny(inpainting.Config, tmp_path / "joint" / "b")))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(inpainting, "reconstruction_loss", monkeypatch, tmp_path, **SMALL_D)


@pytest.mark.parametrize("key,value", [("mask", "blocks"), ("image_size", 48), ("overlap", 8), ("adv_weight", -1.0),
                                       ("adv_weight", 1.5), ("beta1", 1.0), ("lr", 0.0)])
def test_config_refuses_impossible_values(key, value):
    with pytest.raises(ValueError, match=f"--{key}"):
        inpainting.Config(**{key: value})


def test_png_pastes_the_prediction_into_the_hole_only(tmp_path):
    """The PNG's middle row (save_inpaintings): F's prediction pasted into the hole, the image elsewhere. An F that
    paints black everywhere leaves a black hole in an otherwise untouched image."""
    cfg = tiny(inpainting.Config, tmp_path, mask="center")
    rt = common.setup(cfg)

    class Black(nn.Module):
        def forward(self, x):
            return -torch.ones_like(x)  # tanh's -1: pixel value 0

    x = common.make_synthetic(8, 32, seed=1)[0]
    inpainting.save_inpaintings(Black(), x, torch.full((3,), 0.5), cfg, rt, "p.png")
    png = torchvision.io.read_image(os.path.join(cfg.out_dir, "p.png"))
    pasted, truth = png[:, 36:68, 2:34], png[:, 70:102, 2:34]  # test image 0: rows 2 and 3 of the first column
    hole = inpainting.central_region(1, 32)[0, 0].bool()
    assert (pasted[:, hole] == 0).all() and torch.equal(pasted[:, ~hole], truth[:, ~hole])


def test_two_processes_equal_one_process_on_the_global_batch(dist_scripts):
    """Both DDP-wrapped networks: D (called twice before its backward) and F get the one-process gradients."""
    out = dist_scripts("dist_inpainting_step.py")
    assert out.count("max grad diff") == 2, out
