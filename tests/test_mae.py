"""mae.py: patches, masking, the loss against hand computation, and the training loop's contract on CPU."""

import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import (assert_nan_stops_the_run, assert_resumes_exactly, assert_smoke_run, evaluation_inputs,
                      few_test_images, load_ckpt, read_log, tiny)

import common
import mae

SMALL_DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)  # the loop's tests do not need a real decoder


def tiny_mae(**overrides):
    torch.manual_seed(0)
    return mae.MAE(image_size=16, patch_size=4, dim=32, depth=2, heads=2, decoder_dim=32, decoder_depth=1,
                   decoder_heads=2, **overrides)


# ------------------------------------------------------------------------------------ patches


def test_patchify_order_and_unpatchify_inverse():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 8, 12)
    x = mae.patchify(imgs, 4)
    assert x.shape == (2, 6, 48)  # 2 x 3 patches of 4*4*3 values
    for l, (r, c) in enumerate([(r, c) for r in range(2) for c in range(3)]):  # row-major patches
        patch = imgs[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4]  # (B, C, p, p)
        torch.testing.assert_close(x[:, l], patch.permute(0, 2, 3, 1).reshape(2, -1))  # (row, col, channel)
    square = torch.randn(3, 3, 16, 16)
    assert torch.equal(mae.unpatchify(mae.patchify(square, 4), 4), square)
    y = torch.randn(3, 16, 12)
    assert torch.equal(mae.patchify(mae.unpatchify(y, 2), 2), y)


# ------------------------------------------------------------------------------------ masking


@pytest.mark.parametrize("L, ratio, removed",
                         [(64, 0.75, 48), (49, 0.75, 37), (10, 0.35, 4), (10, 0.45, 5), (16, 0.5, 8), (64, 0.6, 39)])
def test_random_masking_keeps_int_L_times_1_minus_ratio_per_sample(L, ratio, removed):
    """The official count, rounded down: int(64 * 0.4) = 25 kept (round(64 * 0.6) would remove 38), int(5.5) = 5."""
    assert L - removed == int(L * (1 - ratio))
    torch.manual_seed(0)
    x = torch.randn(16, L, 5)
    visible, mask, ids_restore = mae.random_masking(x, ratio)
    assert visible.shape == (16, L - removed, 5) and mask.shape == (16, L)
    assert (mask.sum(1) == removed).all() and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert len({tuple(m.tolist()) for m in mask}) > 1  # a different subset per sample
    for b in range(16):  # the visible tokens are exactly the kept positions' tokens
        kept = x[b][mask[b] == 0]
        assert sorted(map(tuple, visible[b].tolist())) == sorted(map(tuple, kept.tolist()))
    # ids_restore puts [visible, anything] back into image order, the visible tokens in their places
    padded = torch.cat([visible, torch.zeros(16, removed, 5)], 1)
    restored = padded.gather(1, ids_restore[..., None].expand(-1, -1, 5))
    torch.testing.assert_close(restored, x * (1 - mask[..., None]))


def test_encoder_never_sees_removed_patches():
    model = tiny_mae().eval()
    patches = mae.patchify(torch.randn(4, 3, 16, 16), 4)  # (4, 16, 48)
    torch.manual_seed(1)
    h, mask, _ = model.forward_encoder(patches, 0.75)
    changed = patches + 10 * torch.randn_like(patches) * mask[..., None]  # new content in every removed patch
    torch.manual_seed(1)  # the same masks
    h2, mask2, _ = model.forward_encoder(changed, 0.75)
    assert torch.equal(mask, mask2) and torch.equal(h, h2)
    visible_changed = patches + torch.randn_like(patches) * (1 - mask[..., None])  # the test can fail
    torch.manual_seed(1)
    assert not torch.allclose(model.forward_encoder(visible_changed, 0.75)[0], h)


def test_position_embeddings_are_fixed_2d_sincos():
    model = tiny_mae()
    names = {n for n, _ in model.named_parameters()}
    assert not any("pos_embed" in n for n in names)  # buffers, not trained
    pe = mae.sincos_pos_embed(8, 3)  # (1 + 9, 8): 2 frequencies each for column sin, column cos, row sin, row cos
    assert pe.shape == (10, 8) and torch.equal(pe[0], torch.zeros(8))
    row, col = 1, 2  # patch 1 * 3 + 2 = 5, the token after the cls row
    omega = torch.tensor([1.0, 0.01])  # 1 / 10000 ** (k / 2)
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                          torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(pe[1 + 5], expected)


def test_encoder_and_decoder_know_where_each_patch_lies():
    """Fixed position embeddings enter the encoder (before masking) and the decoder: without them a transformer is
    blind to order, and shuffling the patches (or the decoder's tokens) would only shuffle the outputs."""
    model = tiny_mae().eval()
    patches, perm = mae.patchify(torch.randn(2, 3, 16, 16), 4), torch.randperm(16)
    ids = torch.arange(16).expand(2, -1)  # nothing removed: image order
    with torch.no_grad():
        h = model.forward_encoder(patches, 0.0)[0]
        h_perm = model.forward_encoder(patches[:, perm], 0.0)[0]
        assert not torch.allclose(h_perm[:, 1:], h[:, 1:][:, perm], atol=1e-3)
        pred = model.forward_decoder(h, ids)
        pred_perm = model.forward_decoder(torch.cat([h[:, :1], h[:, 1:][:, perm]], 1), ids)
        assert not torch.allclose(pred_perm, pred[:, perm], atol=1e-3)


def test_decoder_puts_every_token_back_in_its_own_place():
    """With the decoder's blocks made identities (residual branches zeroed) each prediction reads one token: changing
    the first visible token changes the prediction of the patch it came from (ids_restore's unshuffle), no other."""
    model = tiny_mae().eval()
    for block in model.decoder_blocks:
        for layer in (block.self_attn.out_proj, block.linear2):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    torch.manual_seed(1)
    with torch.no_grad():
        h, mask, ids_restore = model.forward_encoder(mae.patchify(torch.randn(4, 3, 16, 16), 4), 0.75)
        changed = h.clone()
        changed[:, 1] += 1  # the first visible token (token 0 is the cls token)
        moved = (model.forward_decoder(changed, ids_restore) - model.forward_decoder(h, ids_restore)).abs().amax(-1) > 0
    first = ids_restore.argsort(1)[:, 0]  # (B,): the patch the first visible token came from
    assert torch.equal(moved, F.one_hot(first, 16).bool()) and (mask.gather(1, first[:, None]) == 0).all()


def test_weight_decay_spares_only_biases_and_norms_as_the_official_code():
    """main_pretrain.py groups parameters with timm 0.3.2's add_weight_decay: no decay for 1-D parameters
    and names ending in .bias; everything else, cls_token and mask_token ((1, 1, D) there) included, decays."""
    model = tiny_mae()
    groups = {g["name"]: g for g in common.param_groups(model, 0.05)}
    decayed = {id(p) for p in groups["weights"]["params"]}
    assert groups["weights"]["weight_decay"] == 0.05 and groups["biases"]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        official = not (p.ndim == 1 or name.endswith(".bias"))  # timm's rule, as main_pretrain.py calls it
        assert (id(p) in decayed) == official, name
    assert id(model.cls_token) in decayed and id(model.mask_token) in decayed  # the tokens decay
    assert model.cls_token.shape == (1, 1, 32) and model.mask_token.shape == (1, 1, 32)  # by their 3-D shape


# ------------------------------------------------------------------------------------------ loss


def test_mae_loss_only_on_removed_patches():
    torch.manual_seed(0)
    imgs, pred = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 48)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1]])
    for norm in (False, True):
        loss = mae.mae_loss(imgs, pred, mask, 4, norm)
        moved = pred + 5 * torch.randn_like(pred) * (1 - mask[..., None])  # other predictions on the visible patches
        torch.testing.assert_close(mae.mae_loss(imgs, moved, mask, 4, norm), loss)
        moved = pred + torch.randn_like(pred) * mask[..., None]  # the test can fail
        assert not torch.allclose(mae.mae_loss(imgs, moved, mask, 4, norm), loss)


def test_mae_loss_hand_computed():
    """One 2x2 image, p = 1: four patches of three values; patches 1 and 2 removed."""
    img = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [6.0, 1.0]], [[2.0, 2.0], [0.0, 1.0]]])[None]  # 1x3x2x2
    pixels = [[1.0, 0.0, 2.0], [2.0, 0.0, 2.0], [3.0, 6.0, 0.0], [4.0, 1.0, 1.0]]  # patches (row-major), channels last
    pred = torch.tensor([[[0.5, 0.5, 0.5], [1.0, -1.0, 3.0], [2.0, 2.0, 2.0], [9.0, 9.0, 9.0]]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])

    def mse(target, p):
        return sum((a - b) ** 2 for a, b in zip(target, p)) / 3

    raw = (mse(pixels[1], pred[0, 1].tolist()) + mse(pixels[2], pred[0, 2].tolist())) / 2  # (3/3 + 21/3) / 2
    assert mae.mae_loss(img, pred, mask, 1, False).item() == pytest.approx(raw, rel=1e-6)
    assert raw == pytest.approx(4.0)

    def standardized(v):  # unbiased variance (n - 1), epsilon 1e-6 inside the root, as the official code
        m = sum(v) / 3
        var = sum((a - m) ** 2 for a in v) / 2
        return [(a - m) / (var + 1e-6) ** 0.5 for a in v]

    normed = (mse(standardized(pixels[1]), pred[0, 1].tolist()) + mse(standardized(pixels[2]), pred[0, 2].tolist())) / 2
    assert mae.mae_loss(img, pred, mask, 1, True).item() == pytest.approx(normed, rel=1e-5)
    # [2, 0, 2]: mean 4/3, unbiased variance 4/3 -> (1/sqrt(3)) * [1, -2, 1]
    torch.testing.assert_close(torch.tensor(standardized(pixels[1])), torch.tensor([1.0, -2.0, 1.0]) / 3**0.5)


def test_config_rejects_impossible_values(tmp_path):
    for bad in (dict(mask_ratio=1.0), dict(mask_ratio=0.0), dict(mask_ratio=0.999), dict(patch_size=5),
                dict(decoder_dim=30), dict(arch="resnet18")):
        with pytest.raises(ValueError, match="--" + list(bad)[0]):
            tiny(mae.Config, tmp_path, **bad)


# -------------------------------------------------------------------------------------- training


def test_smoke_run_writes_log_ckpt_results_and_pngs(tmp_path):
    cfg, results = assert_smoke_run(mae, tmp_path, **SMALL_DECODER)
    assert results["steps"] == 16
    log = read_log(cfg)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    for name in ("reconstruction_epoch1.png", "reconstruction_final.png"):
        png = torchvision.io.read_image(os.path.join(cfg.out_dir, name))
        # 3 rows (original, masked, reconstruction) of 8 images, 2 px padding
        assert png.shape == (3, 3 * 34 + 2, 8 * 34 + 2)
    encoder = torch.load(os.path.join(cfg.out_dir, "encoder.pt"), weights_only=True)
    assert "cls_token" in encoder and not any(k.startswith(("decoder", "mask_token")) for k in encoder)


def test_resume_is_exact(tmp_path):
    assert_resumes_exactly(mae, tmp_path, **SMALL_DECODER)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(mae, "mae_loss", monkeypatch, tmp_path, **SMALL_DECODER)


def test_evaluations_and_pngs_read_images_at_image_size_not_the_datasets(tmp_path):
    # synthetic images are 32 px; at image_size=16 the positional embedding has a 4 x 4 grid, so the kNN
    # features, the linear evaluation's crops, test_loss and the PNG must all be resized to 16 px first
    cfg = tiny(mae.Config, tmp_path, image_size=16, patch_size=4, subset=128, max_steps=1, linear_epochs=1,
               **SMALL_DECODER)
    results = mae.train(cfg)
    assert all(0 <= results[k] <= 1 for k in ("knn_top1", "probe_top1", "linear_top1"))
    assert results["test_loss"] > 0
    png = torchvision.io.read_image(os.path.join(cfg.out_dir, "reconstruction_final.png"))
    assert png.shape == (3, 3 * 18 + 2, 8 * 18 + 2)  # 16 px images, 2 px padding


def test_defaults_are_the_documented_recipe():
    """The docstring's table: 75% of the patches removed (P Sec. 4.1), normalized-pixel targets (P Tab. 1d), crops
    of 20-100% of the area (C); as I: ViT-Tiny on 4 px patches, a decoder of 4 blocks 192 wide with 3 heads, batch
    4096, AdamW 1.5e-4 per 256 images, 2000 epochs with 200 of warmup; weight decay 0.05 (C)."""
    cfg = mae.Config()
    assert (cfg.mask_ratio, cfg.norm_pix_loss, cfg.crop_min) == (0.75, True, 0.2)
    assert (cfg.arch, cfg.patch_size) == ("vit_tiny", 4)
    assert (cfg.decoder_depth, cfg.decoder_dim, cfg.decoder_heads) == (4, 192, 3)
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.warmup_epochs, cfg.weight_decay) == (4096, 1.5e-4, 2000, 200, 0.05)


def test_features_are_the_normed_cls_token_of_the_whole_image(tmp_path, monkeypatch):
    """Evaluated features (docstring; C main_linprobe.py): the encoder's cls-token output after its final LayerNorm,
    with every patch of the un-masked image in place: token 0 of norm(blocks([cls + pos_0, embed(patches) + pos]))."""
    cfg = tiny(mae.Config, tmp_path, max_steps=1, probe_epochs=0, **SMALL_DECODER)
    model, features, data = evaluation_inputs(mae, cfg, monkeypatch)
    x = data.test[0][:4]  # uint8 (4, 3, 32, 32)
    patches = mae.patchify(common.normalize(common.to_float(x)), 4)  # (4, 64, 48): all 64 patches
    cls = (model.cls_token + model.pos_embed[0]).expand(4, 1, -1)
    with torch.no_grad():
        tokens = torch.cat([cls, model.patch_embed(patches) + model.pos_embed[1:]], 1)  # (4, 65, 64)
        torch.testing.assert_close(features(x), model.norm(model.blocks(tokens))[:, 0])


def test_monitor_runs_every_eval_every_epochs_and_encoder_pt_is_the_whole_encoder(tmp_path):
    """eval_every counts epochs: 3 epochs of 8 steps with eval_every=2 run the monitor (and its PNG) at random
    initialisation and after epoch 2 (step 16) only; the end has its own. encoder.pt is the encoder as trained:
    every parameter but the decoder's and the mask token (patch embedding, cls token, blocks, final norm)."""
    cfg = tiny(mae.Config, tmp_path, epochs=3, eval_every=2, probe_epochs=0, **SMALL_DECODER)
    with few_test_images():
        mae.train(cfg)
    log = read_log(cfg)
    assert [r["step"] for r in log if "knn_top1" in r] == [0, 16]
    pngs = sorted(f for f in os.listdir(cfg.out_dir) if f.endswith(".png"))
    assert pngs == ["reconstruction_epoch0.png", "reconstruction_epoch2.png", "reconstruction_final.png"]
    encoder = torch.load(os.path.join(cfg.out_dir, "encoder.pt"), weights_only=True)
    trained = {k: v for k, v in load_ckpt(cfg)["model"].items() if not k.startswith(("decoder", "mask_token"))}
    assert {"norm.weight", "norm.bias", "cls_token", "patch_embed.weight"} <= set(encoder)
    assert encoder.keys() == trained.keys() and all(torch.equal(v, trained[k]) for k, v in encoder.items())
