"""colorization.py (and common.py's colour section it uses): the ab gamut, soft encoding, grey images,
rebalancing, annealed mean and loss against hand computation, and the training loop's contract on CPU."""

import math
import os

import pytest
import torch
import torchvision

from conftest import (assert_features_see_image_size, assert_nan_stops_the_run, assert_resumes_exactly,
                      assert_smoke_run, few_test_images, load_ckpt, tiny)

import colorization
import common

N_BINS = 229  # the count the docstring states: grid 10, centre in the sRGB gamut for some L


def in_gamut(ab, L_step):
    """(n,) bool: some L in [0, 100] (in steps of L_step) makes the colour (L, a, b) displayable."""
    L = torch.arange(0, 100 + L_step / 2, L_step)
    lab = torch.stack([L.view(-1, 1).expand(-1, len(ab)), ab[:, 0].expand(len(L), -1), ab[:, 1].expand(len(L), -1)])
    rgb = common.lab_to_rgb(lab[None], clamp=False)[0]  # (3, nL, n)
    return ((rgb >= 0) & (rgb <= 1)).all(0).any(0)


# ------------------------------------------------------------------------------------ colour bins


def test_ab_bins_are_exactly_the_in_gamut_grid_centres():
    bins = common.ab_bins(10.0)
    assert len(bins) == N_BINS
    assert torch.equal(bins, (bins / 10).round() * 10)  # centres on the grid of 10
    assert in_gamut(bins, 0.05).all()  # every kept bin is a displayable colour at some L (L twice as fine)
    side = torch.arange(-150, 151, 10.0)
    grid = torch.cartesian_prod(side, side)
    kept = (grid[:, None] == bins[None]).all(2).any(1)
    assert not in_gamut(grid[~kept], 0.05).any()  # and no displayable centre was left out


def test_nearest_bin_is_exact_even_a_ten_thousandth_from_a_tie():
    # points 1e-4 either side of the midline between two bin columns (a = 5 between 0 and 10): the nearest
    # bin flips with the side. |p|^2 - 2 p.b + |b|^2 in float32 (or a TF32 matmul on CUDA) loses that
    bins, g, n = common.ab_bins(10.0), torch.Generator().manual_seed(0), 4000
    side = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    a = torch.randint(-8, 8, (n,), generator=g) * 10 + 5 + side * 1e-4
    b = torch.randint(-8, 8, (n,), generator=g) * 10 + torch.rand(n, generator=g) * 2 - 1
    ab = torch.stack([a, b]).float().view(1, 2, 1, n)
    exact = torch.cdist(torch.stack([a, b], 1).double(), bins.double()).argmin(1)
    assert torch.equal(common.bin_distances(ab, bins).argmin(1), exact)


def test_every_srgb_colour_is_within_a_bin_width_of_a_bin():
    bins = common.ab_bins(10.0)
    torch.manual_seed(0)
    corners = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * 3).T[None]  # (1, 3, 8)
    rgb = torch.cat([torch.rand(1, 3, 200, 200).flatten(2), corners], 2)
    ab = common.rgb_to_lab(rgb[..., None])[0, 1:, :, 0].T  # (n, 2) incl. the cube's corners
    assert torch.cdist(ab, bins).min(1).values.max() < 10


# --------------------------------------------------------------------------------- soft encoding


def test_soft_encoding_at_a_bin_centre_by_hand():
    bins = common.ab_bins(10.0)
    grey = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)
    target = colorization.soft_encode(grey, bins, neighbours=5, sigma=5.0)[0, :, 0, 0]
    # nearest: (0, 0) at distance 0; then its 4 grid neighbours at distance 10: weights exp(-100 / 50) = e^-2
    z = 1 + 4 * math.exp(-2)
    expected = {(0.0, 0.0): 1 / z, (10.0, 0.0): math.exp(-2) / z, (-10.0, 0.0): math.exp(-2) / z,
                (0.0, 10.0): math.exp(-2) / z, (0.0, -10.0): math.exp(-2) / z}
    got = {tuple(bins[q].tolist()): target[q].item() for q in target.nonzero()[:, 0]}
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k] == pytest.approx(expected[k], rel=1e-5)


def test_soft_encoding_sums_to_one_and_peaks_at_the_nearest_bin():
    bins = common.ab_bins(10.0)
    torch.manual_seed(0)
    ab = common.rgb_to_lab(torch.rand(3, 3, 6, 5))[:, 1:]  # (3, 2, 6, 5) real colours
    target = colorization.soft_encode(ab, bins, neighbours=5, sigma=5.0)  # (3, Q, 6, 5)
    assert target.shape == (3, len(bins), 6, 5)
    torch.testing.assert_close(target.sum(1), torch.ones(3, 6, 5))
    assert ((target > 0).sum(1) == 5).all()
    nearest = torch.cdist(ab.permute(0, 2, 3, 1).reshape(-1, 2), bins).argmin(1).view(3, 6, 5)  # brute force
    assert torch.equal(target.argmax(1), nearest)
    # the weights fall with the distance to the bin
    p = ab[0, :, 0, 0]
    share = target[0, :, 0, 0]
    used = share.nonzero()[:, 0]
    d = (bins[used] - p).norm(dim=1)
    assert torch.equal(share[used].argsort(descending=True), d.argsort())


# ------------------------------------------------------------------------- rebalancing, decoding


def test_colour_prior_draws_its_images_from_every_class(tmp_path):
    """A folder lists its images class by class: a prior over the first 100 of 1,000 would see one colour."""
    hues = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 0.5, 0], [0.5, 0, 1],
                         [0, 0.5, 0], [0.5, 0.2, 0]])  # 10 colours, one per class, in 10 different ab bins
    y = torch.arange(10).repeat_interleave(100)  # sorted by class
    x = (hues[y].view(-1, 3, 1, 1).expand(-1, 3, 8, 8) * 255).round().to(torch.uint8)
    rt = common.setup(tiny(colorization.Config, tmp_path))
    data = common.Data("sorted", (x, y), (x, y), (x[:10], y[:10]), [str(c) for c in range(10)], rt, 100, 0)
    bins = common.ab_bins()
    colours = colorization.colour_prior(data, bins, rt, max_images=100, size=8).nonzero().numel()
    everything = colorization.colour_prior(data, bins, rt, max_images=1000, size=8).nonzero().numel()
    assert everything == 10 and colours >= 9  # 100 random images of 1,000 miss a class with probability < 1e-3


def test_rebalance_weights_have_expectation_one_under_the_prior():
    bins = common.ab_bins(10.0)
    torch.manual_seed(0)
    prior = torch.rand(len(bins)) ** 4
    prior /= prior.sum()
    w, smooth = colorization.rebalance_weights(prior, bins, lambd=0.5, sigma=5.0)
    assert (smooth * w).sum().item() == pytest.approx(1.0, abs=1e-6)
    assert smooth.sum().item() == pytest.approx(1.0, abs=1e-6) and (w > 0).all()
    # Eq. 4 by hand: w proportional to 1 / (0.5 p~ + 0.5 / Q)
    raw = 1 / (0.5 * smooth + 0.5 / len(bins))
    torch.testing.assert_close(w, raw / (smooth * raw).sum())
    assert torch.equal(w.argsort(), smooth.argsort(descending=True))  # rarer colours weigh more
    # lambda = 1: uniform weights; a negligible sigma leaves the prior as it is
    torch.testing.assert_close(colorization.rebalance_weights(prior, bins, lambd=1.0)[0], torch.ones(len(bins)))
    torch.testing.assert_close(colorization.rebalance_weights(prior, bins, sigma=1e-3)[1], prior)
    # smoothing by hand for one bin: sum over bins of prior * exp(-d^2 / 2 sigma^2), normalized
    kernel = torch.exp(-torch.cdist(bins, bins) ** 2 / 50)
    torch.testing.assert_close(smooth, kernel @ prior / (kernel @ prior).sum())


def test_annealed_mean_is_the_mean_at_t1_and_the_mode_as_t_goes_to_0():
    bins = common.ab_bins(10.0)
    torch.manual_seed(0)
    logits = torch.rand(2, len(bins), 3, 4)
    logits.scatter_add_(1, torch.randint(len(bins), (2, 1, 3, 4)), torch.full((2, 1, 3, 4), 2.0))  # a clear mode
    p = logits.softmax(1)
    mean = torch.einsum("bqhw,qc->bchw", p, bins)
    torch.testing.assert_close(common.annealed_mean(logits, bins, 1.0), mean)
    mode = bins[logits.argmax(1)].permute(0, 3, 1, 2)  # (2, 2, 3, 4)
    torch.testing.assert_close(common.annealed_mean(logits, bins, 1e-3), mode, atol=1e-3, rtol=0)
    # in between: T = 0.38 lies closer to the mode than the mean does
    mid = common.annealed_mean(logits, bins, 0.38)
    assert ((mid - mode).norm(dim=1) <= (mean - mode).norm(dim=1) + 1e-4).all()


# ------------------------------------------------------------------------------------------- loss


def test_loss_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]).T.reshape(1, 3, 1, 2)  # 2 pixels, 3 bins
    target = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]).T.reshape(1, 3, 1, 2)
    weights = torch.tensor([[[2.0, 0.5]]])
    lse0, lse1 = math.log(math.e + math.e**2 + 1), math.log(2 + math.e**3)
    ce0, ce1 = -(0.5 * (1 - lse0) + 0.5 * (2 - lse0)), -(3 - lse1)
    expected = 2.0 * ce0 + 0.5 * ce1  # summed over the image's pixels (paper Eq. 2)
    assert colorization.colorization_loss(logits, target, weights).item() == pytest.approx(expected, rel=1e-6)
    assert colorization.colorization_loss(logits, target, torch.zeros(1, 1, 2)).item() == 0
    # averaged over the images, grey ones (weight 0) included: the official loss layer divides by the batch
    two = colorization.colorization_loss(logits.repeat(2, 1, 1, 1), target.repeat(2, 1, 1, 1),
                                         torch.cat([weights, torch.zeros(1, 1, 2)]))
    assert two.item() == pytest.approx(expected / 2, rel=1e-6)


# ------------------------------------------------------------------------------------- grey images


def test_has_colour_is_the_official_threshold_on_every_a_and_b_of_the_grid():
    ab = torch.zeros(4, 2, 3, 3)
    ab[0, 0] = 5.0  # |a| = 5 everywhere: not above the threshold, grey
    ab[1, 1, 2, 2] = -5.01  # a single b below -5: colour
    ab[2, 0, 0, 1] = 5.01  # a single a above 5: colour
    ab[3] = torch.tensor([4.0, -4.0]).view(2, 1, 1)  # |a|, |b| = 4 everywhere (|ab| = 5.7): grey
    assert colorization.has_colour(ab, 5.0).tolist() == [False, True, True, False]
    assert colorization.has_colour(ab, 3.0).tolist() == [True, True, True, True]


def test_training_gives_grey_images_no_loss(tmp_path, monkeypatch):
    """The official NonGrayMaskLayer: the pixels of a grey image get weight 0; colour images keep theirs."""
    real_view, real_loss, seen = colorization.colorization_view, colorization.colorization_loss, []

    def half_grey(x, cfg):  # every other image of the batch loses its colour
        v = real_view(x, cfg)
        v[0::2] = v[0::2].mean(1, keepdim=True).expand(-1, 3, -1, -1)
        return v

    def loss(logits, target, weights):
        seen.append(weights.detach().clone())
        return real_loss(logits, target, weights)

    monkeypatch.setattr(colorization, "colorization_view", half_grey)
    monkeypatch.setattr(colorization, "colorization_loss", loss)
    colorization.train(tiny(colorization.Config, tmp_path, max_steps=2, probe_epochs=0))
    assert len(seen) == 2
    for w in seen:  # (B, 8, 8)
        assert (w[0::2] == 0).all()
        assert (w[1::2].flatten(1) > 0).all(1).float().mean() > 0.9  # synthetic images are nearly all colourful


def test_training_weighs_each_colour_pixel_by_its_nearest_bins_weight(tmp_path, monkeypatch):
    """Inside train(): a pixel of a colour image weighs w[q] (Eq. 3), q its nearest bin (the target's largest
    share), w from rebalance_weights; here w = 1, 2, ..., Q, so that every bin's weight is its own."""
    w, seen = torch.arange(1.0, len(common.ab_bins()) + 1), []
    monkeypatch.setattr(colorization, "rebalance_weights", lambda *args: (w, None))
    real_loss = colorization.colorization_loss

    def loss(logits, target, weights):
        seen.append((target.detach().clone(), weights.detach().clone()))
        return real_loss(logits, target, weights)

    monkeypatch.setattr(colorization, "colorization_loss", loss)
    colorization.train(tiny(colorization.Config, tmp_path, max_steps=1, probe_epochs=0))
    (target, weights), = seen
    colour = weights.flatten(1).any(1)  # (B,): grey images weigh 0 (test_training_gives_grey_images_no_loss)
    assert colour.float().mean() > 0.9 and torch.equal(weights[colour], w[target.argmax(1)][colour])


def test_the_network_reads_one_channel_and_predicts_at_quarter_resolution():
    model = common.PixelClassifier("tiny", True, 1, 229)  # what train() builds
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 229, 8, 8)
    assert model.backbone(torch.randn(2, 1, 32, 32)).shape == (2, 128)
    r18 = common.PixelClassifier("resnet18", True, 1, 229)
    assert r18.backbone.conv1.in_channels == 1 and r18.backbone.conv1.kernel_size == (3, 3)
    assert r18(torch.randn(2, 1, 64, 64)).shape == (2, 229, 16, 16)
    big = common.PixelClassifier("resnet18", False, 1, 229)  # the ImageNet stem: the trunk ends at 1/32
    assert big.backbone.conv1.kernel_size == (7, 7) and big(torch.randn(1, 1, 96, 96)).shape == (1, 229, 24, 24)


def test_the_logits_are_resized_bilinearly():
    """The trunk's 4 x 4 logits reach the 8 x 8 grid by bilinear resizing (align_corners=False): logit (1, 1) is
    9/16 of low (0, 0), 3/16 of (0, 1) and of (1, 0), 1/16 of (1, 1); not nearest's 2 x 2 blocks of copies."""
    torch.manual_seed(0)
    model, x = common.PixelClassifier("tiny", True, 1, 8).eval(), torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        low = model.classify(model.mix(torch.nn.Sequential(*list(model.backbone.children())[:-2])(x)))  # (1, 8, 4, 4)
        out = model(x)
    want = (9 * low[..., 0, 0] + 3 * low[..., 0, 1] + 3 * low[..., 1, 0] + low[..., 1, 1]) / 16
    assert out.shape == (1, 8, 8, 8)
    torch.testing.assert_close(out[..., 1, 1], want)


def test_features_take_uint8_images_at_the_data_size_and_see_them_at_image_size(tmp_path, monkeypatch):
    """The evaluated trunk reads the L channel of the images at image_size."""
    assert_features_see_image_size(colorization, tmp_path, monkeypatch,
                                   lambda model, up: model.backbone(common.rgb_to_lab(up)[:, :1] / 50 - 1))


def test_config_rejects_impossible_values():
    for bad in [dict(image_size=30), dict(temperature=0.0), dict(rebalance_lambda=1.5), dict(neighbours=0)]:
        with pytest.raises(ValueError, match="--" + next(iter(bad))):
            colorization.Config(**bad)


# -------------------------------------------------------------------------------------- training


def test_smoke_run_writes_results_and_colorization_pngs(tmp_path):
    cfg, results = assert_smoke_run(colorization, tmp_path, extra_keys=("color_top1", "color_auc", "ab_bins"))
    assert results["ab_bins"] == N_BINS and 0 <= results["color_top1"] <= 1 and 0 < results["color_auc"] <= 1
    for name in ("colorization_epoch0001.png", "colorization.png"):  # after epoch 1's monitor, and at the end
        png = torchvision.io.read_image(os.path.join(cfg.out_dir, name))
        assert png.shape == (3, 3 * 34 + 2, 8 * 34 + 2)  # 3 rows (L, prediction, truth) of 8 images of 32 px, pad 2


def test_resume_is_exact(tmp_path):
    assert_resumes_exactly(colorization, tmp_path)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(colorization, "colorization_loss", monkeypatch, tmp_path)


def test_colour_metrics_of_a_perfect_predictor(tmp_path):
    """Logits that are the (sharpened) soft-encoded truth give colour-bin top-1 1 and a high AuC."""
    cfg = tiny(colorization.Config, tmp_path)
    rt = common.setup(cfg)
    data = common.load_data(cfg, rt)
    bins = common.ab_bins(cfg.grid)
    truth = [colorization.soft_encode(colorization.split_lab(common.rgb_to_lab(common.to_float(x)))[1], bins)
             for x, _ in data.eval_batches("test", 500)]  # the batches colour_metrics will see, in order

    class Oracle(torch.nn.Module):
        def forward(self, L):
            return 50 * truth.pop(0).clamp(min=1e-12).log()  # (b, Q, h, w): argmax = nearest bin, sharp

    got = colorization.colour_metrics(Oracle(), data, bins, rt, cfg.temperature, cfg.image_size)
    assert not truth and got["color_top1"] == 1.0
    assert 0.9 < got["color_auc"] < 1  # errors left: bin rounding and the 1/4-resolution prediction


def test_colour_auc_is_the_share_of_thresholds_0_to_150_each_pixel_meets(tmp_path):
    """A predictor of grey (ab = 0) everywhere: the AuC is the share of the 151 thresholds t = 0, 1, ..., 150
    with |true ab| <= t (paper Sec. 3.1), over every pixel of the test images, counted here directly."""
    cfg = tiny(colorization.Config, tmp_path)
    rt = common.setup(cfg)
    with few_test_images(64):
        data = common.load_data(cfg, rt)
    bins = common.ab_bins(cfg.grid)
    grey = (bins == 0).all(1).float() * 1e4  # (Q,): all the mass on the bin at (0, 0)

    class Grey(torch.nn.Module):
        def forward(self, L):
            return grey.view(1, -1, 1, 1).expand(len(L), -1, L.shape[2] // 4, L.shape[3] // 4)

    got = colorization.colour_metrics(Grey(), data, bins, rt, cfg.temperature, cfg.image_size)["color_auc"]
    err = torch.cat([common.rgb_to_lab(common.to_float(x))[:, 1:].norm(dim=1) for x, _ in data.eval_batches("test", 9)])
    share = (err[..., None] <= torch.arange(151.0)).float().mean()  # (64, 32, 32, 151): pixels x thresholds
    assert len(err) == 64 and got == pytest.approx(share.item(), rel=1e-5)


def test_defaults_are_the_documented_recipe():
    """The docstring's table: ab grid 10 (P Sec. 2.1), soft encoding over the 5 nearest bins with sigma 5 (P, not C's
    10), rebalancing lambda 1/2 and prior smoothing sigma 5 (P Eq. 4), annealed-mean T 0.38 (P Sec. 2.3), grey
    threshold 5 (C NonGrayMaskLayer); Adam 1e-3 per 256 images, L2 1e-3 (P Sec. 3), batch 256, 200 epochs."""
    cfg = colorization.Config()
    assert (cfg.grid, cfg.neighbours, cfg.sigma, cfg.rebalance_lambda, cfg.rebalance_sigma) == (10, 5, 5, 0.5, 5)
    assert (cfg.temperature, cfg.gray_threshold) == (0.38, 5)
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (1e-3, 1e-3, 256, 200)


def test_run_saves_the_trunk_alone_and_scores_the_auc_at_its_temperature(tmp_path, monkeypatch):
    """encoder.pt is the 1-channel trunk, as trained (the checkpoint's backbone.*), without the head; the AuC of
    results.json decodes the annealed mean at --temperature (P Sec. 2.3), as the PNGs do."""
    temperatures, real_metrics = [], colorization.colour_metrics
    monkeypatch.setattr(colorization, "colour_metrics", lambda *a: temperatures.append(a[4]) or real_metrics(*a))
    cfg = tiny(colorization.Config, tmp_path, max_steps=1, probe_epochs=0, temperature=0.2)
    with few_test_images():
        colorization.train(cfg)
    assert temperatures == [0.2]
    encoder = torch.load(os.path.join(cfg.out_dir, "encoder.pt"), weights_only=True)
    trunk = {k.removeprefix("backbone."): v for k, v in load_ckpt(cfg)["model"].items() if k.startswith("backbone.")}
    assert encoder.keys() == trunk.keys() and all(torch.equal(v, trunk[k]) for k, v in encoder.items())
    assert encoder["0.weight"].shape[1] == 1  # conv1 reads L


def test_png_rows_are_the_l_input_the_prediction_and_the_truth(tmp_path):
    """save_colorizations: row 1 the L input (ab = 0), row 2 L with the predicted colours, row 3 the image. A
    predictor of grey everywhere (all mass on the bin at ab = (0, 0)) paints row 2 as row 1."""
    bins = common.ab_bins(10.0)

    class Grey(torch.nn.Module):
        def forward(self, L):
            return ((bins == 0).all(1).float() * 1e4).view(1, -1, 1, 1).expand(len(L), -1, 8, 8)

    x = common.make_synthetic(4, 32, seed=3)[0]
    colorization.save_colorizations(Grey(), x, bins, 0.38, 32, str(tmp_path / "c.png"))
    png = torchvision.io.read_image(str(tmp_path / "c.png"))  # 3 rows of 4 images of 32 px, 2 px padding
    L_row, pred_row, truth_row = (png[:, 2 + 34 * r:34 * (r + 1), 2:34 * 4] for r in range(3))
    assert torch.equal(pred_row, L_row) and not torch.equal(truth_row, L_row)
    assert (truth_row[:, :, :32].int() - x[0].int()).abs().max() <= 1  # image 0, through Lab and back
