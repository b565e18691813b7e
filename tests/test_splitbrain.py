"""splitbrain.py: the split of the input channels between the halves, quantization, the loss against
hand computation, evaluation at the training scale, and the training loop's contract on CPU."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import (ROOT, assert_features_see_image_size, assert_nan_stops_the_run, assert_resumes_exactly,
                      assert_smoke_run, few_test_images, tiny)

import common
import splitbrain

# ----------------------------------------------------------------------------------- the halves


@pytest.mark.parametrize("mode", ["train", "eval"])  # BatchNorm's batch statistics must not leak either
def test_each_half_sees_only_its_own_channels(mode):
    torch.manual_seed(0)
    model = splitbrain.SplitBrain("tiny", True, 229, 50)
    getattr(model, mode)()
    x = torch.randn(4, 3, 32, 32)
    new_ab, new_L = x.clone(), x.clone()
    new_ab[:, 1:] = torch.randn(4, 2, 32, 32)
    new_L[:, :1] = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        ab_logits, l_logits = model(x)
        ab_logits_2, l_logits_2 = model(new_ab)  # other ab: the L -> ab half must not notice
        ab_logits_3, l_logits_3 = model(new_L)  # other L: the ab -> L half must not notice
        f, f2, f3 = model.features(x), model.features(new_ab), model.features(new_L)
    assert ab_logits.shape == (4, 229, 8, 8) and l_logits.shape == (4, 50, 8, 8) and f.shape == (4, 256)
    assert torch.equal(ab_logits_2, ab_logits) and not torch.allclose(l_logits_2, l_logits)
    assert torch.equal(l_logits_3, l_logits) and not torch.allclose(ab_logits_3, ab_logits)
    half = f.shape[1] // 2  # features = [L -> ab trunk | ab -> L trunk]
    assert torch.equal(f2[:, :half], f[:, :half]) and not torch.allclose(f2[:, half:], f[:, half:])
    assert torch.equal(f3[:, half:], f[:, half:]) and not torch.allclose(f3[:, :half], f[:, :half])


def test_halves_read_one_and_two_channels():
    model = splitbrain.SplitBrain("resnet18", True, 229, 50)
    assert model.l_to_ab.backbone.conv1.in_channels == 1 and model.ab_to_l.backbone.conv1.in_channels == 2
    assert not set(map(id, model.l_to_ab.parameters())) & set(map(id, model.ab_to_l.parameters()))  # disjoint


# ---------------------------------------------------------------------------------- quantization


def test_quantization_round_trip_within_a_bin_width():
    torch.manual_seed(0)
    L = torch.cat([torch.rand(1000) * 100, torch.tensor([0.0, 1.0, 2.0, 99.99, 100.0])]).view(1, 1, 1, -1)
    for n_bins in (50, 7):
        width = 100 / n_bins
        q = splitbrain.quantize_l(L, n_bins)  # (1, 1, n)
        assert q.min() >= 0 and q.max() <= n_bins - 1
        back = splitbrain.l_centres(n_bins)[q, 0]  # (1, 1, n)
        assert (back - L[:, 0]).abs().max() <= width / 2 + 1e-4
    edges = torch.tensor([0.0, 1.99, 2.0, 100.0]).view(1, 1, 1, 4)
    assert splitbrain.quantize_l(edges, 50).flatten().tolist() == [0, 0, 1, 49]
    bins = common.ab_bins(10.0)
    corners = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * 3).T[None]  # (1, 3, 8)
    rgb = torch.cat([torch.rand(1, 3, 100, 100).flatten(2), corners], 2)
    ab = common.rgb_to_lab(rgb[..., None])[:, 1:]  # (1, 2, n, 1): sRGB colours and the cube's corners
    back = bins[splitbrain.quantize_ab(ab, bins)].permute(0, 3, 1, 2)  # (1, 2, n, 1)
    assert (back - ab).norm(dim=1).max() < 10  # within one bin width of the grid
    centres = bins.T.reshape(1, 2, -1, 1)
    assert torch.equal(splitbrain.quantize_ab(centres, bins).flatten(), torch.arange(len(bins)))  # fixed points


def test_the_file_needs_only_common_and_torch():
    """splitbrain.py + common.py is all a copy needs: the colour machinery it shares with colorization.py
    (ab bins, annealed mean, the pixel classifier) lives in common.py, not in another method file."""
    source = open(os.path.join(ROOT, "splitbrain.py")).read()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports == {"dataclasses", "os", "torch", "common"}


def test_targets_of_a_flat_colour_image():
    rgb = torch.tensor([0.8, 0.3, 0.1]).view(1, 3, 1, 1).expand(2, 3, 16, 16)
    lab = common.rgb_to_lab(rgb)
    bins = common.ab_bins(10.0)
    ab_t, l_t = splitbrain.lab_targets(lab, bins, 50)
    assert ab_t.shape == l_t.shape == (2, 4, 4)
    L, a, b = lab[0, :, 0, 0].tolist()
    assert (l_t == int(L // 2)).all()
    assert (ab_t == torch.cdist(torch.tensor([[a, b]]), bins).argmin()).all()


def test_targets_are_those_of_the_4x4_averages():
    """The targets on the prediction grid quantize the mean L and ab of each 4 x 4 block (the table), not one pixel."""
    lab = torch.zeros(1, 3, 4, 4)
    lab[:, 0] = torch.tensor([10.0, 30.0]).repeat(8).view(4, 4)  # L alternates 10, 30: mean 20, bin 10 of 50
    lab[:, 1] = torch.tensor([0.0, 40.0]).repeat(8).view(4, 4)  # a alternates 0, 40: mean 20; b = 0
    bins = common.ab_bins(10.0)
    ab_t, l_t = splitbrain.lab_targets(lab, bins, 50)
    assert l_t.tolist() == [[[10]]] and bins[ab_t.item()].tolist() == [20.0, 0.0]


# ------------------------------------------------------------------------------------------- loss


def test_loss_hand_computed():
    ab_logits = torch.tensor([1.0, 2.0, 0.0]).view(1, 3, 1, 1)
    l_logits = torch.tensor([0.5, -0.5]).view(1, 2, 1, 1)
    ab_target, l_target = torch.tensor([[[1]]]), torch.tensor([[[0]]])
    expected = -(2 - math.log(math.e + math.e**2 + 1)) - (0.5 - math.log(math.exp(0.5) + math.exp(-0.5)))
    got = splitbrain.split_brain_loss(ab_logits, ab_target, l_logits, l_target)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(0)
    a, b = torch.randn(2, 229, 3, 3), torch.randn(2, 50, 3, 3)
    ta, tb = torch.randint(229, (2, 3, 3)), torch.randint(50, (2, 3, 3))
    # each half's cross-entropy summed over the 3 x 3 pixels of an image (paper Eq. 2), averaged over the 2 images
    expected = 9 * (F.cross_entropy(a, ta) + F.cross_entropy(b, tb))
    torch.testing.assert_close(splitbrain.split_brain_loss(a, ta, b, tb), expected)


def test_loss_gradient_reaches_both_halves():
    """d loss / d logits is (softmax - 1-hot) / B at every pixel of each half: both halves learn (Eq. 2-3)."""
    torch.manual_seed(0)
    a, b = torch.randn(2, 229, 3, 3, requires_grad=True), torch.randn(2, 50, 3, 3, requires_grad=True)
    ta, tb = torch.randint(229, (2, 3, 3)), torch.randint(50, (2, 3, 3))
    splitbrain.split_brain_loss(a, ta, b, tb).backward()
    for logits, t, n in [(a, ta, 229), (b, tb, 50)]:
        expected = (logits.detach().softmax(1) - F.one_hot(t, n).permute(0, 3, 1, 2)) / 2  # 2 images
        torch.testing.assert_close(logits.grad, expected)


def test_annealed_mean_limits():
    torch.manual_seed(0)
    centres = splitbrain.l_centres(50)
    logits = torch.rand(2, 50, 3, 3)
    logits.scatter_add_(1, torch.randint(50, (2, 1, 3, 3)), torch.full((2, 1, 3, 3), 2.0))  # a clear mode
    torch.testing.assert_close(common.annealed_mean(logits, centres, 1.0),
                               torch.einsum("bqhw,qc->bchw", logits.softmax(1), centres))
    mode = centres[logits.argmax(1), 0][:, None]  # (2, 1, 3, 3)
    torch.testing.assert_close(common.annealed_mean(logits, centres, 1e-3), mode, atol=1e-3, rtol=0)


def test_features_take_uint8_images_at_the_data_size_and_see_them_at_image_size(tmp_path, monkeypatch):
    """Both halves read their Lab channels of the images at image_size; the features are theirs, concatenated."""
    def expected(model, up):
        lab = common.rgb_to_lab(up)
        return torch.cat([model.l_to_ab.backbone(lab[:, :1] / 50 - 1), model.ab_to_l.backbone(lab[:, 1:] / 110)], 1)

    assert_features_see_image_size(splitbrain, tmp_path, monkeypatch, expected)


def test_config_rejects_impossible_values():
    for bad in [dict(image_size=30), dict(l_bins=1), dict(grid=0.0), dict(temperature=0.0)]:
        with pytest.raises(ValueError, match="--" + next(iter(bad))):
            splitbrain.Config(**bad)


# -------------------------------------------------------------------------------------- training


def test_smoke_run_writes_results_and_prediction_pngs(tmp_path):
    cfg, results = assert_smoke_run(splitbrain, tmp_path, extra_keys=("ab_top1", "l_top1", "ab_bins"))
    assert results["ab_bins"] == 229 and 0 <= results["ab_top1"] <= 1 and 0 <= results["l_top1"] <= 1
    for name in ("splitbrain_epoch0001.png", "splitbrain.png"):  # after epoch 1's monitor, and at the end
        png = torchvision.io.read_image(os.path.join(cfg.out_dir, name))
        assert png.shape == (3, 5 * 34 + 2, 8 * 34 + 2)  # 5 rows (2 inputs, 2 predictions, truth) of 8 images, pad 2
    encoder = torch.load(os.path.join(cfg.out_dir, "encoder.pt"), weights_only=True)
    assert encoder["l_to_ab"]["0.weight"].shape[1] == 1 and encoder["ab_to_l"]["0.weight"].shape[1] == 2


def test_resume_is_exact(tmp_path):
    assert_resumes_exactly(splitbrain, tmp_path)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(splitbrain, "split_brain_loss", monkeypatch, tmp_path)


def test_training_targets_are_those_of_the_view_the_halves_see(tmp_path, monkeypatch):
    """Inside train(): the targets are lab_targets of the very augmented view (crop, flip) the model reads."""
    views, seen = [], []
    real_view, real_loss = splitbrain.splitbrain_view, splitbrain.split_brain_loss
    monkeypatch.setattr(splitbrain, "splitbrain_view", lambda x, cfg: views.append(real_view(x, cfg)) or views[-1])
    monkeypatch.setattr(splitbrain, "split_brain_loss",
                        lambda a, ta, b, tb: seen.append((ta, tb)) or real_loss(a, ta, b, tb))
    splitbrain.train(tiny(splitbrain.Config, tmp_path, max_steps=1, probe_epochs=0))
    (view,), ((ab_t, l_t),) = views, seen
    want_ab, want_l = splitbrain.lab_targets(common.rgb_to_lab(view), common.ab_bins(), 50)
    assert torch.equal(ab_t, want_ab) and torch.equal(l_t, want_l)


def test_pretext_metrics_of_a_perfect_predictor(tmp_path):
    """Logits 1-hot on each half's true bins (those of the test images' 4 x 4 averages): ab_top1 = l_top1 = 1."""
    cfg = tiny(splitbrain.Config, tmp_path)
    rt = common.setup(cfg)
    with few_test_images(64):
        data = common.load_data(cfg, rt)
    bins = common.ab_bins(cfg.grid)
    truth = [splitbrain.lab_targets(splitbrain.lab_at(x, 32), bins, 50) for x, _ in data.eval_batches("test", 500)]

    class Oracle(torch.nn.Module):
        def forward(self, x):  # (ab logits, L logits), each 1-hot on the truth
            return tuple(F.one_hot(t, n).permute(0, 3, 1, 2).float() for t, n in zip(truth.pop(0), (len(bins), 50)))

    got = splitbrain.pretext_metrics(Oracle(), data, bins, 50, rt, 32)
    assert not truth and got == {"ab_top1": 1.0, "l_top1": 1.0}


def test_defaults_are_the_documented_recipe():
    """P Sec. 4.1: ab bins of grid 10 and 50 L bins of width 2; the rest colorization.py's (the docstring): Adam 1e-3
    per 256 images, L2 1e-3, batch 256, 200 epochs, square crops of 50-100% of the area, annealed-mean T 0.38."""
    cfg = splitbrain.Config()
    assert (cfg.grid, cfg.l_bins, cfg.temperature, cfg.crop_min) == (10.0, 50, 0.38, 0.5)
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (1e-3, 1e-3, 256, 200)


def test_png_rows_are_the_inputs_the_two_predictions_and_the_truth(tmp_path):
    """save_predictions' rows: L (ab = 0), ab (at L = 50), L -> ab (true L, predicted ab), ab -> L (predicted L, true
    ab), the image. A model that predicts grey (all mass on the bin at ab = (0, 0)) and uniform L bins (annealed mean
    50, the mean of the bin centres) paints row 3 as row 1 and row 4 as row 2."""
    bins = common.ab_bins(10.0)

    class Stub(torch.nn.Module):
        def forward(self, x):
            ab = ((bins == 0).all(1).float() * 1e4).view(1, -1, 1, 1).expand(len(x), -1, 8, 8)
            return ab, torch.zeros(len(x), 50, 8, 8)

    x = common.make_synthetic(4, 32, seed=3)[0]
    splitbrain.save_predictions(Stub(), x, bins, 50, 0.38, 32, str(tmp_path / "p.png"))
    png = torchvision.io.read_image(str(tmp_path / "p.png")).int()  # 5 rows of 4 images of 32 px, 2 px padding
    rows = [png[:, 2 + 34 * r:34 * (r + 1), 2:34 * 4] for r in range(5)]
    assert (rows[2] - rows[0]).abs().max() <= 1 and (rows[3] - rows[1]).abs().max() <= 1
    assert (rows[4][:, :, :32] - x[0].int()).abs().max() <= 1 and (rows[4] - rows[0]).abs().max() > 1
