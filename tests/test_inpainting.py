"""inpainting.py: masks, losses against hand computation, the alternating D / F steps, the model's
pieces, and the training loop's contract on CPU."""

import json
import math
import os

import pytest
import torch
import torchvision
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from conftest import assert_nan_stops_the_run, assert_resumes_exactly, assert_smoke_run, load_ckpt, tiny, torchrun

import common
import inpainting

SMALL_D = dict(d_width=16)  # a narrower discriminator than DCGAN's 64 keeps the CPU runs short

# ------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("kind", inpainting.MASKS)
def test_masks_remove_exactly_a_quarter(kind, size):
    torch.manual_seed(0)
    m = inpainting.random_mask(16, size, kind)
    assert m.shape == (16, 1, size, size) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert (m.sum((1, 2, 3)) == size * size // 4).all()  # the stated area, exactly, in every image
    if kind == "center":
        q = size // 4
        assert m[:, :, q:size - q, q:size - q].all()  # the central (size/2)^2 square and nothing else
    else:
        assert len({tuple(r.flatten().tolist()) for r in m}) == 16  # every image draws its own mask
    if kind == "blocks":  # unions of whole (size/4)^2 cells: every row and column crosses whole cells
        cell = size // 4
        assert (m.sum(3) % cell == 0).all() and (m.sum(2) % cell == 0).all()
    if kind == "regions":  # blobs, not scattered pixels: few 4-neighbours differ (scattered: 2 * 0.25 * 0.75)
        changes = ((m[..., 1:, :] != m[..., :-1, :]).float().mean() + (m[..., 1:] != m[..., :-1]).float().mean()) / 2
        assert changes < 0.15, changes


def test_masks_repeat_with_a_seeded_generator():
    a = inpainting.random_mask(4, 32, "regions", generator=torch.Generator().manual_seed(3))
    b = inpainting.random_mask(4, 32, "regions", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_masked_input_has_the_fill_colour_in_the_hole_only():
    img, fill = torch.rand(2, 3, 32, 32), torch.tensor([0.1, 0.2, 0.3])
    hole = inpainting.random_mask(2, 32, "blocks")
    out = inpainting.mask_image(img, hole, fill)
    assert torch.equal(out * (1 - hole), img * (1 - hole))
    assert torch.equal(out * hole, fill.view(1, 3, 1, 1) * hole)


# ------------------------------------------------------------------------------------------- loss


def test_reconstruction_loss_hand_computed():
    hole = inpainting.random_mask(1, 8, "center")  # rows/cols 2..5; with a 1 px band the region is 1..6: 36 px
    target = torch.zeros(1, 3, 8, 8)
    pred = target.clone()
    pred[:, :, 2:6, 2:6] = 0.5  # error 0.5 on all 16 hole pixels, 3 channels
    pred[0, 0, 1, 1] = 0.2  # one band pixel, one channel: weight 10
    pred[0, 1, 0, 0] = 9.0  # context outside the band: weight 0
    expected = (16 * 3 * 0.25 + 10 * 0.2**2) / (3 * 36)
    assert inpainting.reconstruction_loss(pred, target, hole, 1, 10.0).item() == pytest.approx(expected, rel=1e-6)
    assert inpainting.reconstruction_loss(pred, target, hole, 0, 10.0).item() == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("kind", inpainting.MASKS)
def test_reconstruction_loss_sees_the_hole_and_band_only(kind):
    torch.manual_seed(0)
    hole = inpainting.random_mask(4, 32, kind)
    region = inpainting.predicted_region(hole, 1)
    target = torch.rand(4, 3, 32, 32) * 2 - 1
    outside = 100 * torch.randn(4, 3, 32, 32) * (1 - region)  # anything at all outside hole and band
    loss = lambda p: inpainting.reconstruction_loss(p, target, hole, 1, 10.0)  # noqa: E731
    assert loss(target + outside).item() == 0  # prediction = target inside the mask and its band: zero
    assert inpainting.reconstruction_loss(target + 100 * (1 - hole), target, hole, 0, 10.0).item() == 0  # no band
    noisy = target + 0.3 * torch.randn_like(target)
    assert loss(noisy).item() > 0 and loss(noisy * region + outside).item() == loss(noisy).item()
    # per-image normalisation: the batch loss is the mean of the images' losses (same at any process count)
    each = [inpainting.reconstruction_loss(noisy[i:i + 1], target[i:i + 1], hole[i:i + 1], 1, 10.0) for i in range(4)]
    torch.testing.assert_close(loss(noisy), torch.stack(each).mean())


def test_band_weighs_ten_times_the_hole():
    hole = inpainting.random_mask(1, 32, "center")
    region = inpainting.predicted_region(hole, 2)
    band = region - hole
    assert band.sum() == 20**2 - 16**2  # a 2 px band around the 16 px hole
    target = torch.zeros(1, 3, 32, 32)
    in_band = inpainting.reconstruction_loss(target + band, target, hole, 2, 10.0)  # error 1 on every band pixel
    in_hole = inpainting.reconstruction_loss(target + hole, target, hole, 2, 10.0)  # error 1 on every hole pixel
    assert in_band.item() == pytest.approx(10 * in_hole.item() * band.sum().item() / hole.sum().item(), rel=1e-6)


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


# -------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One assert_smoke_run (2 epochs of 8 steps, kNN monitor after the first), with a hook on every
    optimizer step that notes whose optimizer stepped (D's, F's or another, e.g. the linear probe's)
    and snapshots the parameters of both networks after it. -> (cfg, results, events)."""
    nets, events = {}, []  # events: (None for the start | "D" | "F", {"D": [params], "F": [params]})

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
            events.append((None, snap()))

    def post(opt, args, kwargs):
        if owner(opt) != "other":
            events.append((owner(opt), snap()))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inpainting, "ContextEncoder", RecordedF)
        mp.setattr(inpainting, "Discriminator", RecordedD)
        handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]  # every optimizer
        try:
            cfg, results = assert_smoke_run(inpainting, tmp_path_factory.mktemp("smoke"),
                                           extra_keys=("hole_mse", "hole_mse_mean_fill"), **SMALL_D)
        finally:
            for h in handles:
                h.remove()
    return cfg, results, events


def test_each_optimizer_step_moves_only_its_own_network(smoke):
    """Inside train(): between consecutive optimizer steps, D's step changes every parameter of D and
    none of F (encoder + decoder), and F's step every parameter of F and none of D."""
    _, results, events = smoke
    assert [who for who, _ in events] == [None] + ["D", "F"] * results["steps"]  # D first, then F, every step
    for (_, before), (who, after) in zip(events, events[1:]):
        other = "F" if who == "D" else "D"
        assert all(not torch.equal(a, b) for a, b in zip(before[who], after[who])), f"{who}'s step missed parameters"
        assert all(torch.equal(a, b) for a, b in zip(before[other], after[other])), f"{who}'s step moved {other}"


def test_smoke_run_writes_log_ckpt_results_and_pictures(smoke):
    cfg, results, _ = smoke
    assert results["steps"] == 16 and 0 < results["hole_mse"] and 0 < results["hole_mse_mean_fill"] < 1
    log = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "log.jsonl"))]
    assert all({"rec", "adv", "d_loss"} <= set(r) for r in log if "loss" in r)  # both players logged
    assert {"model", "disc", "opt", "opt_d"} <= set(load_ckpt(cfg))
    x_test = common.make_synthetic(2_000, 32, seed=1)[0]
    for name in ("inpainting_epoch0001.png", "inpainting.png"):  # at the kNN monitor and at the end
        png = torchvision.io.read_image(os.path.join(cfg.out_dir, name))
        assert png.shape == (3, 3 * 34 + 2, 8 * 34 + 2)  # 3 rows (masked, prediction, truth) x 8 images, 2 px padding
        masked, truth = png[:, 2:34, 2:34], png[:, 2 + 68:34 + 68, 2:34]  # first column: test image 0
        assert torch.equal(truth, x_test[0])
        assert masked[:, 8:24, 8:24].flatten(1).unique(dim=1).shape[1] == 1  # the hole is one colour (the mean)
        assert torch.equal(masked[:, :8], truth[:, :8])  # the context is the image


def test_resume_is_exact_with_discriminator_and_random_masks(tmp_path):
    assert_resumes_exactly(inpainting, tmp_path, mask="regions", **SMALL_D)
    assert {"disc", "opt_d"} <= set(load_ckpt(tiny(inpainting.Config, tmp_path / "b")))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(inpainting, "reconstruction_loss", monkeypatch, tmp_path, **SMALL_D)


@pytest.mark.parametrize("key,value", [("mask", "ring"), ("image_size", 48), ("overlap", 8), ("adv_weight", -1.0),
                                       ("beta1", 1.0)])
def test_config_refuses_impossible_values(key, value):
    with pytest.raises(ValueError, match=f"--{key}"):
        inpainting.Config(**{key: value})


@pytest.mark.slow  # a torchrun launch: the 2-process smoke run of every method is in test_distributed.py
def test_two_processes_equal_one_process_on_the_global_batch():
    """Both DDP-wrapped networks: D (called twice before its backward) and F get the one-process gradients."""
    p = torchrun(["tests/dist_inpainting_step.py"])
    assert p.stdout.count("max grad diff") == 2, p.stdout
