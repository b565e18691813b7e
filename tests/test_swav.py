"""swav.py: Sinkhorn codes, the swapped-prediction loss against hand computation, prototypes and
queue in the training loop, the 2-process equality, the recipe's views and optimizer, and the loop's
contract on CPU."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from conftest import (assert_features_and_encoder_are_the_backbone, assert_nan_stops_the_run, assert_resumes_exactly,
                      assert_smoke_run, assert_warmup_then_cosine, load_ckpt, read_log, tiny)

import common
import swav


def cosine_scores(B, K, D, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, D, generator=g), dim=1) @ F.normalize(torch.randn(K, D, generator=g), dim=1).T


# ---------------------------------------------------------------------------------------- sinkhorn


def test_sinkhorn_rows_sum_to_one_and_columns_are_balanced():
    """The paper's setting: batch 256, 3000 prototypes, 128-d, epsilon 0.05, 3 iterations. Rows sum
    to 1 (float32 rounding); each column sums to B/K within 1% (seen: at most 0.08% over 3 seeds),
    where the softmax of the same scores is off by a factor of 2-4."""
    for seed in range(3):
        scores = cosine_scores(256, 3000, 128, seed)
        q = swav.sinkhorn(scores, 0.05, 3)
        assert q.shape == (256, 3000) and q.dtype == torch.float32 and (q >= 0).all()
        torch.testing.assert_close(q.sum(1), torch.ones(256), atol=1e-5, rtol=0)
        balance = q.sum(0) / (256 / 3000)  # 1 = perfectly equal share
        assert (balance - 1).abs().max() < 0.01
        assert ((F.softmax(scores / 0.05, 1).sum(0) / (256 / 3000)) - 1).abs().max() > 1.0


def test_sinkhorn_converges_to_equipartition():
    """Few prototypes and peaked scores: 3 iterations only approach the equal share; the column
    error shrinks with the iterations and vanishes in the limit (the transport polytope's point)."""
    scores = cosine_scores(64, 8, 16, 0)
    errors = [(swav.sinkhorn(scores, 0.05, n).sum(0) / 8 - 1).abs().max().item() for n in (3, 10, 30, 200)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.05 and errors[-1] < 1e-4


def test_sinkhorn_matches_the_official_formulation():
    """The official distributed_sinkhorn, written out here (K x B layout, total normalization, 1/K and
    1/B factors, columns scaled by B at the end): the same codes."""
    scores, eps = cosine_scores(40, 12, 8, 1), 0.05
    Q = torch.exp(scores / eps).T  # (K, B)
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(3):
        Q /= Q.sum(1, keepdim=True)
        Q /= K
        Q /= Q.sum(0, keepdim=True)
        Q /= B
    Q *= B
    torch.testing.assert_close(swav.sinkhorn(scores, eps, 3), Q.T, atol=1e-6, rtol=1e-5)


def test_sinkhorn_gives_no_gradient():
    scores = cosine_scores(16, 5, 4, 0).requires_grad_(True)
    q = swav.sinkhorn(scores, 0.05, 3)
    assert not q.requires_grad and q.grad_fn is None
    loss = swav.swav_loss(torch.stack([scores, scores]), torch.stack([q, q]), 0.1)
    loss.backward()  # the gradient reaches the scores only through the predictions
    expected = (F.softmax(scores.detach() / 0.1, 1) - q) / 0.1 / 16  # d CE / d scores, mean over 16 rows, both crops
    torch.testing.assert_close(scores.grad, expected, atol=1e-6, rtol=1e-4)


def test_sinkhorn_under_two_processes_equals_one_process_on_the_global_batch(dist_scripts):
    """Also one full SwAV step: 2-process loss and gradients == 1 process (tests/dist_swav_sinkhorn.py)."""
    out = dist_scripts("dist_swav_sinkhorn.py")
    assert out.count("max grad diff") == 2, out


# -------------------------------------------------------------------------------------------- loss


def test_swav_loss_hand_computed():
    # V = 3 crops (2 global + 1 small) of B = 1 image, K = 2 prototypes
    s = [[0.5, -0.2], [0.1, 0.3], [-0.4, 0.9]]
    q = [[0.7, 0.3], [0.2, 0.8]]
    T = 0.1

    def ce(code, score):
        m = max(score)
        lse = m / T + math.log(sum(math.exp((v - m) / T) for v in score))
        return -sum(c * (v / T - lse) for c, v in zip(code, score))

    expected = 0.5 * ((ce(q[0], s[1]) + ce(q[0], s[2])) / 2 + (ce(q[1], s[0]) + ce(q[1], s[2])) / 2)
    loss = swav.swav_loss(torch.tensor(s).view(3, 1, 2), torch.tensor(q).view(2, 1, 2), T)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_prototype_scores_stay_float32_under_bfloat16_autocast():
    """Sinkhorn takes exp(scores / 0.05): a bfloat16 score (8 bits of mantissa) would move the codes by percents."""
    torch.manual_seed(0)
    model = swav.SwAV("tiny", True, 32, 16, 10)
    x = torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, scores = model(x)
    assert z.dtype == torch.bfloat16 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, z.float() @ model.prototypes.weight.T, atol=0, rtol=0)


def test_swav_loss_swaps_the_predictions():
    """A crop never predicts its own code: changing crop 0's scores leaves the term of code 0 unchanged."""
    torch.manual_seed(0)
    scores, codes = torch.randn(2, 4, 6), F.softmax(torch.randn(2, 4, 6), 2)
    moved = scores.clone()
    moved[0] += torch.randn(4, 6)
    only_code0 = torch.stack([codes[0], torch.zeros(4, 6)])
    torch.testing.assert_close(swav.swav_loss(scores, only_code0, 0.1), swav.swav_loss(moved, only_code0, 0.1))


# ------------------------------------------------------------------------------- prototypes, queue


def record_forward(monkeypatch):
    """Record (z, prototypes) at every training forward; the evaluation uses the backbone only."""
    calls, real_forward = [], swav.SwAV.forward

    def forward(self, x_big, x_small=None):
        z, scores = real_forward(self, x_big, x_small)
        calls.append((z.detach().clone(), self.prototypes.weight.detach().clone()))
        return z, scores

    monkeypatch.setattr(swav.SwAV, "forward", forward)
    return calls


def record_sinkhorn_rows(monkeypatch):
    rows, real_sinkhorn = [], swav.sinkhorn

    def sinkhorn(scores, epsilon, n_iters):
        rows.append(scores.shape[0])
        return real_sinkhorn(scores, epsilon, n_iters)

    monkeypatch.setattr(swav, "sinkhorn", sinkhorn)
    return rows


def test_queue_holds_the_last_features_and_joins_the_codes_once_full(tmp_path, monkeypatch):
    calls, rows = record_forward(monkeypatch), record_sinkhorn_rows(monkeypatch)
    cfg = tiny(swav.Config, tmp_path, subset=256, batch_size=32, max_steps=4, queue_size=64, queue_start_epoch=0,
               probe_epochs=0)  # a queue of 2 batches
    swav.train(cfg)
    B, D = cfg.batch_size, cfg.proj_dim
    queue = load_ckpt(cfg)["queue"]
    assert queue.shape == (64, 2, D)  # (queue_size, global crops, proj_dim)
    newest, previous = calls[-1][0][:2 * B].view(2, B, D), calls[-2][0][:2 * B].view(2, B, D)
    torch.testing.assert_close(queue.transpose(0, 1), torch.cat([newest, previous], 1), atol=0, rtol=0)
    assert rows == [B, B, B, B, B + 64, B + 64, B + 64, B + 64]  # 2 codes a step; full after step 2


def test_prototypes_frozen_in_the_first_epochs_then_stepped_and_unit_norm(tmp_path, monkeypatch):
    calls = record_forward(monkeypatch)
    small = dict(subset=256, batch_size=32, max_steps=3, probe_epochs=0)  # 8 steps per epoch
    frozen = tiny(swav.Config, tmp_path / "a", **small)  # all 3 steps in the frozen first epochs
    swav.train(frozen)
    init = calls[0][1]
    torch.testing.assert_close(init.norm(dim=1), torch.ones(len(init)))  # unit rows from the start
    torch.testing.assert_close(load_ckpt(frozen)["model"]["prototypes.weight"], init, atol=1e-6, rtol=0)
    calls.clear()
    free = tiny(swav.Config, tmp_path / "b", freeze_prototypes_epochs=0, **small)
    swav.train(free)
    after = load_ckpt(free)["model"]["prototypes.weight"]
    assert (after - calls[0][1]).abs().max() > 1e-4  # they moved ...
    torch.testing.assert_close(after.norm(dim=1), torch.ones(len(after)))  # ... and are back on the sphere


# -------------------------------------------------------------------------------------- training


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="--queue_size"):
        swav.Config(queue_size=1000, batch_size=256)
    with pytest.raises(ValueError, match="--epsilon"):
        swav.Config(epsilon=0.01)
    with pytest.raises(ValueError, match="--small_crop_min"):
        swav.Config(small_crop_min=0.5)
    with pytest.raises(ValueError, match="--final_lr_ratio"):
        swav.Config(final_lr_ratio=-0.1)


# -------------------------------------------------------------------------------------- the recipe


def test_blur_is_pil_blur_sized_by_sigma(monkeypatch):
    """solo-learn and the official multicropdataset.py blur with PIL's GaussianBlur(radius=sigma), sigma
    ~ U(0.1, 2): at sigma 2 a 32 px impulse spreads over +-5 px, centre weight 0.035 (measured), where a
    kernel of 10% of the side (3 taps) keeps it within +-1 px at 0.131. The view is driven with blur on,
    sigma 2, and every other augmentation off."""
    real_blur = common.gaussian_blur
    for name in ("random_resized_crop", "random_flip", "color_jitter", "random_grayscale"):
        monkeypatch.setattr(common, name, lambda x, *args, **kwargs: x)
    monkeypatch.setattr(common, "gaussian_blur", lambda x, p, sigma=(0.1, 2.0), kernel="side": real_blur(
        x, 1.0, (2.0, 2.0), kernel))  # blur on, sigma 2, the kernel the file asks for
    impulse = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    impulse[..., 16, 16] = 255
    big, _ = swav.swav_views(impulse, swav.Config())
    blurred = big[0, 0] * common.STD[0] + common.MEAN[0]  # (32, 32): back to [0, 1]
    pil = np.asarray(Image.fromarray(impulse[0, 0].numpy()).filter(ImageFilter.GaussianBlur(radius=2))) / 255
    assert (blurred[16, 11:22] > 1e-3).all() and (pil[16, 11:22] > 0).all()  # beyond +-3 px, as PIL's
    assert abs(blurred[16, 16].item() - pil[16, 16]) < 0.01, (blurred[16, 16].item(), pil[16, 16])


def test_defaults_are_solo_learn_cifar_recipe():
    """scripts/pretrain/cifar/swav.yaml and augmentations/symmetric.yaml, with solo-learn's defaults
    (warmup_cosine: 10 warmup epochs, min_lr 0; sk_epsilon 0.05, sk_iters 3)."""
    cfg = swav.Config()
    recipe = dict(proj_hidden=2048, queue_size=3840, proj_dim=128, n_prototypes=3000, queue_start_epoch=50,
                  freeze_prototypes_epochs=2, temperature=0.1, batch_size=256, lr=0.6, weight_decay=1e-6,
                  lars_eta=0.02, lars_clip=True, exclude_bias_n_norm=True, epochs=1000, crop_min=0.08, blur=True,
                  n_small_crops=0, warmup_epochs=10, final_lr_ratio=0.0, epsilon=0.05, sinkhorn_iters=3)
    assert {k: getattr(cfg, k) for k in recipe} == recipe


def test_lars_is_solo_learn_s_and_the_official_larc_a_flag_away(tmp_path):
    """solo-learn's LARS (form "larc"; exclude_bias_n_norm: biases and BN neither adapted nor decayed)
    by default; the official code's apex LARC adapts and decays every parameter, eta 0.001, no clip."""
    run = tiny(swav.Config, tmp_path / "a", max_steps=2, probe_epochs=0)
    swav.train(run)
    groups = {g["name"]: g for g in load_ckpt(run)["opt"]["param_groups"]}
    assert (groups["weights"]["form"], groups["weights"]["eta"], groups["weights"]["clip"]) == ("larc", 0.02, True)
    assert groups["biases"]["lars_exclude"] and groups["biases"]["weight_decay"] == 0.0
    official = tiny(swav.Config, tmp_path / "b", max_steps=2, probe_epochs=0, lars_eta=0.001, lars_clip=False,
                    exclude_bias_n_norm=False)
    swav.train(official)
    (group,) = load_ckpt(official)["opt"]["param_groups"]  # every parameter in one group, as apex's LARC
    assert (group["form"], group["eta"], group["clip"], group["lars_exclude"]) == ("larc", 0.001, False, False)
    model = swav.SwAV("tiny", True, official.proj_hidden, official.proj_dim, official.n_prototypes)
    n_params = len(list(model.parameters()))
    assert group["weight_decay"] == official.weight_decay and len(group["params"]) == n_params


FEATURES = dict(n_small_crops=2, queue_size=128, queue_start_epoch=1)  # multi-crop and the queue on


def test_smoke_run_writes_log_ckpt_results(tmp_path):
    cfg, results = assert_smoke_run(swav, tmp_path, **FEATURES)
    assert results["steps"] == 16
    log = read_log(cfg)
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    assert all(0 < r["z_std"] <= 1 and math.isfinite(r["loss"]) for r in steps)


def test_resume_is_exact_including_the_queue(tmp_path):
    # 5 steps per epoch, the queue (2 batches) full from step 2 and in use from step 5: after the resume at 4
    assert_resumes_exactly(swav, tmp_path, queue_size=128, queue_start_epoch=1)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    assert_nan_stops_the_run(swav, "swav_loss", monkeypatch, tmp_path)


# ---------------------------------------------------------------------------------------- learning


def test_training_codes_are_the_batch_rows_of_sinkhorn_at_the_configured_epsilon_and_iterations(
        tmp_path, monkeypatch):
    """Each step, each global crop's codes given to swav_loss are the first B rows (the batch's, not the queue's) of
    sinkhorn(scores, --epsilon, --sinkhorn_iters), here at values unlike the defaults and the temperature."""
    calls, targets, real_sinkhorn, real_loss = [], [], swav.sinkhorn, swav.swav_loss

    def sinkhorn(scores, epsilon, n_iters):
        calls.append((epsilon, n_iters, real_sinkhorn(scores, epsilon, n_iters)))
        return calls[-1][2]

    monkeypatch.setattr(swav, "sinkhorn", sinkhorn)
    monkeypatch.setattr(swav, "swav_loss",
                        lambda scores, codes, T: targets.append(codes) or real_loss(scores, codes, T))
    cfg = tiny(swav.Config, tmp_path, subset=256, batch_size=32, max_steps=3, queue_size=64, queue_start_epoch=0,
               epsilon=0.07, sinkhorn_iters=5, probe_epochs=0)  # the queue (2 batches) joins the codes at step 2
    swav.train(cfg)
    assert [(eps, n) for eps, n, _ in calls] == [(0.07, 5)] * 6 and len(calls[-1][2]) == 32 + 64
    for step, codes in enumerate(targets):
        for i in range(2):
            torch.testing.assert_close(codes[i], calls[2 * step + i][2][:32], atol=0, rtol=0)


def test_prototypes_are_frozen_for_exactly_the_first_epochs(tmp_path, monkeypatch):
    """freeze_prototypes_epochs=1 at 2 steps per epoch: steps 0 and 1 leave the prototypes as they were, step 2
    moves them."""
    calls = record_forward(monkeypatch)
    cfg = tiny(swav.Config, tmp_path, subset=64, batch_size=32, epochs=2, max_steps=3, freeze_prototypes_epochs=1,
               queue_size=0, probe_epochs=0)
    swav.train(cfg)
    init = calls[0][1]
    torch.testing.assert_close(calls[2][1], init, atol=1e-6, rtol=0)  # seen by step 2's forward: not moved yet
    moved = (load_ckpt(cfg)["model"]["prototypes.weight"] - init).abs().max()
    assert moved > 1e-5  # step 2 moved them (by ~5e-5 at this lr; a frozen step's renormalization: ~1e-7)


# ----------------------------------------------- multi-crop, queue start, schedule, evaluated features


def test_small_crops_are_small_crop_size_of_area_small_crop_min_to_max(monkeypatch):
    """P Sec. 3.2, A.2 (C main_swav.py: size_crops 224 96, min_scale_crops 0.14 0.05, max_scale_crops 1 0.14): the 2
    global crops at image_size of area (crop_min, 1), the n_small_crops at small_crop_size of their own areas."""
    calls, real = [], common.random_resized_crop
    monkeypatch.setattr(common, "random_resized_crop",
                        lambda x, size, scale: calls.append((len(x), size, scale)) or real(x, size, scale))
    cfg = swav.Config(n_small_crops=3, small_crop_size=12, small_crop_min=0.06, small_crop_max=0.2)
    big, small = swav.swav_views(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), cfg)
    assert calls == [(8, 32, (0.08, 1.0)), (12, 12, (0.06, 0.2))]  # 2 x 4 global crops, 3 x 4 small ones
    assert big.shape == (8, 3, 32, 32) and small.shape == (12, 3, 12, 12)


def test_queue_joins_the_codes_from_queue_start_epoch_counted_in_epochs(tmp_path, monkeypatch):
    """queue_start_epoch=1 at 4 steps per epoch: the queue (2 batches, full after step 2) joins the codes at step 4,
    the first of epoch 1 (P A.6 and S: the queue is used from an epoch on), not at step 2."""
    rows = record_sinkhorn_rows(monkeypatch)
    cfg = tiny(swav.Config, tmp_path, subset=128, batch_size=32, epochs=2, max_steps=6, queue_size=64,
               queue_start_epoch=1, probe_epochs=0)
    swav.train(cfg)
    assert rows == [32] * 8 + [32 + 64] * 4  # 2 codes a step: steps 0-3 on the batch alone, 4-5 with the queue


def test_lr_warms_up_over_warmup_epochs_then_follows_the_cosine_of_all_the_epochs(tmp_path):
    """P A.1 and S (warmup_cosine): linear warmup from 0 over warmup_epochs x steps per epoch, then cosine at epochs x
    steps per epoch, to 0 (S). 4 steps per epoch, 3 epochs, 1 of warmup, stopped after 6 steps."""
    assert_warmup_then_cosine(swav, tmp_path)


def test_evaluated_features_and_encoder_pt_are_the_backbones_h(tmp_path, monkeypatch):
    """P A.3 (linear evaluation on the frozen trunk's pooled features): the three evaluations score the backbone's
    h, not the projection head's output, and encoder.pt holds that backbone."""
    cfg = tiny(swav.Config, tmp_path, max_steps=2, probe_epochs=0)
    assert_features_and_encoder_are_the_backbone(swav, cfg, monkeypatch)
