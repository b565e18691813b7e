"""MoCo: momentum contrast for unsupervised visual representation learning (v1 and v2).

He, Fan, Wu, Xie, Girshick. CVPR 2020. arXiv:1911.05722 (MoCo v1).
Chen, Fan, Girshick, He. "Improved Baselines with Momentum Contrastive Learning", 2020. arXiv:2003.04297 (v2).

Contrastive learning as dictionary look-up: a query q = f_q(t(x)) must match its key k+ = f_k(t'(x))
(another crop of the same image) among K negative keys held in a queue (paper Eq. 1, InfoNCE). The
queue holds the keys of the last K / N batches: it decouples the number of negatives from the batch
size. Its keys must stay consistent although they were encoded by earlier encoders, so the key
encoder f_k gets no gradient and follows the query encoder slowly, theta_k <- m theta_k + (1 - m)
theta_q (Eq. 2). After each step the batch's keys are enqueued and the oldest are dequeued. BatchNorm
would let a query find its key through batch statistics they share, so the keys are encoded in a
shuffled order ("shuffling BN", Sec. 3.3). MoCo v2 adds an MLP head, SimCLR-like augmentation (plus
blur on ImageNet) and a cosine schedule; v1 has a linear head and InstDisc's weaker augmentation.

BatchNorm: under torchrun each process normalizes its own queries (per-process statistics, as the
paper; not SyncBatchNorm) and encodes the keys of a random part of the global batch, so a query and
its key never share batch statistics. SyncBatchNorm would not help (as MoCo's authors note): every
query and key would share the statistics of the same whole batch. The key encoder is never
converted. On one process there is nothing to shuffle across, so, as the official CIFAR-10 demo,
BN statistics come from 8 groups of the batch (SplitBatchNorm below, the "GPUs") and keys are
shuffled across the groups; the demo reports that dropping the shuffle costs 4% at 800 epochs.

    python moco.py                                               # 1 GPU: CIFAR-10, MoCo v2, the demo's recipe
    python moco.py --symmetric                                   # the demo's symmetric loss (its best numbers)
    python moco.py --version=1                                   # MoCo v1: linear head, v1 augmentation
    torchrun --standalone --nproc_per_node=8 moco.py             # 8 GPUs, same global batch of 512, shuffled BN
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 moco.py
    python moco.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run
    torchrun --standalone --nproc_per_node=8 moco.py --dataset=folder --data_dir=$IMAGENET --image_size=224 \
        --arch=resnet50 --batch_size=256 --lr=0.03 --weight_decay=1e-4 --epochs=200 --queue_size=65536 \
        --key_momentum=0.999 --temperature=0.2 --crop_min=0.2 --blur       # the paper's ImageNet MoCo v2

Defaults follow the official CIFAR-10 demo (facebookresearch/moco, colab/moco_cifar10_demo.ipynb):
ResNet-18 with CIFAR stem, 128-d output, queue 4096, key momentum 0.99, temperature 0.1, SGD with
momentum 0.9 and lr 0.06 at batch 512 (0.03 per 256 images), weight decay 5e-4 on all parameters,
cosine schedule without warmup, the v2 augmentation without blur, BatchNorm split into 8 groups on
one GPU, asymmetric loss. The demo itself uses a linear head (v1's); version=2 here adds v2's MLP
head. The demo reports kNN top-1 (on its 128-d head output) of 82.6 / 86.3 / 88.7 at 200 / 400 / 800
epochs with the asymmetric loss and 85.3 / 88.5 / 89.7 with the symmetric one; its symmetric
800-epoch model has 90.7% linear top-1. Its own logged run is 200 epochs (82.58%); epochs=800 here.
ImageNet values (paper): queue 65536, key momentum 0.999, temperature 0.07 (v1) / 0.2 (v2), lr 0.03
at batch 256, weight decay 1e-4, crop scale (0.2, 1), 200 epochs; v1 there uses a step schedule
(lr / 10 at epochs 120 and 160): version=1 here keeps the cosine schedule.
Results of this file: not yet measured (see README).
Evaluated features: the query encoder's pooled backbone output h (512-d for ResNet-18), not the
head's output; the probe trains on frozen h of the un-augmented training images and their flips.
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
    out_dir: str = "out/moco"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the augmented views (96 for STL-10, 224 for ImageNet)
    # model
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs)
    version: int = 2  # 2: MLP head + v2 augmentation; 1: linear head + v1 augmentation
    proj_dim: int = 128  # output width of the head: the dimension of queries and keys
    bn_splits: int = 8  # on one process, BN statistics over this many groups of the batch (the demo's 8 "GPUs")
    # method
    queue_size: int = 4096  # K negative keys, a multiple of the keys enqueued per step (65536 on ImageNet)
    key_momentum: float = 0.99  # m of the key encoder's moving average (0.999 on ImageNet)
    temperature: float = 0.1  # tau of the InfoNCE loss (ImageNet: 0.07 in v1, 0.2 in v2)
    symmetric: bool = False  # also use the key crop as a query and sum both losses (the demo's option)
    crop_min: float = 0.08  # smallest area fraction of the random resized crop (the demo's; 0.2 on ImageNet)
    blur: bool = False  # Gaussian blur on half the views, v2 only (off at 32 px as in the demo; on for ImageNet)
    # optim
    epochs: int = 800  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 512  # global batch, split across processes
    lr: float = 0.03  # SGD base lr per 256 images, scaled linearly with the batch (0.06 at 512)
    weight_decay: float = 5e-4  # on all parameters, as the official code
    warmup_epochs: int = 0  # linear warmup, then cosine decay to 0 (the demo has none)
    # eval
    eval_every: int = 10  # epochs between kNN monitor runs (0 = only at the end)
    probe_epochs: int = 100  # fast linear probe on precomputed frozen features at the end, epochs (0 = none)
    linear_epochs: int = -1  # standard linear evaluation at the end, epochs (-1: 100 on CUDA, none on CPU; 0: none)
    # system
    seed: int = 0  # weights, data order, augmentations and key shuffles
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    compile: str = "auto"  # torch.compile the model: auto (on CUDA only) | true | false
    log_every: int = 50  # steps between progress lines
    resume: bool = False  # continue from out_dir/ckpt.pt

    def __post_init__(self):
        common.check_config(self)
        per_step = self.batch_size * (2 if self.symmetric else 1)  # keys enqueued per step
        if self.queue_size < 1 or self.queue_size % per_step:
            raise ValueError(f"--queue_size={self.queue_size} is impossible: it must be a multiple of the {per_step} keys "
                             f"enqueued per step (the global batch{', twice with --symmetric' if self.symmetric else ''})")
        if self.version not in (1, 2) or (self.blur and self.version == 1):
            raise ValueError("--version must be 1 or 2, and --blur belongs to version 2's augmentation")
        if self.bn_splits < 1 or (int(os.environ.get("WORLD_SIZE", 1)) == 1 and self.batch_size % self.bn_splits):
            raise ValueError(f"--bn_splits={self.bn_splits} is impossible: it must divide --batch_size={self.batch_size}")
        if not 0 <= self.key_momentum <= 1 or self.temperature <= 0 or not 0 < self.crop_min <= 1:
            raise ValueError("--key_momentum must be in [0, 1], --temperature > 0 and --crop_min in (0, 1]")


# -------------------------------------------------------------------------------------------------
# views


def moco_view(x, cfg):
    """One random augmentation of each image: uint8 (B,3,H,W) -> (B,3,S,S), v2's or v1's."""
    x = common.to_float(x)
    x = common.random_resized_crop(x, cfg.image_size, scale=(cfg.crop_min, 1.0))
    x = common.random_flip(x)
    if cfg.version == 2:  # v2 (SimCLR's recipe with jitter strength 0.5, v2 paper Sec. 3)
        x = common.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8)
        x = common.random_grayscale(x, p=0.2)
        if cfg.blur:
            x = common.gaussian_blur(x, p=0.5)
    else:  # v1 (InstDisc's): grayscale first, then a jitter with a stronger hue on every image
        x = common.random_grayscale(x, p=0.2)
        x = common.color_jitter(x, 0.4, 0.4, 0.4, 0.4)
    return common.normalize(x)


# -------------------------------------------------------------------------------------------------
# model


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from `groups` contiguous equal parts of the batch,
    each on its own, as if each part were on its own GPU (the official CIFAR-10 demo's SplitBatchNorm).
    The running statistics are the mean of the parts'; evaluation uses them as BatchNorm2d does."""

    def __init__(self, num_features, groups):
        super().__init__(num_features)
        self.groups = groups

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        N, C, H, W = x.shape
        G, n = self.groups, N // self.groups
        xg = x.view(G, n, C, H, W).transpose(0, 1).reshape(n, G * C, H, W)  # part g -> channels g*C..(g+1)*C-1
        mean, var = self.running_mean.repeat(G), self.running_var.repeat(G)  # (G*C,) updated in place below
        y = F.batch_norm(xg, mean, var, self.weight.repeat(G), self.bias.repeat(G), True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(G, C).mean(0))
            self.running_var.copy_(var.view(G, C).mean(0))
            self.num_batches_tracked.add_(1)
        return y.view(n, G, C, H, W).transpose(0, 1).reshape(N, C, H, W)  # (N, C, H, W) in input order


def split_batchnorm(module, groups):
    """Replace every BatchNorm2d in module by a fresh SplitBatchNorm with `groups` parts (1: unchanged)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and groups > 1:
            setattr(module, name, SplitBatchNorm(child.num_features, groups))
        else:
            split_batchnorm(child, groups)
    return module


class MoCoEncoder(nn.Module):
    """Encoder f (ResNet) and head g: x -> z = g(f(x)), not normalized. The query encoder f_q; the
    key encoder f_k is a second instance with f_q's weights, moved by the moving average only."""

    def __init__(self, arch, small_images, proj_dim, mlp, bn_groups):
        super().__init__()
        backbone, width = common.resnet(arch, small_images)
        self.backbone = split_batchnorm(backbone, bn_groups)
        if mlp:  # v2: a 2-layer MLP head without BN (v2 paper Sec. 3); v1: the linear fc layer
            self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, proj_dim))
        else:
            self.head = nn.Linear(width, proj_dim)

    def forward(self, x):
        h = self.backbone(x)  # (B, width): the representation
        return self.head(h)  # (B, proj_dim)


# -------------------------------------------------------------------------------------------------
# loss


def moco_loss(q, k, queue, temperature):
    """InfoNCE (paper Eq. 1): cross-entropy over 1 + K logits with the positive first, mean over N.

    q: (N, D) queries, k: (N, D) their positive keys, queue: (K, D) negative keys, all L2-normalized.
    Keys and queue are constants (no gradient reaches them). Computed in float32.
    """
    q, k, queue = q.float(), k.detach().float(), queue.detach().float()
    l_pos = (q * k).sum(1, keepdim=True)  # (N, 1) cos(q, k+)
    l_neg = q @ queue.T  # (N, K) cos(q, k-)
    logits = torch.cat([l_pos, l_neg], 1) / temperature  # (N, 1 + K)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))  # class 0: the positive


# -------------------------------------------------------------------------------------------------
# method helpers: shuffled keys and the queue


@torch.no_grad()
def shuffled_keys(key_model, x, seed, rank):
    """L2-normalized keys of the GLOBAL batch (N, D), in image order, from this process's key crops
    x (B,3,S,S), encoded in a shuffled order ("shuffling BN", paper Sec. 3.3).

    Each process encodes a random part of the global batch, so the BN statistics of a key are not
    those of its query (on one process, SplitBatchNorm's groups play the processes). The
    permutation comes from `seed`, the same on every process, so no broadcast is needed.
    """
    x_all = common.gather_with_grad(x)  # (N, 3, S, S): the key crops of every process, in rank order
    N, B = x_all.shape[0], x.shape[0]
    perm = torch.randperm(N, generator=torch.Generator(device=x.device).manual_seed(seed), device=x.device)  # (N,)
    k = F.normalize(key_model(x_all[perm[rank * B:(rank + 1) * B]]).float(), dim=1)  # (B, D): this process's part
    k_all = common.gather_with_grad(k)  # (N, D) keys of the shuffled global batch: row j is image perm[j]'s
    return k_all[perm.argsort()]  # (N, D): row i is image i's key again


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """Write keys (n, D) over the n oldest entries of the ring buffer queue (K, D), which start at
    ptr; return the new ptr. queue.roll(-ptr, 0) lists the last K keys, oldest first."""
    queue[ptr:ptr + len(keys)] = keys.to(queue.dtype)  # K is a multiple of n: never wraps mid-write
    return (ptr + len(keys)) % len(queue)


# -------------------------------------------------------------------------------------------------
# training


def train(cfg: Config) -> dict:
    rt = common.setup(cfg)  # processes, device, precision, seed, out_dir
    data = common.load_data(cfg, rt)  # uint8 images; small datasets live on the device
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (Goyal et al. 2017): 0.03 per 256 = the demo's 0.06 at 512
    views = 2 if cfg.symmetric else 1  # query crops per image
    groups = cfg.bn_splits if rt.world_size == 1 else 1  # BN groups per view and process
    bn = f"{groups} BN groups, keys shuffled across them" if rt.world_size == 1 else \
        f"BN per process, keys shuffled across the {rt.world_size} processes, no SyncBatchNorm"
    common.print0(f"moco v{cfg.version}: {total_steps} steps, SGD lr {lr:.3g}, queue {cfg.queue_size}, "
                  f"key momentum {cfg.key_momentum}, temperature {cfg.temperature}, {bn}")

    # Queries keep per-process BN statistics, as the paper (Sec. 3.3), not SyncBatchNorm: each view is
    # normalized on its own (the demo encodes the two crops in separate passes), hence groups * views.
    raw_model = MoCoEncoder(cfg.arch, cfg.image_size <= 64, cfg.proj_dim, cfg.version == 2, groups * views).to(rt.device)
    model = common.compile_and_ddp(raw_model, rt)
    key_encoder = MoCoEncoder(cfg.arch, cfg.image_size <= 64, cfg.proj_dim, cfg.version == 2, groups).to(rt.device)
    key_encoder.load_state_dict(raw_model.state_dict())  # f_k starts as f_q
    key_encoder.requires_grad_(False)  # and never gets a gradient: only the moving average moves it
    key_model = torch.compile(key_encoder) if rt.compile else key_encoder  # not DDP: it has nothing to reduce
    queue = F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim, generator=torch.Generator().manual_seed(cfg.seed)),
                        dim=1).to(rt.device)  # (K, D) random unit keys until real ones arrive, as the official code
    queue_ptr = 0  # position of the oldest key: a plain int, known on the host without a sync
    # plain SGD with weight decay on every parameter (BN and biases too), as the official code and demo
    opt = torch.optim.SGD(raw_model.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        key_encoder.load_state_dict(state["key_encoder"])
        queue.copy_(state["queue"])
        queue_ptr = state["queue_ptr"]
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # the representation h = f_q(x) of un-augmented uint8 images
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
        x1, x2 = moco_view(x, cfg), moco_view(x, cfg)  # (B, 3, S, S) each: query crop t(x), key crop t'(x)
        B = x.shape[0]
        mine = slice(rt.rank * B, (rt.rank + 1) * B)  # this process's rows of the global batch
        seed = (cfg.seed * 1_000_003 + step) * 2  # the key shuffles of this step, the same on every process
        with rt.autocast():
            q = model(torch.cat([x1, x2]) if cfg.symmetric else x1)  # (views*B, proj_dim)
            k2 = shuffled_keys(key_model, x2, seed, rt.rank)  # (N, proj_dim): keys of the global batch
            k1 = shuffled_keys(key_model, x1, seed + 1, rt.rank) if cfg.symmetric else None
        q = F.normalize(q.float(), dim=1)  # (views*B, proj_dim) on the unit sphere
        loss = moco_loss(q[:B], k2[mine], queue, cfg.temperature)  # per-process mean; DDP averages the gradients
        if cfg.symmetric:  # the demo's symmetric loss is the sum of both directions
            loss = loss + moco_loss(q[B:], k1[mine], queue, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        common.ema_update(key_encoder, raw_model, cfg.key_momentum)  # theta_k <- m theta_k + (1 - m) theta_q (Eq. 2)
        queue_ptr = enqueue(queue, queue_ptr, torch.cat([k1, k2]) if cfg.symmetric else k2)  # global: one queue everywhere
        z_std = q[:B].detach().std(0).mean()  # collapse monitor: ~1/sqrt(D) healthy, 0 collapsed
        pos_cos = (q[:B].detach() * k2[mine]).sum(1).mean()  # mean cos(q, k+)
        log.step(step, loss=loss, lr=lr_now, z_std=z_std, pos_cos=pos_cos)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "key_encoder": key_encoder.state_dict(), "queue": queue,
                    "queue_ptr": queue_ptr, "opt": opt.state_dict(), "step": step + 1,
                    "config": dataclasses.asdict(cfg)}, rt)

    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    if rt.is_main:  # the encoder alone, loadable into a torchvision ResNet with the same stem (README)
        torch.save(raw_model.backbone.state_dict(), os.path.join(cfg.out_dir, "encoder.pt"))
    results = {"method": "moco", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, "train_seconds": round(log.train_seconds, 1), "images_per_second": round(log.images_per_second(), 1),
               "version": cfg.version}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
