"""jigsaw.py: the permutation set, tiles and their reassembly, per-tile normalization, and the training
loop's contract on CPU."""

import itertools
import math

import pytest
import torch

from conftest import (assert_each_image_or_its_mirror, assert_features_see_image_size, assert_nan_stops_the_run,
                      assert_resumes_exactly, assert_smoke_run, few_test_images, read_log, tiny)

import jigsaw


# the loop tests puzzle 32 px images (cells of 10 px, tiles of 9 px): a quarter of the default's pixels
SMALL = dict(image_size=32, tile_size=9)


def hamming(perms):
    """Minimum and average Hamming distance over all pairs of distinct rows."""
    d = (perms[:, None] != perms[None]).sum(-1)
    off = d[~torch.eye(len(perms), dtype=torch.bool)]
    return off.min().item(), off.float().mean().item()


def position_image(B, S):
    """Float images whose channel 0 holds each pixel's row, channel 1 its column, channel 2 zeros."""
    x = torch.zeros(B, 3, S, S)
    x[:, 0] = torch.arange(S, dtype=torch.float32).view(S, 1)
    x[:, 1] = torch.arange(S, dtype=torch.float32).view(1, S)
    return x


# --------------------------------------------------------------------------------- permutations


def test_permutations_valid_distinct_deterministic_and_far_apart():
    perms = jigsaw.make_permutations(100, 0)
    assert perms.shape == (100, 9) and perms.dtype == torch.int64
    assert (perms.sort(1).values == torch.arange(9)).all()  # each row is a permutation of 0..8
    assert len({tuple(p) for p in perms.tolist()}) == 100  # all distinct
    lo, avg = hamming(perms)
    print(f"100 permutations, seed 0: min Hamming distance {lo}, average {avg:.3f}")
    # the paper's Table 4 lists 8.08 / 2 for its 100-set; two random permutations differ in 8 places on average
    assert lo >= 3 and avg >= 8.07
    # the same set for a seed (uncached call); greedy, so a smaller set is the start of a larger one
    assert torch.equal(jigsaw.make_permutations.__wrapped__(10, 0), perms[:10])
    assert not torch.equal(jigsaw.make_permutations.__wrapped__(10, 1), perms[:10])


def test_permutations_are_greedy_for_summed_distance():
    """Each added permutation has the largest summed distance to those before it (Algorithm 1)."""
    perms = jigsaw.make_permutations.__wrapped__(6, 3)
    every = torch.tensor(list(itertools.permutations(range(9))))
    totals = torch.zeros(len(every), dtype=torch.long)  # (9!,) summed distance to the first i
    for i in range(1, 6):
        totals += (every != perms[i - 1]).sum(1)
        assert totals[(every == perms[i]).all(1)].item() == totals.max().item()


@pytest.mark.slow
def test_thousand_permutations():
    perms = jigsaw.make_permutations.__wrapped__(1000, 0)
    assert len({tuple(p) for p in perms.tolist()}) == 1000 and (perms.sort(1).values == torch.arange(9)).all()
    lo, avg = hamming(perms)
    print(f"1000 permutations, seed 0: min Hamming distance {lo}, average {avg:.3f}")
    assert lo >= 2 and avg >= 8.0  # the paper's Table 4: 8.00 / 2


# ------------------------------------------------------------------------------------------ tiles


def test_tiles_equal_cells_and_reassemble_by_inverse_permutation():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 63, 63)
    tiles = jigsaw.cut_tiles(x, 21)  # tile = cell: no random offset, the tiles are the cells
    cells = torch.stack([x[:, :, r * 21:(r + 1) * 21, c * 21:(c + 1) * 21] for r in range(3) for c in range(3)], 1)
    assert torch.equal(tiles, cells)
    perms = jigsaw.make_permutations(100, 0)
    order = perms[torch.tensor([0, 5, 17, 99])]
    puzzle = jigsaw.shuffle_tiles(tiles, order)
    for b in range(4):
        for i in range(9):
            assert torch.equal(puzzle[b, i], cells[b, order[b, i]])  # position i shows cell order[b, i]
        assert torch.equal(puzzle[b, order[b].argsort()], cells[b])  # the inverse permutation gives the cells back


@pytest.mark.parametrize("jitter", [0, 1, 2])
def test_tiles_lie_inside_their_cells_with_gaps(jitter):
    # with channel jitter too: a shifted channel stays in its cell, so no two tiles share a pixel row or column
    torch.manual_seed(0)
    S, T = 64, 18
    x = position_image(64, S)
    x[:, 2] = x[:, 0]  # channel 2 (shifted on its own) also holds the row
    tiles = jigsaw.cut_tiles(x, T, jitter=jitter)
    rows, cols = tiles[:, :, 0::2], tiles[:, :, 1]  # (B, 9, [2,] T, T): the source pixel of every tile pixel
    for k in range(9):
        r, c = divmod(k, 3)
        assert rows[:, k].min() >= 21 * r and rows[:, k].max() < 21 * (r + 1)
        assert cols[:, k].min() >= 21 * c and cols[:, k].max() < 21 * (c + 1)
    rows = tiles[:, :, 0]
    assert torch.equal(rows[..., 1:, :] - rows[..., :-1, :], torch.ones_like(rows[..., 1:, :]))  # contiguous crops
    offsets = rows[:, :, 0, 0] % 21  # the random offset inside the cell: 0 .. 21 - 18
    assert offsets.min() == 0 and offsets.max() == 3


def test_channel_jitter_shifts_channels_by_at_most_jitter():
    torch.manual_seed(0)
    x = position_image(32, 64)
    x[:, 2] = x[:, 0]  # channel 2 also holds the row: compare it with channel 0
    tiles = jigsaw.cut_tiles(x, 18, jitter=1)
    shift = tiles[:, :, 2, 0, 0] - tiles[:, :, 0, 0, 0]  # (B, 9) row shift between two channels of a tile
    assert shift.abs().max() <= 2 and (shift != 0).any()


def test_channel_shift_only_in_colour_images():
    """The paper (Table 5) shifts the colour channels of the colour images; a grey image stays grey."""
    torch.manual_seed(0)
    x = position_image(8, 64)
    x[:, 2] = x[:, 0]
    colour = torch.tensor([True, False] * 4)
    tiles = jigsaw.cut_tiles(x, 18, jitter=1, colour=colour)
    shift = tiles[:, :, 2, 0, 0] - tiles[:, :, 0, 0, 0]  # (B, 9)
    assert (shift[~colour] == 0).all() and (shift[colour] != 0).any()


def test_grayscale_puzzles_have_equal_channels(tmp_path):
    cfg = tiny(jigsaw.Config, tmp_path, gray_prob=1.0, channel_jitter=2)
    x = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    tiles, _ = jigsaw.jigsaw_view(x, jigsaw.make_permutations(cfg.n_perms, 0), cfg)
    assert torch.equal(tiles[:, :, 0], tiles[:, :, 1]) and torch.equal(tiles[:, :, 0], tiles[:, :, 2])
    grey = jigsaw.grayscale(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))  # pure red: luma 0.299 (PIL's weights)
    torch.testing.assert_close(grey, torch.full((1, 3, 1, 1), 0.299))


def test_per_tile_standardization():
    torch.manual_seed(0)
    tiles = torch.rand(2, 9, 3, 18, 18) * (1 + torch.rand(2, 9, 3, 1, 1)) + torch.rand(2, 9, 3, 1, 1)
    out = jigsaw.standardize(tiles)  # each (tile, channel) on its own, whatever its offset and scale
    torch.testing.assert_close(out.mean((-2, -1)), torch.zeros(2, 9, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((-2, -1), unbiased=False), torch.ones(2, 9, 3), atol=1e-3, rtol=0)
    assert jigsaw.standardize(torch.full((1, 3, 4, 4), 0.7)).abs().max() < 1e-4  # a flat tile stays flat, no NaN


def test_jigsaw_view_shapes_and_labels(tmp_path):
    cfg = tiny(jigsaw.Config, tmp_path)
    perms = jigsaw.make_permutations(cfg.n_perms, 0)
    x = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    tiles, labels = jigsaw.jigsaw_view(x, perms, cfg)
    assert tiles.shape == (8, 9, 3, cfg.tile_size, cfg.tile_size) and labels.shape == (8,)
    assert labels.min() >= 0 and labels.max() < cfg.n_perms


def test_jigsaw_view_flips_about_half_the_images(tmp_path, monkeypatch):
    """With the whole image as the crop (crop_min=1) and no grey puzzles, the image the tiles are cut from is the
    image, mirrored left-right or not, per image."""
    torch.manual_seed(0)
    seen, real_cut = [], jigsaw.cut_tiles
    monkeypatch.setattr(jigsaw, "cut_tiles", lambda x, *a, **k: seen.append(x) or real_cut(x, *a, **k))
    cfg = tiny(jigsaw.Config, tmp_path, crop_min=1.0, gray_prob=0.0, **SMALL)
    x = (torch.rand(64, 3, 32, 32) * 255).to(torch.uint8)
    jigsaw.jigsaw_view(x, jigsaw.make_permutations(cfg.n_perms, 0), cfg)
    plain = x.float() / 255
    assert_each_image_or_its_mirror(seen[0], plain, atol=1e-5)


# ------------------------------------------------------------------------------------- model, loss


def test_model_concatenates_tile_features_in_tile_order():
    torch.manual_seed(0)
    model = jigsaw.Jigsaw("tiny", True, 16, 32, 24).eval()
    tiles = torch.randn(2, 9, 3, 18, 18)
    assert model(tiles).shape == (2, 24)
    h = model.tile_fc(model.backbone(tiles.flatten(0, 1))).view(2, 9, 16)
    torch.testing.assert_close(model(tiles), model.classifier(h.flatten(1)))
    swapped = tiles[:, [1, 0, 2, 3, 4, 5, 6, 7, 8]]  # the classifier sees the order of the tiles
    assert not torch.allclose(model(swapped), model(tiles))


def test_jigsaw_loss_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([1, 2])
    expected = (-(2 - math.log(math.e + math.exp(2) + 1)) + math.log(3)) / 2
    assert jigsaw.jigsaw_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_config_checks():
    with pytest.raises(ValueError, match="--tile_size=21"):
        jigsaw.Config(tile_size=21)  # no gap left in a 21 px cell
    with pytest.raises(ValueError, match="--n_perms=1"):
        jigsaw.Config(n_perms=1)
    with pytest.raises(ValueError, match="--gray_prob"):
        jigsaw.Config(gray_prob=1.5)


# -------------------------------------------------------------------------------------- training


def test_smoke_run_writes_log_ckpt_results(tmp_path):
    cfg, results = assert_smoke_run(jigsaw, tmp_path, extra_keys=("pretext_top1",), **SMALL)
    assert results["steps"] == 16 and results["n_perms"] == 100 and 0 <= results["pretext_top1"] <= 1
    log = read_log(cfg)
    assert all("pretext_acc" in r for r in log if "loss" in r)
    assert any("pretext_top1" in r and r.get("epoch") == 1 for r in log)


def test_resume_is_exact(tmp_path):
    assert_resumes_exactly(jigsaw, tmp_path, **SMALL)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(jigsaw, "jigsaw_loss", monkeypatch, tmp_path, **SMALL)


def test_defaults_are_the_documented_recipe():
    """The docstring's "this file" column: 64 px puzzle images of 21 px cells with 18 px tiles (the paper's 64 of 75),
    channel shift <= 1 px and 30% grey puzzles (P Table 5), 100 permutations (C), fc6 512 and fc7 1024, and RotNet's
    CIFAR optimizer: lr 0.1 at batch 128, wd 5e-4, 100 epochs."""
    cfg = jigsaw.Config()
    assert (cfg.image_size, cfg.tile_size, cfg.channel_jitter, cfg.gray_prob) == (64, 18, 1, 0.3)
    assert (cfg.n_perms, cfg.tile_dim, cfg.hidden_dim) == (100, 512, 1024)
    assert (cfg.lr * cfg.batch_size / 256, cfg.weight_decay, cfg.epochs) == (0.1, 5e-4, 100)


def test_features_are_the_tile_encoder_on_the_whole_standardized_image(tmp_path, monkeypatch):
    """Evaluated features (docstring): the tile encoder f, globally pooled, not fc6, on the whole un-tiled image
    upsampled to image_size, each channel standardized as a tile's (P Table 5's per-tile normalization)."""
    assert_features_see_image_size(jigsaw, tmp_path, monkeypatch,
                                   lambda model, up: model.backbone(jigsaw.standardize(up)))


def test_training_puzzles_come_from_the_permutation_set_of_its_seed(tmp_path, monkeypatch):
    """Config: --seed picks the permutation set too: a run with seed 1 trains on make_permutations(n_perms, 1)."""
    seen, real_view = [], jigsaw.jigsaw_view
    monkeypatch.setattr(jigsaw, "jigsaw_view", lambda x, perms, cfg: seen.append(perms) or real_view(x, perms, cfg))
    with few_test_images():
        jigsaw.train(tiny(jigsaw.Config, tmp_path, seed=1, max_steps=1, probe_epochs=0, **SMALL))
    assert torch.equal(seen[0], jigsaw.make_permutations(100, 1))
    assert not torch.equal(seen[0], jigsaw.make_permutations(100, 0))


# ------------------------------------------------------------------------------------- learning
