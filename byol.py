"""BYOL: bootstrap your own latent, self-supervised learning without negative pairs.

Grill, Strub, Altche, Tallec, Richemond, Buchatskaya, Doersch, Avila Pires, Guo, Gheshlaghi Azar,
Piot, Kavukcuoglu, Munos, Valko. NeurIPS 2020. arXiv:2006.07733.

Two networks see two augmentations of each image. The online network (encoder f, projector g,
predictor q) learns to predict, from view v, the target network's projection z' of the other view
v'. The target network (its own f and g) receives no gradient: after every optimizer step its
weights move a little towards the online weights, an exponential moving average (paper Eq. 1)
whose rate tau rises from tau_base to 1 on a cosine schedule (Sec. 3.3). The loss is the squared
distance of the L2-normalized prediction and target, 2 - 2 cos (Eq. 2), summed over both
directions (v -> v' and v' -> v). No negatives: the predictor and the slow target keep the outputs
from collapsing to a constant. The two views come from different augmentation distributions (blur
and solarization probabilities differ, App. B, Table 6). After training only the online f is kept.

    python byol.py                                               # 1 GPU: CIFAR-10, solo-learn's recipe
    torchrun --standalone --nproc_per_node=8 byol.py             # 8 GPUs, same global batch of 256
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 byol.py
    python byol.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run
    python byol.py --lars_form=byol --lars_eta=0.001 --lars_clip=false --lr=0.2   # the official code's LARS

The paper has no CIFAR pretraining recipe; the defaults are solo-learn's CIFAR-10 BYOL
(scripts/pretrain/cifar/byol.yaml with augmentations/asymmetric.yaml), for which its README reports
92.58% linear top-1 after 1000 epochs (the protocol is not stated there; its runs train an online
linear classifier). Evaluated features: the online backbone's pooled output h = f(x) (512-d for
ResNet-18) for knn_top1, probe_top1 and linear_top1 (common.evaluate); the target is not evaluated.
The predictor's lr follows the schedule like every other layer's (paper, official code and
solo-learn alike). Results of this file: not yet measured (README).

Departures from the sources (P: the paper, arXiv v3; C: the official JAX code, deepmind-research/byol;
S: solo-learn's CIFAR-10 recipe, which the defaults follow unless the last column says otherwise):

| setting | paper | official code | this file |
|---|---|---|---|
| data, trunk | ImageNet, ResNet-50 (P Sec. 3.3) | as P (C configs) | CIFAR-10, ResNet-18, CIFAR stem (S pads 2 px) |
| batch, epochs | 4096, 1000 (P Sec. 3.3) | as P (C main_loop.py) | 256, 1000 (S) |
| LARS form | biases, BN not adapted (P Sec. 3.3) | "byol": trust on g + wd w (C optimizers.py) | "larc" (S lars.py) |
| LARS eta, cap | - | 0.001, none (C configs/byol.py) | 0.02, the rate capped at lr (S) |
| lr per 256 | 0.2, scaled linearly (P Sec. 3.3) | as P | 1.0 (S) |
| weight decay | 1.5e-6 (P Sec. 3.3) | as P | 1e-5 (S) |
| tau_base | 0.996 (P Sec. 3.3) | as P | 0.99 (S) |
| blur | p 1.0 / 0.1, 23 px at 224 (P App. B) | kernel side / 10 (C augmentations.py) | off (S); --blur: as P, C |
| colour jitter | offsets, in random order (P App. B) | + delta brightness, per-channel contrast | torchvision's (S) |
| saturation | - | scaled in HSV (C augmentations.py) | blended with gray (torchvision's, S) |
| crop resize | bicubic (P App. B) | as P (C utils/dataset.py) | bilinear (S: bicubic) |
| input | ImageNet mean and std (P App. B) | as P (C utils/dataset.py) | as P (S: CIFAR-10's) |
| MLP output layer | - | no bias (C networks.py) | a bias (S) |
| target init | - | its own random init (C byol_experiment.py) | a copy of the online net (S) |
| evaluation | linear on frozen y (P App. C.1) | online on sg(y); offline linear (C) | the three on h (above) |
"""

import copy
import dataclasses
import math
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
    out_dir: str = "out/byol"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the augmented views (96 for STL-10, 224 for ImageNet)
    # model
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs)
    proj_hidden: int = 4096  # hidden width of the projector g and the predictor q (paper Sec. 3.3)
    proj_dim: int = 256  # output width of g and q: the space where prediction and target meet
    # method
    tau_base: float = 0.99  # target EMA rate at step 0, raised to 1 by a cosine (0.996 on ImageNet)
    crop_min: float = 0.08  # smallest area fraction of the random resized crop
    blur: bool = False  # Gaussian blur, p = 1.0 / 0.1 on the two views (paper); off in solo-learn's CIFAR recipe
    # optim
    epochs: int = 1000  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedules still span `epochs`
    batch_size: int = 256  # global batch, split across processes
    lr: float = 1.0  # LARS base lr per 256 images, scaled linearly with the batch (0.2 on ImageNet)
    weight_decay: float = 1e-5  # on weights only, not biases and BN (1.5e-6 on ImageNet)
    lars_form: str = "larc"  # LARS of solo-learn (larc) | of the official code (byol): common.LARS
    lars_eta: float = 0.02  # LARS trust coefficient (solo-learn CIFAR; the official code: 0.001)
    lars_clip: bool = True  # cap each layer's adapted lr at lr (solo-learn CIFAR; the official code: false)
    warmup_epochs: int = 10  # linear warmup, then cosine decay to 0
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
        if not 0 <= self.tau_base <= 1:
            raise ValueError(f"--tau_base={self.tau_base} is impossible: it must be in [0, 1]")
        if self.proj_hidden < 1 or self.proj_dim < 1:
            raise ValueError("--proj_hidden and --proj_dim must be at least 1")
        if self.lars_eta <= 0:
            raise ValueError(f"--lars_eta={self.lars_eta} is impossible: it must be positive")
        if self.lars_form not in ("larc", "byol", "simclr"):
            raise ValueError(f"--lars_form={self.lars_form} is impossible: it must be larc, byol or simclr")
        if not 0 < self.crop_min <= 1:
            raise ValueError(f"--crop_min={self.crop_min} is impossible: it must be in (0, 1]")


# -------------------------------------------------------------------------------------------------
# views


def byol_view(x, cfg, blur_p, solarize_p):
    """One random augmentation of each image (paper Table 6): uint8 (B,3,H,W) -> (B,3,S,S).

    Crop, flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale with p = 0.2, then
    blur and solarization with the probabilities of the view's distribution (T: 1.0 and 0.0,
    T': 0.1 and 0.2). solo-learn's CIFAR recipe turns the blur off (gaussian_prob 0.0 for both
    views in asymmetric.yaml), as SimCLR (App. B.9) and SimSiam (App. D) do on CIFAR.
    """
    x = common.to_float(x)
    x = common.random_resized_crop(x, cfg.image_size, scale=(cfg.crop_min, 1.0))
    x = common.random_flip(x)
    x = common.color_jitter(x, 0.4, 0.4, 0.2, 0.1, p=0.8)
    x = common.random_grayscale(x, p=0.2)
    if cfg.blur:
        x = common.gaussian_blur(x, p=blur_p, kernel="side")  # the paper's 23 px at 224: 10% of the side
    x = common.solarize(x, p=solarize_p)
    return common.normalize(x)


# -------------------------------------------------------------------------------------------------
# model


def mlp(d_in, hidden, d_out):
    """The paper's projector / predictor (Sec. 3.3): Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, d_out))


class BYOL(nn.Module):
    """Online network (backbone f, projector g, predictor q) and target network (f', g').

    The target starts as a copy of the online f and g, takes no gradient, and is changed only by
    the EMA in train(). Each view goes through the networks on its own, so BatchNorm statistics
    are per view, as in the official code.
    """

    def __init__(self, arch, small_images, proj_hidden, proj_dim):
        super().__init__()
        self.backbone, width = common.resnet(arch, small_images)
        self.projector = mlp(width, proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, proj_hidden, proj_dim)
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, x1, x2):
        """Two views (B,3,S,S) -> online predictions p1, p2 and target projections t1, t2, (B, proj_dim) each."""
        p1 = self.predictor(self.projector(self.backbone(x1)))  # (B, proj_dim): q(g(f(v)))
        p2 = self.predictor(self.projector(self.backbone(x2)))  # (B, proj_dim)
        with torch.no_grad():  # the target is only ever evaluated (paper: sg(z'))
            t1 = self.target_projector(self.target_backbone(x1))  # (B, proj_dim): g'(f'(v))
            t2 = self.target_projector(self.target_backbone(x2))  # (B, proj_dim)
        return p1, p2, t1, t2


# -------------------------------------------------------------------------------------------------
# loss


def byol_loss(p, z):
    """Normalized squared error (paper Eq. 2): mean over the batch of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z).

    p: (N, D) online predictions; z: (N, D) target projections of the OTHER views, a constant (no
    gradient reaches them). Range [0, 4]: 0 when aligned, 4 when opposite. Computed in float32.
    """
    p = F.normalize(p.float(), dim=1)  # (N, D)
    z = F.normalize(z.float().detach(), dim=1)  # (N, D), stop-gradient
    return (2 - 2 * (p * z).sum(1)).mean()


# -------------------------------------------------------------------------------------------------
# method helpers


def target_tau(step, total_steps, tau_base):
    """EMA rate of the target (paper Sec. 3.3): tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2,
    tau_base at k = 0 rising to 1 at k = K."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


# -------------------------------------------------------------------------------------------------
# training


def train(cfg: Config) -> dict:
    rt = common.setup(cfg)  # processes, device, precision, seed, out_dir
    data = common.load_data(cfg, rt)  # uint8 images; small datasets live on the device
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (paper Sec. 3.3: lr = 0.2 x BatchSize / 256)
    common.print0(f"byol: {total_steps} steps, LARS ({cfg.lars_form}) lr {lr:.3g}, tau {cfg.tau_base} -> 1, "
                  f"blur {cfg.blur}")

    model_args = (cfg.arch, cfg.image_size <= 64, cfg.proj_hidden, cfg.proj_dim)
    raw_model = common.sync_batchnorm(BYOL(*model_args).to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)  # DDP syncs only the online parameters (the target needs no grad)
    opt = common.LARS(common.param_groups(raw_model, cfg.weight_decay), lr=lr, momentum=0.9, eta=cfg.lars_eta,
                      clip=cfg.lars_clip, form=cfg.lars_form)  # the target is left out: it has no gradient
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])  # online and target networks
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # the representation h = f(x) of the ONLINE encoder, un-augmented uint8 images
        return raw_model.backbone(common.normalize(common.to_float(x)))

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt)})

    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, _ in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = common.cosine_lr(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        common.set_lr(opt, lr_now)  # every layer, the predictor too: no rule of its own in P, C or S
        x1 = byol_view(x, cfg, blur_p=1.0, solarize_p=0.0)  # (B, 3, S, S): v ~ T
        x2 = byol_view(x, cfg, blur_p=0.1, solarize_p=0.2)  # (B, 3, S, S): v' ~ T'
        with rt.autocast():
            p1, p2, t1, t2 = model(x1, x2)  # (B, proj_dim) each
        # each view predicts the OTHER view's target; the paper's loss is the sum of the two directions
        # (Sec. 3.1), = 2 x the mean over both. Per-process mean: DDP's gradient average makes it global.
        loss = 2 * byol_loss(torch.cat([p1, p2]), torch.cat([t2, t1]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tau = target_tau(step, total_steps, cfg.tau_base)  # after the step: xi <- tau xi + (1 - tau) theta
        common.ema_update(raw_model.target_backbone, raw_model.backbone, tau)
        common.ema_update(raw_model.target_projector, raw_model.projector, tau)
        # collapse monitor (SimSiam Sec. 4.1) on the regression targets: ~1/sqrt(D) healthy, 0 collapsed
        z_std = F.normalize(t1.float(), dim=1).std(0).mean()
        log.step(step, loss=loss, lr=lr_now, tau=tau, z_std=z_std)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                    "config": dataclasses.asdict(cfg)}, rt)

    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    if rt.is_main:  # the online encoder alone, loadable into a torchvision ResNet with the same stem (README)
        torch.save(raw_model.backbone.state_dict(), os.path.join(cfg.out_dir, "encoder.pt"))
    results = {"method": "byol", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1),
               "z_std": round(float(z_std), 4) if start_step < stop_step else None}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
