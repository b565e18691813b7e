"""Jigsaw: unsupervised learning of visual representations by solving jigsaw puzzles.

Noroozi, Favaro. ECCV 2016. arXiv:1603.09246.

An image is cut into a 3x3 grid of tiles, the tiles are shuffled by one permutation out of a fixed
set, and a network must say which permutation it was. The tiles pass one by one through a shared
(siamese) encoder, which cannot see how tiles relate; only the classifier on top of the nine
concatenated tile features can. To solve the puzzle, the encoder must therefore describe what each
tile shows (an eye, a wheel, the top of a roof) well enough that the classifier can place it: it
learns object parts. Shortcuts are removed as in the paper (Table 5): each tile is a random crop
smaller than its cell, so edges and textures rarely continue from tile to tile (18 px in 21 px cells:
neighbours are 0-6 px apart, at most 1 px in 3 pairs of 16; the paper's 64 in 75: 3 of 144); every tile is
standardized on its own, so brightness and contrast do not tell neighbours apart; and against
chromatic aberration some puzzles are made in grayscale and the colour channels of the others are
shifted a little against each other. The permutation set is chosen greedily for maximal Hamming
distance (Algorithm 1), so that the puzzles are far apart and each needs the whole arrangement.

    python jigsaw.py                                             # 1 GPU: CIFAR-10
    torchrun --standalone --nproc_per_node=8 jigsaw.py           # 8 GPUs, same global batch of 128
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 jigsaw.py
    python jigsaw.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=128   # CPU smoke run

The paper trains an AlexNet on ImageNet and reports 67.6% PASCAL VOC 2007 classification after
fine-tuning (Table 1); there is no CIFAR recipe. Here the paper's geometry is scaled to CIFAR images
upsampled to 64 px, with a ResNet-18 tile encoder and RotNet's CIFAR-10 optimizer (the table).
Evaluated features: knn_top1, probe_top1 and linear_top1 on the tile encoder applied to the whole,
un-tiled image at the puzzle's scale (upsampled to image_size, each channel standardized as a tile's),
globally pooled (512-d for ResNet-18). pretext_top1 is the permutation accuracy on puzzles made from
the test images. Results of this file: not yet measured (README).

Departures from the sources (P: the paper, arXiv v3; C: the official Caffe release MehdiNoroozi/
JigsawPuzzleSolver as of 2016, commit 2fba1c6, whose data_transformer.cpp cuts the tiles (the 2018
"jigsaw++" commits change it); B: the widely used PyTorch reimplementation, bbrattoli/
JigsawPuzzlePytorch):

| setting | paper | official code | this file |
|---|---|---|---|
| tile encoder | AlexNet, conv1 stride 2, no BN (P Sec. 3) | as P (C train_val_cfn_jps) | ResNet-18, CIFAR stem |
| head | fc6 512 per tile, fc7 4096 (P Sec. 3) | fc6 1024, fc7 4096, dropout (C, B) | 512, 1024, BN |
| image | 256 px, random 225 crop (P 3); centre 255 (P Tab. 5) | centre 255, no flip (C, B) | >= 60% area to 64, flip |
| cell / tile | 75 / 64 px (P 3); 85 / 64 (P Tab. 5) | 85 / 64 (C jitter 21); 86 / 64 -> 75 (B) | 21 / 18 (as 64/75) |
| tile norm. | mean and std of each tile (P Tab. 5) | mean per channel (C); and std (B) | mean, std per channel |
| grayscale | 30% of the images (P Tab. 5) | none (C); 30% (B JigsawImageLoader) | 30% |
| channel shift | 0, 1 or 2 px, colour images (P Tab. 5) | none (C); B adds -2..1 to values | <= 1 px, colour images |
| permutations | 1000 best for detection (P Tab. 4) | 100 (C); 1000 (B) | 100; --n_perms=1000 |
| greedy ties | - | first index (B select_permutations.py) | farthest from its nearest |
| optimizer | SGD, lr 0.01, batch 256 (P) | momentum 0.9, wd 5e-4 (C solver) | Nesterov 0.9, wd 5e-4 |
| schedule | 350k steps, ~69 epochs (P) | lr / 10 every 100k steps (C solver) | lr 0.1 at 128, cosine, 100 ep. |
| evaluation | fine-tuning, VOC 2007 (P Tab. 1) | - | frozen: kNN, probe, linear |
"""

import dataclasses
import functools
import itertools
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
    out_dir: str = "out/jigsaw"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 64  # side of the puzzle image (CIFAR upsampled: 3x3 cells of 21 px; the paper: 225)
    # model
    arch: str = "resnet18"  # tile encoder: resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs)
    tile_dim: int = 512  # width of the shared per-tile layer (the paper's fc6: 512)
    hidden_dim: int = 1024  # width of the hidden layer over the 9 concatenated tiles (the paper's fc7: 4096)
    # method
    n_perms: int = 100  # size of the permutation set = classes of the pretext task (the paper's best: 1000)
    tile_size: int = 18  # side of a tile, cut at a random place in its cell of image_size // 3 px (paper: 64 of 75)
    channel_jitter: int = 1  # each channel of a colour tile is shifted by up to this many px (paper: 2 of 64)
    gray_prob: float = 0.3  # fraction of puzzles made from the grayscale image (the paper's 30%)
    crop_min: float = 0.6  # smallest area fraction of the random square crop that becomes the puzzle image
    # optim
    epochs: int = 100  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 128  # global batch of puzzles, split across processes
    lr: float = 0.2  # SGD base lr per 256 images, scaled linearly (0.1 at batch 128)
    momentum: float = 0.9  # SGD momentum (Nesterov)
    weight_decay: float = 5e-4  # on all parameters
    warmup_epochs: int = 0  # linear warmup, then cosine decay to 0
    # eval
    eval_every: int = 10  # epochs between kNN monitor runs (0 = only at the end)
    probe_epochs: int = 100  # fast linear probe on precomputed frozen features at the end, epochs (0 = none)
    linear_epochs: int = -1  # standard linear evaluation at the end, epochs (-1: 100 on CUDA, none on CPU; 0: none)
    # system
    seed: int = 0  # weights, data order, augmentations and the permutation set
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    compile: str = "auto"  # torch.compile the model: auto (on CUDA only) | true | false
    log_every: int = 50  # steps between progress lines
    resume: bool = False  # continue from out_dir/ckpt.pt

    def __post_init__(self):
        common.check_config(self)
        if not 2 <= self.n_perms <= 1000:
            raise ValueError(f"--n_perms={self.n_perms} is impossible: it must be in 2..1000 (the paper's largest set)")
        if not 4 <= self.tile_size < self.image_size // 3:
            raise ValueError(f"--tile_size={self.tile_size} is impossible: it must be at least 4 and smaller than the "
                             f"cells of image_size // 3 = {self.image_size // 3} px, so that tiles have gaps")
        if self.channel_jitter < 0 or not 0 <= self.gray_prob <= 1 or not 0 < self.crop_min <= 1:
            raise ValueError("--channel_jitter must be >= 0, --gray_prob in [0, 1] and --crop_min in (0, 1]")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum={self.momentum} is impossible: it must be in [0, 1)")


# -------------------------------------------------------------------------------------------------
# views: puzzles


@functools.lru_cache(maxsize=4)  # train() and the tests ask for the same set again; never modified
def make_permutations(n_perms, seed):
    """(n_perms, 9) int64: distinct permutations of the 9 tiles, chosen greedily for maximal
    Hamming distance (paper Algorithm 1); the same set for the same (n_perms, seed).

    Start from a random permutation of all 9!; then, again and again, add the one whose summed
    Hamming distance to those chosen so far is largest (the paper's criterion). The paper leaves
    ties open, and there are many: they go to the permutation whose nearest chosen one is farthest.
    Seed 0 gives an average pairwise distance of 8.08 and a minimum of 3 for 100 permutations (the
    paper's Table 4 lists 8.08 and 2), 8.01 on average for 1000 (paper: 8.00).
    """
    every = torch.tensor(list(itertools.permutations(range(9))), dtype=torch.uint8).T.contiguous()  # (9, 9!)
    j = int(torch.randint(every.shape[1], (1,), generator=torch.Generator().manual_seed(seed)))
    total = torch.zeros(every.shape[1], dtype=torch.int32)  # (9!,) summed distance to the chosen set
    nearest = torch.full_like(total, 9)  # (9!,) distance to the nearest chosen permutation
    chosen = []
    for _ in range(n_perms):
        chosen.append(j)
        d = (every != every[:, j:j + 1]).sum(0, dtype=torch.int32)  # (9!,) Hamming distance to the new one
        total += d
        torch.minimum(nearest, d, out=nearest)
        score = total * 10 + nearest  # nearest <= 9 < 10: the sum decides, `nearest` breaks ties
        j = int(score.masked_fill(nearest == 0, -1).argmax())  # the chosen ones (distance 0) are out
    return every[:, chosen].T.long()


def cut_tiles(x, tile, jitter=0, colour=None):
    """The 3x3 grid's tiles: (B,C,S,S) -> (B, 9, C, tile, tile), cells in row-major order.

    The cells are S // 3 px; each tile is cut at a random offset inside its cell, so neighbouring
    tiles are apart by a random gap (as in the paper). With jitter, each colour channel of a tile is
    shifted by its own random offset of up to +-jitter px (kept inside the cell, so that no two tiles
    share a pixel), in the images marked by colour (B,) bool, or in all of them.
    """
    B, C, S, _ = x.shape
    cell, dev = S // 3, x.device
    corner = torch.arange(3, device=dev) * cell
    cell_top, cell_left = corner.repeat_interleave(3).view(1, 9, 1), corner.repeat(3).view(1, 9, 1)  # row-major
    top = cell_top + torch.randint(0, cell - tile + 1, (B, 9, 1), device=dev)
    left = cell_left + torch.randint(0, cell - tile + 1, (B, 9, 1), device=dev)
    shift = torch.randint(-jitter, jitter + 1, (2, B, 9, C), device=dev)  # per channel
    if colour is not None:
        shift = shift * colour.view(1, B, 1, 1)  # no shift where the channels are one grey
    top = (top + shift[0]).clamp(cell_top, cell_top + cell - tile)  # (B, 9, C)
    left = (left + shift[1]).clamp(cell_left, cell_left + cell - tile)  # (B, 9, C)
    span = torch.arange(tile, device=dev)
    rows = (top[..., None] + span)[..., :, None]  # (B, 9, C, T, 1)
    cols = (left[..., None] + span)[..., None, :]  # (B, 9, C, 1, T)
    b, c = torch.arange(B, device=dev).view(B, 1, 1, 1, 1), torch.arange(C, device=dev).view(1, 1, C, 1, 1)
    return x[b, c, rows, cols]  # (B, 9, C, T, T)


def shuffle_tiles(tiles, order):
    """Puzzle b shows tile order[b, i] of the grid at position i: (B,9,C,T,T), (B,9) -> (B,9,C,T,T).

    The inverse permutation puts them back: puzzle[b, order[b].argsort()] is the grid of image b.
    """
    return tiles.gather(1, order.view(*order.shape, 1, 1, 1).expand_as(tiles))


def standardize(x, eps=1e-4):
    """Each channel of each tile (or image) to zero mean and unit variance on its own: (..., H, W).
    eps floors the std at about 0.01 (2.5 grey levels), so that flat tiles are not blown up to noise."""
    mean, var = x.mean((-2, -1), keepdim=True), x.var((-2, -1), keepdim=True, unbiased=False)
    return (x - mean) / (var + eps).sqrt()


def grayscale(x):
    """(B,3,H,W) -> its luma in all three channels (ITU-R 601 weights, as PIL's convert("L"))."""
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (B, H, W)
    return luma.unsqueeze(1).expand_as(x)


def jigsaw_view(x, perms, cfg):
    """uint8 (B,3,H,W) -> puzzles (B, 9, 3, T, T), standardized tiles in shuffled order, and the
    index into perms of each puzzle's permutation (B,)."""
    x = common.random_resized_crop(common.to_float(x), cfg.image_size, scale=(cfg.crop_min, 1.0), ratio=(1.0, 1.0))
    x = common.random_flip(x)
    gray = torch.rand(len(x), device=x.device) < cfg.gray_prob  # (B,): puzzles made from the grayscale image
    x = torch.where(gray.view(-1, 1, 1, 1), grayscale(x), x)
    tiles = cut_tiles(x, cfg.tile_size, cfg.channel_jitter, colour=~gray)  # (B, 9, 3, T, T) in grid order
    labels = torch.randint(len(perms), (x.shape[0],), device=x.device)  # (B,) one permutation per puzzle
    return standardize(shuffle_tiles(tiles, perms[labels])), labels


# -------------------------------------------------------------------------------------------------
# model


class Jigsaw(nn.Module):
    """The paper's context-free network: a tile encoder f shared by the 9 tiles (siamese) with a
    per-tile layer (fc6), then a classifier over the 9 tile features concatenated in tile order."""

    def __init__(self, arch, small_images, tile_dim, hidden_dim, n_perms):
        super().__init__()
        self.backbone, width = common.resnet(arch, small_images)
        self.tile_fc = nn.Sequential(  # the paper's fc6, one per tile (shared)
            nn.Linear(width, tile_dim, bias=False), nn.BatchNorm1d(tile_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            nn.Linear(9 * tile_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, n_perms))

    def forward(self, tiles):
        B = tiles.shape[0]
        h = self.backbone(tiles.flatten(0, 1))  # (9B, width): every tile alone through f
        z = self.tile_fc(h).view(B, -1)  # (B, 9 * tile_dim): tile features concatenated in tile order
        return self.classifier(z)  # (B, n_perms)


# -------------------------------------------------------------------------------------------------
# loss


def jigsaw_loss(logits, labels):
    """Cross-entropy over the permutation set, averaged over the puzzles.

    logits: (B, n_perms); labels: (B,) index of each puzzle's permutation. Computed in float32.
    """
    return F.cross_entropy(logits.float(), labels)


# -------------------------------------------------------------------------------------------------
# method helpers


@torch.no_grad()
def jigsaw_accuracy(model, data, rt, perms, cfg, batch_size=512):
    """Top-1 permutation accuracy on puzzles made from the test images (the training's random tiling).

    Every process scores its share of the test split; the counts are summed over processes.
    """
    model.eval()
    counts = torch.zeros(2, device=rt.device)  # correct, seen
    for x, _ in data.eval_batches("test", batch_size):
        tiles, labels = jigsaw_view(x, perms, cfg)
        with rt.autocast():
            logits = model(tiles)  # (b, n_perms)
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
    perms = make_permutations(cfg.n_perms, cfg.seed).to(rt.device)  # (n_perms, 9), the same on every process
    common.print0(f"jigsaw: {total_steps} steps, SGD lr {lr:.3g}, {cfg.n_perms} permutations, "
                  f"{cfg.tile_size} px tiles in {cfg.image_size // 3} px cells")

    raw_model = Jigsaw(cfg.arch, cfg.tile_size <= 64, cfg.tile_dim, cfg.hidden_dim, cfg.n_perms)
    raw_model = common.sync_batchnorm(raw_model.to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    opt = torch.optim.SGD(raw_model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=True)
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # f on the whole un-tiled image, at the puzzle's scale, standardized like a tile
        x = common.resize(common.to_float(x), cfg.image_size)
        return raw_model.backbone(standardize(x))

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt),
                   "pretext_top1": jigsaw_accuracy(raw_model, data, rt, perms, cfg)})

    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, _ in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = common.cosine_lr(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        common.set_lr(opt, lr_now)
        tiles, labels = jigsaw_view(x, perms, cfg)  # (B, 9, 3, T, T), (B,)
        with rt.autocast():
            logits = model(tiles)  # (B, n_perms)
        # the mean over this process's B puzzles; DDP averages the gradients: the global batch's mean
        loss = jigsaw_loss(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pretext_acc = (logits.detach().argmax(1) == labels).float().mean()  # puzzles solved in this batch
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
    pretext_top1 = jigsaw_accuracy(raw_model, data, rt, perms, cfg)
    if rt.is_main:  # the tile encoder alone, loadable into a torchvision ResNet with the CIFAR stem (README)
        torch.save(raw_model.backbone.state_dict(), os.path.join(cfg.out_dir, "encoder.pt"))
    results = {"method": "jigsaw", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1), "pretext_top1": pretext_top1,
               "n_perms": cfg.n_perms}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
