"""Context prediction: unsupervised visual representation learning by context prediction.

Doersch, Gupta, Efros. ICCV 2015. arXiv:1505.05192.

Two patches are cut from an image: the centre of a 3x3 grid and one of its 8 neighbours; a network
must say where the neighbour lies relative to the centre (an 8-way classification). Both patches
pass through the same encoder separately, and only an MLP on the two concatenated features sees
them together (the paper's late fusion), so each patch must be described well enough to tell
that, say, an ear belongs above and to the left of an eye: the encoder learns objects and their
parts. Trivial cues are removed as in the paper: a gap between the patches and a random jitter of
each patch, so lines and textures do not continue across the border; against chromatic aberration
(lenses shift colours by a position-dependent amount, which tells where in the image a patch comes
from) the colours are projected off the green-magenta axis (the paper's "projection"); and, as in the
official code, each patch is normalized on its own (its channels' means removed, divided by its RMS),
"so that gradients are a less useful cue" to where it lies.

    python context_pred.py                                       # 1 GPU: CIFAR-10
    torchrun --standalone --nproc_per_node=8 context_pred.py     # 8 GPUs, same global batch of 128
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 context_pred.py
    python context_pred.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=128   # CPU smoke run

The paper trains an AlexNet-like network on ImageNet and evaluates by fine-tuning on PASCAL VOC 2007
detection; it gives no CIFAR-10 recipe or number. Here the paper's geometry is scaled to CIFAR images
upsampled to 96 px, with a ResNet-18 patch encoder and RotNet's CIFAR-10 optimizer (the table; not
tuned for this task). Evaluated features: knn_top1, probe_top1 and linear_top1 on the patch encoder
applied to the whole image at the pretext's scale (upsampled to image_size, colours projected and
normalized as one patch), globally pooled (512-d for ResNet-18). pretext_top1 is the relative-position
accuracy on pairs cut from the test images. Results of this file: not yet measured (README).

Where a patch lies gives part of its label away when the grid nearly fills the image: the encoder may learn
where such content usually sits in a CIFAR image (the object near the centre, background at the borders, sky at
the top; the flip makes left and right alike, not top and bottom) instead of relating the two patches. The grid
(3 x 14 px patches, 2 x 7 px gaps, 2 x 2 px jitter: 60 px) leaves `room` = image_size - 60 px of slack in
sample_pairs: 36 px at the default 96 px, 1.7 steps of patch + gap; the paper's grids have up to about 1.9 in
its 150k-450k pixel images (the official train.py starts each grid uniformly in 0-143 px, one step, and tiles the
image). At 64 px, 4 px: the neighbour of each label comes from a nearly fixed spot. Measured with
tests/context_pred_shortcut.py (10,000 CIFAR-10 images, 3 epochs, tiny trunk, CPU; pretext_top1 on the test
images, chance 12.5%), the neighbour alone (the centre patch blanked) against the pair: 26.1% vs 25.5% at 64 px,
where what is learned is the shortcut; 17.2% vs 19.6% at 96 px; 14.2% vs 16.7% at 128 px.

Departures from the sources (P: the paper, arXiv v3; C: the official code cdoersch/deepcontext,
train.py, which its README calls a refactoring of the paper's code):

| setting | paper | official code | this file |
|---|---|---|---|
| patch encoder | AlexNet-style to fc6 (P Sec. 3) | CaffeNet to fc6 4096 (C gen_net) | ResNet-18, CIFAR stem, fc6 512 |
| fusion head | fc7, fc8 over both fc6 (P Sec. 3) | fc7, fc8 4096, fc9 8 (C gen_net) | 1024, 8 |
| batch norm | no scale and shift (P Sec. 3.2) | conv3-5, fc6, fc7, no scale (C) | with scale and shift |
| image | 150k to 450k pixels (P Sec. 3.2) | as P (C) | CIFAR upsampled to 96 px, flipped |
| patch, gap, jitter | 96, 48, +-7 px (P Sec. 3.2) | as P (C) | 14, 7, +-2 px |
| pairs | a patch, one of its 8 neighbours (P Sec. 3) | all neighbours in 4 grids an image (C) | centre, 1 neighbour |
| batch | - | up to 512 patches and all their pairs (C batch_sz) | 128 pairs, one per image |
| grid place | - | start uniform in 0-143 px, cells over the whole image (C) | 0-36 px at 96 px (above) |
| chromatic aberration | projection, or colour dropping (P 3.1) | colour dropping (C prep_image) | projection |
| patch normalization | mean subtraction (P Sec. 3.2) | kept channel's mean out, / RMS, x 50 (C) | means out, / RMS |
| pixelation | some patches down to 100 px (P 3.2) | a third, to 10-95 px sides (C) | none (CIFAR is upsampled) |
| optimizer | SGD (P Sec. 3.2) | lr 1e-5 on the summed loss, no momentum, no wd (C) | Nesterov 0.9, wd 5e-4 |
| schedule | - | constant lr, no end: max_iter 1e9 (C solver_mko.prototxt) | lr 0.1 at 128, cosine, 100 ep. |
| length | - | ~1M iterations: the paper's model; 1.7M: its 51.4% VOC run (C README) | 100 epochs, 39k steps |
| evaluation | fine-tuning, VOC 2007 detection (P Sec. 4) | - | frozen: kNN, probe, linear |
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
    out_dir: str = "out/context_pred"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 96  # side of the image the patches are cut from (CIFAR upsampled; 64 leaves no grid slack)
    # model
    arch: str = "resnet18"  # patch encoder: resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs)
    patch_dim: int = 512  # width of the shared per-patch layer (the paper's fc6; C: 4096)
    hidden_dim: int = 1024  # width of the hidden layer over the two concatenated patches (C: 2 of 4096)
    # method
    patch_size: int = 14  # side of a patch (the paper: 96 px)
    gap: int = 7  # pixels between neighbouring patches of the grid (the paper: 48 px, half a patch)
    jitter: int = 2  # each patch moves by up to this many px in each direction (the paper: 7 px)
    # optim
    epochs: int = 100  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 128  # global batch of patch pairs (one per image), split across processes
    lr: float = 0.2  # SGD base lr per 256 images, scaled linearly (0.1 at batch 128)
    momentum: float = 0.9  # SGD momentum (Nesterov)
    weight_decay: float = 5e-4  # on all parameters
    warmup_epochs: int = 0  # linear warmup, then cosine decay to 0
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
        if self.patch_size < 4 or self.gap < 0 or self.jitter < 0:
            raise ValueError("--patch_size must be >= 4, --gap >= 0 and --jitter >= 0")
        if 3 * self.patch_size + 2 * self.gap + 2 * self.jitter > self.image_size:
            raise ValueError(f"--patch_size={self.patch_size}, --gap={self.gap}, --jitter={self.jitter}: the 3x3 grid "
                             f"(3 * patch_size + 2 * gap + 2 * jitter) does not fit in --image_size={self.image_size}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum={self.momentum} is impossible: it must be in [0, 1)")


# -------------------------------------------------------------------------------------------------
# views: patch pairs


def remove_green_magenta(x):
    """The paper's "projection" against chromatic aberration: each pixel's colour loses its
    component along the green-magenta axis a = (-1, 2, -1)/sqrt(6), i.e. x - a (a . x); grey is
    unchanged, green and magenta shift towards grey. (B,3,H,W) -> (B,3,H,W)."""
    r, g, b = x.unbind(1)  # (B, H, W) each
    gm = (2 * g - r - b) / 6  # (a . x) / sqrt(6)
    return torch.stack([r + gm, g - 2 * gm, b + gm], 1)


def normalize_patch(x, eps=1e-5):
    """The official per-patch normalization (C train.py, prep_image): each channel of a patch loses
    its own mean, then the whole patch is divided by its root mean square, "so that gradients are a
    less useful cue" (C): a gradient of brightness, contrast or colour across the image (vignetting, a
    sky lighter at the top) no longer tells where a patch lies. C scales to RMS 50 for AlexNet's pixel
    range; here RMS 1, the scale of standardized inputs. eps floors the RMS at 0.003 (a grey level).
    (..., C, H, W) -> (..., C, H, W)."""
    x = x - x.mean((-2, -1), keepdim=True)  # each channel's mean out
    return x / (x.square().mean((-3, -2, -1), keepdim=True) + eps).sqrt()  # one RMS over C, H, W


def crop(x, top, left, size):
    """One size x size crop per image at (top (B,), left (B,)): (B,C,H,W) -> (B,C,size,size)."""
    span = torch.arange(size, device=x.device)
    rows = (top[:, None] + span)[:, :, None]  # (B, P, 1)
    cols = (left[:, None] + span)[:, None, :]  # (B, 1, P)
    return x[torch.arange(len(x), device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, P, P)


def sample_pairs(x, patch, gap, jitter):
    """The centre patch of a 3x3 grid and one random neighbour per image, with the neighbour's label.

    Label k in 0..7 is the neighbour's place around the centre, in row-major order of the grid:
        0 1 2
        3 . 4
        5 6 7
    (0 top-left, 1 above, 2 top-right, 3 left, 4 right, 5 bottom-left, 6 below, 7 bottom-right).
    Grid cells are `patch` px, `gap` px apart; the grid sits at a random place in the image and each
    patch moves by its own random jitter of up to +-jitter px per direction (as in the paper).
    (B,C,S,S) -> centre (B,C,P,P), neighbour (B,C,P,P), labels (B,) int64.
    """
    B, _, S, _ = x.shape
    dev, step = x.device, patch + gap
    room = S - (3 * patch + 2 * gap + 2 * jitter)  # free space for placing the grid
    centre = jitter + step + torch.randint(0, room + 1, (2, B), device=dev)  # (2, B): (row, col) of the centre cell
    labels = torch.randint(0, 8, (B,), device=dev)  # (B,)
    cell = labels + (labels >= 4).long()  # (B,): the neighbour's cell 0..8 in the grid, skipping the centre (4)
    offset = torch.stack([cell // 3 - 1, cell % 3 - 1])  # (2, B): (row, col) steps from the centre, in -1..1
    at_centre = centre + torch.randint(-jitter, jitter + 1, (2, B), device=dev)
    at_neighbour = centre + offset * step + torch.randint(-jitter, jitter + 1, (2, B), device=dev)
    return crop(x, *at_centre, patch), crop(x, *at_neighbour, patch), labels


def patch_pairs(x, cfg):
    """Float images (B,3,S,S) in [0, 1] -> centre and neighbour patches (B,3,P,P), colours projected
    and each patch normalized on its own, and the neighbours' labels (B,)."""
    centre, neighbour, labels = sample_pairs(remove_green_magenta(x), cfg.patch_size, cfg.gap, cfg.jitter)
    return normalize_patch(centre), normalize_patch(neighbour), labels


def context_view(x, cfg):
    """uint8 (B,3,H,W) -> centre and neighbour patches (B,3,P,P) each, and labels (B,)."""
    x = common.resize(common.to_float(x), cfg.image_size)
    x = common.random_flip(x)  # before the grid: the labels follow the flipped image
    return patch_pairs(x, cfg)


# -------------------------------------------------------------------------------------------------
# model


class ContextPred(nn.Module):
    """The paper's late fusion: a patch encoder f with a per-patch layer (fc6), shared by both
    patches, then an MLP over the two concatenated patch features that scores the 8 positions."""

    def __init__(self, arch, small_images, patch_dim, hidden_dim):
        super().__init__()
        self.backbone, width = common.resnet(arch, small_images)
        self.patch_fc = nn.Sequential(  # the paper's fc6, one per patch (shared)
            nn.Linear(width, patch_dim, bias=False), nn.BatchNorm1d(patch_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            nn.Linear(2 * patch_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, 8))

    def forward(self, centre, neighbour):
        B = centre.shape[0]
        h = self.backbone(torch.cat([centre, neighbour]))  # (2B, width): each patch alone through f
        z = self.patch_fc(h)  # (2B, patch_dim)
        return self.classifier(torch.cat([z[:B], z[B:]], 1))  # (B, 8): the two patches meet only here


# -------------------------------------------------------------------------------------------------
# loss


def context_loss(logits, labels):
    """Cross-entropy of the 8-way relative position, averaged over the pairs.

    logits: (B, 8); labels: (B,) in 0..7 (the neighbour's place, row-major around the centre).
    Computed in float32.
    """
    return F.cross_entropy(logits.float(), labels)


# -------------------------------------------------------------------------------------------------
# method helpers


@torch.no_grad()
def context_accuracy(model, data, rt, cfg, batch_size=512):
    """Top-1 relative-position accuracy on one random pair from each test image (no flip).

    Every process scores its share of the test split; the counts are summed over processes.
    """
    model.eval()
    counts = torch.zeros(2, device=rt.device)  # correct, seen
    for x, _ in data.eval_batches("test", batch_size):
        centre, neighbour, labels = patch_pairs(common.resize(common.to_float(x), cfg.image_size), cfg)
        with rt.autocast():
            logits = model(centre, neighbour)  # (b, 8)
        counts += torch.stack([(logits.argmax(1) == labels).sum(), torch.tensor(len(labels), device=rt.device)])
    model.train()
    counts = common.all_reduce_sum(counts)  # global: the whole test split
    return (counts[0] / counts[1]).item()


# -------------------------------------------------------------------------------------------------
# training


def train(cfg: Config) -> dict:
    rt = common.setup(cfg)  # processes, device, precision, seed, out_dir
    data = common.load_data(cfg, rt)  # uint8 images; small datasets live on the device
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (reference batch 256)
    common.print0(f"context_pred: {total_steps} steps, SGD lr {lr:.3g}, {cfg.patch_size} px patches, "
                  f"{cfg.gap} px gaps, jitter {cfg.jitter} px, in {cfg.image_size} px images")

    raw_model = ContextPred(cfg.arch, cfg.patch_size <= 64, cfg.patch_dim, cfg.hidden_dim)
    raw_model = common.sync_batchnorm(raw_model.to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    opt = torch.optim.SGD(raw_model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=True)
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # f on the whole image at the patches' scale, projected and normalized as one patch
        x = common.resize(common.to_float(x), cfg.image_size)
        return raw_model.backbone(normalize_patch(remove_green_magenta(x)))

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt),
                   "pretext_top1": context_accuracy(raw_model, data, rt, cfg)})

    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, _ in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = common.cosine_lr(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        common.set_lr(opt, lr_now)
        centre, neighbour, labels = context_view(x, cfg)  # (B, 3, P, P) twice, (B,)
        with rt.autocast():
            logits = model(centre, neighbour)  # (B, 8)
        # the mean over this process's B pairs; DDP averages the gradients: the global batch's mean
        loss = context_loss(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pretext_acc = (logits.detach().argmax(1) == labels).float().mean()  # positions right in this batch
        log.step(step, loss=loss, lr=lr_now, pretext_acc=pretext_acc)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                    "config": dataclasses.asdict(cfg)}, rt)

    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    pretext_top1 = context_accuracy(raw_model, data, rt, cfg)
    if rt.is_main:  # the patch encoder alone, loadable into a torchvision ResNet with the CIFAR stem (README)
        torch.save(raw_model.backbone.state_dict(), os.path.join(cfg.out_dir, "encoder.pt"))
    results = {"method": "context_pred", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs,
               "steps": stop_step, **metrics, "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1), "pretext_top1": pretext_top1}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
