"""CPC: contrastive predictive coding, for images (CPC v2).

van den Oord, Li, Vinyals. Representation learning with contrastive predictive coding. 2018.
arXiv:1807.03748. Henaff, Srinivas, De Fauw, Razavi, Doersch, Eslami, van den Oord. Data-efficient
image recognition with contrastive predictive coding. ICML 2020. arXiv:1905.09272.

An image is cut into a grid of overlapping patches and an encoder maps each patch on its own to a
vector z[i, j]. A context network over the grid, masked so that c[i, j] sees only rows <= i, sums
up everything above and on row i. For k = 1..K rows further down, a linear map W_k turns c[i, j]
into a prediction of z[i+k, j], scored by InfoNCE: the true z[i+k, j] must get the highest dot
product among the codes of all patches of the batch. Predicting what lies below from
what lies above needs the codes to carry the image's content, not its pixels. After training, the
context network and the W_k are thrown away; the patch encoder is the representation.

    python cpc.py                                                # 1 GPU: CIFAR-10, 7 x 7 grid of 8 px patches
    torchrun --standalone --nproc_per_node=8 cpc.py              # 8 GPUs, same global batch of 256
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 cpc.py
    python cpc.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=64   # CPU smoke run

The papers have no CIFAR recipe; these defaults are our choices, not a reproduced recipe. The grid
follows the CIFAR-10 setting of PyTorch Lightning Bolts' CPC v2 (8 px patches overlapping by 4 px:
a 7 x 7 grid on 32 px images, no upsampling; CPC v1 cut 256 px images into the same 7 x 7 grid of
64 px patches with half-patch overlap); its lr 1e-4 at batch 128 is our 2e-4 per 256 (it publishes
no linear-probe number for this setting). From the papers: layer norm instead of batch norm in the
patch encoder (CPC v2: batch statistics tie a patch's code to the other patches, those below it
included, a leak the task can exploit; here GroupNorm with one group normalizes each patch over its
own C, H, W), predictions up to K = 5 rows below (CPC v1's image experiments), negatives from the
other positions of the same image and from the other images of the batch (CPC v2), colour dropping
and flips drawn for each patch independently (CPC v2). Ours: ResNet-18 with CIFAR stem as the patch
encoder (CPC v2: a wider and deeper ResNet-161), a 3-block residual net of vertically masked 3x3
convolutions as context network, top-to-bottom prediction only (CPC v2 also predicts in other
directions), AdamW with warmup and cosine over 300 epochs, weight decay 1e-5, a random resized crop
(0.3, 1) and flip of the whole image before it is cut. Negatives under DDP are global: the codes of
every process are gathered with common.gather_with_grad, so the loss is that of one process.
Results of this file: not yet measured (see README).
Evaluated features: the patch encoder's z of the 7 x 7 patches of the whole, un-augmented image,
averaged over the grid (512-d for ResNet-18); the probe trains on them frozen (plus flips).
"""

import dataclasses
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
    patch_stride: int = 4  # step between patches (half a patch: neighbours overlap by half, as CPC v1)
    context_dim: int = 256  # width of the masked-convolution context network
    context_blocks: int = 3  # residual blocks of the context network (each sees 2 more rows up)
    # method
    pred_steps: int = 5  # K: predict z up to K rows below each context vector (CPC v1)
    color_drop: float = 1.0  # probability that a patch keeps only one random colour channel (v2 colour dropping)
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
        grid = (S - P) // self.patch_stride + 1
        if not 1 <= self.pred_steps < grid:
            raise ValueError(f"--pred_steps={self.pred_steps} must be in [1, {grid - 1}] for a {grid} x {grid} grid")
        if self.context_dim < 1 or self.context_blocks < 1 or not 0 <= self.color_drop <= 1 or not 0 < self.crop_min <= 1:
            raise ValueError("--context_dim and --context_blocks must be >= 1, --color_drop in [0, 1], --crop_min in (0, 1]")


# -------------------------------------------------------------------------------------------------
# views


def cut_patches(x, size, stride):
    """(B, 3, H, W) -> (B, G, G, 3, size, size): the overlapping grid, G = (H - size) // stride + 1."""
    return x.unfold(2, size, stride).unfold(3, size, stride).permute(0, 2, 3, 1, 4, 5)


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
    keep = F.one_hot(torch.randint(0, 3, (len(p),), device=p.device), 3).to(p.dtype).view(-1, 3, 1, 1)  # (B*G*G, 3, 1, 1)
    dropping = torch.rand(len(p), 1, 1, 1, device=p.device) < cfg.color_drop
    return torch.where(dropping, p * keep, p).view(patches.shape)


# -------------------------------------------------------------------------------------------------
# model


def patch_encoder(arch, small_patches):
    """Patch encoder with layer norm in place of batch norm -> (module: (N,3,P,P) -> (N, width), width).

    GroupNorm with one group normalizes each patch over its own (C, H, W): no statistics shared
    between patches. resnet18/34/50 are torchvision's (CIFAR stem for small patches); `tiny` is a
    3-conv trunk for CPU runs.
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


class ContextNet(nn.Module):
    """z grid (B, D, G, G) -> c (B, Dc, G, G) with c[:, :, i] a function of rows <= i only.

    Residual blocks of 3x3 convolutions padded with two rows above and none below: a vertically
    masked convolution, so each block reaches two rows further up and never down. No normalization:
    a norm over the grid would mix the rows below into c.
    """

    def __init__(self, width, dim, blocks):
        super().__init__()
        self.proj = nn.Conv2d(width, dim, 1)
        self.blocks = nn.ModuleList([nn.Sequential(
            nn.ReLU(), nn.ZeroPad2d((1, 1, 2, 0)), nn.Conv2d(dim, dim, 3), nn.ReLU(), nn.Conv2d(dim, dim, 1))
            for _ in range(blocks)])

    def forward(self, z):
        c = self.proj(z)  # (B, Dc, G, G)
        for block in self.blocks:
            c = c + block(c)
        return c


class CPC(nn.Module):
    """Patch encoder, masked context network and the K linear predictors W_k."""

    def __init__(self, arch, small_patches, context_dim, context_blocks, pred_steps):
        super().__init__()
        self.encoder, self.width = patch_encoder(arch, small_patches)
        self.context = ContextNet(self.width, context_dim, context_blocks)
        self.predictors = nn.Linear(context_dim, pred_steps * self.width, bias=False)  # W_1..W_K, stacked
        self.K = pred_steps

    def encode(self, patches):
        """(B, G, G, 3, P, P) -> z (B, G, G, D): every patch encoded on its own."""
        B, G = patches.shape[:2]
        return self.encoder(patches.flatten(0, 2)).view(B, G, G, self.width)

    def forward(self, patches):
        z = self.encode(patches)  # (B, G, G, D)
        B, G, _, D = z.shape
        c = self.context(z.permute(0, 3, 1, 2))  # (B, Dc, G, G): c[..., i, j] sees rows <= i
        p = self.predictors(c.permute(0, 2, 3, 1)).view(B, G, G, self.K, D).permute(0, 3, 1, 2, 4)  # (B, K, G, G, D)
        return z, p  # p[:, k-1, i, j] = W_k c[i, j], the prediction of z[i+k, j]


# -------------------------------------------------------------------------------------------------
# loss


def prediction_targets(B, K, G, first, device):
    """Which rows of preds and of the flattened codes cpc_loss pairs up.

    For each k, the predictions p[b, k-1, i, j] with i + k < G (rows i >= G - k have nothing below)
    and their positives z_all[first + b, i + k, j]. Returns (index into preds.reshape(-1, D),
    index into z_all.reshape(-1, D)), both (sum_k B*(G-k)*G,) int64.
    """
    b, s, i, j = torch.meshgrid(*[torch.arange(n, device=device) for n in (B, K, G, G)], indexing="ij")
    k = s + 1  # s indexes preds' dim 1, which holds step k = s + 1
    valid = i + k < G
    pred_index = (((b * K + s) * G + i) * G + j)[valid]
    code_index = (((first + b) * G + i + k) * G + j)[valid]
    return pred_index, code_index


def cpc_loss(preds, z_all, first):
    """InfoNCE of CPC, averaged over every prediction of every step k.

    preds: (B, K, G, G, D), preds[b, k-1, i, j] = W_k c[i, j] of this process's B images.
    z_all: (N, G, G, D) the codes of all N images that give negatives (the global batch), this
    process's images at rows first .. first+B-1. Each prediction (i + k < G) is scored by dot
    product against all N*G*G codes: its positive is z_all[first + b, i + k, j]; every other patch,
    of the same image (other positions) or of another image, is a negative. Returns the mean
    cross-entropy and the top-1 accuracy of picking the positive (chance: 1 / (N*G*G)). float32.
    """
    B, K, G, _, D = preds.shape
    pred_index, code_index = prediction_targets(B, K, G, first, preds.device)
    p = preds.float().reshape(-1, D)[pred_index]  # (M, D): the M predictions that have a target
    logits = p @ z_all.float().reshape(-1, D).T  # (M, N*G*G)
    return F.cross_entropy(logits, code_index), (logits.argmax(1) == code_index).float().mean()


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
    common.print0(f"cpc: {total_steps} steps, AdamW lr {lr:.3g}, {grid} x {grid} patches of {cfg.patch_size} px, "
                  f"predicting {cfg.pred_steps} rows ahead against {cfg.batch_size * grid * grid} codes")

    raw_model = CPC(cfg.arch, cfg.patch_size <= 32, cfg.context_dim, cfg.context_blocks, cfg.pred_steps)
    raw_model = common.sync_batchnorm(raw_model.to(rt.device), rt)  # layer norm only: nothing to convert
    model = common.compile_and_ddp(raw_model, rt)
    opt = torch.optim.AdamW(common.param_groups(raw_model, cfg.weight_decay), lr=lr)
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # the patch codes z of the whole, un-augmented image, averaged over the grid
        patches = cut_patches(common.normalize(common.to_float(x)), cfg.patch_size, cfg.patch_stride)
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
            z, preds = model(patches)  # (B, G, G, D), (B, K, G, G, D)
        # every process scores its predictions against the codes of the GLOBAL batch: the negatives
        # are all patches of all images; this process's images sit at rows rank*B .. rank*B+B-1
        loss, acc = cpc_loss(preds, common.gather_with_grad(z.float()), rt.rank * len(x))
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
               **metrics, "train_seconds": round(log.train_seconds, 1), "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
