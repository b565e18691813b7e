"""Colorization: colorful image colorization as a pretext task.

Zhang, Isola, Efros. ECCV 2016. arXiv:1603.08511.

The network sees only the lightness L of a CIE Lab image and predicts, at every pixel, a
distribution over the quantized ab colour plane (paper Sec. 2.1): colour prediction is
multimodal (a shirt may be red or blue), so it is a classification over ab bins, not a
regression. The target of a pixel is its true ab soft-encoded over the 5 nearest bins (Gaussian,
sigma 5); each pixel's cross-entropy is weighted by the rarity of its colour (class rebalancing,
Eq. 3-4), so that the rare saturated colours are not drowned by the grey-brown majority. To paint
an image, the distribution is decoded by its annealed mean (temperature 0.38, Sec. 2.3). Solving
the task requires knowing what is in the image, so the trunk learns a representation.

    python colorization.py                                       # 1 GPU: CIFAR-10, the recipe below
    torchrun --standalone --nproc_per_node=8 colorization.py     # 8 GPUs, same global batch of 256
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 colorization.py
    python colorization.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run

Colour bins: a grid of 10 in ab (centres at multiples of 10); a bin is kept if its centre is an sRGB
colour for some L in [0, 100] (tested in steps of 0.1): 229 bins (261 cells hold some sRGB colour;
the paper keeps 313 bins, found on ImageNet).
Network: common.resnet's trunk with its first convolution reading 1 channel (L). With the CIFAR
stem its last feature map is 1/8 of the image; a 3x3 convolution, bilinear upsampling to 1/4 (8 x 8
at 32 px) and a 1x1 convolution predict the bins there, as the paper predicts at 1/4 resolution.
The true ab is average-pooled to that grid (the paper subsamples it); the PNGs upsample the decoded ab.
Defaults: the paper has no CIFAR recipe. Its optimizer is kept (Adam, betas 0.9/0.99, weight decay
1e-3); its lr 3e-5 is for batches of 40 ImageNet crops, so for CIFAR-10 this file uses Adam's
usual 1e-3 per 256 images with cosine decay over 200 epochs of random square crops (at least half
the area, like the paper's 176 px crops of 256 px images) and flips. No published CIFAR-10 number.
Results of this file: not yet measured (see README).
Evaluated features: the trunk's pooled output on the L channel alone (grayscale input, as the paper
evaluates); the probe trains on frozen features of the un-augmented training images and their
flips. Pretext metrics on the test images: colour-bin top-1 and the AuC of the per-pixel ab error
(thresholds 0 to 150, paper Sec. 3.1).
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

PRED_STRIDE = 4  # predictions at 1/4 of the image side, as the paper (56 x 56 for 224 px)


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic
    data_dir: str = "./data"  # folder of <dataset>.npz (downloaded there if missing); $SSL_DATA replaces this default
    out_dir: str = "out/colorization"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json, PNGs
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the crops (a multiple of 4; 96 for STL-10, 224 for ImageNet)
    # model
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs)
    # method
    grid: float = 10.0  # spacing of the ab bins (paper Sec. 2.1)
    neighbours: int = 5  # soft-encoding: the target spreads over this many nearest bins
    sigma: float = 5.0  # soft-encoding: Gaussian width in ab units
    rebalance_lambda: float = 0.5  # class rebalancing: mix of the colour prior with uniform (Eq. 4)
    rebalance_sigma: float = 5.0  # class rebalancing: Gaussian smoothing of the colour prior in ab units
    temperature: float = 0.38  # annealed-mean decoding (Sec. 2.3): 1 = mean, -> 0 = mode
    prior_images: int = 50000  # training images counted for the colour prior (at most)
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
            raise ValueError(f"--image_size must be a multiple of {PRED_STRIDE} (predictions at 1/{PRED_STRIDE} resolution)")
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


def split_lab(lab):
    """Lab (B,3,H,W) -> (network input L/50 - 1 (B,1,H,W), true ab on the prediction grid (B,2,H/4,W/4))."""
    return lab[:, :1] / 50 - 1, F.avg_pool2d(lab[:, 1:], PRED_STRIDE)


# -------------------------------------------------------------------------------------------------
# model


def set_input_channels(net, channels):
    """Replace the trunk's first convolution by one reading `channels` planes (else the same)."""
    name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent), attr, nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride,
                                                       conv.padding, bias=conv.bias is not None))
    return net


class Colorizer(nn.Module):
    """L (B,1,H,W) -> logits over the ab bins (B, Q, H/4, W/4); backbone(L) is the representation."""

    def __init__(self, arch, small_images, n_bins):
        super().__init__()
        self.backbone, width = common.resnet(arch, small_images)
        set_input_channels(self.backbone, 1)
        self.mix = nn.Sequential(  # a 3x3 conv on the trunk's last map, before upsampling it
            nn.Conv2d(width, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True))
        self.classify = nn.Conv2d(width // 2, n_bins, 1)  # per-pixel bin logits on the 1/4-resolution grid

    def forward(self, L):
        h = L
        for layer in list(self.backbone.children())[:-2]:  # the trunk without its pooling and flatten/fc
            h = layer(h)  # ends (B, width, H/8, W/8) with the CIFAR stem, (B, width, H/32, W/32) without
        h = F.interpolate(self.mix(h), size=(L.shape[2] // PRED_STRIDE, L.shape[3] // PRED_STRIDE), mode="bilinear",
                          align_corners=False)  # (B, width/2, H/4, W/4)
        return self.classify(h)  # (B, Q, H/4, W/4)


# -------------------------------------------------------------------------------------------------
# loss


def colorization_loss(logits, target, weights):
    """Class-rebalanced multinomial cross-entropy (paper Eq. 2), averaged over pixels.

    logits: (B, Q, h, w) scores over the ab bins; target: (B, Q, h, w) soft-encoded true colours
    (each pixel sums to 1); weights: (B, h, w) the rebalancing weight v(Z) of each pixel (Eq. 3).
    Computed in float32.
    """
    ce = F.cross_entropy(logits.float(), target.float(), reduction="none")  # (B, h, w): -sum_q Z_q log softmax_q
    return (weights.float() * ce).mean()


# -------------------------------------------------------------------------------------------------
# colour bins, soft encoding, rebalancing, decoding


def ab_bins(grid=10.0, L_step=0.1):
    """(Q, 2) centres (a, b) of the grid cells whose centre is in the sRGB gamut for some L in [0, 100]."""
    side = torch.arange(-120 // grid, 120 // grid + 1) * grid  # |a|, |b| < 120 for every sRGB colour
    ab = torch.cartesian_prod(side, side)  # (G, 2)
    L = torch.arange(0, 100 + L_step / 2, L_step)  # (nL,)
    lab = torch.cat([L.view(-1, 1, 1).expand(-1, len(ab), 1), ab.expand(len(L), -1, -1)], 2)  # (nL, G, 3)
    rgb = common.lab_to_rgb(lab.permute(2, 0, 1)[None], clamp=False)[0]  # (3, nL, G), unclamped
    in_gamut = ((rgb >= 0) & (rgb <= 1)).all(0).any(0)  # (G,): some L makes it a displayable colour
    return ab[in_gamut]


def squared_distances(ab, bins):
    """ab (B,2,h,w), bins (Q,2) -> (B*h*w, Q) squared distances, pixels in (B, h, w) order."""
    p = ab.permute(0, 2, 3, 1).reshape(-1, 2).float()  # (P, 2)
    return ((p**2).sum(1, keepdim=True) - 2 * p @ bins.T + (bins**2).sum(1)).clamp(min=0)  # (P, Q)


def soft_encode(ab, bins, neighbours=5, sigma=5.0):
    """True colours ab (B,2,h,w) -> targets (B,Q,h,w): Gaussian weights on the nearest bins, summing to 1."""
    B, _, h, w = ab.shape
    d2, idx = squared_distances(ab, bins).topk(neighbours, dim=1, largest=False)  # (P, k) each
    weights = torch.softmax(-d2 / (2 * sigma**2), dim=1)  # (P, k): exp(-d^2 / 2 sigma^2), normalized
    target = torch.zeros(len(idx), len(bins), device=ab.device).scatter_(1, idx, weights)  # (P, Q)
    return target.view(B, h, w, -1).permute(0, 3, 1, 2)  # (B, Q, h, w)


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


def annealed_mean(logits, bins, temperature):
    """logits (B,Q,h,w) -> ab (B,2,h,w): the mean of softmax(logits / T) over the bin centres (Sec. 2.3)."""
    p = torch.softmax(logits.float() / temperature, dim=1)  # (B, Q, h, w): re-normalized p^(1/T)
    return torch.einsum("bqhw,qc->bchw", p, bins)


@torch.no_grad()
def colour_prior(data, bins, rt, max_images):
    """Empirical distribution (Q,) of the training pixels' nearest bins, on the prediction grid."""
    counts, seen = torch.zeros(len(bins), dtype=torch.long, device=rt.device), 0
    for x, _ in data.eval_batches("train", 500):
        _, ab = split_lab(common.rgb_to_lab(common.to_float(x)))  # (b, 2, h, w)
        counts += torch.bincount(squared_distances(ab, bins).argmin(1), minlength=len(bins))
        seen += len(x)
        if seen >= max_images / rt.world_size:
            break
    counts = common.all_reduce_sum(counts)  # the histogram of every process's share of the images
    return counts / counts.sum()


@torch.no_grad()
def colour_metrics(model, data, bins, rt, temperature):
    """Pretext metrics on the test images: colour-bin top-1 on the prediction grid, and the AuC of the
    full-resolution per-pixel ab error of the annealed mean over thresholds 0, 1, ..., 150 (Sec. 3.1)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # correct bins, grid pixels, AuC of pixels
    for x, _ in data.eval_batches("test", 500):
        lab = common.rgb_to_lab(common.to_float(x))  # (b, 3, H, W)
        L_in, ab = split_lab(lab)
        with rt.autocast():
            logits = model(L_in)
        logits = logits.float()  # (b, Q, h, w)
        hit = logits.argmax(1).flatten() == squared_distances(ab, bins).argmin(1)  # (b*h*w,)
        pred = F.interpolate(annealed_mean(logits, bins, temperature), size=lab.shape[2:], mode="bilinear",
                             align_corners=False)  # (b, 2, H, W)
        err = (pred - lab[:, 1:]).norm(dim=1)  # (b, H, W)
        within = (151 - err.ceil()).clamp(min=0) / 151  # fraction of the thresholds 0..150 that err meets
        sums += torch.stack([hit.sum(), torch.tensor(hit.numel(), device=rt.device), within.mean((1, 2)).sum()]).double()
    sums = common.all_reduce_sum(sums)  # every process's share of the test set
    model.train()
    return {"color_top1": (sums[0] / sums[1]).item(), "color_auc": (sums[2] / len(data.labels("test"))).item()}


@torch.no_grad()
def save_colorizations(model, x, bins, temperature, path):
    """PNG rows: the L input (grey), the annealed-mean colourization, the ground truth (uint8 x)."""
    model.eval()
    x = common.to_float(x)
    lab = common.rgb_to_lab(x)
    ab = F.interpolate(annealed_mean(model(split_lab(lab)[0]), bins, temperature), size=x.shape[2:], mode="bilinear",
                       align_corners=False)  # (N, 2, H, W): the 1/4-resolution prediction, upsampled
    grey = common.lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(ab)], 1))
    common.save_image_grid([grey, common.lab_to_rgb(torch.cat([lab[:, :1], ab], 1)), x], path)
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
    bins = ab_bins(cfg.grid).to(rt.device)  # (Q, 2)
    class_weights, _ = rebalance_weights(colour_prior(data, bins, rt, cfg.prior_images), bins, cfg.rebalance_lambda,
                                         cfg.rebalance_sigma)  # (Q,)
    common.print0(f"colorization: {total_steps} steps, Adam lr {lr:.3g}, {len(bins)} ab bins in the sRGB gamut, "
                  f"rebalancing weights {class_weights.min():.3g}..{class_weights.max():.3g}")

    raw_model = common.sync_batchnorm(Colorizer(cfg.arch, cfg.image_size <= 64, len(bins)).to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    opt = torch.optim.Adam(common.param_groups(raw_model, cfg.weight_decay), lr=lr, betas=(0.9, 0.99))
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # the pooled trunk output on the L channel alone (grayscale input)
        return raw_model.backbone(split_lab(common.rgb_to_lab(common.to_float(x)))[0])

    shown = next(iter(data.eval_batches("test", cfg.show)))[0]  # the same test images in every PNG

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt),
                   **colour_metrics(raw_model, data, bins, rt, cfg.temperature)})
        if rt.is_main:
            save_colorizations(raw_model, shown, bins, cfg.temperature,
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
        with rt.autocast():
            logits = model(L_in)  # (B, Q, S/4, S/4)
        # each process averages over its own pixels; DDP's gradient average makes it the global mean
        loss = colorization_loss(logits, target, class_weights[nearest])
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
        save_colorizations(raw_model, shown, bins, cfg.temperature, os.path.join(cfg.out_dir, "colorization.png"))
    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    colour = colour_metrics(raw_model, data, bins, rt, cfg.temperature)
    common.print0(f"colour-bin top-1 {colour['color_top1']:.4f} | AuC {colour['color_auc']:.4f} (test images)")
    results = {"method": "colorization", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, **colour, "ab_bins": len(bins), "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
