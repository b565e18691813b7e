"""Barlow Twins: self-supervised learning via redundancy reduction.

Zbontar, Jing, Misra, LeCun, Deny. ICML 2021. arXiv:2103.03230.

Two augmentations of each image go through the same encoder f and projector g. Each dimension of
the projections z1, z2 is standardized over the batch, and the empirical cross-correlation matrix
C (D x D) between the two views is pushed towards the identity (paper Eq. 1): its diagonal to 1,
so that every feature is invariant to the augmentations, and its off-diagonal entries to 0, weighted
by lambda, so that different features carry different information (redundancy reduction, after
H. Barlow). No negatives, no predictor, no momentum encoder, no stop-gradient: the decorrelation
term alone keeps the features from collapsing, and a wide projector helps (paper's ablations). Under DDP the
batch statistics and C are summed over processes (the paper's all_reduce), so that C is the matrix
of the global batch. After training, g is thrown away and h = f(x) is the representation.

    python barlow.py                                             # 1 GPU: CIFAR-10, the recipe below
    torchrun --standalone --nproc_per_node=8 barlow.py           # 8 GPUs, same global batch of 256
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 barlow.py
    python barlow.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run

The paper has no CIFAR recipe. CIFAR-10 defaults: solo-learn's CIFAR-10 Barlow Twins
(scripts/pretrain/cifar/barlow.yaml, augmentations/asymmetric.yaml: ResNet-18 with CIFAR stem, batch
256, 1000 epochs, projector 2048-2048-2048, lambda 0.0051, the paper's asymmetric augmentations
without blur at 32 px, the loss scaled by 0.1, LARS with trust coefficient 0.02 and each layer's lr
capped at lr, biases and BN neither adapted nor decayed, lr 0.3 per 256 images, weight decay 1e-4,
10 warmup epochs, cosine decay to 0), for which solo-learn reports 92.10% linear top-1 (its online
classifier). The paper's optimizer (Implementation Details, official main.py) is `--lars_eta=0.001
--lars_clip=false --loss_scale=1 --lr=0.2 --lr_biases=0.0048 --weight_decay=1.5e-6 --final_lr_ratio=0.001`.
ImageNet (paper): ResNet-50, projector 8192-8192-8192, batch 2048,
blur on, `--image_size=224 --proj_dim=8192 --blur=true --batch_size=2048`.
Results of this file: not yet measured (see README).
Evaluated features: the backbone's pooled output h (512-d for ResNet-18); the probe trains on
frozen h of the un-augmented training images and their flips.
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
    lambd: float = 0.0051  # weight of the off-diagonal (redundancy) terms (official code and solo-learn; paper: ~5e-3)
    loss_scale: float = 0.1  # the loss is multiplied by this (solo-learn CIFAR; the paper: 1)
    crop_min: float = 0.08  # smallest area fraction of the random resized crop
    blur: bool = False  # the paper's asymmetric blur (view 1 always, view 2 p=0.1); off at 32 px as solo-learn
    # optim
    epochs: int = 1000  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 256  # global batch, split across processes
    lr: float = 0.3  # LARS base lr per 256 images, scaled linearly with the batch (solo-learn; paper: 0.2)
    lr_biases: float = 0.0  # base lr of biases and BN per 256 images (0: the same as lr, solo-learn; paper: 0.0048)
    weight_decay: float = 1e-4  # on weights only, not biases and BN (solo-learn; paper: 1.5e-6)
    lars_eta: float = 0.02  # LARS trust coefficient (solo-learn; paper: 0.001)
    lars_clip: bool = True  # cap each layer's adapted lr at lr (solo-learn; paper: false)
    warmup_epochs: int = 10  # linear warmup, then cosine decay to lr * final_lr_ratio
    final_lr_ratio: float = 0.0  # the cosine ends at lr times this (solo-learn: 0; paper: 0.001)
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


# -------------------------------------------------------------------------------------------------
# views


def barlow_view(x, cfg, blur_p, solarize_p):
    """One augmentation (the paper follows BYOL's recipe): uint8 (B,3,H,W) -> (B,3,S,S). The two views
    differ only in the probabilities of blur and solarization."""
    x = common.to_float(x)
    x = common.random_resized_crop(x, cfg.image_size, scale=(cfg.crop_min, 1.0))
    x = common.random_flip(x)
    x = common.color_jitter(x, 0.4, 0.4, 0.2, 0.1, p=0.8)
    x = common.random_grayscale(x, p=0.2)
    if cfg.blur:
        x = common.gaussian_blur(x, p=blur_p)
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
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (paper: base lr x BatchSize / 256)
    bias_ratio = cfg.lr_biases / cfg.lr if cfg.lr_biases else 1.0  # lr of biases and BN / lr of the weights
    common.print0(f"barlow: {total_steps} steps, LARS lr {lr:.3g} (biases {lr * bias_ratio:.3g}, eta {cfg.lars_eta}, "
                  f"clip {cfg.lars_clip}), lambda {cfg.lambd}, projector {cfg.proj_dim}")

    raw_model = common.sync_batchnorm(BarlowTwins(cfg.arch, cfg.image_size <= 64, cfg.proj_dim).to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    opt = common.LARS(common.param_groups(raw_model, cfg.weight_decay), lr=lr, momentum=0.9, eta=cfg.lars_eta,
                      clip=cfg.lars_clip)  # groups: weights, biases + BN
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
        lr_now = common.cosine_lr(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr, lr * cfg.final_lr_ratio)
        common.set_lr(opt, lr_now, biases=lr_now * bias_ratio)  # biases and BN: the paper gives them a smaller lr
        # view 1 always blurred, never solarized; view 2 rarely blurred, solarized with p = 0.2 (BYOL's recipe)
        x1, x2 = barlow_view(x, cfg, blur_p=1.0, solarize_p=0.0), barlow_view(x, cfg, blur_p=0.1, solarize_p=0.2)
        with rt.autocast():
            z1, z2 = model(x1, x2)  # (B, proj_dim) each
        loss = cfg.loss_scale * barlow_twins_loss(z1.float(), z2.float(), cfg.lambd)  # statistics and C: global
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        z_std = F.normalize(z1.detach().float(), dim=1).std(0).mean()  # collapse monitor: ~1/sqrt(D) healthy, 0 collapsed
        log.step(step, loss=loss, lr=lr_now, z_std=z_std)

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
               **metrics, "train_seconds": round(log.train_seconds, 1), "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
