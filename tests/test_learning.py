"""Proof that every method learns: one fixed-seed CPU run of its `tiny` trunk, on a CIFAR-10 subset
when SSL_DATA holds cifar10.npz (as in CI), else on the synthetic set. Both tables below pass on this
project's CPU; `SSL_DATA= python -m pytest tests/test_learning.py` runs the synthetic one.

Each run's kNN monitor scores the random initialisation at step 0 (train() does so whenever
eval_every > 0), and its final evaluation scores the trained encoder on the same images, so each
run compares the trained network with the very network it started from. A row of the tables below
is one method: the settings of its short run (the recipe's defaults, but for the lr of a run of a
few hundred steps and CPU-sized heads) and what must improve, by how much:

    gain   {metric: margin}  the metric of the trained encoder exceeds its value at init by margin
    drop   {metric: margin}  the metric falls below its value at init by margin
    trend  {metric: margin}  over the records every log_every steps, the mean of the last three exceeds
                             (margin > 0) or falls below (margin < 0) the mean of the first three
    floor  {metric: value}   the mean of the last three training-step records stays above value

The margins are about half of the gains measured on this project's 2-core CPU (the comments give the
measured values: init -> trained, in the order of the checks), so that a run on other hardware,
whose floating-point sums differ, still passes while a method that stopped learning fails. Each
table is sized to about 15 s a method on 2 cores; where a metric does not move at that budget, the
comment says so and it is not asserted.
"""

import importlib

import pytest

from conftest import METHODS, cifar10_root, learning_run

SMALL_CLIP = dict(embed_dim=32, text_width=32, text_layers=1, text_heads=2)
SMALL_MAE = dict(patch_size=8, decoder_dim=64, decoder_depth=3, decoder_heads=2)
SMALL_CPC = dict(patch_size=16, patch_stride=8, pred_steps=1, context_dim=64, context_blocks=2)  # 3 x 3: row i -> i+2
# SwAV and Barlow Twins in a run this short: the official code's LARS (trust coefficient 0.001, no
# clipping) in place of the solo-learn CIFAR recipe's clipped LARS (0.02), and for SwAV a lower lr and
# prototypes not frozen. With the recipe's optimizer SwAV stays on its plateau (loss = log K) for
# hundreds of steps and both kNNs fall (measured on CIFAR-10 in 96 steps: SwAV 0.267 -> 0.250)
GENTLE_LARS = dict(lars_eta=0.001, lars_clip=False)
GENTLE_SWAV = dict(**GENTLE_LARS, lr=0.2, freeze_prototypes_epochs=0)

# method: (settings of the run, checks); measured values (this CPU) in the comments
SYNTHETIC = {
    "rotnet": (dict(subset=2048, batch_size=128, epochs=2),
               dict(gain={"pretext_top1": 0.2})),  # 0.250 -> 0.697 (kNN -0.003)
    "jigsaw": (dict(subset=2048, batch_size=128, epochs=3, lr=0.4, n_perms=24),
               dict(gain={"pretext_top1": 0.018})),  # 0.041 -> 0.077 (kNN falls: 0.175 -> 0.137)
    # context_pred at its 96 px (at 64 px the grid's place gave most of the label: 0.120 -> 0.282), seeds 0, 1, 2:
    # +0.046, +0.030, +0.072 (0.120 -> 0.166 at seed 0; kNN 0.149 -> 0.154)
    "context_pred": (dict(subset=2048, batch_size=128, epochs=24, lr=0.04),
                     dict(gain={"pretext_top1": 0.02})),
    "colorization": (dict(subset=2048, batch_size=128, epochs=6, lr=2e-3),
                     dict(gain={"color_top1": 0.007, "color_auc": 0.025})),  # 0.005 -> 0.019; 0.674 -> 0.725
    # the feature recipe (random regions, L2 alone) fills holes better, but its features do not separate these
    # classes at this budget (kNN 0.124 -> 0.115, probe 0.178 -> 0.164)
    "inpainting": (dict(subset=2048, batch_size=32, epochs=2), dict(drop={"hole_mse": 0.005})),  # 0.058 -> 0.047
    # splitbrain: 0.114 -> 0.162; 0.005 -> 0.019; 0.047 -> 0.069
    "splitbrain": (dict(subset=2048, batch_size=128, epochs=6, lr=2e-3),
                   dict(gain={"knn_top1": 0.018, "ab_top1": 0.006, "l_top1": 0.01})),
    # The two-view methods' kNN does not move on this set at this budget (its class information is all in
    # shape, under random colours): what they show here is their loss falling without collapse. Their
    # representations are tested on CIFAR-10 (below).
    "simclr": (dict(subset=2048, batch_size=128, epochs=4, lr=2.0), dict(trend={"loss": -0.12})),  # 10.14 -> 9.80
    "moco": (dict(subset=2048, batch_size=128, epochs=4, lr=0.06, temperature=0.2, queue_size=1024),
             dict(trend={"loss": -0.2})),  # 6.54 -> 6.24
    # BYOL's loss chases a moving target and need not fall; what must hold is no collapse: ~1/sqrt(256) = 0.0625
    "byol": (dict(subset=2048, batch_size=128, epochs=4, proj_hidden=512), dict(floor={"z_std": 0.03})),  # 0.051
    "simsiam": (dict(subset=2048, batch_size=128, epochs=4, lr=0.1, proj_hidden=512, proj_dim=512, pred_hidden=128),
                dict(trend={"loss": -0.14}, floor={"z_std": 0.02})),  # -0.05 -> -0.39; 0.042 (1/sqrt(512) = 0.044)
    "barlow": (dict(subset=2048, batch_size=128, epochs=4, lr=0.1, proj_dim=1024),
               dict(trend={"loss": -3.0})),  # 66.7 -> 58.9
    "swav": (dict(subset=2048, batch_size=128, epochs=4, proj_hidden=512, n_prototypes=100, queue_size=0,
                  **GENTLE_SWAV),
             dict(trend={"loss": -0.05}, gain={"knn_top1": 0.009})),  # 4.80 -> 4.65; 0.124 -> 0.144
    "cpc": (dict(subset=2048, batch_size=64, epochs=4, lr=3e-3, **SMALL_CPC),
            dict(trend={"loss": -0.05})),  # 6.31 -> 6.23 (acc does not move at this budget: 0.0035 -> 0.0035)
    "mae": (dict(subset=2048, batch_size=128, epochs=8, lr=3e-3, warmup_epochs=1, probe_epochs=20, **SMALL_MAE),
            dict(gain={"probe_top1": 0.011}, drop={"test_loss": 0.4})),  # 0.133 -> 0.154; 1.43 -> 0.56
    "clip": (dict(subset=2048, batch_size=64, epochs=5, warmup_epochs=1, lr=8e-3, **SMALL_CLIP),
             dict(gain={"knn_top1": 0.05, "zero_shot_top1": 0.05})),  # 0.124 -> 0.238; 0.106 -> 0.209
}

# The first 4,096 CIFAR-10 training images (also the kNN's memory), 2 epochs, scored on the first 5,000
# test images; jigsaw and context_pred, whose evaluations cut 9 tiles or patch pairs from every image,
# train on 2,048 and are scored on 1,000 (context_pred: 2,000). Settings: the method's synthetic row, then these.
CIFAR10 = {
    "rotnet": (dict(batch_size=64, subset=2048),  # 0.250 -> 0.485; 0.250 -> 0.310
               dict(gain={"pretext_top1": 0.12, "knn_top1": 0.03})),
    # jigsaw: pretext_top1 gains +0.025, +0.107, +0.081 at seeds 0, 1, 2 (0.046 -> 0.071 at seed 0; kNN falls,
    # 0.275 -> 0.213). Before channel shifts were kept in their cells (tiles shared pixel rows at times), the
    # same seeds gained +0.061, +0.045, +0.082: seed noise at this budget, the margin is below the smallest
    "jigsaw": (dict(subset=2048, epochs=3, test_images=1000), dict(gain={"pretext_top1": 0.015})),
    # context_pred at its 96 px, seeds 0, 1, 2: +0.051, +0.032, +0.054 (0.120 -> 0.171 at seed 0; kNN falls, 0.280 ->
    # 0.223). At 64 px, where the grid's place gave the label away (tests/context_pred_shortcut.py): 0.100 -> 0.220
    "context_pred": (dict(subset=2048, batch_size=64, epochs=8, test_images=2000),
                     dict(gain={"pretext_top1": 0.02})),
    # colorization, seeds 0, 1, 2: kNN +0.034, +0.035, +0.048; colour AUC +0.036, +0.041, +0.040; the colour bin's
    # top-1 is the noisy one (0.001 -> 0.067, 0.006 -> 0.154, 0.000 -> 0.101). Seed 0 again after the head was made to
    # resize its logits rather than its features: kNN +0.032, AUC +0.036, top-1 0.001 -> 0.067
    "colorization": ({}, dict(gain={"knn_top1": 0.02, "color_auc": 0.025, "color_top1": 0.04})),
    "inpainting": ({}, dict(gain={"knn_top1": 0.010}, drop={"hole_mse": 0.012})),  # 0.276 -> 0.296; 0.062 -> 0.039
    # splitbrain, seeds 0, 1, 2: kNN +0.010, +0.014, +0.034 (0.288 -> 0.298 at seed 0); ab top-1 +0.246, +0.237,
    # +0.261; loss 568 -> 495 at seed 0. Seed 0 again after the head change (as colorization's): kNN 0.288 -> 0.303
    "splitbrain": ({}, dict(gain={"knn_top1": 0.006, "ab_top1": 0.15}, trend={"loss": -30})),
    "simclr": ({}, dict(gain={"knn_top1": 0.018})),  # 0.276 -> 0.312
    "moco": ({}, dict(gain={"knn_top1": 0.014})),  # 0.276 -> 0.317
    # BYOL with the recipe's clipped LARS: the kNN drifts around its start at this budget (seeds 0, 1, 2 at lr 0.5:
    # +0.010, -0.012, -0.026); with the official optimizer (form "byol", trust 0.001) it rises a little on
    # every seed tried and the loss falls clearly: what is asserted, with non-collapse
    # kNN 0.276 -> 0.284 (an earlier draw of the jitter: 0.282; seed 1: +0.004)
    "byol": (dict(**GENTLE_LARS, lars_form="byol"),
             dict(trend={"loss": -0.12}, floor={"z_std": 0.03}, gain={"knn_top1": 0.002})),
    # SimSiam and Barlow Twins move the kNN least at this budget (and not monotonically in the run
    # length: SimSiam +0.009 after 2 epochs, +0.004 after 3); what they show clearly is the loss falling
    # without collapse, the non-collapse diagnostic of the SimSiam paper (Fig. 2: std of the l2-normalized
    # output ~ 1/sqrt(dim), here 1/sqrt(512) = 0.044)
    "simsiam": ({}, dict(trend={"loss": -0.2}, floor={"z_std": 0.03},  # loss -0.04 -> -0.40; 0.276 -> 0.295
                         gain={"knn_top1": 0.002})),
    # Barlow Twins: the official code's LARS (form "byol"); with the recipe's clipped one the kNN falls (0.276 -> 0.248)
    # loss 68.8 -> 52.3; the kNN is noise at this budget: seeds 0, 1, 2 moved it +0.005, +0.002, -0.017
    "barlow": (dict(epochs=3, **GENTLE_LARS, lars_form="byol", lr=0.4), dict(trend={"loss": -8.0})),
    "swav": ({}, dict(gain={"knn_top1": 0.013})),  # 0.276 -> 0.304
    # cpc: 6.33 -> 6.19; 0.0000 -> 0.0069 (kNN falls: 0.265 -> 0.248)
    "cpc": ({}, dict(trend={"loss": -0.10, "acc": 0.003})),
    "mae": ({}, dict(drop={"test_loss": 0.27})),  # 1.43 -> 0.89 (kNN falls, linear flat)
    "clip": ({}, dict(gain={"knn_top1": 0.05, "zero_shot_top1": 0.12})),  # 0.276 -> 0.376; 0.101 -> 0.352
}
CIFAR10 = {name: ({**SYNTHETIC[name][0], "subset": 4096, "epochs": 2, "test_images": 5000, **extra}, checks)
           for name, (extra, checks) in CIFAR10.items()}


def assert_learned(init, results, steps, checks):
    for key, margin in checks.get("gain", {}).items():
        assert results[key] > init[key] + margin, (key, init[key], results[key])
    for key, margin in checks.get("drop", {}).items():
        assert results[key] < init[key] - margin, (key, init[key], results[key])
    for key, low in checks.get("floor", {}).items():
        last = sum(r[key] for r in steps[-3:]) / 3
        assert last > low, (key, last)
    for key, margin in checks.get("trend", {}).items():
        first, last = (sum(r[key] for r in part) / len(part) for part in (steps[:3], steps[-3:]))
        assert (last > first + margin) if margin > 0 else (last < first + margin), (key, first, last)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_learns(name, tmp_path):
    """On the CIFAR-10 subset when SSL_DATA holds cifar10.npz (CI), else on the synthetic set."""
    module = importlib.import_module(name)
    if root := cifar10_root():
        (settings, checks), where = CIFAR10[name], dict(dataset="cifar10", data_dir=root)
    else:
        (settings, checks), where = SYNTHETIC[name], {}
    init, results, steps = learning_run(module, tmp_path, log_every=8, **where, **settings)
    assert_learned(init, results, steps, checks)
