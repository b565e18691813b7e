"""Split-brain autoencoders: unsupervised learning by cross-channel prediction.

Zhang, Isola, Efros. CVPR 2017. arXiv:1611.09842.

An autoencoder that sees its whole input has nothing to abstract. Split the network in two
disjoint halves and split the input channels with it: in CIE Lab, one half sees only the
lightness L and predicts the colour ab, the other sees only ab and predicts L. Each half solves a
cross-channel prediction problem that needs to know what is in the image, and together they see
every channel. Both predictions are classifications over quantized targets (the paper's best
variant, (cl,cl) of its Table 2): ab over a grid of colour bins, L over 50 lightness bins of width 2,
each a 1-hot target with a plain cross-entropy (no soft encoding, no class rebalancing: P App. B).
After training the heads are dropped and the representation is the concatenation of both halves'
features, computed from the full Lab image.

    python splitbrain.py                                         # 1 GPU: CIFAR-10, the recipe below
    torchrun --standalone --nproc_per_node=8 splitbrain.py       # 8 GPUs, same global batch of 256
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 splitbrain.py
    python splitbrain.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run

Defaults: the paper has no CIFAR recipe, no CIFAR number and no optimizer settings; this file uses
colorization.py's (Adam, betas 0.9/0.99, L2 1e-3, lr 1e-3 per 256 images with cosine decay, 200
epochs, square crops and flips). Sources checked, P: the paper (arXiv v3, with its App. B);
C: the official code (richzhang/splitbrainauto): deploy prototxts and trained weights only, no
training code. Grey images train like any other: neither source says to mask them (colorization.py
does, as its official code).
Evaluated features: the concatenation of the L half's pooled trunk output on L and the ab half's on
ab, both from the un-augmented image in Lab resized to image_size, for knn_top1, probe_top1 and
linear_top1 (common.evaluate). Pretext metrics on the test images: top-1 of the ab bins and of the
L bins. Results of this file: not yet measured (README).

| setting | paper | official code | this file |
|---|---|---|---|
| halves | AlexNet split in two: group 2 (P Sec. 3.2) | AlexNet, group 2 in conv2, 4, 5 (C deploy_lab) | 2 ResNet-18 |
| parameters | those of one AlexNet, halved layers (P Sec. 3.2) | as P (C) | two whole trunks: twice one |
| representation | both halves' layers, concatenated (P Sec. 3.2) | AlexNet to fc7 (C deploy_lab) | 2 x 512, pooled |
| input | Lab | a fixed 1x1 conv per channel, "0-center" L (C deploy_lab) | L / 50 - 1, ab / 110 |
| prediction grid | 12 x 12 of 180 px crops (P App. B, Table 6) | - | 4 x 4 resized to 8 x 8; targets: 4 x 4 averages |
| ab bins | grid 10, 313 in gamut, 1-hot (P Sec. 4.1) | - | 229: common.ab_bins, 1-hot |
| loss scale | sum over pixels (P Eq. 2) | - | as P, mean over images |
| crops | 180 px of 256 px (P App. B) | - | square, 50-100% of the area, flips |
| optimizer, lr, steps | - | - | colorization.py's: Adam, 1e-3 per 256, 200 epochs |
| L2 | - | - | 1e-3 of colorization's C, whose loss sums 529 (v2: 1,936) pixels; here 2 losses of 64 |
| annealed-mean T | for pictures, T of [49] (P Sec. 4.1) | - | 0.38, both halves (PNGs) |
| evaluation | linear on frozen conv maps, ImageNet (P Table 2) | - | knn, probe, linear_eval |
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

PRED_STRIDE = common.PixelClassifier.stride  # logits on a grid of 1/4 of the image side, as colorization.py's
AB_SCALE = 110.0  # |a|, |b| < 110 for sRGB colours: the ab half reads ab / 110


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic
    data_dir: str = "./data"  # folder of <dataset>.npz (downloaded there if missing); $SSL_DATA replaces this default
    out_dir: str = "out/splitbrain"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json, PNGs
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the crops and of evaluated images (a multiple of 4; 96 for STL-10, 224 ImageNet)
    # model
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs): each half's trunk
    # method
    grid: float = 10.0  # spacing of the ab bins (as colorization)
    l_bins: int = 50  # lightness bins over L in [0, 100], of width 100 / l_bins (paper Sec. 4.1: 50 of width 2)
    temperature: float = 0.38  # annealed-mean decoding of both predictions for the PNGs
    crop_min: float = 0.5  # smallest area fraction of the random square crop
    # optim
    epochs: int = 200  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 256  # global batch, split across processes
    lr: float = 1e-3  # Adam base lr per 256 images, scaled linearly with the batch
    weight_decay: float = 1e-3  # L2 on weights only, added to the gradient
    warmup_epochs: int = 0  # linear warmup, then cosine decay to 0
    # eval
    eval_every: int = 10  # epochs between kNN monitor runs and prediction PNGs (0 = only at the end)
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
        if not 0 < self.grid <= 50 or self.l_bins < 2:
            raise ValueError("--grid must be in (0, 50] and --l_bins at least 2")
        if self.temperature <= 0 or not 0 < self.crop_min <= 1 or self.show < 1:
            raise ValueError("--temperature must be > 0, --crop_min in (0, 1] and --show at least 1")


# -------------------------------------------------------------------------------------------------
# views


def splitbrain_view(x, cfg):
    """A random square crop (area >= crop_min) and flip: uint8 (B,3,H,W) -> float RGB in [0,1] (B,3,S,S)."""
    x = common.random_resized_crop(common.to_float(x), cfg.image_size, scale=(cfg.crop_min, 1.0), ratio=(1.0, 1.0))
    return common.random_flip(x)


def lab_at(x, size):
    """uint8 (B,3,H,W) -> Lab (B,3,size,size): un-augmented images at the training scale (bilinear, if not already)."""
    return common.rgb_to_lab(common.resize(common.to_float(x), size))


def lab_input(lab):
    """Lab (B,3,H,W) -> the network input: L / 50 - 1 and ab / 110, both about [-1, 1]."""
    return torch.cat([lab[:, :1] / 50 - 1, lab[:, 1:] / AB_SCALE], 1)


# -------------------------------------------------------------------------------------------------
# model


class SplitBrain(nn.Module):
    """Two disjoint halves (common.PixelClassifier: a trunk and a head whose logits are resized to the
    1/4-resolution grid): F1 sees L and predicts ab bins, F2 sees ab and predicts L bins."""

    def __init__(self, arch, small_images, n_ab_bins, n_l_bins):
        super().__init__()
        self.l_to_ab = common.PixelClassifier(arch, small_images, 1, n_ab_bins)
        self.ab_to_l = common.PixelClassifier(arch, small_images, 2, n_l_bins)

    def forward(self, x):  # x: lab_input (B, 3, H, W)
        return self.l_to_ab(x[:, :1]), self.ab_to_l(x[:, 1:])  # (B, Q_ab, H/4, W/4), (B, Q_L, H/4, W/4)

    def features(self, x):  # the representation: both halves' pooled features, (B, 2 * width)
        return torch.cat([self.l_to_ab.backbone(x[:, :1]), self.ab_to_l.backbone(x[:, 1:])], 1)


# -------------------------------------------------------------------------------------------------
# loss


def split_brain_loss(ab_logits, ab_target, l_logits, l_target):
    """The sum of the two halves' cross-channel classification losses (paper Eq. 2-3), each summed over
    the pixels of an image, as the paper's sum over h, w, and averaged over the images.

    ab_logits: (B, Q_ab, h, w) from the L half, ab_target: (B, h, w) nearest ab bin;
    l_logits: (B, Q_L, h, w) from the ab half, l_target: (B, h, w) L bin. Computed in float32.
    """
    ab = F.cross_entropy(ab_logits.float(), ab_target, reduction="none")  # (B, h, w)
    L = F.cross_entropy(l_logits.float(), l_target, reduction="none")  # (B, h, w)
    return (ab + L).sum((1, 2)).mean()


# -------------------------------------------------------------------------------------------------
# quantization (1-hot targets, paper Sec. 4.1)


def quantize_ab(ab, bins):
    """ab (B,2,h,w) -> (B,h,w) index of the nearest bin centre."""
    B, _, h, w = ab.shape
    return common.bin_distances(ab, bins).argmin(1).view(B, h, w)


def l_centres(n_bins, device=None):
    """(n_bins, 1) centres of the L bins, which split [0, 100] into equal widths."""
    return ((torch.arange(n_bins, device=device) + 0.5) * 100 / n_bins)[:, None]


def quantize_l(L, n_bins):
    """L (B,1,h,w) in [0, 100] -> (B,h,w) bin index (L = 100 joins the last bin)."""
    return (L[:, 0] * n_bins / 100).long().clamp(0, n_bins - 1)


def lab_targets(lab, bins, n_l_bins):
    """Lab (B,3,H,W) -> (ab bin (B,H/4,W/4), L bin (B,H/4,W/4)) on the prediction grid (4 x 4 averages)."""
    lab = F.avg_pool2d(lab, PRED_STRIDE)  # (B, 3, H/4, W/4)
    return quantize_ab(lab[:, 1:], bins), quantize_l(lab[:, :1], n_l_bins)


# -------------------------------------------------------------------------------------------------
# pretext metrics and pictures


@torch.no_grad()
def pretext_metrics(model, data, bins, n_l_bins, rt, size):
    """Top-1 of the ab bins (L half) and of the L bins (ab half) on the test images' prediction grid."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # correct ab, correct L, pixels
    for x, _ in data.eval_batches("test", 500):
        lab = lab_at(x, size)
        ab_target, l_target = lab_targets(lab, bins, n_l_bins)
        with rt.autocast():
            ab_logits, l_logits = model(lab_input(lab))
        sums += torch.stack([(ab_logits.argmax(1) == ab_target).sum(), (l_logits.argmax(1) == l_target).sum(),
                             torch.tensor(ab_target.numel(), device=rt.device)]).double()
    sums = common.all_reduce_sum(sums)  # every process's share of the test set
    model.train()
    return {"ab_top1": (sums[0] / sums[2]).item(), "l_top1": (sums[1] / sums[2]).item()}


@torch.no_grad()
def save_predictions(model, x, bins, n_l_bins, temperature, size, path):
    """PNG rows: the L input, the ab input (shown at L = 50), L -> ab (true L, predicted ab),
    ab -> L (predicted L, true ab), the ground truth (uint8 x at the training scale)."""
    model.eval()
    lab = lab_at(x, size)
    L, ab = lab[:, :1], lab[:, 1:]
    ab_logits, l_logits = model(lab_input(lab))
    up = lambda t: F.interpolate(t, size=lab.shape[2:], mode="bilinear", align_corners=False)  # noqa: E731
    ab_pred = up(common.annealed_mean(ab_logits, bins, temperature))  # (N, 2, S, S)
    L_pred = up(common.annealed_mean(l_logits, l_centres(n_l_bins, x.device), temperature))  # (N, 1, S, S)
    rows = [torch.cat([L, torch.zeros_like(ab)], 1), torch.cat([torch.full_like(L, 50.0), ab], 1),
            torch.cat([L, ab_pred], 1), torch.cat([L_pred, ab], 1), lab]
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
    bins = common.ab_bins(cfg.grid).to(rt.device)  # (Q_ab, 2)
    common.print0(f"splitbrain: {total_steps} steps, Adam lr {lr:.3g}, {len(bins)} ab bins, {cfg.l_bins} L bins")

    raw_model = common.sync_batchnorm(SplitBrain(cfg.arch, S <= 64, len(bins), cfg.l_bins).to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    opt = torch.optim.Adam(common.param_groups(raw_model, cfg.weight_decay), lr=lr, betas=(0.9, 0.99))
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # both halves' pooled features of the un-augmented image in Lab, at the training scale
        return raw_model.features(lab_input(lab_at(x, S)))

    shown = next(iter(data.eval_batches("test", cfg.show)))[0]  # the same test images in every PNG

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt),
                   **pretext_metrics(raw_model, data, bins, cfg.l_bins, rt, S)})
        if rt.is_main:
            save_predictions(raw_model, shown, bins, cfg.l_bins, cfg.temperature, S,
                             os.path.join(cfg.out_dir, f"splitbrain_epoch{epoch:04d}.png"))

    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, _ in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = common.cosine_lr(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        common.set_lr(opt, lr_now)
        lab = common.rgb_to_lab(splitbrain_view(x, cfg))  # (B, 3, S, S)
        ab_target, l_target = lab_targets(lab, bins, cfg.l_bins)  # (B, S/4, S/4) each
        with rt.autocast():
            ab_logits, l_logits = model(lab_input(lab))  # (B, Q_ab, S/4, S/4), (B, Q_L, S/4, S/4)
        # each process averages over its own images; DDP's gradient average makes it the global mean
        loss = split_brain_loss(ab_logits, ab_target, l_logits, l_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ab_top1 = (ab_logits.detach().argmax(1) == ab_target).float().mean()  # L -> ab accuracy on this batch
        l_top1 = (l_logits.detach().argmax(1) == l_target).float().mean()  # ab -> L accuracy on this batch
        log.step(step, loss=loss, lr=lr_now, ab_top1=ab_top1, l_top1=l_top1)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                    "config": dataclasses.asdict(cfg)}, rt)

    if rt.is_main:  # both halves' trunks (conv1 reads L, resp. ab) and the final predictions, before the last
        # collectives below, so that no process leaves train() while the main one still writes files
        torch.save({"l_to_ab": raw_model.l_to_ab.backbone.state_dict(),
                    "ab_to_l": raw_model.ab_to_l.backbone.state_dict()}, os.path.join(cfg.out_dir, "encoder.pt"))
        save_predictions(raw_model, shown, bins, cfg.l_bins, cfg.temperature, S,
                         os.path.join(cfg.out_dir, "splitbrain.png"))
    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    pretext = pretext_metrics(raw_model, data, bins, cfg.l_bins, rt, S)
    common.print0(f"ab-bin top-1 {pretext['ab_top1']:.4f} | L-bin top-1 {pretext['l_top1']:.4f} (test images)")
    results = {"method": "splitbrain", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs,
               "steps": stop_step, **metrics, **pretext, "ab_bins": len(bins),
               "train_seconds": round(log.train_seconds, 1), "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
