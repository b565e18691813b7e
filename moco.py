"""MoCo: momentum contrast for unsupervised visual representation learning (v1 and v2).

He, Fan, Wu, Xie, Girshick. CVPR 2020. arXiv:1911.05722 (MoCo v1).
Chen, Fan, Girshick, He. "Improved Baselines with Momentum Contrastive Learning", 2020. arXiv:2003.04297 (v2).

Contrastive learning as dictionary look-up: a query q = f_q(x_q) must match its key k+ = f_k(x_k)
(another augmentation of the same image) among K negative keys held in a queue (Eq. 1, InfoNCE).
The queue holds the keys of the last K / N batches: it decouples the number of negatives from the
batch size. Its keys must stay consistent although earlier encoders made them, so the key encoder
f_k gets no gradient and follows the query encoder slowly, theta_k <- m theta_k + (1 - m) theta_q
(Eq. 2). A training step is the paper's Algorithm 1: augment, encode queries, encode keys without
gradient, InfoNCE, update f_q, momentum-update f_k, enqueue the keys and dequeue the oldest.
MoCo v2 adds an MLP head, SimCLR-like augmentation (plus blur on ImageNet) and a cosine schedule.

Shuffling BN (Sec. 3.3): BatchNorm would let a query find its key through the batch statistics they
share, so the keys are encoded in a shuffled order: each GPU normalizes its own queries but the keys
of a random part of the global batch. Under torchrun each process is such a GPU (no SyncBatchNorm,
which would give every query and key the statistics of the same whole batch); on one process, as in
the official CIFAR-10 demo, BatchNorm runs on groups of the batch that play the GPUs (SplitBatchNorm,
groups of batch / bn_splits images) and the keys are shuffled across the groups. The demo reports
that dropping the shuffle costs 4% at 800 epochs.

    python moco.py                                               # 1 GPU: CIFAR-10, the demo's recipe, v2 head
    python moco.py --mlp=false                                   # the demo's own model: a linear head
    python moco.py --symmetric                                   # the demo's symmetric loss (its best numbers)
    python moco.py --version=1 --mlp=false                       # MoCo v1: v1 augmentation, linear head
    torchrun --standalone --nproc_per_node=8 moco.py             # 8 GPUs, same global batch of 512, shuffled BN
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 moco.py
    python moco.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run
    torchrun --standalone --nproc_per_node=8 moco.py --dataset=folder --data_dir=$IMAGENET --image_size=224 \
        --arch=resnet50 --batch_size=256 --lr=0.03 --weight_decay=1e-4 --epochs=200 --queue_size=65536 \
        --key_momentum=0.999 --temperature=0.2 --crop_min=0.2 --blur       # the paper's ImageNet MoCo v2

Defaults: the official CIFAR-10 demo (facebookresearch/moco, colab/moco_cifar10_demo.ipynb), with
v2's MLP head in place of its linear one (`--mlp=false` keeps the demo's). The demo reports kNN top-1
on its 128-d head output of 82.6 / 86.3 / 88.7 at 200 / 400 / 800 epochs (asymmetric loss) and
85.3 / 88.5 / 89.7 (symmetric), and 90.7% linear top-1 for its symmetric 800-epoch model. Evaluated
features: the query encoder's pooled backbone output h (512-d for ResNet-18), not the head's output,
for knn_top1, probe_top1 and linear_top1 (common.evaluate). Results of this file: not yet measured
(README).

Departures from the sources (P: the v1 / v2 papers; C: the official code, main_moco.py and
moco/builder.py for ImageNet, D: its CIFAR-10 demo notebook):

| setting | paper | official code | this file |
|---|---|---|---|
| data, trunk | ImageNet, ResNet-50 (P v1 Sec. 4) | D: CIFAR-10, ResNet-18, CIFAR stem | as D |
| head | v1: fc 128; v2: MLP, 2048 hidden (P v2 Sec. 3) | C: --mlp; D: fc 128 | MLP, trunk-wide; --mlp=false: fc |
| augmentation | v2: SimCLR's + blur (P v2 Sec. 3) | C: crop (0.2, 1); D: (0.08, 1), no blur | as D |
| blur (v2) | SimCLR's (P v2 Sec. 3) | C: PIL's, radius = sigma ~ U(0.1, 2), p 0.5 (loader.py) | off: D; --blur: C |
| input | - | D: CIFAR-10 mean and std | ImageNet mean and std |
| K, m, tau | 65536, 0.999, 0.07 / 0.2 (P v1 Sec. 4, v2) | D: 4096, 0.99, 0.1 | as D |
| batch, lr | 256, SGD 0.03 (P v1 Sec. 4) | D: 512, 0.06 | 0.03 per 256 images, scaled: as D |
| weight decay | 1e-4 (P v1 Sec. 4) | D: 5e-4 on every parameter | as D |
| schedule | v1: /10 at 120, 160 of 200; v2: cosine | D: cosine per epoch to 0; 200 (800 in its table) | per step, 800 |
| loss | asymmetric (P v1 Alg. 1) | D --symmetric: loss_12 + loss_21, a sum | as P; --symmetric as D |
| key BN | shuffled across 8 GPUs (P v1 Sec. 3.3) | C: rank 0's randperm, broadcast; D: 8 groups | a shared generator |
| BN groups | - | D: images i, i + 8, i + 16, ... | contiguous; each crop its own |
| f_k update | after f_q's step (P v1 Alg. 1) | C: in the next forward, before the keys | as P (same f_k: equivalent) |
| evaluation | linear, frozen pool5 (P v1 Sec. 4.1) | D: kNN on the 128-d head output | the three on h (above) |
"""

import copy
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
    version: int = 2  # augmentation: 2 (v2's: SimCLR's jitter, --blur) | 1 (v1's: InstDisc's)
    mlp: bool = True  # v2's MLP head; false: a linear head, as v1 and the CIFAR demo
    proj_dim: int = 128  # output width of the head: the dimension of queries and keys
    bn_splits: int = 8  # on one process, BN statistics over this many groups of each crop's batch (the demo's)
    # method
    queue_size: int = 4096  # K negative keys, a multiple of the keys enqueued per step (65536 on ImageNet)
    key_momentum: float = 0.99  # m of the key encoder's moving average (0.999 on ImageNet)
    temperature: float = 0.1  # tau of the InfoNCE loss (ImageNet: 0.07 in v1, 0.2 in v2)
    symmetric: bool = False  # also use the key crop as a query and sum both losses (the demo's option)
    crop_min: float = 0.08  # smallest area fraction of the random resized crop (the demo's; 0.2 on ImageNet)
    blur: bool = False  # Gaussian blur on half the views, v2 only (off at 32 px as the demo): PIL's, as main_moco
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
            twice = ", twice with --symmetric" if self.symmetric else ""
            raise ValueError(f"--queue_size={self.queue_size} is impossible: it must be a multiple of the {per_step} "
                             f"keys enqueued per step (the global batch{twice})")
        if self.version not in (1, 2) or (self.blur and self.version == 1):
            raise ValueError("--version must be 1 or 2, and --blur belongs to version 2's augmentation")
        if self.bn_splits < 1 or (int(os.environ.get("WORLD_SIZE", 1)) == 1 and self.batch_size % self.bn_splits):
            raise ValueError(f"--bn_splits={self.bn_splits} is impossible: it must divide "
                             f"--batch_size={self.batch_size}")
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
        if cfg.blur:  # loader.py's PIL GaussianBlur(radius=sigma), sigma ~ U(0.1, 2): a kernel sized by sigma
            x = common.gaussian_blur(x, p=0.5, sigma=(0.1, 2.0), kernel="sigma")
    else:  # v1 (InstDisc's): grayscale first, then a jitter with a stronger hue on every image
        x = common.random_grayscale(x, p=0.2)
        x = common.color_jitter(x, 0.4, 0.4, 0.4, 0.4)
    return common.normalize(x)


# -------------------------------------------------------------------------------------------------
# model


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from consecutive groups of `group_size` images, each
    group normalized on its own as if it were on a GPU of its own (the CIFAR demo's SplitBatchNorm,
    which plays 8 GPUs on one). The running statistics move by the mean of the groups'; evaluation
    uses them as BatchNorm2d does."""

    def __init__(self, num_features, group_size):
        super().__init__(num_features)
        self.group_size = group_size

    def forward(self, x):
        N, C, H, W = x.shape
        n, G = self.group_size, N // self.group_size
        if not self.training or G == 1:
            return super().forward(x)
        xg = x.view(G, n, C, H, W).transpose(0, 1).reshape(n, G * C, H, W)  # group g -> channels g*C..(g+1)*C-1
        mean, var = self.running_mean.repeat(G), self.running_var.repeat(G)  # (G*C,): F.batch_norm updates these
        y = F.batch_norm(xg, mean, var, self.weight.repeat(G), self.bias.repeat(G), True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(G, C).mean(0))
            self.running_var.copy_(var.view(G, C).mean(0))
            self.num_batches_tracked.add_(1)
        return y.view(n, G, C, H, W).transpose(0, 1).reshape(N, C, H, W)  # (N, C, H, W) in input order


def split_batchnorm(module, group_size):
    """Replace every BatchNorm2d in module by a fresh SplitBatchNorm with groups of group_size images."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, SplitBatchNorm(child.num_features, group_size))
        else:
            split_batchnorm(child, group_size)
    return module


class MoCoEncoder(nn.Module):
    """Encoder f (ResNet) and head g: x -> z = g(f(x)), not normalized; BatchNorm over groups of
    bn_group_size images. The query encoder f_q; the key encoder f_k is a copy moved by Eq. 2 only."""

    def __init__(self, arch, small_images, proj_dim, mlp, bn_group_size):
        super().__init__()
        backbone, width = common.resnet(arch, small_images)
        self.backbone = split_batchnorm(backbone, bn_group_size)
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
# method helpers: keys with shuffling BN, and the queue


@torch.no_grad()
def keys_with_shuffling_bn(key_encoder, x_k, perm, rank):
    """Keys k = f_k(x_k) of this process's key crops x_k (B,3,S,S) -> (B, D), L2-normalized, in
    x_k's order, encoded in a shuffled order ("shuffling BN", paper Sec. 3.3).

    perm (N,) is a permutation of the global batch, the same on every process: this process encodes
    the images perm[rank*B:(rank+1)*B], a random part of the global batch, so that a key's BatchNorm
    statistics are not its query's; the keys then go back to the processes that own their images.
    """
    B = x_k.shape[0]
    x_all = common.all_gather(x_k)  # (N, 3, S, S): the key crops of the global batch
    mine = perm[rank * B:(rank + 1) * B]  # (B,): this process's part of perm
    k = F.normalize(key_encoder(x_all[mine]).float(), dim=1)  # (B, D): the keys of those images
    k_all = common.all_gather(k)  # (N, D): row j is the key of image perm[j]
    own = perm.argsort()[rank * B:(rank + 1) * B]  # argsort inverts perm: where image i's key sits in k_all
    return k_all[own]  # (B, D): the keys of this process's own images, in order


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
    B = cfg.batch_size // rt.world_size  # images per process
    bn_group = B // cfg.bn_splits if rt.world_size == 1 else B  # images per BN group: the demo's 64 per "GPU"
    bn = f"BN groups of {bn_group} images, keys shuffled across them" if rt.world_size == 1 else \
        f"BN per process, keys shuffled across the {rt.world_size} processes, no SyncBatchNorm"
    common.print0(f"moco, v{cfg.version} views, {'MLP' if cfg.mlp else 'linear'} head: {total_steps} steps, "
                  f"SGD lr {lr:.3g}, queue {cfg.queue_size}, key momentum {cfg.key_momentum}, "
                  f"temperature {cfg.temperature}, {bn}")

    raw_model = MoCoEncoder(cfg.arch, cfg.image_size <= 64, cfg.proj_dim, cfg.mlp, bn_group).to(rt.device)
    model = common.compile_and_ddp(raw_model, rt)  # f_q
    key_encoder = copy.deepcopy(raw_model).requires_grad_(False)  # f_k starts as f_q and never gets a gradient
    key_model = torch.compile(key_encoder) if rt.compile else key_encoder  # not DDP: it has nothing to reduce
    queue = F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim, generator=torch.Generator().manual_seed(cfg.seed)),
                        dim=1).to(rt.device)  # (K, D) random unit keys until real ones arrive, as the official code
    queue_ptr = 0  # position of the oldest key: a plain int, known on the host without a sync
    shuffler = torch.Generator(rt.device).manual_seed(cfg.seed)  # the same on every process: no broadcast needed
    # plain SGD with weight decay on every parameter (BN and biases too), as the official code and demo
    opt = torch.optim.SGD(raw_model.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        key_encoder.load_state_dict(state["key_encoder"])
        queue.copy_(state["queue"])
        queue_ptr = state["queue_ptr"]
        shuffler.set_state(state["key_shuffle"].cpu())
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def shuffle():  # a permutation of the N images of the global batch, the same on every process
        return torch.randperm(cfg.batch_size, generator=shuffler, device=rt.device)

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
        x_q, x_k = moco_view(x, cfg), moco_view(x, cfg)  # (B, 3, S, S) each: two random augmentations of x
        with rt.autocast():  # --symmetric: x_k is a query too, with x_q's key as its positive
            q = model(torch.cat([x_q, x_k]) if cfg.symmetric else x_q)  # (V*B, D) queries; BN groups within a crop
            k = keys_with_shuffling_bn(key_model, x_k, shuffle(), rt.rank)  # (B, D) keys of x_k, no gradient
            k_q = keys_with_shuffling_bn(key_model, x_q, shuffle(), rt.rank) if cfg.symmetric else None
        q = F.normalize(q.float(), dim=1)  # (V*B, D) on the unit sphere
        loss = moco_loss(q[:B], k, queue, cfg.temperature)  # per-process mean; DDP averages the gradients
        if cfg.symmetric:  # the demo's symmetric loss is the sum of both directions
            loss = loss + moco_loss(q[B:], k_q, queue, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # update f_q
        common.ema_update(key_encoder, raw_model, cfg.key_momentum)  # theta_k <- m theta_k + (1 - m) theta_q (Eq. 2)
        new_keys = common.all_gather(torch.cat([k_q, k]) if cfg.symmetric else k)  # (V*N, D): every process's keys
        queue_ptr = enqueue(queue, queue_ptr, new_keys)  # enqueue them over the oldest: one queue everywhere
        z_std = q[:B].detach().std(0).mean()  # collapse monitor: ~1/sqrt(D) healthy, 0 collapsed
        pos_cos = (q[:B].detach() * k).sum(1).mean()  # mean cos(q, k+)
        log.step(step, loss=loss, lr=lr_now, z_std=z_std, pos_cos=pos_cos)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "key_encoder": key_encoder.state_dict(), "queue": queue,
                    "queue_ptr": queue_ptr, "key_shuffle": shuffler.get_state(), "opt": opt.state_dict(),
                    "step": step + 1, "config": dataclasses.asdict(cfg)}, rt)

    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    if rt.is_main:  # the encoder alone, loadable into a torchvision ResNet with the same stem (README)
        torch.save(raw_model.backbone.state_dict(), os.path.join(cfg.out_dir, "encoder.pt"))
    results = {"method": "moco", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1), "version": cfg.version, "mlp": cfg.mlp}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
