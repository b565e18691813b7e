"""context_pred.py: patch pairs and their position labels, the colour projection, the per-patch normalization,
late fusion, and the training loop's contract on CPU."""

import math

import pytest
import torch

from conftest import (assert_each_image_or_its_mirror, assert_features_see_image_size, assert_nan_stops_the_run,
                      assert_resumes_exactly, assert_smoke_run, read_log, tiny)

import context_pred

# the place of each label around the centre, in grid steps (row, col): row-major, centre left out
EXPECTED = {0: (-1, -1), 1: (-1, 0), 2: (-1, 1), 3: (0, -1), 4: (0, 1), 5: (1, -1), 6: (1, 0), 7: (1, 1)}


# the loop tests cut 7 px patches, 3 px apart, from 32 px images: a quarter of the default's pixels
SMALL = dict(image_size=32, patch_size=7, gap=3, jitter=1)


def position_image(B, S):
    """Float images whose channel 0 holds each pixel's row, channel 1 its column, channel 2 zeros."""
    x = torch.zeros(B, 3, S, S)
    x[:, 0] = torch.arange(S, dtype=torch.float32).view(S, 1)
    x[:, 1] = torch.arange(S, dtype=torch.float32).view(1, S)
    return x


# ------------------------------------------------------------------------------------ patch pairs


@pytest.mark.parametrize("S, patch, gap, jitter", [(64, 14, 7, 2), (40, 8, 4, 0), (96, 21, 10, 3)])
def test_every_label_matches_the_true_relative_position(S, patch, gap, jitter):
    torch.manual_seed(0)
    centre, neighbour, labels = context_pred.sample_pairs(position_image(2000, S), patch, gap, jitter)
    assert centre.shape == neighbour.shape == (2000, 3, patch, patch) and labels.shape == (2000,)
    assert set(labels.tolist()) == set(range(8))  # all eight positions are drawn
    for p in (centre, neighbour):  # every patch is a contiguous crop inside the image
        rows, cols = p[:, 0], p[:, 1]
        span = torch.arange(patch, dtype=torch.float32)
        assert torch.equal(rows - rows[:, :1, :1], span.view(1, patch, 1).expand_as(rows))
        assert torch.equal(cols - cols[:, :1, :1], span.view(1, 1, patch).expand_as(cols))
        assert rows.min() >= 0 and rows.max() <= S - 1 and cols.min() >= 0 and cols.max() <= S - 1
    d_row = neighbour[:, 0, 0, 0] - centre[:, 0, 0, 0]  # (B,) where the neighbour is, in pixels
    d_col = neighbour[:, 1, 0, 0] - centre[:, 1, 0, 0]
    step = patch + gap
    for k, (dr, dc) in EXPECTED.items():
        sel = labels == k
        for d, want in [(d_row[sel], dr), (d_col[sel], dc)]:
            # one grid step of patch + gap px in the labelled direction, give or take both patches' jitter
            assert (d - want * step).abs().max() <= 2 * jitter, (k, want)
        if jitter == 0:
            assert torch.equal(d_row[sel], torch.full_like(d_row[sel], dr * step))
    # patches never overlap: a gap of at least gap - 2 * jitter px remains between them
    overlap_rows = (d_row.abs() < patch) & (d_col.abs() < patch)
    assert not overlap_rows.any()


def test_grid_position_and_jitter_vary():
    torch.manual_seed(0)
    centre, _, _ = context_pred.sample_pairs(position_image(500, 64), 14, 7, 2)
    tops = centre[:, 0, 0, 0]
    # the centre cell's top row is 2 + 21 + (0..4 grid placement) + (-2..2 jitter): 21 .. 29
    assert tops.min() == 21 and tops.max() == 29


def test_each_patch_has_its_own_symmetric_jitter():
    """The neighbour's offset from its grid step is the difference of two independent draws in -2..2 (one per
    patch, as the paper): every value in -4..4 occurs, in rows and in columns (not so for a shared or one-sided one)."""
    torch.manual_seed(0)
    centre, neighbour, labels = context_pred.sample_pairs(position_image(2000, 64), 14, 7, 2)
    for axis in (0, 1):  # channel 0 holds the row, channel 1 the column
        want = torch.tensor([EXPECTED[k][axis] for k in range(8)])[labels] * 21  # one grid step: 14 + 7 px
        off = neighbour[:, axis, 0, 0] - centre[:, axis, 0, 0] - want
        assert sorted(off.unique().tolist()) == list(range(-4, 5)), axis


def test_label_docstring_layout():
    doc = context_pred.sample_pairs.__doc__
    assert "0 1 2" in doc and "3 . 4" in doc and "5 6 7" in doc


# ----------------------------------------------------------------------------------------- colour


def test_green_magenta_projection():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 5, 5)
    y = context_pred.remove_green_magenta(x)
    gm = lambda t: 2 * t[:, 1] - t[:, 0] - t[:, 2]  # noqa: E731  (the green-magenta coordinate, up to scale)
    assert gm(y).abs().max() < 1e-6  # no green-magenta component left
    torch.testing.assert_close(y - x, -(gm(x) / 6).unsqueeze(1) * torch.tensor([-1.0, 2.0, -1.0]).view(1, 3, 1, 1))
    torch.testing.assert_close(context_pred.remove_green_magenta(y), y)  # a projection: idempotent
    grey = torch.rand(2, 1, 3, 3).expand(2, 3, 3, 3)
    torch.testing.assert_close(context_pred.remove_green_magenta(grey), grey)  # grey is left alone
    red_blue = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1) - torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(context_pred.remove_green_magenta(red_blue), red_blue)  # orthogonal colours too


def test_normalize_patch_hand_computed():
    """Each channel's mean out, then one RMS over the whole patch (official train.py, prep_image)."""
    x = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]])  # (1, 2, 1, 2): channel 0 varies, channel 1 is flat
    rms = math.sqrt((1 + 1 + 0 + 0) / 4 + 1e-5)  # channel 0 becomes -1, 1; channel 1 becomes 0, 0
    expected = torch.tensor([[[[-1.0, 1.0]], [[0.0, 0.0]]]]) / rms
    torch.testing.assert_close(context_pred.normalize_patch(x), expected)
    assert context_pred.normalize_patch(torch.full((1, 3, 4, 4), 0.7)).abs().max() < 1e-3  # a flat patch stays flat


def test_normalize_patch_removes_brightness_contrast_and_colour_cast():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 14, 14)
    cast, contrast = torch.rand(4, 3, 1, 1), 0.5 + torch.rand(4, 1, 1, 1)  # per patch and channel; per patch
    torch.testing.assert_close(context_pred.normalize_patch(contrast * x + cast),
                               context_pred.normalize_patch(x), atol=1e-3, rtol=0)


def test_context_view_normalizes_each_patch_on_its_own(tmp_path):
    """The patches reaching the encoder: every channel of every patch has mean 0, every patch RMS 1."""
    torch.manual_seed(0)
    cfg = tiny(context_pred.Config, tmp_path, **SMALL)
    x = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    x[:8] //= 4  # dark images: without a normalization per patch, their patches would be dark too
    for patch in context_pred.context_view(x, cfg)[:2]:  # centre, neighbour: (B, 3, P, P)
        torch.testing.assert_close(patch.mean((2, 3)), torch.zeros(16, 3), atol=1e-5, rtol=0)
        torch.testing.assert_close(patch.square().mean((1, 2, 3)).sqrt(), torch.ones(16), atol=1e-2, rtol=0)


def test_context_view_flips_about_half_the_images_before_the_grid(tmp_path, monkeypatch):
    """The image the pairs are cut from (image_size = the data's 32 px: no resize) is mirrored left-right or not,
    per image."""
    torch.manual_seed(0)
    seen = []
    monkeypatch.setattr(context_pred, "patch_pairs", lambda x, cfg: seen.append(x))
    x = (torch.rand(64, 3, 32, 32) * 255).to(torch.uint8)
    context_pred.context_view(x, tiny(context_pred.Config, tmp_path, **SMALL))
    plain = x.float() / 255
    assert_each_image_or_its_mirror(seen[0], plain)


def test_context_view_shapes(tmp_path):
    cfg = tiny(context_pred.Config, tmp_path)
    x = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    centre, neighbour, labels = context_pred.context_view(x, cfg)
    assert centre.shape == neighbour.shape == (8, 3, cfg.patch_size, cfg.patch_size)
    assert labels.min() >= 0 and labels.max() <= 7


# ------------------------------------------------------------------------------------ model, loss


def test_late_fusion_shares_the_encoder_and_concatenates():
    torch.manual_seed(0)
    model = context_pred.ContextPred("tiny", True, 16, 32).eval()
    a, b = torch.randn(3, 3, 14, 14), torch.randn(3, 3, 14, 14)
    z = model.patch_fc(model.backbone(torch.cat([a, b])))
    torch.testing.assert_close(model(a, b), model.classifier(torch.cat([z[:3], z[3:]], 1)))
    assert model(a, b).shape == (3, 8) and not torch.allclose(model(a, b), model(b, a))  # order matters


def test_context_loss_hand_computed():
    logits = torch.zeros(2, 8)
    logits[0, 3] = 2.0
    labels = torch.tensor([3, 0])
    expected = (-(2 - math.log(math.exp(2) + 7)) + math.log(8)) / 2  # the second row: uniform over 8
    assert context_pred.context_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_config_checks():
    with pytest.raises(ValueError, match="does not fit in --image_size=64"):
        context_pred.Config(image_size=64, patch_size=16, gap=8)
    with pytest.raises(ValueError, match="--patch_size must be"):
        context_pred.Config(jitter=-1)


# -------------------------------------------------------------------------------------- training


def test_smoke_run_writes_log_ckpt_results(tmp_path):
    cfg, results = assert_smoke_run(context_pred, tmp_path, extra_keys=("pretext_top1",), **SMALL)
    assert results["steps"] == 16 and 0 <= results["pretext_top1"] <= 1
    log = read_log(cfg)
    assert all("pretext_acc" in r for r in log if "loss" in r)
    assert any("pretext_top1" in r and r.get("epoch") == 1 for r in log)


def test_resume_is_exact(tmp_path):
    assert_resumes_exactly(context_pred, tmp_path, **SMALL)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(context_pred, "context_loss", monkeypatch, tmp_path, **SMALL)


def test_defaults_are_the_documented_recipe():
    """The docstring's "this file" column: CIFAR upsampled to 96 px (64 px leaves no grid slack), 14 px patches 7 px
    apart (the paper's gap of half a patch), jitter +-2 px, fc6 512, fusion 1024, lr 0.1 at batch 128, 100 epochs."""
    cfg = context_pred.Config()
    assert (cfg.image_size, cfg.patch_size, cfg.gap, cfg.jitter) == (96, 14, 7, 2)
    assert (cfg.patch_dim, cfg.hidden_dim, cfg.lr * cfg.batch_size / 256, cfg.epochs) == (512, 1024, 0.1, 100)


def test_features_are_the_patch_encoder_on_the_whole_projected_normalized_image(tmp_path, monkeypatch):
    """Evaluated features (docstring): the patch encoder f, globally pooled, not fc6, on the whole image upsampled to
    image_size, its colours projected off green-magenta and normalized as one patch, as the pretext's patches."""
    assert_features_see_image_size(context_pred, tmp_path, monkeypatch, lambda model, up: model.backbone(
        context_pred.normalize_patch(context_pred.remove_green_magenta(up))))


# ------------------------------------------------------------------------------------- learning
