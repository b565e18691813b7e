"""CPC: contrastive predictive coding, for images (CPC v2).

van den Oord, Li, Vinyals. Representation learning with contrastive predictive coding. 2018.
arXiv:1807.03748 (P1). Henaff, Srinivas, De Fauw, Razavi, Doersch, Eslami, van den Oord. Data-efficient
image recognition with contrastive predictive coding. ICML 2020. arXiv:1905.09272 (P2).

An image is cut into a grid of overlapping patches and an encoder maps each patch on its own to a
vector z[i, j]. A context network of masked convolutions sums up the grid so that c[i, j] sees only
rows <= i. For each step k, a linear map W_k turns c[i, j] into a prediction of the patch k rows
below, and InfoNCE scores it: the true target must get the highest dot product among the targets of
all patches of the batch (other positions of the same image, other images). As in CPC v2, both meet
in a narrow space: the target is T z[i+k, j] (T a linear map to 64 dims), the prediction 0.1 W_k c[i, j].
The first step is the nearest row that shares no pixel with rows <= i: a patch that overlaps what the
context saw could be predicted from the pixels they share, a shortcut that needs no understanding of
the image. That row borders the context's last one, and a crop upsampled by up to 2.1x makes the two share
interpolated source pixels: P2 skips that row as well; C and this file do not. After training, the
context network, T and the W_k are thrown away; the patch encoder is the representation.

    python cpc.py                                                # 1 GPU: CIFAR-10, 7 x 7 grid of 8 px patches
    torchrun --standalone --nproc_per_node=8 cpc.py              # 8 GPUs, same global batch of 256
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 cpc.py
    python cpc.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=64   # CPU smoke run

Neither paper trains on CIFAR. The grid is that of PyTorch Lightning Bolts' CPC v2 for CIFAR-10 (C:
Lightning-Universe/lightning-bolts, src/pl_bolts/: models/self_supervised/cpc/cpc_module.py, losses/
self_supervised_learning.py CPCTask, transforms/self_supervised/cpc_transforms.py); the method is P2's
(its App. A pseudo-code: steps_to_ignore, target_dim 64, emb_scale 0.1, the pixelCNN context); trunk,
optimizer and schedule are ours. Evaluated features: knn_top1, probe_top1 and linear_top1 all use the
patch encoder's z of the 7 x 7 patches of the un-augmented image resized to image_size, averaged over the
grid (512-d for ResNet-18), as P1 Sec. 3.2 mean-pools its grid. Negatives under DDP are global
(common.gather_with_grad): N processes give the loss of one. Results of this file: not yet measured (README).

| setting | paper | official code | this file |
|---|---|---|---|
| data, grid | ImageNet, 7 x 7 of 64 px, stride 32 (P1 3.2) | CIFAR, 7 x 7 of 8 px, stride 4 (C Patchify) | as C |
| first step k | 1 (P1 3.2); 3: steps_to_ignore 2 (P2 App. A) | 2 (C CPCTask: i + 1, i >= 1) | first clear row: 2 |
| steps | 1..5 (P1 3.2); 3 only (P2 App. A) | 2..6, step k counted k - 1 times (C CPCTask) | 2..6 (pred_steps 5) |
| loss over steps | sum over steps (P2 App. A) | sum of per-step means, with those repeats | mean over all predictions |
| compared in | z vs W_k c (P1); 64-d T z vs 0.1 W_k c (P2 A) | as P2, one W for all k (C CPCTask) | as P2 |
| context net | 5 blocks 1x1, 1x3, masked 2x1, 1x1; 256 (P2 A) | as P2, pads with ones (C PixelCNN) | as P2, one 2x3 |
| directions | top-down (P1 3.2); also others (P2 Sec. 3) | top-down (C CPCTask) | as C |
| trunk | ResNet-v2-101 (P1); ResNet-161, layer norm (P2) | as P2 (C networks.py) | ResNet-18, GroupNorm(1, c) |
| image aug. | crop of 300 px, flip, gray (P1 3.2) | flip, shift 4, jitter, gray (C transforms) | crop (0.3, 1), flip |
| patch aug. | 60 px subcrop (P1 3.2); colour drop, flip (P2) | none (C transforms) | colour drop, flip |
| optimizer | Adam (P1 3.2) | Adam (0.8, 0.999), eps 1e-7, L2 1e-5 (C cpc_module.py) | AdamW, wd 1e-5 (in effect none) |
| lr, batch | 2e-4 at 512 (P1 3.2) | 1e-4 (class), 1e-5 at 128 (CLI), 4e-5 at 64 (docs) | 2e-4 per 256, linear rule |
| schedule | - | constant (C: MultiStepLR commented out) | warmup 10, cosine to 0 |
| epochs | - | 1000 (C docs, for its 84.5% from YADIM) | 300 |
| input | - | CIFAR mean and std (C cpc_transforms.py) | ImageNet mean and std |
| evaluation | linear, mean-pooled z (P1 3.2) | online linear, flat z grid (C cli_main) | knn/probe/linear, mean z |
"""

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic
    data_dir: str = "./data"  # folder of <dataset>.npz (downloaded there if missing); $SSL_DATA replaces this default
    out_dir: str = "out/cpc"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the augmented views, cut into the patch grid
    # model
    arch: str = "resnet18"  # patch encoder, with layer norm: resnet18 | resnet34 | resnet50 | tiny (3 convs: CPU runs)
    patch_size: int = 8  # side of a patch (32 px image, 8 px patches, stride 4 -> 7 x 7 grid)
    patch_stride: int = 4  # step between patches (half a patch: neighbours overlap by half, as P1 and C)
    context_dim: int = 256  # hidden width of the context network's blocks (P2 App. A)
    context_blocks: int = 5  # residual blocks of the context network, each sees one more row up (P2 App. A)
    # method
    pred_steps: int = 5  # K: rows predicted below each context, from the first that shares no pixel with it
    target_dim: int = 64  # width of the space where predictions meet targets (P2 App. A, C CPCTask)
    emb_scale: float = 0.1  # predictions are scaled by this before the dot product (P2 App. A, C CPCTask)
    color_drop: float = 1.0  # probability that a patch keeps only one random colour channel (P2 colour dropping)
    crop_min: float = 0.3  # smallest area fraction of the random resized crop of the whole image
    # optim
    epochs: int = 300  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 256  # global batch, split across processes
    lr: float = 2e-4  # AdamW base lr per 256 images, scaled linearly with the batch
    weight_decay: float = 1e-5  # decoupled, on weights only (not biases and norms)
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
        S, P = self.image_size, self.patch_size
        if not 1 <= self.patch_stride <= P <= S or (S - P) % self.patch_stride:
            raise ValueError(f"--patch_size={self.patch_size} and --patch_stride={self.patch_stride} must tile "
                             f"--image_size={self.image_size}: (image_size - patch_size) divisible by patch_stride")
        grid, first = (S - P) // self.patch_stride + 1, prediction_steps(P, self.patch_stride, 1)[0]
        if not 1 <= self.pred_steps <= grid - first:
            raise ValueError(f"--pred_steps={self.pred_steps} must be in [1, {grid - first}]: on a {grid} x {grid} "
                             f"grid the first row that shares no pixel with the context's is {first} rows below it")
        if min(self.context_dim, self.context_blocks, self.target_dim) < 1 or self.emb_scale <= 0:
            raise ValueError("--context_dim, --context_blocks and --target_dim must be >= 1, --emb_scale > 0")
        if not 0 <= self.color_drop <= 1 or not 0 < self.crop_min <= 1:
            raise ValueError("--color_drop must be in [0, 1], --crop_min in (0, 1]")


# -------------------------------------------------------------------------------------------------
# views


def cut_patches(x, size, stride):
    """(B, 3, H, W) -> (B, G, G, 3, size, size): the overlapping grid, G = (H - size) // stride + 1."""
    return x.unfold(2, size, stride).unfold(3, size, stride).permute(0, 2, 3, 1, 4, 5)


def prediction_steps(patch_size, patch_stride, pred_steps):
    """The row offsets k that CPC predicts: pred_steps of them, from the first that shares no pixel with the context.

    Grid row i covers pixel rows [i * stride, i * stride + size), and the context c[i, j] has seen rows <= i,
    whose lowest pixel row is i * stride + size - 1. Row i + k starts at (i + k) * stride: below all of it
    exactly when k * stride >= size. (P2 App. A, 64 px patches at stride 32, ignores steps 1 and 2: the overlapping
    row and also the first clear one, which touches the context; this file starts at the first clear row.)
    """
    first = math.ceil(patch_size / patch_stride)  # the smallest k with k * stride >= size
    return list(range(first, first + pred_steps))


def cpc_view(x, cfg):
    """Crop and flip the whole image, cut it, then augment every patch on its own (as CPC v2):
    a horizontal flip with probability 0.5 and colour dropping (keep one random channel, the other
    two set to 0, the mean colour after normalization) with probability color_drop.
    uint8 (B,3,H,W) -> normalized patches (B, G, G, 3, P, P)."""
    x = common.to_float(x)
    x = common.random_resized_crop(x, cfg.image_size, scale=(cfg.crop_min, 1.0))
    x = common.random_flip(x)
    patches = cut_patches(common.normalize(x), cfg.patch_size, cfg.patch_stride)
    p = common.random_flip(patches.flatten(0, 2))  # (B*G*G, 3, P, P): a flip drawn per patch
    keep = F.one_hot(torch.randint(0, 3, (len(p),), device=p.device), 3).to(p.dtype).view(-1, 3, 1, 1)  # (BGG, 3, 1, 1)
    dropping = torch.rand(len(p), 1, 1, 1, device=p.device) < cfg.color_drop
    return torch.where(dropping, p * keep, p).view(patches.shape)


# -------------------------------------------------------------------------------------------------
# model


def patch_encoder(arch, small_patches):
    """Patch encoder with layer norm in place of batch norm -> (module: (N,3,P,P) -> (N, width), width).

    P2 replaces batch norm by layer norm: batch statistics tie a patch's code to the other patches,
    those below it included, a leak the task can exploit. GroupNorm with one group normalizes each
    patch over its own (C, H, W). resnet18/34/50 are torchvision's (CIFAR stem for small patches);
    `tiny` is a 3-conv trunk for CPU runs.
    """
    layer_norm = lambda c: nn.GroupNorm(1, c)  # noqa: E731
    if arch == "tiny":
        layers, c_in = [], 3
        for c_out, stride in [(16, 1), (32, 2), (64, 2)]:
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), layer_norm(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c_in
    net = getattr(torchvision.models, arch)(norm_layer=layer_norm)
    if small_patches:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    width, net.fc = net.fc.in_features, nn.Identity()
    return net, width


class MaskedConv2d(nn.Conv2d):
    """A 2 x 3 convolution whose output at row i sees input rows i - 1 and i only, never a row below.

    PixelCNN's masked convolution, masked by rows: the input is padded with one row of zeros on top
    and none at the bottom, so the kernel's lower row sits on row i and its upper row on i - 1. P2's
    pixelCNN writes it as a 1x3 convolution, then this padding and a 2x1 one: the same receptive field.
    """

    def __init__(self, c_in, c_out):
        super().__init__(c_in, c_out, kernel_size=(2, 3))

    def forward(self, x):  # (B, C, G, G) -> (B, C_out, G, G)
        return super().forward(F.pad(x, (1, 1, 1, 0)))  # (left, right, top, bottom)


class ContextNet(nn.Module):
    """The pixelCNN of P2 App. A: z grid (B, G, G, D) -> c (B, G, G, D), c[:, i] a function of rows <= i only.

    Residual blocks 1x1 (to `hidden`), ReLU, masked conv, ReLU, 1x1 (back to D): each block reaches one
    row further up. No normalization: a norm over the grid would mix the rows below into c.
    """

    def __init__(self, width, hidden, blocks):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(
            nn.Conv2d(width, hidden, 1), nn.ReLU(),
            MaskedConv2d(hidden, hidden), nn.ReLU(),
            nn.Conv2d(hidden, width, 1)) for _ in range(blocks)])

    def forward(self, z):
        c = z.permute(0, 3, 1, 2).contiguous()  # (B, D, G, G); a strided view would give DDP channels-last grads
        for block in self.blocks:
            c = c + block(c)
        return F.relu(c).permute(0, 2, 3, 1)  # (B, G, G, D)


class CPC(nn.Module):
    """Patch encoder, context network, the target map T and one linear predictor W_k per step."""

    def __init__(self, arch, small_patches, context_dim, context_blocks, pred_steps, target_dim, emb_scale):
        super().__init__()
        self.encoder, self.width = patch_encoder(arch, small_patches)
        self.context = ContextNet(self.width, context_dim, context_blocks)
        self.target = nn.Linear(self.width, target_dim)  # T: a 1x1 convolution over the grid (P2 App. A)
        self.predictors = nn.ModuleList([nn.Linear(self.width, target_dim) for _ in range(pred_steps)])  # W_k
        self.emb_scale = emb_scale

    def encode(self, patches):
        """(B, G, G, 3, P, P) -> z (B, G, G, D): every patch encoded on its own."""
        B, G = patches.shape[:2]
        return self.encoder(patches.flatten(0, 2)).view(B, G, G, self.width)

    def forward(self, patches):
        z = self.encode(patches)  # (B, G, G, D)
        c = self.context(z)  # (B, G, G, D): c[:, i, j] has seen rows <= i
        targets = self.target(z)  # (B, G, G, T)
        preds = torch.stack([W_k(c) for W_k in self.predictors], 1) * self.emb_scale  # (B, K, G, G, T)
        return targets, preds  # preds[:, s, i, j] predicts targets[:, i + k, j], k the s-th step


# -------------------------------------------------------------------------------------------------
# loss


def cpc_loss(preds, targets, steps, own_start):
    """InfoNCE of CPC, averaged over every prediction of every step. float32.

    preds: (B, K, G, G, T), this process's B images; preds[:, s, i, j] predicts the target k = steps[s]
    rows below, in the same column. targets: (N, G, G, T), the targets of all N images that give
    negatives (the global batch), this process's at own_start .. own_start + B - 1. Each prediction whose row
    i + k exists is scored by dot product against all N*G*G targets; the one at (i + k, j) of its own
    image is the positive. Returns the mean cross-entropy and the top-1 accuracy of picking the
    positive (chance: 1 / (N*G*G)).
    """
    B, K, G, _, T = preds.shape
    candidates = targets.float().reshape(-1, T)  # (N*G*G, T): every patch of every image
    position = torch.arange(len(candidates), device=preds.device).view(targets.shape[:3])  # (N, G, G)
    p, positive = [], []
    for s, k in enumerate(steps):  # the context at row i faces the target at row i + k: rows 0..G-k-1 vs k..G-1
        p.append(preds[:, s, :G - k].reshape(-1, T))  # (B*(G-k)*G, T)
        positive.append(position[own_start:own_start + B, k:].reshape(-1))  # (B*(G-k)*G,): where its target sits
    p, positive = torch.cat(p).float(), torch.cat(positive)  # (M, T), (M,)
    logits = p @ candidates.T  # (M, N*G*G)
    return F.cross_entropy(logits, positive), (logits.argmax(1) == positive).float().mean()


# -------------------------------------------------------------------------------------------------
# training


def train(cfg: Config) -> dict:
    rt = common.setup(cfg)  # processes, device, precision, seed, out_dir
    data = common.load_data(cfg, rt)  # uint8 images; small datasets live on the device
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (reference batch 256)
    grid = (cfg.image_size - cfg.patch_size) // cfg.patch_stride + 1
    steps = prediction_steps(cfg.patch_size, cfg.patch_stride, cfg.pred_steps)  # the row offsets k
    common.print0(f"cpc: {total_steps} steps, AdamW lr {lr:.3g}, {grid} x {grid} patches of {cfg.patch_size} px, "
                  f"predicting rows {steps} below against {cfg.batch_size * grid * grid} targets")

    raw_model = CPC(cfg.arch, cfg.patch_size <= 32, cfg.context_dim, cfg.context_blocks, cfg.pred_steps,
                    cfg.target_dim, cfg.emb_scale)
    raw_model = common.sync_batchnorm(raw_model.to(rt.device), rt)  # layer norm only: nothing to convert
    model = common.compile_and_ddp(raw_model, rt)
    opt = torch.optim.AdamW(common.param_groups(raw_model, cfg.weight_decay), lr=lr)
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # the patch codes z of the whole, un-augmented image at image_size, averaged over the grid
        x = common.resize(common.to_float(x), cfg.image_size)  # the scale the patches were learned at
        patches = cut_patches(common.normalize(x), cfg.patch_size, cfg.patch_stride)
        return raw_model.encode(patches).mean((1, 2))

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt)})

    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, _ in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = common.cosine_lr(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        common.set_lr(opt, lr_now)
        patches = cpc_view(x, cfg)  # (B, G, G, 3, P, P)
        with rt.autocast():
            targets, preds = model(patches)  # (B, G, G, T), (B, K, G, G, T)
        # every process scores its predictions against the targets of the GLOBAL batch: the negatives
        # are all patches of all images; this process's images sit at rows rank*B .. rank*B+B-1
        loss, acc = cpc_loss(preds, common.gather_with_grad(targets.float()), steps, rt.rank * len(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(step, loss=loss, lr=lr_now, acc=acc)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                    "config": dataclasses.asdict(cfg)}, rt)

    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    if rt.is_main:  # the patch encoder alone: a torchvision ResNet with GroupNorm(1, c) layers and the CIFAR stem
        torch.save(raw_model.encoder.state_dict(), os.path.join(cfg.out_dir, "encoder.pt"))
    results = {"method": "cpc", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
