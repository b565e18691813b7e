"""Barlow Twins: self-supervised learning via redundancy reduction.

Zbontar, Jing, Misra, LeCun, Deny. ICML 2021. arXiv:2103.03230.

Two augmentations of each image go through the same encoder f and projector g. Each dimension of
the projections z1, z2 is standardized over the batch, and the empirical cross-correlation matrix
C (D x D) between the two views is pushed towards the identity (paper Eq. 1): its diagonal to 1,
so that every feature is invariant to the augmentations, and its off-diagonal entries to 0, weighted
by lambda, so that different features carry different information (redundancy reduction, after
H. Barlow). No negatives, no predictor, no momentum encoder, no stop-gradient: the decorrelation
term alone keeps the features from collapsing. Under DDP the batch statistics and C are summed over
processes: C is the matrix of the global batch. After training, g is thrown away and h = f(x) is
the representation.

    python barlow.py                                             # 1 GPU: CIFAR-10, solo-learn's recipe
    torchrun --standalone --nproc_per_node=8 barlow.py           # 8 GPUs, same global batch of 256
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 barlow.py
    python barlow.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run

The paper has no CIFAR recipe; the defaults are solo-learn's CIFAR-10 Barlow Twins (S below:
scripts/pretrain/cifar/barlow.yaml, augmentations/asymmetric.yaml, solo/utils/lars.py), for which
solo-learn reports 92.10% top-1 (its README does not say: online or offline linear). The official main.py sums C over
its W GPUs with an all_reduce that autograd does not see; after DDP's mean its step follows 1/W of
the global loss's gradient. This file takes the true gradient at any W; the official W-GPU run is
`--lars_form=byol --lars_eta=0.001 --lars_clip=false --lr=0.2 --lr_biases=0.0048 --weight_decay=1e-6
--final_lr_ratio=0.001 --loss_scale=1/W` with 1/W as a number (its README: 16 GPUs, 0.0625), checked
by tests/dist_barlow_official.py; on ImageNet add `--dataset=folder --data_dir=<ImageNet> --arch=resnet50
--image_size=224 --proj_dim=8192 --blur=true --batch_size=2048`. Still different from C then: the trunk's init
and the crops' interpolation (table), bfloat16 autocast for C's float16, and the crops, cut from each image's
256 px centre square (common's folder loader) where C crops the whole image. Evaluated features: the
backbone's pooled h (512-d for ResNet-18) for knn_top1, probe_top1 and linear_top1 (common.evaluate).
Results of this file: not yet measured (README).

Departures from the sources (P: the paper, ICML version; C: the official main.py; S: solo-learn, above):

| setting | paper | official code | this file |
|---|---|---|---|
| trunk | ResNet-50 (P 2.2) | as P (C) | ResNet-18, CIFAR stem (S; it pads 2 px) |
| trunk init | - | zero_init_residual=True: each block's last BN at 0 (C) | torchvision's default: no zero-init (S) |
| batch, epochs | 2048, 1000, 32 GPUs (P 2.2) | 2048, 1000, 16 GPUs (C README) | 256, 1000 (S) |
| projector | 3 x 8192, BN + ReLU after two (P 2.2) | as P, no biases (C) | 3 x 2048 (S), no biases (C; S: biases) |
| lambda | 5e-3 (P 2.2) | 0.0051 (C) | as C (S) |
| standardization | z.std(0), unbiased (P Alg. 1) | BatchNorm1d(affine=False), synced (C) | as C |
| loss scale | 1 | 1; W GPUs step on 1/W of the gradient (C) | 0.1 (S); the true gradient |
| LARS form | BYOL's (P 2.2) | "byol": v <- m v + trust d, w <- w - lr v (C) | "larc" (S): the same steps |
| LARS trust | BYOL's (P 2.2) | eta norm(w) / norm(g + wd w) (C) | eta norm(w) / (norm(g) + wd norm(w)) (S) |
| LARS flag | - | - | --lars_form=byol: C's form and trust (common.LARS) |
| LARS eta, clip | - | 0.001, no clip (C) | 0.02, each layer's rate capped at lr (S) |
| lr per 256 images | 0.2, biases and BN 0.0048 (P 2.2) | as P (C) | 0.3, biases and BN too (S) |
| weight decay | 1.5e-6, not on biases and BN (P 2.2) | 1e-6, as P (C default) | 1e-4, as P (S) |
| schedule | 10 warmup epochs, cosine to lr / 1000 (P 2.2) | as P (C) | 10 warmup epochs, cosine to 0 (S) |
| crops | BYOL's: 224 px, area 0.08-1 (P 2.2) | bicubic (C) | 32 px, bilinear (S: bicubic) |
| blur | BYOL's: p 1 / 0.1, 23 px kernel (P 2.2) | PIL's, radius = sigma in 0.1-2 (C) | off at 32 px (S); --blur: as C |
| input | - | ImageNet's mean and std (C) | as C (S: CIFAR-10's) |
| evaluation | linear, frozen h (P 3.1) | SGD 0.3, 100 epochs, crops (C evaluate.py) | linear_eval (S: online linear) |
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic
    data_dir: str = "./data"  # folder of <dataset>.npz (downloaded there if missing); $SSL_DATA replaces this default
    out_dir: str = "out/barlow"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the augmented views (96 for STL-10, 224 for ImageNet)
    # model
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs)
    proj_dim: int = 2048  # width of each of the projector's three layers (solo-learn CIFAR; 8192 on ImageNet)
    # method
    lambd: float = 0.0051  # weight of the off-diagonal (redundancy) terms (C and S; paper: 5e-3)
    loss_scale: float = 0.1  # the loss is multiplied by this (S; paper: 1; the official step on W GPUs: 1/W)
    crop_min: float = 0.08  # smallest area fraction of the random resized crop
    blur: bool = False  # blur view 1 always, view 2 with p=0.1 (paper, on ImageNet); off at 32 px as S
    # optim
    epochs: int = 1000  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 256  # global batch, split across processes
    lr: float = 0.3  # LARS base lr per 256 images, scaled linearly with the batch (S; paper: 0.2)
    lr_biases: float = 0.0  # base lr of biases and BN per 256 images (0 means: the same as lr, S; paper: 0.0048)
    weight_decay: float = 1e-4  # on weights only, not biases and BN (S; paper: 1.5e-6; C: 1e-6)
    lars_form: str = "larc"  # common.LARS form: larc (S) | byol (C) | simclr
    lars_eta: float = 0.02  # LARS trust coefficient (S; C: 0.001)
    lars_clip: bool = True  # cap each layer's adapted lr at lr (S; C: false)
    warmup_epochs: int = 10  # linear warmup, then cosine decay to lr * final_lr_ratio
    final_lr_ratio: float = 0.0  # the cosine ends at lr times this (S: 0; paper: 0.001)
    # eval
    eval_every: int = 10  # epochs between kNN monitor runs (0 = only at the end)
    probe_epochs: int = 100  # fast linear probe on precomputed frozen features at the end, epochs (0 = none)
    linear_epochs: int = -1  # standard linear evaluation at the end, epochs (-1: 100 on CUDA, none on CPU; 0: none)
    # system
    seed: int = 0  # weights, data order and augmentations
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    compile: str = "auto"  # torch.compile the model: auto (on CUDA only) | true | false
    log_every: int = 50  # steps between progress lines
    resume: bool = False  # continue from out_dir/ckpt.pt

    def __post_init__(self):
        common.check_config(self)
        if min(self.lambd, self.lr_biases, self.final_lr_ratio) < 0 or self.loss_scale <= 0 or self.lars_eta <= 0:
            raise ValueError("--lambd, --lr_biases and --final_lr_ratio must be >= 0, --loss_scale and --lars_eta > 0")
        if self.proj_dim < 1 or not 0 < self.crop_min <= 1:
            raise ValueError("--proj_dim must be >= 1 and --crop_min in (0, 1]")
        if self.lars_form not in ("larc", "byol", "simclr"):
            raise ValueError(f"--lars_form={self.lars_form} is impossible: it must be larc, byol or simclr")


# -------------------------------------------------------------------------------------------------
# views


def barlow_view(x, cfg, blur_p, solarize_p):
    """One augmentation (BYOL's recipe, paper Sec. 2.2): uint8 (B,3,H,W) -> (B,3,S,S). The two views
    differ only in the probabilities of blur and solarization. The blur is main.py's: PIL's GaussianBlur
    with radius sigma ~ U(0.1, 2), a kernel reaching 3 sigma (BYOL's 23 px at 224 px cuts it nowhere)."""
    x = common.to_float(x)
    x = common.random_resized_crop(x, cfg.image_size, scale=(cfg.crop_min, 1.0))
    x = common.random_flip(x)
    x = common.color_jitter(x, 0.4, 0.4, 0.2, 0.1, p=0.8)
    x = common.random_grayscale(x, p=0.2)
    if cfg.blur:
        x = common.gaussian_blur(x, p=blur_p, sigma=(0.1, 2.0), kernel="sigma")
    x = common.solarize(x, p=solarize_p)
    return common.normalize(x)


# -------------------------------------------------------------------------------------------------
# model


class BarlowTwins(nn.Module):
    """Encoder f (ResNet) and projector g: two views x1, x2 -> z1 = g(f(x1)), z2 = g(f(x2))."""

    def __init__(self, arch, small_images, proj_dim):
        super().__init__()
        self.backbone, width = common.resnet(arch, small_images)
        # g: three linear layers, BN + ReLU after the first two, no biases (official code)
        self.projector = nn.Sequential(
            nn.Linear(width, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False))

    def forward(self, x1, x2):
        # one pass per view, as the official code: BatchNorm statistics of each view's batch alone
        h1, h2 = self.backbone(x1), self.backbone(x2)  # (B, width) each: the representation
        return self.projector(h1), self.projector(h2)  # (B, proj_dim) each


# -------------------------------------------------------------------------------------------------
# loss


def standardize(z, eps=1e-5):
    """Each column of z (2, B, D) to zero mean and unit variance over the GLOBAL batch of N rows.

    Biased variance and eps as BatchNorm1d(affine=False) in training mode (the official code's
    self.bn, synchronized across processes there). Returns (z_standardized, N as a tensor).
    """
    n = common.all_reduce_sum(z.new_tensor(float(z.shape[1])))  # global batch size N
    mean = common.all_reduce_sum(z.sum(1, keepdim=True)) / n  # (2, 1, D): means over the global batch
    var = common.all_reduce_sum((z - mean).pow(2).sum(1, keepdim=True)) / n  # (2, 1, D): global biased variances
    return (z - mean) / (var + eps).sqrt(), n


def barlow_twins_loss(z1, z2, lambd):
    """Barlow Twins loss (paper Eq. 1 and 2) of the GLOBAL batch.

    z1, z2: (B, D) projections of two views of the same B images (this process's share of the
    batch). Each dimension is standardized over the batch, C = z1n.T @ z2n / N is the (D, D)
    cross-correlation matrix, and the loss is sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2.
    Under DDP the batch statistics and C are summed over processes, so every process gets the loss
    of the global batch of N rows; on one process N = B. Computed in float32.
    """
    zn, n = standardize(torch.stack([z1, z2]).float())  # (2, B, D)
    c = common.all_reduce_sum(zn[0].T @ zn[1]) / n  # (D, D): the cross-correlation of the global batch
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()  # invariance term
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()  # redundancy-reduction term
    return on_diag + lambd * off_diag


# -------------------------------------------------------------------------------------------------
# training


def train(cfg: Config) -> dict:
    rt = common.setup(cfg)  # processes, device, precision, seed, out_dir
    data = common.load_data(cfg, rt)  # uint8 images; small datasets live on the device
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (paper Sec. 2.2: lr x batch size / 256)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    lr_biases = (cfg.lr_biases or cfg.lr) * cfg.batch_size / 256  # of the group "biases" (biases and BN)
    common.print0(f"barlow: {total_steps} steps, LARS ({cfg.lars_form}, eta {cfg.lars_eta}, clip {cfg.lars_clip}) "
                  f"lr {lr:.3g} (biases {lr_biases:.3g}), loss x {cfg.loss_scale}, lambda {cfg.lambd}")

    raw_model = common.sync_batchnorm(BarlowTwins(cfg.arch, cfg.image_size <= 64, cfg.proj_dim).to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    opt = common.LARS(common.param_groups(raw_model, cfg.weight_decay), lr=lr, momentum=0.9, eta=cfg.lars_eta,
                      clip=cfg.lars_clip, form=cfg.lars_form)  # groups "weights" and "biases" (biases and BN)
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # the representation h = f(x) of un-augmented uint8 images
        return raw_model.backbone(common.normalize(common.to_float(x)))

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt)})

    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, _ in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = common.cosine_lr(step, total_steps, warmup_steps, lr, final_lr=lr * cfg.final_lr_ratio)
        common.set_lr(opt, lr_now, biases=lr_now * lr_biases / lr)  # biases and BN: the same schedule, their own lr
        # view 1 always blurred, never solarized; view 2 rarely blurred, solarized with p = 0.2 (BYOL's recipe)
        x1, x2 = barlow_view(x, cfg, blur_p=1.0, solarize_p=0.0), barlow_view(x, cfg, blur_p=0.1, solarize_p=0.2)
        with rt.autocast():
            z1, z2 = model(x1, x2)  # (B, proj_dim) each
        # statistics and C of the global batch, its true gradient at any number of processes (main.py's step
        # on W GPUs follows 1/W of it: --loss_scale=1/W takes that step, see the docstring)
        loss = cfg.loss_scale * barlow_twins_loss(z1.float(), z2.float(), cfg.lambd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        z_std = F.normalize(z1.detach().float(), dim=1).std(0).mean()  # collapse monitor: ~1/sqrt(D), 0 collapsed
        log.step(step, loss=loss, lr=lr_now, z_std=z_std)  # the loss as minimized: times loss_scale (0.1)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                    "config": dataclasses.asdict(cfg)}, rt)

    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    if rt.is_main:  # the encoder alone, loadable into a torchvision ResNet with the same stem (README)
        torch.save(raw_model.backbone.state_dict(), os.path.join(cfg.out_dir, "encoder.pt"))
    results = {"method": "barlow", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
