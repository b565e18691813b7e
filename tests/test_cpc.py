"""cpc.py: the patch grid, targets clear of the context, the context's causality, InfoNCE against hand
computation, per-patch augmentation, 2-process equality, and the training loop's contract on CPU."""

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import (assert_nan_stops_the_run, assert_resumes_exactly, assert_smoke_run, evaluation_inputs,
                      few_test_images, load_ckpt, read_log, tiny)

import common
import cpc

FAST = dict(context_dim=32, context_blocks=1, pred_steps=2)  # the loop's tests need no real context network


def small_cpc(blocks=3, pred_steps=2):
    return cpc.CPC("tiny", True, context_dim=16, context_blocks=blocks, pred_steps=pred_steps, target_dim=8,
                   emb_scale=0.1)


# ------------------------------------------------------------------------------------ the grid


def test_cut_patches_is_the_overlapping_grid():
    x = torch.randn(2, 3, 32, 32)
    patches = cpc.cut_patches(x, 8, 4)
    assert patches.shape == (2, 7, 7, 3, 8, 8)
    for i, j in [(0, 0), (0, 6), (3, 2), (6, 6)]:
        assert torch.equal(patches[:, i, j], x[:, :, 4 * i:4 * i + 8, 4 * j:4 * j + 8])


def test_no_target_patch_shares_a_pixel_with_a_patch_its_context_saw(tmp_path):
    """c[i, j] has seen every patch of rows <= i (all columns, through the masked convolutions). Every
    target it is asked to predict, in any row i + k of the steps, must share no pixel with those; and
    the first step must be the first such row (no clear row skipped), for every patch_size and stride."""
    checked = 0
    for S in (16, 32, 40):
        pixel = torch.arange(S * S, dtype=torch.float64).view(1, 1, S, S).expand(1, 3, S, S)  # each pixel's id
        for size in range(1, S + 1):
            for stride in range(1, size + 1):
                if (S - size) % stride:
                    continue
                grid = cpc.cut_patches(pixel, size, stride)[0, :, :, 0]  # (G, G, size, size) pixel ids
                G = len(grid)
                row = [set(grid[i].long().flatten().tolist()) for i in range(G)]  # the pixels of grid row i
                clear = [k for k in range(1, G) if not row[0] & row[k]]  # rows below row 0 sharing none of its pixels
                if not clear:  # no row can be predicted: the config must say so
                    with pytest.raises(ValueError, match="--pred_steps"):
                        tiny(cpc.Config, tmp_path, image_size=S, patch_size=size, patch_stride=stride, pred_steps=1)
                    continue
                K = G - clear[0]  # the most steps that fit
                cfg = tiny(cpc.Config, tmp_path, image_size=S, patch_size=size, patch_stride=stride, pred_steps=K)
                steps = cpc.prediction_steps(cfg.patch_size, cfg.patch_stride, cfg.pred_steps)
                assert steps[0] == clear[0] and len(steps) == K, (S, size, stride, steps)
                for k in steps:
                    for i in range(G - k):
                        seen = set().union(*row[:i + 1])  # every patch of rows <= i
                        assert not seen & row[i + k], (S, size, stride, i, k)
                with pytest.raises(ValueError, match="--pred_steps"):
                    tiny(cpc.Config, tmp_path, image_size=S, patch_size=size, patch_stride=stride, pred_steps=K + 1)
                checked += 1
    assert checked > 50
    assert cpc.prediction_steps(8, 4, 5) == [2, 3, 4, 5, 6]  # the default grid: 8 px patches, stride 4


def test_masked_conv_sees_its_own_row_and_the_one_above():
    torch.manual_seed(0)
    conv = cpc.MaskedConv2d(4, 4)
    x = torch.randn(2, 4, 7, 7)
    y = conv(x)
    assert y.shape == x.shape
    for r in range(7):
        changed = x.clone()
        changed[:, :, r] = torch.randn_like(changed[:, :, r])
        moved = [not torch.allclose(row2, row) for row2, row in zip(conv(changed).unbind(2), y.unbind(2))]
        assert moved == [i in (r, r + 1) for i in range(7)], r


def test_context_at_row_r_does_not_depend_on_patches_below():
    torch.manual_seed(0)
    model = small_cpc(blocks=3)
    patches = torch.randn(2, 7, 7, 3, 8, 8)
    c = model.context(model.encode(patches))  # (B, G, G, D)
    targets, p = model(patches)
    for r in range(6):
        changed = patches.clone()
        changed[:, r + 1:] = torch.randn_like(changed[:, r + 1:])  # every patch below row r
        c2 = model.context(model.encode(changed))
        _, p2 = model(changed)
        assert torch.equal(c2[:, :r + 1], c[:, :r + 1]), r
        assert torch.equal(p2[:, :, :r + 1], p[:, :, :r + 1]), r  # the predictions made from rows <= r
        assert not torch.allclose(c2[:, r + 1:], c[:, r + 1:])  # the test can fail: the rows below did change
    changed = patches.clone()
    changed[:, 0] = torch.randn_like(changed[:, 0])  # the top row reaches one row further down per block
    c2 = model.context(model.encode(changed))
    assert [not torch.allclose(c2[:, i], c[:, i]) for i in range(7)] == [i <= 3 for i in range(7)]


def test_context_blocks_are_residual():
    """P2 App. A: each block adds its output to its input. With every block's last 1x1 conv zeroed, the blocks add
    nothing and c = relu(z)."""
    torch.manual_seed(0)
    net = cpc.ContextNet(8, 16, 3)
    for block in net.blocks:
        torch.nn.init.zeros_(block[-1].weight)
        torch.nn.init.zeros_(block[-1].bias)
    z = torch.randn(2, 5, 5, 8)
    torch.testing.assert_close(net(z), F.relu(z))


def test_predictions_and_targets_meet_in_the_projected_space():
    """As P2 App. A: targets T z, predictions emb_scale * W_k c, one W_k per step."""
    torch.manual_seed(0)
    model = small_cpc(pred_steps=3)
    patches = torch.randn(2, 7, 7, 3, 8, 8)
    targets, preds = model(patches)
    z = model.encode(patches)
    c = model.context(z)
    assert targets.shape == (2, 7, 7, 8) and preds.shape == (2, 3, 7, 7, 8)
    torch.testing.assert_close(targets, z @ model.target.weight.T + model.target.bias)
    for s, W_k in enumerate(model.predictors):
        torch.testing.assert_close(preds[:, s], 0.1 * (c @ W_k.weight.T + W_k.bias))
    assert len({W_k.weight.data_ptr() for W_k in model.predictors}) == 3  # not shared across steps


# ------------------------------------------------------------------------------------------ loss


def test_cpc_loss_equals_cross_entropy_with_the_positive_index():
    torch.manual_seed(0)
    B, G, T, N, own_start, steps = 2, 4, 4, 3, 1, [2, 3]  # this process holds images 1 and 2 of 3
    preds, targets = torch.randn(B, len(steps), G, G, T), torch.randn(N, G, G, T)
    candidates = targets.reshape(-1, T)  # (N*G*G, T): target of (n, i, j) at row (n*G + i)*G + j
    losses, hits = [], []
    for b in range(B):
        for s, k in enumerate(steps):
            for i in range(G - k):
                for j in range(G):
                    logits = candidates @ preds[b, s, i, j]  # (N*G*G,) every patch of every image
                    positive = ((own_start + b) * G + i + k) * G + j  # k rows below, same column, same image
                    losses.append(F.cross_entropy(logits[None], torch.tensor([positive])))
                    hits.append(float(logits.argmax() == positive))
    assert len(losses) == B * G * (2 + 1)  # k = 2: rows 0, 1; k = 3: row 0
    loss, acc = cpc.cpc_loss(preds, targets, steps, own_start)
    torch.testing.assert_close(loss, torch.stack(losses).mean())
    assert acc.item() == pytest.approx(sum(hits) / len(hits))


def test_cpc_loss_hand_computed():
    """One image, a 2 x 2 grid, one step k = 1: the two patches of row 0 predict the two of row 1."""
    targets = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 0.0]]]])  # (1, 2, 2, 2): targets[0,i,j]
    preds = torch.zeros(1, 1, 2, 2, 2)
    preds[0, 0, 0, 0] = torch.tensor([2.0, 0.0])  # predicts targets[1, 0] = (1, 1)
    preds[0, 0, 0, 1] = torch.tensor([0.0, 1.0])  # predicts targets[1, 1] = (-1, 0)
    preds[0, 0, 1] = 100.0  # row 1 has nothing below: must not count
    codes = [(1, 0), (0, 1), (1, 1), (-1, 0)]

    def nll(p, positive):
        scores = [p[0] * c[0] + p[1] * c[1] for c in codes]
        return -scores[positive] + math.log(sum(math.exp(s) for s in scores))

    expected = (nll((2, 0), 2) + nll((0, 1), 3)) / 2  # scores (2, 0, 2, -2) and (0, 1, 1, 0)
    loss, acc = cpc.cpc_loss(preds, targets, [1], 0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # first prediction: tie between codes 0 and 2, argmax picks the first (a miss); second: tie 1, 2 (a miss)
    assert acc.item() == 0.0


def test_cpc_loss_hand_computed_two_rows_down():
    """One image, a 3 x 1 grid, step k = 2: only row 0 predicts, and its positive is row 2, not row 1."""
    targets = torch.tensor([[[[1.0]], [[2.0]], [[-1.0]]]])  # (1, 3, 1, 1)
    preds = torch.tensor([[[[[-1.0]], [[50.0]], [[50.0]]]]])  # (1, 1, 3, 1, 1): rows 1 and 2 must not count
    scores = [-1.0, -2.0, 1.0]  # pred -1 against targets 1, 2, -1
    expected = -scores[2] + math.log(sum(math.exp(s) for s in scores))
    loss, acc = cpc.cpc_loss(preds, targets, [2], 0)
    assert loss.item() == pytest.approx(expected, rel=1e-6) and acc.item() == 1.0


def test_patch_augmentations_are_drawn_per_patch(tmp_path):
    torch.manual_seed(0)
    tile = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    x = tile.repeat(4, 1, 8, 8)  # (4, 3, 32, 32), period 4: all 49 patches of an image are the same
    cfg = tiny(cpc.Config, tmp_path, crop_min=1.0, color_drop=0.0)  # crop_min 1: the crop is the whole image
    patches = cpc.cpc_view(x, cfg)  # (4, 7, 7, 3, 8, 8)
    for img in patches:
        first = img[0, 0]
        same = [torch.allclose(p, first, atol=1e-5) for p in img.flatten(0, 1)]
        mirrored = [torch.allclose(p, first.flip(2), atol=1e-5) for p in img.flatten(0, 1)]
        assert all(s or m for s, m in zip(same, mirrored)) and 5 < sum(mirrored) < 44  # flipped or not, per patch
    patches = cpc.cpc_view(x, tiny(cpc.Config, tmp_path, color_drop=1.0))
    zero = (patches.abs().amax((4, 5)) == 0)  # (4, 7, 7, 3): channels dropped to the mean
    assert (zero.sum(-1) == 2).all()  # every patch keeps exactly one channel
    kept = (~zero).float().argmax(-1)  # (4, 7, 7)
    assert all(len(k.unique()) == 3 for k in kept)  # which one is drawn per patch, not per image


def test_config_rejects_impossible_values(tmp_path):
    for bad in (dict(pred_steps=6), dict(pred_steps=0), dict(patch_stride=5), dict(color_drop=1.5),
                dict(target_dim=0), dict(emb_scale=0.0), dict(arch="vit")):
        with pytest.raises(ValueError, match="--" + list(bad)[0]):
            tiny(cpc.Config, tmp_path, **bad)


def test_two_processes_equal_one_process_on_the_global_batch(dist_scripts):
    """Negatives span the global batch: 2-process loss and gradients == 1 process on all images."""
    out = dist_scripts("dist_cpc_step.py")
    assert out.count("max grad diff") == 2, out


# -------------------------------------------------------------------------------------- training


def test_smoke_run_writes_log_ckpt_results(tmp_path):
    cfg, results = assert_smoke_run(cpc, tmp_path, **FAST)
    assert results["steps"] == 16
    log = read_log(cfg)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    assert "acc" in log[1] and log[0]["step"] == 0  # log[0]: the monitor at random initialisation


def test_resume_is_exact(tmp_path):
    assert_resumes_exactly(cpc, tmp_path, **FAST)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(cpc, "cpc_loss", monkeypatch, tmp_path, **FAST)


def test_every_grid_is_cut_from_images_at_image_size(tmp_path, monkeypatch):
    # synthetic images are 32 px; at image_size=24 the views are 24 px, and the evaluations (kNN, probe,
    # linear crops of the 32 px images) must resize to 24 px too: the scale the patch codes were learned at
    sides, cut = [], cpc.cut_patches
    monkeypatch.setattr(cpc, "cut_patches", lambda x, size, stride: sides.append(x.shape[-1]) or cut(x, size, stride))
    results = cpc.train(tiny(cpc.Config, tmp_path, image_size=24, subset=128, max_steps=1, linear_epochs=1, **FAST))
    assert results["linear_top1"] is not None and len(sides) > 3 and set(sides) == {24}


def test_a_process_finds_its_positives_among_its_own_targets(tmp_path, monkeypatch):
    """Inside train() as process 1 of 2 (faked, up to its first loss): the gathered targets hold process 0's images
    first (zeros here), so this process's positives, own_start .. own_start + B - 1, must be its own targets."""
    real_setup, seen = common.setup, []
    monkeypatch.setattr(common, "setup", lambda cfg: dataclasses.replace(real_setup(cfg), rank=1, world_size=2))
    monkeypatch.setattr(common, "compile_and_ddp", lambda model, rt: model)  # no process group to wrap it in
    monkeypatch.setattr(common, "gather_with_grad", lambda t: torch.cat([torch.zeros_like(t), t]))

    class Seen(Exception):  # stops the run at its first loss: the faked process group could not evaluate
        pass

    def loss(preds, targets, steps, own_start):
        seen.append((targets.detach(), own_start, len(preds)))
        raise Seen

    monkeypatch.setattr(cpc, "cpc_loss", loss)
    with pytest.raises(Seen):
        cpc.train(tiny(cpc.Config, tmp_path, max_steps=1, probe_epochs=0, **FAST))
    (targets, own_start, B), = seen
    assert len(targets) == 2 * B and (targets[own_start:own_start + B].abs().flatten(1).sum(1) > 0).all()


def test_defaults_are_the_documented_recipe():
    """The docstring's table: C's 7 x 7 grid of 8 px patches at stride 4 on 32 px images; P2 App. A's context net
    (5 blocks, 256 wide), 64-d target space and emb_scale 0.1; steps 2..6 (pred_steps 5); crops of 30-100% of the
    area; AdamW 2e-4 per 256 images, wd 1e-5, batch 256, warmup 10 then cosine, 300 epochs."""
    cfg = cpc.Config()
    assert (cfg.image_size, cfg.patch_size, cfg.patch_stride, cfg.context_blocks, cfg.context_dim) == (32, 8, 4, 5, 256)
    assert (cfg.pred_steps, cfg.target_dim, cfg.emb_scale, cfg.crop_min) == (5, 64, 0.1, 0.3)
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.warmup_epochs, cfg.epochs) == (2e-4, 1e-5, 256, 10, 300)


def test_features_average_the_codes_of_the_grids_patches(tmp_path, monkeypatch):
    """Evaluated features (docstring, P1 Sec. 3.2): the patch encoder's z of each of the 7 x 7 patches (8 px, stride 4)
    of the normalized image, each patch encoded alone, averaged over the grid."""
    model, features, data = evaluation_inputs(cpc, tiny(cpc.Config, tmp_path, max_steps=1, probe_epochs=0, **FAST),
                                              monkeypatch)
    x = data.test[0][:4]  # uint8 (4, 3, 32, 32)
    up = common.normalize(common.to_float(x))
    with torch.no_grad():
        z = torch.stack([model.encoder(up[:, :, 4 * i:4 * i + 8, 4 * j:4 * j + 8]) for i in range(7) for j in range(7)])
        torch.testing.assert_close(features(x), z.mean(0))


def test_run_warms_up_over_warmup_epochs_and_saves_the_patch_encoder_alone(tmp_path):
    """The lr rises linearly from 0 over warmup_epochs epochs of steps (here 1 epoch of 8 steps) to 2e-4 * 64 / 256 =
    5e-5: the record after step s holds 5e-5 * (s - 1) / 8. encoder.pt is the patch encoder as trained (the
    checkpoint's encoder.*), without the context network, T and the W_k."""
    cfg = tiny(cpc.Config, tmp_path, epochs=2, warmup_epochs=1, max_steps=8, probe_epochs=0, **FAST)
    with few_test_images():
        cpc.train(cfg)
    log = read_log(cfg)
    lrs = {r["step"]: r["lr"] for r in log if "loss" in r}
    assert lrs == pytest.approx({s: 5e-5 * (s - 1) / 8 for s in (1, 2, 4, 6, 8)})
    encoder = torch.load(os.path.join(cfg.out_dir, "encoder.pt"), weights_only=True)
    trained = {k.removeprefix("encoder."): v for k, v in load_ckpt(cfg)["model"].items() if k.startswith("encoder.")}
    assert encoder.keys() == trained.keys() and all(torch.equal(v, trained[k]) for k, v in encoder.items())
