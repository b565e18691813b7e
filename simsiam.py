"""SimSiam: exploring simple Siamese representation learning.

Chen, He. CVPR 2021. arXiv:2011.10566.

Two augmentations x1, x2 of each image go through one shared encoder f (backbone + projection
MLP) to z1, z2, and a small prediction MLP h maps each to p1, p2. The loss makes each prediction
point the way of the OTHER view's projection: L = D(p1, z2)/2 + D(p2, z1)/2 with D the negative
cosine similarity (paper Eq. 1, 4). The one thing that keeps this from collapsing to a constant
output is the stop-gradient: z is treated as a constant in D, so the encoder learns through p
only (Sec. 4.1: without it the loss drops to -1 and the outputs collapse). No negative pairs, no
large batches, no momentum encoder: "BYOL without the momentum encoder". This file holds the
predictor's lr at its base value while the encoder's decays, the better variant of the paper's
ablation (Sec. 4.2, Table 1c: 68.1 vs 67.7). After training, h and the projector are dropped.

    python simsiam.py                                            # 1 GPU: CIFAR-10, the paper's App. D recipe
    torchrun --standalone --nproc_per_node=8 simsiam.py          # 8 GPUs, same global batch of 512
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 simsiam.py
    python simsiam.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run

Defaults: the paper's CIFAR-10 setting (App. D), with what App. D leaves to "the implementation is
similar to that in ImageNet" taken from the ImageNet settings (Sec. 3, App. A) and the official code
(facebookresearch/simsiam, main_simsiam.py and simsiam/builder.py, ImageNet only). The paper reports
91.8% linear top-1 on CIFAR-10 (Fig. D.1; the linear protocol is not described for CIFAR).
Evaluated features: the backbone's pooled output h (512-d for ResNet-18), before the projection
MLP, for knn_top1, probe_top1 and linear_top1 (common.evaluate). Results of this file: not yet
measured (README).

Departures from the sources (P: the paper, arXiv v2; C: the official code, for ImageNet):

| setting | paper | official code | this file |
|---|---|---|---|
| data, trunk | CIFAR-10, CIFAR ResNet-18 (P App. D) | ImageNet, ResNet-50 | as P |
| projector | 2 fc, 2048-d output (P App. D); ImageNet: 3 | 3, hidden = trunk width (C builder.py) | 2; 2048 hidden |
| predictor | ImageNet: 2048 -> 512 -> 2048 (P Sec. 3), hidden d/4 (App. B) | as P (C --pred-dim 512) | as P |
| lr per 256, batch | 0.03, 512 (P App. D) | 0.05, 512 (C main_simsiam.py) | as P |
| weight decay | 5e-4 on every parameter (P App. D, A) | 1e-4 on every parameter | as P |
| predictor lr | cosine (P Sec. 3); fixed: Table 1c, 68.1 vs 67.7 | cosine; README runs --fix-pred-lr | fixed |
| schedule | cosine, 800 epochs (P App. D) | cosine, one lr per epoch | cosine per step |
| blur | none on CIFAR (P App. D) | PIL's, radius = sigma ~ U(0.1, 2), p 0.5 (C loader.py) | as P; --blur: as C |
| evaluation | kNN monitor; linear (P App. D) | LARS, batch 4096 (C main_lincls.py) | the three on h (above) |
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
    out_dir: str = "out/simsiam"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the augmented views (96 for STL-10, 224 for ImageNet)
    # model
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs)
    proj_layers: int = 2  # fc layers of the projection MLP: 2 on CIFAR (App. D), 3 on ImageNet (Sec. 3)
    proj_hidden: int = 2048  # hidden width of the projection MLP
    proj_dim: int = 2048  # d: width of z and p
    pred_hidden: int = 512  # bottleneck of the prediction MLP h (d/4, as 2048 -> 512 -> 2048 in Sec. 3)
    # method
    crop_min: float = 0.2  # smallest area fraction of the random resized crop (official code: 0.2)
    blur: bool = False  # Gaussian blur, p = 0.5: off on CIFAR (App. D); main_simsiam.py's PIL kernel (ImageNet)
    fix_pred_lr: bool = True  # keep the predictor's lr at its base value, not decayed (Sec. 4.2, Table 1c)
    # optim
    epochs: int = 800  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 512  # global batch, split across processes
    lr: float = 0.03  # SGD base lr per 256 images, scaled linearly with the batch (0.05 on ImageNet)
    weight_decay: float = 5e-4  # on all parameters, as the official code (1e-4 on ImageNet)
    warmup_epochs: int = 0  # linear warmup, then cosine decay to 0 (the paper warms up only for batches >= 1024)
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
        if self.proj_layers not in (2, 3):
            raise ValueError(f"--proj_layers={self.proj_layers} is impossible: it must be 2 (CIFAR) or 3 (ImageNet)")
        if min(self.proj_hidden, self.proj_dim, self.pred_hidden) < 1:
            raise ValueError("--proj_hidden, --proj_dim and --pred_hidden must be at least 1")
        if not 0 < self.crop_min <= 1:
            raise ValueError(f"--crop_min={self.crop_min} is impossible: it must be in (0, 1]")


# -------------------------------------------------------------------------------------------------
# views


def simsiam_view(x, cfg):
    """One random augmentation of each image, the official code's (MoCo v2's): uint8 (B,3,H,W) -> (B,3,S,S)."""
    x = common.to_float(x)
    x = common.random_resized_crop(x, cfg.image_size, scale=(cfg.crop_min, 1.0))
    x = common.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8)
    x = common.random_grayscale(x, p=0.2)
    if cfg.blur:  # loader.py's PIL GaussianBlur(radius=sigma), sigma ~ U(0.1, 2): a kernel sized by sigma
        x = common.gaussian_blur(x, p=0.5, sigma=(0.1, 2.0), kernel="sigma")
    x = common.random_flip(x)
    return common.normalize(x)


# -------------------------------------------------------------------------------------------------
# model


class SimSiam(nn.Module):
    """Encoder f = projection MLP o backbone, and prediction MLP h (paper Sec. 3, "Baseline settings").

    Projector: BN on every fc including the output, no ReLU after the output; the output BN has no
    affine parameters (as the official code; Sec. 4.4 finds them unnecessary). Predictor: a
    bottleneck, BN and ReLU on the hidden fc only. Each view goes through f on its own, so
    BatchNorm statistics are per view, as in the official code.
    """

    def __init__(self, arch, small_images, proj_layers, proj_hidden, proj_dim, pred_hidden):
        super().__init__()
        # each residual block starts as the identity (paper App. A; official builder.py: zero_init_residual=True)
        self.backbone, width = common.resnet(arch, small_images, zero_init_residual=True)
        layers, d = [], width
        for _ in range(proj_layers - 1):
            layers += [nn.Linear(d, proj_hidden, bias=False), nn.BatchNorm1d(proj_hidden), nn.ReLU(inplace=True)]
            d = proj_hidden
        self.projector = nn.Sequential(*layers, nn.Linear(d, proj_dim, bias=False),
                                       nn.BatchNorm1d(proj_dim, affine=False))
        self.predictor = nn.Sequential(
            nn.Linear(proj_dim, pred_hidden, bias=False), nn.BatchNorm1d(pred_hidden), nn.ReLU(inplace=True),
            nn.Linear(pred_hidden, proj_dim))

    def forward(self, x1, x2):
        """Two views (B,3,S,S) -> predictions p1, p2 and projections z1, z2, (B, proj_dim) each."""
        z1 = self.projector(self.backbone(x1))  # (B, proj_dim): f(x1)
        z2 = self.projector(self.backbone(x2))  # (B, proj_dim): f(x2)
        return self.predictor(z1), self.predictor(z2), z1, z2  # p = h(z), (B, proj_dim) each


# -------------------------------------------------------------------------------------------------
# loss


def negative_cosine(p, z):
    """D(p, stopgrad(z)) of paper Eq. 1 and 3: -mean_i cos(p_i, z_i) over (N, D) inputs; z gets no gradient."""
    return -F.cosine_similarity(p.float(), z.float().detach(), dim=1).mean()


def simsiam_loss(p1, p2, z1, z2):
    """Symmetrized loss with stop-gradient (paper Eq. 4): D(p1, z2)/2 + D(p2, z1)/2.

    p1, p2: (N, D) predictions of views 1 and 2; z1, z2: (N, D) projections, used as constants.
    Range [-1, 1], -1 when every prediction points along the other view's projection. float32.
    """
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


# -------------------------------------------------------------------------------------------------
# method helpers


def param_groups(model, weight_decay):
    """SGD groups named "encoder" and "predictor" (train() gives the predictor its fixed lr by name,
    through common.set_lr). Weight decay on every parameter, as the official code."""
    encoder = [p for name, p in model.named_parameters() if not name.startswith("predictor.")]
    return [{"name": "encoder", "params": encoder, "weight_decay": weight_decay},
            {"name": "predictor", "params": list(model.predictor.parameters()), "weight_decay": weight_decay}]


# -------------------------------------------------------------------------------------------------
# training


def train(cfg: Config) -> dict:
    rt = common.setup(cfg)  # processes, device, precision, seed, out_dir
    data = common.load_data(cfg, rt)  # uint8 images; small datasets live on the device
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (paper Sec. 3: lr x BatchSize / 256)
    pred = "fixed" if cfg.fix_pred_lr else "decayed"
    common.print0(f"simsiam: {total_steps} steps, SGD lr {lr:.3g}, predictor lr {pred}")

    model_args = (cfg.arch, cfg.image_size <= 64, cfg.proj_layers, cfg.proj_hidden, cfg.proj_dim, cfg.pred_hidden)
    raw_model = common.sync_batchnorm(SimSiam(*model_args).to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    opt = torch.optim.SGD(param_groups(raw_model, cfg.weight_decay), lr=lr, momentum=0.9)
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # the backbone's output for un-augmented uint8 images
        return raw_model.backbone(common.normalize(common.to_float(x)))

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt)})

    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, _ in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = common.cosine_lr(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        pred_lr = lr if cfg.fix_pred_lr else lr_now  # the predictor's lr stays at its base value (Sec. 4.2)
        common.set_lr(opt, lr_now, predictor=pred_lr)  # the group named "predictor" gets pred_lr, the rest lr_now
        x1, x2 = simsiam_view(x, cfg), simsiam_view(x, cfg)  # (B, 3, S, S) each
        with rt.autocast():
            p1, p2, z1, z2 = model(x1, x2)  # (B, proj_dim) each
        # per-process mean over B images; DDP averages the gradients, so the step is that of the global batch
        loss = simsiam_loss(p1, p2, z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # collapse monitor (Sec. 4.1): per-channel std of z/|z|, ~1/sqrt(d) when healthy, 0 when collapsed
        z_std = F.normalize(z1.detach().float(), dim=1).std(0).mean()
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
    results = {"method": "simsiam", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1),
               "z_std": round(float(z_std), 4) if start_step < stop_step else None}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
