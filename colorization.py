"""Colorization: colorful image colorization as a pretext task.

Zhang, Isola, Efros. ECCV 2016. arXiv:1603.08511.

The network sees only the lightness L of a CIE Lab image and predicts, at every pixel of a coarse grid,
a distribution over the quantized ab colour plane (paper Sec. 2.1): colour is multimodal (a shirt may be
red or blue), so it is a classification over ab bins, not a regression. A pixel's target is its true ab
soft-encoded over the nearest bins; its cross-entropy is weighted by the rarity of its colour (class
rebalancing, Eq. 3-4), so that rare saturated colours are not drowned by the grey-brown majority, and
images without colour weigh nothing. The annealed mean of the distribution paints the image (Sec. 2.3).
Solving the task requires knowing what is in the image, so the trunk learns a representation.

    python colorization.py                                       # 1 GPU: CIFAR-10, the recipe below
    torchrun --standalone --nproc_per_node=8 colorization.py     # 8 GPUs, same global batch of 256
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 colorization.py
    python colorization.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run

Defaults: the paper has no CIFAR recipe and no CIFAR number. This file keeps its objective and its
solver (Adam, L2 1e-3, though against a loss over fewer pixels: row "L2 vs. loss") and sizes the rest
for 32 px images. Sources checked, P: the paper (arXiv v5);
C: the official Caffe code (richzhang/colorization, caffe branch): the feature-learning AlexNet of
train_alexnet/ (train_val.prototxt, solver0-3.prototxt; "v2": the colour net of
models/colorization_train_val_v2.prototxt, train/solver.prototxt, train/readme) and the layers of
resources/caffe_traininglayers.py and softmax_cross_entropy_loss_layer.cpp.
Evaluated features: the trunk's pooled output on the L channel alone (grayscale input, as P Sec. 3.2)
of the un-augmented image resized to image_size, for knn_top1, probe_top1 and linear_top1
(common.evaluate). Pretext metrics on the test images: colour-bin top-1 and the AuC of the per-pixel ab
error (thresholds 0 to 150, P Sec. 3.1). Results of this file: not yet measured (README).

| setting | paper | official code | this file |
|---|---|---|---|
| trunk | AlexNet on L for features (P Sec. 3.2) | AlexNet with BN (C train_alexnet) | ResNet-18, CIFAR stem, on L |
| input | L | L - 50 (C data_l) | L / 50 - 1 (BN follows conv1) |
| prediction grid | 1/4 of the side (colour net, P Table 4) | 12 x 12 of 180 px, to 23 x 23 (C) | as C: 4 x 4 to 8 x 8 |
| ab target on the grid | - | one pixel in 8 x 8 (4 x 4 in v2): data_ab_ss (C) | 4 x 4 average |
| ab bins | grid 10, 313 in gamut (P Sec. 2.1) | 313 (C pts_in_hull.npy) | 229: common.ab_bins |
| soft encoding | 5 nearest bins, sigma 5 (P Sec. 2.1) | 10 nearest, sigma 5 (C NNEncLayer) | as P |
| colour prior | ImageNet's, smoothed, sigma 5 (P Sec. 2.2) | prior_probs.npy (C PriorBoostLayer) | training set's |
| rebalancing | lambda 1/2, uniform over Q (P Eq. 4) | uniform over bins seen (C PriorFactor) | as P |
| grey images | - | no loss if all grid a, b are within +-5 (C NonGrayMaskLayer) | as C, on 4 x 4 averages |
| loss scale | sum over pixels (P Eq. 2) | / images, not pixels (C loss layer .cpp) | as C |
| crops | - | 180 px of 256 px, flips (C; 176 px in v2) | square, 50-100% of the area, flips |
| batch, steps | - | 80, 450k (C solver0-3); v2: 40, max_iter 500k, ends near 450k (C readme) | 256, 200 epochs (39k) |
| Adam betas | 0.9, 0.99 (P Sec. 3) | 0.9, 0.999 (C solver0-3; 0.99 in v2) | as P |
| lr | 3e-5; 1e-5, 3e-6 at 200k, 375k (P Sec. 3) | 3e-5; 1e-5, 3e-6, 1e-6 at 240k, 300k, 400k (C) | 1e-3 / 256, cosine |
| lr, v2 | - | 3e-5, x0.1 per 225k (C solver @4aa459f, readme); 3.16e-5, x0.316 per 215k (@94b2a53) | as lr |
| weight decay | L2 1e-3 (P Sec. 3) | 1e-3; biases: none, lr x2 (C train_val; v2: as weights) | L2 1e-3, weights only |
| L2 vs. loss | - | loss sums 23 x 23 = 529 pixels (v2: 44 x 44 = 1,936) (C) | 64 (8 x 8): L2 8x (30x) stronger |
| annealed-mean T | 0.38 (P Sec. 2.3) | 1 / 2.606 = 0.384 (C deploy_v2 conv8_313_rh) | as P (PNGs, AuC) |
| evaluation | linear on frozen conv maps, ImageNet (P Sec. 3.2) | - | knn, probe, linear_eval |
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common

PRED_STRIDE = common.PixelClassifier.stride  # logits on a grid of 1/4 of the image side (56 x 56 for 224 px)


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic
    data_dir: str = "./data"  # folder of <dataset>.npz (downloaded there if missing); $SSL_DATA replaces this default
    out_dir: str = "out/colorization"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json, PNGs
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the crops and of evaluated images (a multiple of 4; 96 for STL-10, 224 ImageNet)
    # model
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs)
    # method
    grid: float = 10.0  # spacing of the ab bins (paper Sec. 2.1)
    neighbours: int = 5  # soft-encoding: the target spreads over this many nearest bins
    sigma: float = 5.0  # soft-encoding: Gaussian width in ab units
    rebalance_lambda: float = 0.5  # class rebalancing: mix of the colour prior with uniform (Eq. 4)
    rebalance_sigma: float = 5.0  # class rebalancing: Gaussian smoothing of the colour prior in ab units
    gray_threshold: float = 5.0  # an image with no grid |a| or |b| above this is grey: no loss (official code)
    temperature: float = 0.38  # annealed-mean decoding (Sec. 2.3): 1 = mean, -> 0 = mode
    prior_images: int = 50000  # pretraining images counted for the colour prior (at most: all if fewer)
    crop_min: float = 0.5  # smallest area fraction of the random square crop
    # optim
    epochs: int = 200  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 256  # global batch, split across processes
    lr: float = 1e-3  # Adam base lr per 256 images, scaled linearly with the batch
    weight_decay: float = 1e-3  # L2 on weights only, added to the gradient (the paper's solver)
    warmup_epochs: int = 0  # linear warmup, then cosine decay to 0
    # eval
    eval_every: int = 10  # epochs between kNN monitor runs and colourization PNGs (0 = only at the end)
    probe_epochs: int = 100  # fast linear probe on precomputed frozen features at the end, epochs (0 = none)
    linear_epochs: int = -1  # standard linear evaluation at the end, epochs (-1: 100 on CUDA, none on CPU; 0: none)
    show: int = 8  # test images in the PNG grid
    # system
    seed: int = 0  # weights, data order and augmentations
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    compile: str = "auto"  # torch.compile the model: auto (on CUDA only) | true | false
    log_every: int = 50  # steps between progress lines
    resume: bool = False  # continue from out_dir/ckpt.pt

    def __post_init__(self):
        common.check_config(self)
        if self.image_size % PRED_STRIDE:
            raise ValueError(f"--image_size must be a multiple of {PRED_STRIDE} (the prediction grid's stride)")
        if not 0 < self.grid <= 50 or self.neighbours < 1 or self.sigma <= 0 or self.rebalance_sigma <= 0:
            raise ValueError("--grid must be in (0, 50], --neighbours >= 1, --sigma and --rebalance_sigma > 0")
        if not 0 <= self.rebalance_lambda <= 1 or self.temperature <= 0 or not 0 < self.crop_min <= 1:
            raise ValueError("--rebalance_lambda must be in [0, 1], --temperature > 0 and --crop_min in (0, 1]")
        if self.prior_images < 1 or self.show < 1:
            raise ValueError("--prior_images and --show must be at least 1")


# -------------------------------------------------------------------------------------------------
# views


def colorization_view(x, cfg):
    """A random square crop (area >= crop_min) and flip: uint8 (B,3,H,W) -> float RGB in [0,1] (B,3,S,S)."""
    x = common.random_resized_crop(common.to_float(x), cfg.image_size, scale=(cfg.crop_min, 1.0), ratio=(1.0, 1.0))
    return common.random_flip(x)


def lab_at(x, size):
    """uint8 (B,3,H,W) -> Lab (B,3,size,size): un-augmented images at the training scale (bilinear, if not already)."""
    return common.rgb_to_lab(common.resize(common.to_float(x), size))


def split_lab(lab):
    """Lab (B,3,H,W) -> (network input L/50 - 1 (B,1,H,W), true ab on the prediction grid (B,2,H/4,W/4))."""
    return lab[:, :1] / 50 - 1, F.avg_pool2d(lab[:, 1:], PRED_STRIDE)


# -------------------------------------------------------------------------------------------------
# loss


def colorization_loss(logits, target, weights):
    """Class-rebalanced multinomial cross-entropy (paper Eq. 2): summed over the pixels of an image, as the
    paper's sum over h, w, and averaged over the images, as the official loss layer divides by the batch.

    logits: (B, Q, h, w) scores over the ab bins; target: (B, Q, h, w) soft-encoded true colours
    (each pixel sums to 1); weights: (B, h, w) the weight of each pixel: v(Z) of Eq. 3, 0 in grey images.
    Computed in float32.
    """
    ce = F.cross_entropy(logits.float(), target.float(), reduction="none")  # (B, h, w): -sum_q Z_q log softmax_q
    return (weights.float() * ce).sum((1, 2)).mean()


# -------------------------------------------------------------------------------------------------
# soft encoding, grey images, rebalancing


def soft_encode(ab, bins, neighbours=5, sigma=5.0):
    """True colours ab (B,2,h,w) -> targets (B,Q,h,w): Gaussian weights on the nearest bins, summing to 1."""
    B, _, h, w = ab.shape
    d2, idx = common.bin_distances(ab, bins).topk(neighbours, dim=1, largest=False)  # (P, k) each
    weights = torch.softmax(-d2 / (2 * sigma**2), dim=1)  # (P, k): exp(-d^2 / 2 sigma^2), normalized
    target = torch.zeros(len(idx), len(bins), device=ab.device).scatter_(1, idx, weights)  # (P, Q)
    return target.view(B, h, w, -1).permute(0, 3, 1, 2)  # (B, Q, h, w)


def has_colour(ab, threshold=5.0):
    """(B,) bool from the true ab on the grid (B,2,h,w): some |a| or |b| of the image exceeds threshold. The
    official NonGrayMaskLayer's test: the loss of a grey image (a black-and-white photo) is zeroed."""
    return (ab.abs() > threshold).flatten(1).any(1)


def rebalance_weights(prior, bins, lambd=0.5, sigma=5.0):
    """Class-rebalancing weights w (Q,) (paper Eq. 4) and the smoothed prior p~ (Q,) they come from.

    p~ = the empirical bin distribution `prior` smoothed by a Gaussian (sigma) over the ab plane;
    w ~ ((1 - lambd) p~ + lambd / Q)^-1, scaled so that its expectation under p~ is 1.
    """
    kernel = torch.exp(-torch.cdist(bins, bins) ** 2 / (2 * sigma**2))  # (Q, Q)
    smooth = kernel @ prior.float()
    smooth = smooth / smooth.sum()
    w = 1 / ((1 - lambd) * smooth + lambd / len(bins))
    return w / (smooth * w).sum(), smooth


@torch.no_grad()
def colour_prior(data, bins, rt, max_images, size):
    """Empirical distribution (Q,) of the pretraining pixels' nearest bins, on the prediction grid, over
    max_images of them drawn at random (a folder lists its images class by class), whatever the processes."""
    n = len(data.labels("pretrain"))
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_images]  # the same on every process
    counts = torch.zeros(len(bins), dtype=torch.long, device=rt.device)
    for x, _ in data.eval_batches("pretrain", 500, pick):
        _, ab = split_lab(lab_at(x, size))  # (b, 2, h, w)
        counts += torch.bincount(common.bin_distances(ab, bins).argmin(1), minlength=len(bins))
    counts = common.all_reduce_sum(counts)  # the histogram of every process's share of the images
    return counts / counts.sum()


# -------------------------------------------------------------------------------------------------
# pretext metrics and pictures


@torch.no_grad()
def colour_metrics(model, data, bins, rt, temperature, size):
    """Pretext metrics on the test images (at the training scale): colour-bin top-1 on the prediction grid, and
    the AuC of the per-pixel ab error of the upsampled annealed mean over thresholds 0, 1, ..., 150 (Sec. 3.1)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # correct bins, grid pixels, AuC of pixels
    for x, _ in data.eval_batches("test", 500):
        lab = lab_at(x, size)  # (b, 3, S, S)
        L_in, ab = split_lab(lab)
        with rt.autocast():
            logits = model(L_in)
        logits = logits.float()  # (b, Q, h, w)
        hit = logits.argmax(1).flatten() == common.bin_distances(ab, bins).argmin(1)  # (b*h*w,)
        pred = F.interpolate(common.annealed_mean(logits, bins, temperature), size=lab.shape[2:], mode="bilinear",
                             align_corners=False)  # (b, 2, S, S)
        err = (pred - lab[:, 1:]).norm(dim=1)  # (b, S, S)
        # err <= t holds for the thresholds t = ceil(err)..150: 151 - ceil(err) of the 151 thresholds 0..150
        within = (151 - err.ceil()).clamp(min=0) / 151  # (b, S, S)
        pixels = torch.tensor(hit.numel(), device=rt.device)
        sums += torch.stack([hit.sum(), pixels, within.mean((1, 2)).sum()]).double()
    sums = common.all_reduce_sum(sums)  # every process's share of the test set
    model.train()
    return {"color_top1": (sums[0] / sums[1]).item(), "color_auc": (sums[2] / len(data.labels("test"))).item()}


@torch.no_grad()
def save_colorizations(model, x, bins, temperature, size, path):
    """PNG rows: the L input (grey), the annealed-mean colourization, the ground truth (uint8 x)."""
    model.eval()
    lab = lab_at(x, size)
    ab = F.interpolate(common.annealed_mean(model(split_lab(lab)[0]), bins, temperature), size=lab.shape[2:],
                       mode="bilinear", align_corners=False)  # (N, 2, S, S): the 1/4-resolution prediction, upsampled
    rows = [torch.cat([lab[:, :1], torch.zeros_like(ab)], 1), torch.cat([lab[:, :1], ab], 1), lab]
    common.save_image_grid([common.lab_to_rgb(r) for r in rows], path)
    model.train()


# -------------------------------------------------------------------------------------------------
# training


def train(cfg: Config) -> dict:
    rt = common.setup(cfg)  # processes, device, precision, seed, out_dir
    data = common.load_data(cfg, rt)  # uint8 images; small datasets live on the device
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule, reference batch 256
    S = cfg.image_size
    bins = common.ab_bins(cfg.grid).to(rt.device)  # (Q, 2)
    class_weights, _ = rebalance_weights(colour_prior(data, bins, rt, cfg.prior_images, S), bins,
                                         cfg.rebalance_lambda, cfg.rebalance_sigma)  # (Q,)
    common.print0(f"colorization: {total_steps} steps, Adam lr {lr:.3g}, {len(bins)} ab bins in the sRGB gamut, "
                  f"rebalancing weights {class_weights.min():.3g}..{class_weights.max():.3g}")

    # the trunk reads L (1 channel); the head scores the Q ab bins on the trunk's last map, resized to 1/4 of the side
    raw_model = common.sync_batchnorm(common.PixelClassifier(cfg.arch, S <= 64, 1, len(bins)).to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    opt = torch.optim.Adam(common.param_groups(raw_model, cfg.weight_decay), lr=lr, betas=(0.9, 0.99))
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # the pooled trunk output on the L channel alone (grayscale input), at the training scale
        return raw_model.backbone(split_lab(lab_at(x, S))[0])

    shown = next(iter(data.eval_batches("test", cfg.show)))[0]  # the same test images in every PNG

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt),
                   **colour_metrics(raw_model, data, bins, rt, cfg.temperature, S)})
        if rt.is_main:
            save_colorizations(raw_model, shown, bins, cfg.temperature, S,
                               os.path.join(cfg.out_dir, f"colorization_epoch{epoch:04d}.png"))

    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, _ in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = common.cosine_lr(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        common.set_lr(opt, lr_now)
        lab = common.rgb_to_lab(colorization_view(x, cfg))  # (B, 3, S, S)
        L_in, ab = split_lab(lab)  # (B, 1, S, S) input, (B, 2, S/4, S/4) true colours
        target = soft_encode(ab, bins, cfg.neighbours, cfg.sigma)  # (B, Q, S/4, S/4)
        nearest = target.argmax(1)  # (B, S/4, S/4): the bin with the largest share is the nearest
        weights = class_weights[nearest] * has_colour(ab, cfg.gray_threshold)[:, None, None]  # (B, S/4, S/4)
        with rt.autocast():
            logits = model(L_in)  # (B, Q, S/4, S/4)
        # each process averages over its own images; DDP's gradient average makes it the global mean
        loss = colorization_loss(logits, target, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        top1 = (logits.detach().argmax(1) == nearest).float().mean()  # colour-bin accuracy on this batch
        log.step(step, loss=loss, lr=lr_now, top1=top1)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                    "config": dataclasses.asdict(cfg)}, rt)

    if rt.is_main:  # the 1-channel trunk (its conv1 reads L) and the final colourizations, before the last
        # collectives below, so that no process leaves train() while the main one still writes files
        torch.save(raw_model.backbone.state_dict(), os.path.join(cfg.out_dir, "encoder.pt"))
        save_colorizations(raw_model, shown, bins, cfg.temperature, S, os.path.join(cfg.out_dir, "colorization.png"))
    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    colour = colour_metrics(raw_model, data, bins, rt, cfg.temperature, S)
    common.print0(f"colour-bin top-1 {colour['color_top1']:.4f} | AuC {colour['color_auc']:.4f} (test images)")
    results = {"method": "colorization", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs,
               "steps": stop_step, **metrics, **colour, "ab_bins": len(bins),
               "train_seconds": round(log.train_seconds, 1), "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
