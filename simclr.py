"""SimCLR: a simple framework for contrastive learning of visual representations.

Chen, Kornblith, Norouzi, Hinton. ICML 2020. arXiv:2002.05709.

Each image x of a batch of N gets two random augmentations t(x), t'(x). A shared encoder f gives
the representation h = f(t(x)), a small MLP g projects it to z = g(h), and the NT-Xent loss makes
z of the two views of the same image the most similar pair among all 2N projections of the batch:
the other 2N - 2 are the negatives (Algorithm 1 of the paper). Large batches (many negatives),
strong colour distortion and the projection head are what make it work. After training, g is
thrown away and h is the representation.

    python simclr.py                                             # 1 GPU: CIFAR-10, the official recipe
    torchrun --standalone --nproc_per_node=8 simclr.py           # 8 GPUs, same global batch of 512
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 simclr.py
    python simclr.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run

Defaults: the official code's CIFAR-10 command, SimCLR v1 (google-research/simclr at its first
commit, be133b3, March 2020; the current master is v2, whose README changes the weight decay to 1e-4
and whose head has 3 layers); its README reports about 91% linear top-1 for it. Evaluated features:
the backbone's pooled h (512-d for ResNet-18) for knn_top1, probe_top1 and linear_top1 (common.evaluate).
Results of this file: not yet measured (README).

Departures from the sources (P: the paper, arXiv v3; C: the official v1 code):

| setting | paper | official code | this file |
|---|---|---|---|
| trunk | ResNet-50, CIFAR stem (P B.9) | ResNet-18, CIFAR stem (C README) | as C |
| batch, epochs | 256 to 4096, up to 1000 (P B.9) | 512, 1000 (C README) | as C |
| lr per 256 images | 0.5, 1.0 or 1.5 (P B.9) | 1.0 (C README), scaled linearly (C model_util.py) | as C |
| loss | mean over the 2N anchors (P Alg. 1) | loss_a + loss_b: twice that (C objective.py) | as C |
| LARS momentum | - | the lr inside the buffer (C lars_optimizer.py) | as C (common.LARS form "simclr") |
| residual blocks | - | last BN's scale starts at 0 (C resnet.py, init_zero=True) | as C |
| head init | - | weights N(0, 0.01) (C model_util.py linear_layer) | PyTorch's (a BN follows each layer) |
| crop | area ~ U(0.08, 1), aspect 3/4-4/3 (P App. A) | aspect, height ~ U; area >= 0.1 (C data_util.py) | as P |
| crop tries, resize | - | 100, then the whole image; bicubic, whole pixels (C) | 10; bilinear, sub-pixel box |
| blur | side / 10, sigma 0.1-2, p 0.5 (P App. A); CIFAR: none (B.9) | as P, zero padding (C) | --blur: reflect pad |
| brightness jitter | + delta, tf.image (P App. A) | + delta (C data_util.py) | x factor, torchvision's |
| contrast jitter | around each channel's mean (P App. A) | as P (C data_util.py) | around the gray mean (torchvision) |
| saturation jitter | tf.image: scaled in HSV (P App. A) | as P (C data_util.py) | blended with gray (torchvision) |
| input | pixels in [0, 1] | pixels in [0, 1] (C data_util.py) | standardized, ImageNet mean and std |
| linear evaluation | on frozen h (P Sec. 3) | SGD 0.1, 100 epochs, batch 512, crops, flips (C README) | linear_eval |
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
    out_dir: str = "out/simclr"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the augmented views (96 for STL-10, 224 for ImageNet)
    # model
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs)
    proj_dim: int = 128  # output width of the projection head g
    # method
    temperature: float = 0.5  # tau of NT-Xent (official CIFAR-10 setting; 0.1 for ImageNet)
    jitter_strength: float = 0.5  # colour distortion strength s (0.5 on CIFAR-10, 1.0 on ImageNet)
    crop_min: float = 0.08  # smallest area fraction of the random resized crop
    blur: bool = False  # Gaussian blur on half the views (off at 32 px, paper App. B.9; on for ImageNet)
    # optim
    epochs: int = 1000  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 512  # global batch, split across processes
    lr: float = 1.0  # LARS base lr per 256 images, scaled linearly with the batch
    weight_decay: float = 1e-6  # on weights only (not biases and BN)
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
        if self.temperature <= 0 or self.jitter_strength < 0 or not 0 < self.crop_min <= 1:
            raise ValueError("--temperature must be > 0, --jitter_strength >= 0 and --crop_min in (0, 1]")


# -------------------------------------------------------------------------------------------------
# views


def simclr_view(x, cfg):
    """One random augmentation t ~ T of each image (paper App. A): uint8 (B,3,H,W) -> (B,3,S,S)."""
    x = common.to_float(x)
    x = common.random_resized_crop(x, cfg.image_size, scale=(cfg.crop_min, 1.0))
    x = common.random_flip(x)
    s = cfg.jitter_strength
    x = common.color_jitter(x, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8)
    x = common.random_grayscale(x, p=0.2)
    if cfg.blur:
        x = common.gaussian_blur(x, p=0.5)
    return common.normalize(x)


# -------------------------------------------------------------------------------------------------
# model


class SimCLR(nn.Module):
    """Encoder f (ResNet) and projection head g: x -> z = g(f(x))."""

    def __init__(self, arch, small_images, proj_dim):
        super().__init__()
        # each residual block starts as the identity, as the official resnet.py (init_zero=True)
        self.backbone, width = common.resnet(arch, small_images, zero_init_residual=True)
        # g: 2-layer MLP with BN, as the official head: the last BN scales but does not shift
        self.projector = nn.Sequential(
            nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Linear(width, proj_dim, bias=False), nn.BatchNorm1d(proj_dim))
        self.projector[-1].bias.requires_grad_(False)

    def forward(self, x):
        h = self.backbone(x)  # (B, width): the representation
        return self.projector(h)  # (B, proj_dim)


# -------------------------------------------------------------------------------------------------
# loss


def nt_xent_loss(z1, z2, temperature):
    """NT-Xent (paper Eq. 1), averaged over all 2N anchors.

    z1, z2: (N, D) projections of two views, not normalized; (z1[i], z2[i]) is the positive pair,
    and the other 2N - 2 projections are each anchor's negatives. Computed in float32.
    """
    N = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D) on the unit sphere
    sim = z @ z.T / temperature  # (2N, 2N) cosine similarities / tau
    self_pair = torch.eye(2 * N, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_pair, float("-inf"))  # 1[k != i]: an anchor is not its own negative
    positive = torch.cat([torch.arange(N, 2 * N), torch.arange(N)]).to(z.device)  # (2N,) index of the other view
    return F.cross_entropy(sim, positive)  # mean over anchors of -log softmax(sim)[positive]


# -------------------------------------------------------------------------------------------------
# training


def train(cfg: Config) -> dict:
    rt = common.setup(cfg)  # processes, device, precision, seed, out_dir
    data = common.load_data(cfg, rt)  # uint8 images; small datasets live on the device
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (paper App. B.1)
    common.print0(f"simclr: {total_steps} steps, LARS lr {lr:.3g}, temperature {cfg.temperature}")

    raw_model = common.sync_batchnorm(SimCLR(cfg.arch, cfg.image_size <= 64, cfg.proj_dim).to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    opt = common.LARS(common.param_groups(raw_model, cfg.weight_decay), lr=lr, momentum=0.9)
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
        lr_now = common.cosine_lr(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        common.set_lr(opt, lr_now)
        x1, x2 = simclr_view(x, cfg), simclr_view(x, cfg)  # (B, 3, S, S) each: t(x), t'(x)
        with rt.autocast():
            z = model(torch.cat([x1, x2]))  # (2B, proj_dim), both views in one pass
        z1, z2 = z.float().chunk(2)  # (B, proj_dim) each
        # every process scores all N = world * B pairs: the negatives span the GLOBAL batch. The official
        # objective is loss_a + loss_b, twice the paper's mean over the 2N anchors; its lr was tuned on that
        loss = 2 * nt_xent_loss(common.gather_with_grad(z1), common.gather_with_grad(z2), cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        z_std = F.normalize(z1.detach(), dim=1).std(0).mean()  # collapse monitor: ~1/sqrt(D) healthy, 0 collapsed
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
    results = {"method": "simclr", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
