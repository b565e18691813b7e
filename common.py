"""Small, method-agnostic utilities shared by every nanossl method file: config parsing, processes
(torchrun or one), data as uint8 tensors, batched on-device augmentation, backbones, LARS and
schedules, kNN / linear-probe evaluation, logging and checkpoints, sRGB <-> Lab.

Nothing here is a self-supervised method: heads, losses, views and training steps live in the
method files, which read top to bottom without this one.
"""

import contextlib
import dataclasses
import difflib
import functools
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF

DATASETS = ("cifar10", "cifar100", "stl10", "folder", "synthetic")
ARCHS = ("resnet18", "resnet34", "resnet50", "tiny")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, for every dataset (BN follows)


class RunError(Exception):
    """A problem of the run's input (data, checkpoint, diverged loss): shown as one line, no traceback."""


# -------------------------------------------------------------------------------------------------
# config


def _help(Config):
    """Print every field with its default and trailing comment (and the '# section' lines)."""
    doc = (sys.modules[Config.__module__].__doc__ or "").strip().split("\n")[0]
    print(f"usage: python {os.path.basename(sys.argv[0])} [--key=value ...]   {doc}")
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for line in inspect.getsource(Config).splitlines():
        if m := re.match(r"\s*# (.+)$", line):
            print(f"\n  # {m.group(1)}")
        elif (m := re.match(r"\s*(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)) and m.group(1) in defaults:
            print(f"  {f'--{m.group(1)}={defaults[m.group(1)]}':<30} {m.group(2) or ''}")


def _convert(name, kind, text):
    """The command-line string `text` as the type of field `name` (ValueError naming the key)."""
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    try:
        if kind is bool:
            return words[text.lower()]
        return tuple(float(t) for t in text.split(",")) if getattr(kind, "__origin__", None) is tuple else kind(text)
    except (KeyError, ValueError):
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, str(kind))
        raise ValueError(f"--{name} expects {expected}, got {text!r}") from None


def parse_config(Config, argv=None):
    """Build a Config from `--key=value` arguments (`python simclr.py --batch_size=256 --lr=0.3`).

    `--help` lists every field with its default and comment. An unknown key, a value of the wrong
    type or an impossible value (checked by the Config's __post_init__) prints one message and
    exits with status 2 before any work. It also makes RunError print as one line, not a traceback.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        _help(Config)
        sys.exit(0)
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    overrides = {}
    try:
        for arg in argv:
            key, eq, text = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                raise ValueError(f"unknown option {arg!r}" + (f" (did you mean --{close[0]}?)" if close else "") +
                                 "; --help lists them all")
            if not eq and fields[key] is not bool:
                raise ValueError(f"--{key} needs a value: --{key}=...")
            overrides[key] = _convert(key, fields[key], text) if eq else True
        cfg = Config(**overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    def excepthook(kind, value, tb):  # the user's mistakes read as one line, bugs keep their traceback
        if issubclass(kind, RunError):
            print(f"error: {value}", file=sys.stderr)
        else:
            sys.__excepthook__(kind, value, tb)

    sys.excepthook = excepthook
    return cfg


def check_config(cfg, archs=ARCHS):
    """Check the fields every method shares; raise ValueError naming the key. Called by __post_init__."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    checks = [
        ("dataset", cfg.dataset in DATASETS, f"one of {', '.join(DATASETS)}"),
        ("arch", cfg.arch in archs, f"one of {', '.join(archs)}"),
        ("batch_size", cfg.batch_size >= 1, "at least 1"),
        ("batch_size", cfg.batch_size % world == 0, f"divisible by the {world} processes torchrun started"),
        ("epochs", cfg.epochs >= 1, "at least 1"),
        ("max_steps", cfg.max_steps >= 0, "0 (no limit) or more"),
        ("subset", cfg.subset >= 0, "0 (all images) or more"),
        ("lr", cfg.lr > 0, "positive"),
        ("weight_decay", cfg.weight_decay >= 0, "0 or more"),
        ("warmup_epochs", cfg.warmup_epochs >= 0, "0 or more"),
        ("image_size", cfg.image_size >= 8, "at least 8"),
        ("device", cfg.device in ("auto", "cuda", "cpu"), "auto, cuda or cpu"),
        ("device", cfg.device != "cuda" or torch.cuda.is_available(), "auto or cpu: no CUDA GPU is visible"),
        ("dtype", cfg.dtype in ("auto", "bfloat16", "float32"), "auto, bfloat16 or float32"),
        ("compile", cfg.compile.lower() in ("auto", "true", "false"), "auto, true or false"),
        ("eval_every", cfg.eval_every >= 0, "0 (only at the end) or more"),
        ("probe_epochs", cfg.probe_epochs >= 0, "0 (no linear probe) or more"),
        ("log_every", cfg.log_every >= 1, "at least 1"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ValueError(f"--{key}={getattr(cfg, key)} is impossible: it must be {expected}")


# -------------------------------------------------------------------------------------------------
# processes: one code path for `python x.py` and `torchrun x.py`


@dataclasses.dataclass
class Runtime:
    rank: int  # this process among all (0 when not distributed)
    world_size: int  # number of processes
    device: torch.device
    dtype: torch.dtype  # autocast dtype (float32 = autocast off)
    compile: bool

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def print0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


_owned_group = []  # the process group setup() made, if any


def setup(cfg):
    """torchrun env vars -> process group (NCCL on CUDA, gloo on CPU); device, precision, seed, out_dir."""
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in [("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)])
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():  # long timeout: rank 0 writes checkpoints and PNGs
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
        _owned_group.append(dist.group.WORLD)  # cleanup() destroys it; a group the caller made stays
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(cfg.dtype, torch.bfloat16 if cuda else torch.float32)
    rt = Runtime(rank, world, device, dtype, cfg.compile.lower() == "true" or (cfg.compile == "auto" and cuda))
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    if rt.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        script = sys.modules[type(cfg).__module__].__file__
        shutil.copy(script, os.path.join(cfg.out_dir, os.path.basename(script)))  # the run folder reproduces itself
    bn = "SyncBatchNorm" if world > 1 and cuda else "per-process BatchNorm statistics (SyncBatchNorm needs CUDA)"
    print0(f"{world} process(es) on {device.type} | {str(dtype)[6:]} | compile {rt.compile} | "
           f"batch {cfg.batch_size} = {world} x {cfg.batch_size // world}" + (f" | {bn}" if world > 1 else ""))
    return rt


def cleanup():
    """Destroy the process group if setup() made it. A caller that runs several trainings in one
    launch makes the group itself, once: gloo cannot be set up twice from torchrun's store."""
    if _owned_group and dist.is_initialized():
        dist.destroy_process_group()
    _owned_group.clear()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process's loss depends on this slice: sum their gradients
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _distributed():
    return dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x):
    """(B, ...) on each process -> (world*B, ...) in rank order on every process; identity on one.

    Backward gives this process's slice the SUM over processes of the gradients that reach it, so
    that after DDP's averaging the gradient equals the one-process gradient on the global batch.
    """
    return _GatherWithGrad.apply(x) if _distributed() else x


def all_reduce_sum(x):
    """Sum of x over processes, on every process; backward sums gradients likewise. Identity on one."""
    return _AllReduceSum.apply(x) if _distributed() else x


def sync_batchnorm(model, rt):
    """BatchNorm -> SyncBatchNorm when several CUDA processes share the batch (SyncBN refuses CPU)."""
    if rt.world_size > 1 and rt.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def compile_and_ddp(raw_model, rt):
    """torch.compile (if on), then DistributedDataParallel (if several processes). Save raw_model."""
    model = torch.compile(raw_model) if rt.compile else raw_model
    if rt.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return model


# -------------------------------------------------------------------------------------------------
# data: uint8 (B, 3, H, W) images; small sets live on the device, folders stream through a loader


@functools.lru_cache(maxsize=4)  # tests build many runs in one process; the tensors are never modified
def make_synthetic(n, size=32, seed=0):
    """n labelled images (uint8 (n,3,size,size), int64 (n,)) with real class structure, in seconds.

    10 classes = 5 shapes (disk, square, triangle, ring, cross) x 2 fills (plain, striped), each
    under a random foreground and background colour, position, scale, tilt, stripe frequency and
    orientation, background gradient and pixel noise. Colour carries no class information. As in
    photographs, shapes stand upright (tilted by at most 1/4 radian) and scenes are lit from above
    (brighter at the top), so that predicting rotations has something to learn.
    """
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    y = torch.randint(0, 10, (n,), generator=g)
    striped = (y >= 5)[:, None, None]
    coords = (torch.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    yy, xx = coords.view(1, -1, 1), coords.view(1, 1, -1)
    cy, cx, scale, angle = (u(n, 1, 1) - 0.5) * 0.8, (u(n, 1, 1) - 0.5) * 0.8, 0.35 + 0.3 * u(n, 1, 1), (u(n, 1, 1) - 0.5) / 2
    dy, dx = (yy - cy) / scale, (xx - cx) / scale
    a, b = dx * angle.cos() + dy * angle.sin(), -dx * angle.sin() + dy * angle.cos()  # rotated shape frame
    r = (a**2 + b**2).sqrt()
    masks = torch.stack([
        r < 1,
        torch.maximum(a.abs(), b.abs()) < 0.8,
        (b > -0.5) & (b < 1 - 1.732 * a.abs()),
        (r > 0.55) & (r < 1),
        ((a.abs() < 0.3) & (b.abs() < 1)) | ((b.abs() < 0.3) & (a.abs() < 1)),
    ], 1)  # (n, 5, H, W)
    inside = masks[torch.arange(n), y % 5]  # (n, H, W): the class's shape
    phase = u(n, 1, 1) * math.pi
    stripes = torch.sin((a * phase.cos() + b * phase.sin()) * (6 + 6 * u(n, 1, 1)) + u(n, 1, 1) * 6.3) > 0
    fg, fg2, bg, bg2 = (u(n, 3, 1, 1) for _ in range(4))
    fill = torch.where((striped & stripes)[:, None], 0.3 * fg2 + 0.7 * (1 - fg), fg)
    t = ((xx * (u(n, 1, 1) - 0.5) + yy * (u(n, 1, 1) - 0.5)) + 0.5).clamp(0, 1)[:, None]
    back = bg * (1 - t) + bg2 * t
    light = 1.15 - 0.15 * (yy + 1)  # lit from above, as scenes in photographs are: 1.15 at the top, 0.85 at the bottom
    img = torch.where(inside[:, None], fill, back) * light + 0.04 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y


def _download(name, root):
    """Fetch a small dataset through torchvision into root; return the arrays of its .npz file."""
    if name == "stl10":
        sets = {s: torchvision.datasets.STL10(root, split=s, download=True) for s in ("train", "test", "unlabeled")}
        hwc = {s: d.data.transpose(0, 2, 3, 1) for s, d in sets.items()}
        return dict(x_train=hwc["train"], y_train=sets["train"].labels, x_test=hwc["test"],
                    y_test=sets["test"].labels, x_unlabeled=hwc["unlabeled"], classes=np.array(sets["train"].classes))
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    tr, te = cls(root, train=True, download=True), cls(root, train=False, download=True)
    return dict(x_train=tr.data, y_train=np.array(tr.targets), x_test=te.data, y_test=np.array(te.targets),
                classes=np.array(tr.classes))


CLASS_NAMES = {
    "cifar10": "airplane automobile bird cat deer dog frog horse ship truck".split(),
    "stl10": "airplane bird car cat deer dog horse monkey ship truck".split(),
    "synthetic": [f"{fill} {shape}" for fill in ("plain", "striped") for shape in ("disk", "square", "triangle", "ring", "cross")],
}


def _load_arrays(name, root, rt):
    """x_train, y_train, x_test, y_test (+ x_unlabeled) as numpy arrays, from root/<name>.npz."""
    path = os.path.join(root, f"{name}.npz")
    if not os.path.exists(path) and rt.is_main:
        try:
            arrays = _download(name, root)
        except Exception as e:  # offline, blocked, disk full: one clear message, never a silent switch
            raise RunError(f"{name} is not in {os.path.abspath(root)} and could not be downloaded ({type(e).__name__}: "
                           f"{str(e)[:200]}). Put {name}.npz (keys x_train, y_train, x_test, y_test; uint8 HWC images) "
                           f"there, point --data_dir or SSL_DATA at its folder, or run offline with --dataset=synthetic."
                           ) from None
        np.savez(path[:-4] + ".tmp.npz", **arrays)
        os.replace(path[:-4] + ".tmp.npz", path)
    if dist.is_initialized():
        dist.barrier()  # the others wait for rank 0's download
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, KeyError) as e:
        raise RunError(f"cannot read {path} ({e}); delete it to download again") from None


def read_image(path, size):
    """An image file -> uint8 (3, size, size) RGB: shorter side resized to size, centre crop."""
    img = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)
    return TF.center_crop(TF.resize(img, size, antialias=True), size)


class _Folder(torch.utils.data.Dataset):
    """An ImageNet-style tree root/<class>/<image>, decoded to fixed-size uint8 tensors in workers."""

    def __init__(self, root, size):
        self.items = torchvision.datasets.ImageFolder(root, loader=lambda p: p).samples
        self.classes = sorted(os.listdir(root))
        self.labels = torch.tensor([label for _, label in self.items])
        self.size = size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return read_image(self.items[i][0], self.size), self.items[i][1]


class Data:
    """Pretraining images and labelled train/test images of one dataset, as uint8 (B, 3, H, W).

    Small datasets are whole uint8 tensors on the device; folder datasets stream through a
    DataLoader with worker processes. Either way, `steps()` yields each process's slice of a global
    batch drawn from a permutation fixed by (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, name, pretrain, train, test, classes, rt, batch_size, seed):
        self.name, self.classes, self.rt, self.seed = name, classes, rt, seed
        self.pretrain, self.train, self.test = pretrain, train, test  # tensors (x, y) or _Folder
        self.global_batch, self.batch = batch_size, batch_size // rt.world_size
        self.steps_per_epoch = len(self._labels("pretrain")) // batch_size
        if self.steps_per_epoch == 0:
            raise RunError(f"--batch_size={batch_size} is larger than the {len(self._labels('pretrain'))} training images")

    def _labels(self, split):
        s = getattr(self, split)
        return s[1] if isinstance(s, tuple) else s.labels

    def _batches(self, split, index_rows):
        """uint8 images and labels on the device for each row of indices."""
        s = getattr(self, split)
        if isinstance(s, tuple):
            if torch.is_tensor(index_rows):  # a training epoch: one copy to the device, no sync per step
                index_rows = index_rows.to(s[0].device)
            for idx in index_rows:
                yield s[0][idx], s[1][idx]
        else:
            workers = min(8, (os.cpu_count() or 2) // max(1, torch.cuda.device_count()))
            loader = torch.utils.data.DataLoader(s, batch_sampler=[r.tolist() for r in index_rows],
                                                 num_workers=workers, pin_memory=self.rt.device.type == "cuda")
            for x, y in loader:
                yield x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True)

    def steps(self, start, stop):
        """Yield (step, x, y) for steps start..stop-1: this process's part of each global batch.

        Each step also seeds torch's random generators from (seed, rank, step), so the augmentations
        of a resumed run are those the uninterrupted run would have drawn.
        """
        rank, B, GB, n = self.rt.rank, self.batch, self.global_batch, self.steps_per_epoch
        batches = None
        for step in range(start, stop):
            epoch, i = divmod(step, n)
            if batches is None or i == 0:
                perm = torch.randperm(len(self._labels("pretrain")), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
                rows = perm[: n * GB].view(n, GB)[i:, rank * B:(rank + 1) * B]  # global batch -> this rank's slice
                batches = self._batches("pretrain", rows)
            torch.manual_seed((self.seed * 1_000_003 + step) * 1_009 + rank)
            x, y = next(batches)
            yield step, x, y

    def eval_batches(self, split, batch_size):
        """This process's contiguous share of a labelled split, in order (for feature extraction)."""
        n, W = len(self._labels(split)), self.rt.world_size
        share = torch.arange(n).tensor_split(W)[self.rt.rank]
        return self._batches(split, share.split(batch_size))


def load_data(cfg, rt):
    """The dataset named by cfg.dataset as a Data object (prints its sizes)."""
    root = os.environ.get("SSL_DATA", cfg.data_dir) if cfg.data_dir == "./data" else cfg.data_dir
    n = cfg.subset or None
    if cfg.dataset == "folder":
        if not all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
            raise RunError(f"--dataset=folder reads {os.path.abspath(root)}/train/<class>/* and .../val/<class>/*; "
                           "one of them is missing (set --data_dir)")
        pre_size = round(cfg.image_size * 8 / 7)  # the random crops come from a 256 px view of a 224 px run
        pretrain = _Folder(os.path.join(root, "train"), pre_size)
        train, test = _Folder(os.path.join(root, "train"), cfg.image_size), _Folder(os.path.join(root, "val"), cfg.image_size)
        if n:
            for d in (pretrain, train):
                d.items, d.labels = d.items[:n], d.labels[:n]
        data = Data("folder", pretrain, train, test, train.classes, rt, cfg.batch_size, cfg.seed)
    else:
        if cfg.dataset == "synthetic":
            a = dict(zip(("x_train", "y_train"), make_synthetic(10_000, 32, seed=0)))
            a.update(zip(("x_test", "y_test"), make_synthetic(2_000, 32, seed=1)))
        else:
            arrays = _load_arrays(cfg.dataset, root, rt)
            names = [str(c) for c in arrays.pop("classes", [])]  # written by the download; absent in hand-made files
            a = {k: torch.from_numpy(v) for k, v in arrays.items()}
            a = {k: v.permute(0, 3, 1, 2).contiguous() if k.startswith("x") else v.long() for k, v in a.items()}
        dev = rt.device  # small sets live on the device: no loader, no host-device copies per step
        train = (a["x_train"][:n].to(dev), a["y_train"][:n].to(dev))
        test = (a["x_test"].to(dev), a["y_test"].to(dev))
        pretrain = train
        if "x_unlabeled" in a:  # STL-10: pretrain on train + 100k unlabeled, as its SSL protocol does
            x = torch.cat([a["x_train"], a["x_unlabeled"]])[:n].to(dev)
            pretrain = (x, torch.full((len(x),), -1, device=dev))
        classes = CLASS_NAMES.get(cfg.dataset) or names or [str(i) for i in range(int(a["y_train"].max()) + 1)]
        data = Data(cfg.dataset, pretrain, train, test, classes, rt, cfg.batch_size, cfg.seed)
    print0(f"data: {cfg.dataset} | pretrain {len(data._labels('pretrain'))} | train {len(data._labels('train'))} | "
           f"test {len(data._labels('test'))} | {len(data.classes)} classes | {data.steps_per_epoch} steps per epoch")
    return data


# -------------------------------------------------------------------------------------------------
# augmentation on the device, in batch, with random parameters drawn per sample


def to_float(x):
    """uint8 (B,3,H,W) -> float32 in [0, 1]."""
    return x.float() / 255


def _per_sample(x, p):
    """(B,1,1,1) bool: which samples an augmentation applied with probability p touches."""
    return (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p)


def random_resized_crop(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """Crop a random area fraction `scale` and aspect `ratio` of each image, resized to size x size.

    Torchvision's rule, vectorized: draw `tries` (area, aspect) pairs per image, keep the first that
    fits inside the image, else the whole image; bilinear sampling of an affine grid.
    """
    B = x.shape[0]
    area = torch.empty(B, tries, device=x.device).uniform_(*scale)
    logr = torch.empty(B, tries, device=x.device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w, h = (area * logr.exp()).sqrt(), (area / logr.exp()).sqrt()  # fractions of the side
    fits = (w <= 1) & (h <= 1)
    first = fits.int().argmax(1, keepdim=True)
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], 1.0)
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], 1.0)
    cx, cy = (torch.rand(B, device=x.device) * 2 - 1) * (1 - w), (torch.rand(B, device=x.device) * 2 - 1) * (1 - h)
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, (B, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_flip(x, p=0.5):
    """Horizontal flip of each image with probability p."""
    return torch.where(_per_sample(x, p), x.flip(3), x)


def _gray(x):
    """(B,3,H,W) -> (B,1,H,W) luma with torchvision's ITU-R 601 weights."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _adjust_hue(x, shift):
    """Rotate the hue of RGB images in [0,1] by shift (B,1,1,1) of a full turn, in HSV space."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)  # chroma
    inv = 1 / torch.where(c > 0, c, 1.0)
    h = torch.where(v == r, (g - b) * inv, torch.where(v == g, (b - r) * inv + 2, (r - g) * inv + 4))
    h = h + shift * 6  # hue in sixths of a turn
    k = torch.remainder(x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + h, 6)
    return v - c * torch.minimum(k, 4 - k).clamp_(0, 1)  # HSV -> RGB, the three channels at once


def color_jitter(x, brightness, contrast, saturation, hue, p=1.0):
    """Torchvision's ColorJitter with per-image factors and a per-image random order of the four
    adjustments (as the SimCLR and BYOL code), applied to each image with probability p; x in [0,1].

    Speed without changing the distribution: brightness, contrast and saturation are each an affine
    map of the pixel colour, a*x + (1-a)*mean(gray) or a*x + (1-a)*gray, so one batched 3x3 matrix
    product per slot applies whichever of them each image has there; hue, the costly one, is dealt
    to the four slots in equal quarters of the batch, so it runs once per image while each image's
    hue slot is still uniformly random.
    """
    B, dev = x.shape[0], x.device
    u = lambda lo, hi: torch.empty(B, device=dev).uniform_(lo, hi)  # noqa: E731
    on = torch.rand(B, device=dev) < p
    f = torch.stack([u(max(0, 1 - brightness), 1 + brightness), u(max(0, 1 - contrast), 1 + contrast),
                     u(max(0, 1 - saturation), 1 + saturation)], 1).where(on[:, None], 1.0)  # (B, 3)
    shift = u(-hue, hue).where(on, 0.0).view(B, 1, 1, 1)
    deal = torch.randperm(B, device=dev)  # deal[s::4]: the images whose hue adjustment comes in slot s
    hue_slot = torch.empty(B, dtype=torch.long, device=dev).scatter_(0, deal, torch.arange(B, device=dev) % 4)
    others = torch.rand(B, 3, device=dev).argsort(1)  # random order of brightness, contrast, saturation
    luma = x.new_tensor([0.2989, 0.587, 0.114])
    for slot in range(4):
        k = (slot - (slot > hue_slot).long()).clamp(max=2)  # the slots other than the hue slot, in order
        op = torch.where(hue_slot == slot, 3, others.gather(1, k[:, None])[:, 0])  # (B,) 0 b, 1 c, 2 s, 3 hue
        a = f.gather(1, op.clamp(max=2)[:, None])[:, 0].where(op < 3, 1.0)  # (B,)
        to_mean, to_gray = (1 - a) * (op == 1), (1 - a) * (op == 2)
        M = a.view(B, 1, 1) * torch.eye(3, device=dev) + to_gray.view(B, 1, 1) * luma.expand(3, 3)  # (B, 3, 3)
        c = (to_mean * (x.mean((2, 3)) @ luma)).view(B, 1, 1).expand(B, 3, 1)  # (B, 3, 1): contrast's grey level
        x = torch.baddbmm(c, M, x.flatten(2)).view_as(x).clamp_(0, 1)
        idx = deal[slot::4]
        x[idx] = torch.where(on[idx].view(-1, 1, 1, 1), _adjust_hue(x[idx], shift[idx]), x[idx])
    return x


def random_grayscale(x, p):
    """Replace each image by its luma in all three channels with probability p."""
    return torch.where(_per_sample(x, p), _gray(x).expand_as(x), x)


def gaussian_blur(x, p, sigma=(0.1, 2.0), kernel_size=None):
    """Blur each image with probability p by a Gaussian of sigma ~ U(sigma), per sample.

    kernel_size defaults to ~10% of the side (odd), as SimCLR; separable, reflect padding.
    """
    B, C, H, W = x.shape
    k = kernel_size or (H // 10) | 1
    s = torch.empty(B, 1, device=x.device).uniform_(*sigma)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-t**2 / (2 * s**2))
    kern = kern / kern.sum(1, keepdim=True)  # (B, k)
    delta = (t == 0).to(x.dtype).expand(B, k)
    kern = torch.where(_per_sample(x, p).view(B, 1), kern, delta).repeat_interleave(C, 0)  # (B*C, k)
    out = F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
    out = F.conv2d(out, kern.view(B * C, 1, k, 1), groups=B * C)
    out = F.conv2d(out, kern.view(B * C, 1, 1, k), groups=B * C)
    return out.view(B, C, H, W)


def solarize(x, p, threshold=0.5):
    """Invert the pixels at or above threshold, per image with probability p."""
    return torch.where(_per_sample(x, p) & (x >= threshold), 1 - x, x)


def normalize(x, mean=MEAN, std=STD):
    """Standardize channels (x in [0,1])."""
    return (x - x.new_tensor(mean).view(1, -1, 1, 1)) / x.new_tensor(std).view(1, -1, 1, 1)


# -------------------------------------------------------------------------------------------------
# models


def resnet(arch, small_images=True):
    """Backbone without its classifier -> (module: (B,3,H,W) -> (B, width), width).

    resnet18/34/50 are torchvision's; small_images swaps the stem for CIFAR's (3x3 stride-1 conv,
    no max-pool), so the weights load into a torchvision ResNet given the same stem. `tiny` is a
    4-conv trunk for CPU tests and smoke runs.
    """
    if arch == "tiny":
        layers, c_in = [], 3
        for c_out, stride in [(16, 1), (32, 2), (64, 2), (128, 2)]:
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c_in
    net = getattr(torchvision.models, arch)()
    if small_images:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    width, net.fc = net.fc.in_features, nn.Identity()
    return net, width


# -------------------------------------------------------------------------------------------------
# optimization


def param_groups(model, weight_decay):
    """Two groups: weights (decayed) and biases/norm parameters (no decay, no LARS adaptation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-layer lr is scaled by the trust ratio eta*||w|| / ||g + wd*w||
    (You et al. 2017), as in the SimCLR and BYOL code: groups marked lars_exclude (biases, BN) get
    neither weight decay nor adaptation, and the lr enters the momentum buffer ("classic" momentum).
    With clip, a layer's lr is min(eta*||w|| / ||g + wd*w||, lr): the lr caps the adapted rate
    instead of multiplying it (LARC's clip mode, used by solo-learn's CIFAR recipes with eta 0.02)."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, clip=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"])
                layer_lr = g["lr"]
                if not g["lars_exclude"]:
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, 1.0)
                    layer_lr = trust.clamp(max=g["lr"]) if g["clip"] else g["lr"] * trust
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d * layer_lr)
                p.sub_(buf)


def cosine_lr(step, total_steps, warmup_steps, base_lr, final_lr=0.0):
    """Linear warmup over warmup_steps to base_lr, then half a cosine down to final_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def set_lr(opt, lr):
    """Set every group's lr (a group may hold a fixed_lr of its own, as SimSiam's predictor)."""
    for g in opt.param_groups:
        g["lr"] = g.get("fixed_lr", lr)


@torch.no_grad()
def ema_update(target, online, momentum):
    """target <- momentum * target + (1 - momentum) * online, for parameters (buffers stay its own)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - momentum)


# -------------------------------------------------------------------------------------------------
# evaluation on frozen features


@torch.no_grad()
def extract_features(features, data, split, rt, flip=False, batch_size=512):
    """features(uint8 batch) -> (B, D) over a whole split, shared out over processes and gathered.

    Returns float32 (N, D) features and (N,) labels on every process; with flip, also the features
    of the horizontally flipped images (2N rows: originals first).
    """
    out = []
    for x, _ in data.eval_batches(split, batch_size):
        with rt.autocast():
            out.append(torch.stack([features(x)] + ([features(x.flip(3))] if flip else [])).float())
    feats = torch.cat(out, 1)  # (1 or 2, this process's share, D)
    labels = data._labels(split).to(feats.device)
    if _distributed():  # all_gather wants equal sizes: pad every share to the first (largest), trim after
        sizes = [len(s) for s in torch.arange(len(labels)).tensor_split(rt.world_size)]
        parts = [feats.new_empty(feats.shape[0], sizes[0], feats.shape[2]) for _ in sizes]
        dist.all_gather(parts, F.pad(feats, (0, 0, 0, sizes[0] - feats.shape[1])))
        feats = torch.cat([p[:, :k] for p, k in zip(parts, sizes)], 1)
    return feats.flatten(0, 1), labels.repeat(2 if flip else 1)


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=200, temperature=0.1):
    """Weighted kNN top-1 (Wu et al. 2018): each of the k most cosine-similar train samples votes
    for its class with weight exp(cos / temperature)."""
    train_feats, test_feats = F.normalize(train_feats.float(), dim=1), F.normalize(test_feats.float(), dim=1)
    n_classes, k = int(train_labels.max()) + 1, min(k, len(train_labels))
    correct = 0
    for feats, labels in zip(test_feats.split(1024), test_labels.split(1024)):
        sim, idx = (feats @ train_feats.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(feats), n_classes, device=feats.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == labels).sum().item()
    return correct / len(test_labels)


def linear_probe(train_feats, train_labels, test_feats, test_labels, epochs=100, batch_size=256, lr=1e-2,
                 weight_decay=1e-4, seed=0):
    """Top-1 of a linear classifier trained on frozen features (AdamW, cosine lr).

    Features are standardized with the training set's mean and std first (a BatchNorm without
    affine, as MAE's probe), so one lr suits every method.
    """
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    xtr, xte = (train_feats - mean) / std, (test_feats - mean) / std
    torch.manual_seed(seed)
    with torch.enable_grad():
        clf = nn.Linear(xtr.shape[1], int(train_labels.max()) + 1).to(xtr.device)
        opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = max(1, len(xtr) // batch_size)
        for step in range(epochs * steps_per_epoch):
            if step % steps_per_epoch == 0:
                perm = torch.randperm(len(xtr), device=xtr.device)
            idx = perm[(step % steps_per_epoch) * batch_size:][:batch_size]
            set_lr(opt, cosine_lr(step, epochs * steps_per_epoch, 0, lr))
            loss = F.cross_entropy(clf(xtr[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (clf(xte).argmax(1) == test_labels).float().mean().item()


def evaluate(model, features, data, rt, probe_epochs=0):
    """kNN top-1 and (if probe_epochs) linear-probe top-1 of features(uint8 batch) -> (B, D).

    The probe trains on the un-augmented training images plus their horizontal flips.
    """
    model.eval()
    train, train_y = extract_features(features, data, "train", rt, flip=probe_epochs > 0)
    test, test_y = extract_features(features, data, "test", rt)
    model.train()
    n = len(train) // (2 if probe_epochs > 0 else 1)
    knn = knn_accuracy(train[:n], train_y[:n], test, test_y)
    linear = linear_probe(train, train_y, test, test_y, epochs=probe_epochs) if probe_epochs > 0 else None
    return {"knn_top1": knn, "linear_top1": linear}


# -------------------------------------------------------------------------------------------------
# bookkeeping: progress, checkpoints, results


class Logger:
    """Progress line + out_dir/log.jsonl every log_every steps and at each epoch's end, with images/s
    and ETA; stops the run on a NaN/inf loss. Metrics stay on the device between log steps."""

    def __init__(self, cfg, rt, steps_per_epoch, start_step, stop_step):
        self.cfg, self.rt, self.spe, self.stop = cfg, rt, steps_per_epoch, stop_step
        self.path = os.path.join(cfg.out_dir, "log.jsonl")
        self.first_bad = torch.tensor(-1, device=rt.device)  # first step whose loss was not finite
        self.t_last, self.step_last, self.start = time.time(), start_step, start_step
        self.train_seconds = 0.0  # time spent in training steps (evaluation and checkpoints excluded)

    def step(self, step, **metrics):
        """Call once per step with the loss (a device tensor) and other metrics (tensors or floats)."""
        bad = ~torch.isfinite(metrics["loss"].detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        if (step + 1) % self.cfg.log_every and (step + 1) % self.spe and step + 1 != self.stop:
            return
        self.check()
        now = time.time()
        dt, ds = now - self.t_last, step + 1 - self.step_last
        self.t_last, self.step_last, self.train_seconds = now, step + 1, self.train_seconds + dt
        eta = (self.stop - step - 1) * dt / max(ds, 1)
        rec = {"step": step + 1, "epoch": round((step + 1) / self.spe, 3), **{k: float(v.detach() if torch.is_tensor(v) else v) for k, v in metrics.items()},
               "images_per_second": round(ds * self.cfg.batch_size / max(dt, 1e-9), 1), "eta_seconds": round(eta)}
        self.write(rec, f"step {step + 1}/{self.stop} | epoch {rec['epoch']:.2f} | " +
                   " | ".join(f"{k} {rec[k]:.4g}" for k in metrics) +
                   f" | {rec['images_per_second']:.0f} img/s | ETA {timedelta(seconds=round(eta))}")

    def images_per_second(self):
        return (self.step_last - self.start) * self.cfg.batch_size / max(self.train_seconds, 1e-9)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints) does not count as training time."""
        yield
        self.t_last = time.time()

    def check(self):
        """Raise RunError if any process has seen a NaN/inf loss (all processes stop together)."""
        bad = self.first_bad.clone()
        if _distributed():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() >= 0:
            raise RunError(f"loss is NaN or infinite at step {bad.item() + 1}; stopped. The last good checkpoint "
                           f"is {os.path.join(self.cfg.out_dir, 'ckpt.pt')} (if one was written): lower --lr or check the data.")

    def write(self, record, line=None):
        """Append a record to log.jsonl and print a line (main process only)."""
        if self.rt.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(line or " | ".join(f"{k} {v}" for k, v in record.items()), flush=True)


def save_checkpoint(path, state, rt):
    """Atomic write (temp file, then rename) by the main process; plain types only (weights_only loads)."""
    if rt.is_main:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)


RESUME_MAY_CHANGE = ("resume", "max_steps", "log_every", "eval_every", "probe_epochs", "out_dir", "data_dir",
                     "device", "dtype", "compile")


def load_checkpoint(cfg, rt):
    """The state saved in out_dir/ckpt.pt if cfg.resume (None otherwise or when there is none yet).

    A run resumes only with the settings it started with (but those in RESUME_MAY_CHANGE).
    """
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.resume:
        return None
    if not os.path.exists(path):
        print0(f"resume: no checkpoint at {path} yet, starting from scratch")
        return None
    try:
        state = torch.load(path, map_location=rt.device, weights_only=True)
    except Exception as e:
        raise RunError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
                       "delete it or run without --resume") from None
    changed = [k for k, v in dataclasses.asdict(cfg).items()
               if k not in RESUME_MAY_CHANGE and state["config"].get(k) != (list(v) if isinstance(v, tuple) else v)]
    if changed:
        saved = ", ".join(f"{k}={state['config'].get(k)}" for k in changed)
        raise RunError(f"--resume with other settings than the checkpoint's ({saved}); resume with those")
    print0(f"resume: step {state['step']} from {path}")
    return state


def write_results(results, cfg, rt):
    """Write results.json (main process) and print it."""
    if rt.is_main:
        with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    print0("results: " + json.dumps(results))


def save_image_grid(rows, path, pad=2):
    """Save image rows (each (N,3,H,W) float in [0,1], all the same N) as one PNG grid, a row each."""
    grid = torchvision.utils.make_grid(torch.cat([r.detach().float().cpu() for r in rows]), nrow=len(rows[0]),
                                       padding=pad, pad_value=1.0)
    torchvision.io.write_png((grid.clamp(0, 1) * 255).round().to(torch.uint8), path)


# -------------------------------------------------------------------------------------------------
# colour: sRGB (D65) <-> CIE Lab

_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def rgb_to_lab(x):
    """(B,3,H,W) sRGB in [0,1] -> CIE Lab, L in [0,100], a and b roughly in [-128, 127]."""
    x = x.float().clamp(0, 1)
    lin = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)  # undo the sRGB gamma
    xyz = torch.einsum("ij,bjhw->bihw", x.new_tensor(_RGB_TO_XYZ), lin) / x.new_tensor(_WHITE_D65).view(1, 3, 1, 1)
    d = 6 / 29
    f = torch.where(xyz > d**3, xyz.clamp(min=d**3) ** (1 / 3), xyz / (3 * d**2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def lab_to_rgb(lab, clamp=True):
    """CIE Lab (B,3,H,W) -> sRGB; clamped to [0,1] unless clamp=False (to see what is out of gamut)."""
    lab = lab.float()
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], 1)
    d = 6 / 29
    xyz = torch.where(f > d, f**3, 3 * d**2 * (f - 4 / 29)) * lab.new_tensor(_WHITE_D65).view(1, 3, 1, 1)
    lin = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(lab.new_tensor(_RGB_TO_XYZ)), xyz)
    rgb = torch.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)
    return rgb.clamp(0, 1) if clamp else rgb
