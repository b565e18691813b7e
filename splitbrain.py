"""Split-brain autoencoders: unsupervised learning by cross-channel prediction.

Zhang, Isola, Efros. CVPR 2017. arXiv:1611.09842.

An autoencoder that sees its whole input has nothing to abstract. Split the network in two
disjoint halves and split the input channels with it: in CIE Lab, one half sees only the
lightness L and predicts the colour ab, the other sees only ab and predicts L. Each half solves a
cross-channel prediction problem that needs to know what is in the image, and together they see
every channel. Both predictions are classifications over quantized targets (the paper's best
variant, better than regression): ab over a grid of colour bins, L over lightness bins. After
training the heads are dropped and the representation is the concatenation of both halves'
features, computed from the full Lab image.

    python splitbrain.py                                         # 1 GPU: CIFAR-10, the recipe below
    torchrun --standalone --nproc_per_node=8 splitbrain.py       # 8 GPUs, same global batch of 256
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 splitbrain.py
    python splitbrain.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run

Halves: two trunks from common.resnet whose first convolution reads 1 (L) or 2 (ab) channels, each
with a head that predicts at 1/4 resolution (3x3 convolution on the last map, bilinear upsampling,
1x1 convolution), as colorization.py. The paper halves every layer of AlexNet so that the two
halves together have its size; common.resnet has no half-width ResNets, so each half here is a
whole trunk and the representation is twice the trunk's width (1024 for ResNet-18).
Targets, on the 1/4-resolution grid (average-pooled): ab -> nearest of the 229 ab bins of grid 10
whose centre is in the sRGB gamut for some L (as colorization.py); L -> one of 50 bins of width 2
(this file's choice of bins). The loss is the sum of the two halves' cross-entropies against the
target bin (no soft encoding, no class rebalancing: this file's choice, so both halves train alike).
Defaults: the paper has no CIFAR recipe; this file uses colorization.py's (Adam, betas 0.9/0.99,
weight decay 1e-3, lr 1e-3 per 256 images with cosine decay, 200 epochs, square crops of at least
half the area and flips). No published CIFAR-10 number.
Results of this file: not yet measured (see README).
Evaluated features: the concatenation of the L half's pooled trunk output on L and the ab half's on
ab, both from the un-augmented image in Lab; the probe trains on frozen features of the training
images and their flips. Pretext metrics on the test images: top-1 of the ab bins and of the L bins.
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

PRED_STRIDE = 4  # predictions at 1/4 of the image side, as the colorization network
AB_SCALE = 110.0  # |a|, |b| < 110 for sRGB colours: the ab half reads ab / 110


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic
    data_dir: str = "./data"  # folder of <dataset>.npz (downloaded there if missing); $SSL_DATA replaces this default
    out_dir: str = "out/splitbrain"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json, PNGs
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the crops (a multiple of 4; 96 for STL-10, 224 for ImageNet)
    # model
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs): each half's trunk
    # method
    grid: float = 10.0  # spacing of the ab bins (as colorization)
    l_bins: int = 50  # lightness bins over L in [0, 100] (width 100 / l_bins)
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
            raise ValueError(f"--image_size must be a multiple of {PRED_STRIDE} (predictions at 1/{PRED_STRIDE} resolution)")
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


def lab_input(lab):
    """Lab (B,3,H,W) -> the network input: L / 50 - 1 and ab / 110, both about [-1, 1]."""
    return torch.cat([lab[:, :1] / 50 - 1, lab[:, 1:] / AB_SCALE], 1)


# -------------------------------------------------------------------------------------------------
# model


def set_input_channels(net, channels):
    """Replace the trunk's first convolution by one reading `channels` planes (else the same)."""
    name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent), attr, nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride,
                                                       conv.padding, bias=conv.bias is not None))
    return net


class CrossChannelHalf(nn.Module):
    """One half: its channels (B,C,H,W) -> logits over the other channels' bins (B,Q,H/4,W/4).
    backbone(x) (B, width) is this half's part of the representation."""

    def __init__(self, arch, small_images, in_channels, n_bins):
        super().__init__()
        self.backbone, width = common.resnet(arch, small_images)
        set_input_channels(self.backbone, in_channels)
        self.mix = nn.Sequential(  # a 3x3 conv on the trunk's last map, before upsampling it
            nn.Conv2d(width, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True))
        self.classify = nn.Conv2d(width // 2, n_bins, 1)  # per-pixel bin logits on the 1/4-resolution grid

    def forward(self, x):
        h = x
        for layer in list(self.backbone.children())[:-2]:  # the trunk without its pooling and flatten/fc
            h = layer(h)  # ends (B, width, H/8, W/8) with the CIFAR stem, (B, width, H/32, W/32) without
        h = F.interpolate(self.mix(h), size=(x.shape[2] // PRED_STRIDE, x.shape[3] // PRED_STRIDE), mode="bilinear",
                          align_corners=False)  # (B, width/2, H/4, W/4)
        return self.classify(h)  # (B, Q, H/4, W/4)


class SplitBrain(nn.Module):
    """Two disjoint halves: F1 sees L and predicts ab bins, F2 sees ab and predicts L bins."""

    def __init__(self, arch, small_images, n_ab_bins, n_l_bins):
        super().__init__()
        self.l_to_ab = CrossChannelHalf(arch, small_images, 1, n_ab_bins)
        self.ab_to_l = CrossChannelHalf(arch, small_images, 2, n_l_bins)

    def forward(self, x):  # x: lab_input (B, 3, H, W)
        return self.l_to_ab(x[:, :1]), self.ab_to_l(x[:, 1:])  # (B, Q_ab, H/4, W/4), (B, Q_L, H/4, W/4)

    def features(self, x):  # the representation: both halves' pooled features, (B, 2 * width)
        return torch.cat([self.l_to_ab.backbone(x[:, :1]), self.ab_to_l.backbone(x[:, 1:])], 1)


# -------------------------------------------------------------------------------------------------
# loss


def split_brain_loss(ab_logits, ab_target, l_logits, l_target):
    """The sum of the two halves' cross-channel classification losses, each averaged over pixels.

    ab_logits: (B, Q_ab, h, w) from the L half, ab_target: (B, h, w) nearest ab bin;
    l_logits: (B, Q_L, h, w) from the ab half, l_target: (B, h, w) L bin. Computed in float32.
    """
    return F.cross_entropy(ab_logits.float(), ab_target) + F.cross_entropy(l_logits.float(), l_target)


# -------------------------------------------------------------------------------------------------
# quantization and decoding


def ab_bins(grid=10.0, L_step=0.1):
    """(Q, 2) centres (a, b) of the grid cells whose centre is in the sRGB gamut for some L in [0, 100]."""
    side = torch.arange(-120 // grid, 120 // grid + 1) * grid  # |a|, |b| < 120 for every sRGB colour
    ab = torch.cartesian_prod(side, side)  # (G, 2)
    L = torch.arange(0, 100 + L_step / 2, L_step)  # (nL,)
    lab = torch.cat([L.view(-1, 1, 1).expand(-1, len(ab), 1), ab.expand(len(L), -1, -1)], 2)  # (nL, G, 3)
    rgb = common.lab_to_rgb(lab.permute(2, 0, 1)[None], clamp=False)[0]  # (3, nL, G), unclamped
    in_gamut = ((rgb >= 0) & (rgb <= 1)).all(0).any(0)  # (G,): some L makes it a displayable colour
    return ab[in_gamut]


def quantize_ab(ab, bins):
    """ab (B,2,h,w) -> (B,h,w) index of the nearest bin centre."""
    B, _, h, w = ab.shape
    p = ab.permute(0, 2, 3, 1).reshape(-1, 2).float()  # (P, 2)
    d2 = (p**2).sum(1, keepdim=True) - 2 * p @ bins.T + (bins**2).sum(1)  # (P, Q) squared distances
    return d2.argmin(1).view(B, h, w)


def l_centres(n_bins, device=None):
    """(n_bins, 1) centres of the L bins, which split [0, 100] into equal widths."""
    return ((torch.arange(n_bins, device=device) + 0.5) * 100 / n_bins)[:, None]


def quantize_l(L, n_bins):
    """L (B,1,h,w) in [0, 100] -> (B,h,w) bin index (L = 100 joins the last bin)."""
    return (L[:, 0] * n_bins / 100).long().clamp(0, n_bins - 1)


def lab_targets(lab, bins, n_l_bins):
    """Lab (B,3,H,W) -> (ab bin (B,H/4,W/4), L bin (B,H/4,W/4)) on the prediction grid."""
    lab = F.avg_pool2d(lab, PRED_STRIDE)  # (B, 3, H/4, W/4)
    return quantize_ab(lab[:, 1:], bins), quantize_l(lab[:, :1], n_l_bins)


def annealed_mean(logits, centres, temperature):
    """logits (B,Q,h,w), centres (Q,C) -> (B,C,h,w): the mean of softmax(logits / T) over the centres."""
    p = torch.softmax(logits.float() / temperature, dim=1)  # (B, Q, h, w)
    return torch.einsum("bqhw,qc->bchw", p, centres)


@torch.no_grad()
def pretext_metrics(model, data, bins, n_l_bins, rt):
    """Top-1 of the ab bins (L half) and of the L bins (ab half) on the test images' prediction grid."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # correct ab, correct L, pixels
    for x, _ in data.eval_batches("test", 500):
        lab = common.rgb_to_lab(common.to_float(x))
        ab_target, l_target = lab_targets(lab, bins, n_l_bins)
        with rt.autocast():
            ab_logits, l_logits = model(lab_input(lab))
        sums += torch.stack([(ab_logits.argmax(1) == ab_target).sum(), (l_logits.argmax(1) == l_target).sum(),
                             torch.tensor(ab_target.numel(), device=rt.device)]).double()
    sums = common.all_reduce_sum(sums)  # every process's share of the test set
    model.train()
    return {"ab_top1": (sums[0] / sums[2]).item(), "l_top1": (sums[1] / sums[2]).item()}


@torch.no_grad()
def save_predictions(model, x, bins, n_l_bins, temperature, path):
    """PNG rows: the L input, the ab input (shown at L = 50), L -> ab (true L, predicted ab),
    ab -> L (predicted L, true ab), the ground truth (uint8 x)."""
    model.eval()
    x = common.to_float(x)
    lab = common.rgb_to_lab(x)
    L, ab = lab[:, :1], lab[:, 1:]
    ab_logits, l_logits = model(lab_input(lab))
    up = lambda t: F.interpolate(t, size=x.shape[2:], mode="bilinear", align_corners=False)  # noqa: E731
    ab_pred = up(annealed_mean(ab_logits, bins, temperature))  # (N, 2, H, W)
    L_pred = up(annealed_mean(l_logits, l_centres(n_l_bins, x.device), temperature))  # (N, 1, H, W)
    rows = [torch.cat([L, torch.zeros_like(ab)], 1), torch.cat([torch.full_like(L, 50.0), ab], 1),
            torch.cat([L, ab_pred], 1), torch.cat([L_pred, ab], 1)]
    common.save_image_grid([common.lab_to_rgb(r) for r in rows] + [x], path)
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
    bins = ab_bins(cfg.grid).to(rt.device)  # (Q_ab, 2)
    common.print0(f"splitbrain: {total_steps} steps, Adam lr {lr:.3g}, {len(bins)} ab bins, {cfg.l_bins} L bins")

    raw_model = common.sync_batchnorm(SplitBrain(cfg.arch, cfg.image_size <= 64, len(bins), cfg.l_bins).to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    opt = torch.optim.Adam(common.param_groups(raw_model, cfg.weight_decay), lr=lr, betas=(0.9, 0.99))
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # both halves' pooled features of the un-augmented image in Lab
        return raw_model.features(lab_input(common.rgb_to_lab(common.to_float(x))))

    shown = next(iter(data.eval_batches("test", cfg.show)))[0]  # the same test images in every PNG

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt),
                   **pretext_metrics(raw_model, data, bins, cfg.l_bins, rt)})
        if rt.is_main:
            save_predictions(raw_model, shown, bins, cfg.l_bins, cfg.temperature,
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
        # each process averages over its own pixels; DDP's gradient average makes it the global mean
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
        torch.save({"l_to_ab": raw_model.l_to_ab.backbone.state_dict(), "ab_to_l": raw_model.ab_to_l.backbone.state_dict()},
                   os.path.join(cfg.out_dir, "encoder.pt"))
        save_predictions(raw_model, shown, bins, cfg.l_bins, cfg.temperature, os.path.join(cfg.out_dir, "splitbrain.png"))
    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    pretext = pretext_metrics(raw_model, data, bins, cfg.l_bins, rt)
    common.print0(f"ab-bin top-1 {pretext['ab_top1']:.4f} | L-bin top-1 {pretext['l_top1']:.4f} (test images)")
    results = {"method": "splitbrain", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, **pretext, "ab_bins": len(bins), "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
