"""Small, method-agnostic utilities shared by every nanossl method file: config, processes (torchrun
or one), data as uint8 tensors, batched augmentation on the device, backbones, LARS and schedules,
the three evaluations, progress, checkpoints, sRGB <-> Lab. Nothing here is a self-supervised method:
heads, losses, views and training steps live in the method files, which read without this one.
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
PROGRESS_SECONDS = 30  # a progress line at least this often, in training and in evaluations

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

def parse_config(Config, argv=None):
    """A Config from `--key=value` arguments; `--help` lists every field with its default and comment.
    An unknown key, a wrong type or an impossible value (the Config's __post_init__ checks) prints one
    message and exits with status 2 before any work; a RunError later prints as one line."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        _help(Config)
        sys.exit(0)
    fields, overrides = {f.name: f.type for f in dataclasses.fields(Config)}, {}
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    try:
        for arg in argv:
            key, eq, text = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean --{close[0]}?)" if close else ""
                raise ValueError(f"unknown option {arg!r}{hint}; --help lists them all")
            kind = fields[key]
            if not eq and kind is not bool:
                raise ValueError(f"--{key} needs a value: --{key}=...")
            try:
                overrides[key] = (words[text.lower()] if eq else True) if kind is bool else kind(text)
            except (KeyError, ValueError):
                expected = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, kind)
                raise ValueError(f"--{key} expects {expected}, got {text!r}") from None
        cfg = Config(**overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    hook = sys.excepthook  # the user's mistakes read as one line, bugs keep their traceback
    sys.excepthook = lambda kind, e, tb: print(f"error: {e}", file=sys.stderr) if kind == RunError else hook(
        kind, e, tb)
    return cfg

def check_config(cfg, archs=ARCHS):
    """Check the fields every method shares; raise ValueError naming the key. Called by __post_init__."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    for key, ok, expected in [
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
        ("probe_epochs", cfg.probe_epochs >= 0, "0 (no fast probe) or more"),
        ("linear_epochs", cfg.linear_epochs >= -1, "-1 (100 on CUDA, none on the CPU), 0 (none) or more"),
        ("log_every", cfg.log_every >= 1, "at least 1"),
    ]:
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

    is_main = property(lambda self: self.rank == 0)  # the process that logs, evaluates and writes

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

def print0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)

_owned_group = []  # the process group setup() made, if any

def setup(cfg):
    """torchrun env vars -> process group (NCCL on CUDA, gloo on CPU); device, precision, seed, out_dir."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # this process's GPU on its machine
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not cuda and cfg.arch != "tiny":
        print0(f"note: a GPU recipe ({cfg.arch}, batch {cfg.batch_size}, {cfg.epochs} epochs) is running on the CPU, "
               "no CUDA device being visible; it goes on, and after its first step says how long it would take")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():  # long timeout: rank 0 writes checkpoints and PNGs
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
        _owned_group.append(dist.group.WORLD)  # cleanup() destroys it; a group the caller made stays
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "auto": torch.bfloat16 if cuda else torch.float32}
    compile_on = cfg.compile.lower() == "true" or (cfg.compile.lower() == "auto" and cuda)
    rt = Runtime(rank, world, device, dtype[cfg.dtype], compile_on)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    if rt.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        script = sys.modules[type(cfg).__module__].__file__
        shutil.copy(script, os.path.join(cfg.out_dir, os.path.basename(script)))  # the run folder reproduces itself
    bn = " | SyncBatchNorm" if cuda else " | per-process BatchNorm statistics (SyncBatchNorm needs CUDA)"
    print0(f"{world} process(es) on {device.type} | {str(rt.dtype)[6:]} | compile {rt.compile} | "
           f"batch {cfg.batch_size} = {world} x {cfg.batch_size // world}" + (bn if world > 1 else ""))
    return rt

def cleanup():
    """Destroy the process group if setup() made it (a caller running several trainings in one launch
    makes the group itself, once: gloo cannot be set up twice from torchrun's store)."""
    if _owned_group and dist.is_initialized():
        dist.barrier()  # nobody leaves while another still talks to it (gloo aborts at exit otherwise)
        dist.destroy_process_group()
    _owned_group.clear()

def _distributed():
    return dist.is_initialized() and dist.get_world_size() > 1

@torch.no_grad()
def all_gather(x):
    """(B, ...) on each process -> (world*B, ...), every process's rows in rank order; no gradient. Identity on one."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)

class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce writes in place: autograd may share grad with other branches
        dist.all_reduce(grad)  # every process's loss depends on this slice: sum their gradients
        return grad.chunk(dist.get_world_size())[dist.get_rank()]

class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    backward = forward  # the gradient of a sum over processes: the sum of their gradients

def gather_with_grad(x):
    """(B, ...) on each process -> (world*B, ...) in rank order on every process; identity on one.
    Backward gives this process's slice the SUM over processes of the gradients that reach it, so
    that after DDP's averaging the gradient equals the one-process gradient on the global batch."""
    return _GatherWithGrad.apply(x) if _distributed() else x

def all_reduce_sum(x):
    """Sum of x over processes, on every process; backward sums gradients likewise. Identity on one."""
    return _AllReduceSum.apply(x) if _distributed() else x

def sync_batchnorm(model, rt):
    """BatchNorm -> SyncBatchNorm when several CUDA processes share the batch (SyncBN refuses CPU)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if rt.world_size > 1 and rt.device.type == "cuda" else model

def compile_and_ddp(raw_model, rt):
    """torch.compile (if on), then DistributedDataParallel (if several processes). Save raw_model."""
    model = torch.compile(raw_model) if rt.compile else raw_model
    if rt.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
    return model

# -------------------------------------------------------------------------------------------------
# data: uint8 (B, 3, H, W) images; small sets live on the device, folders stream through a loader

@functools.lru_cache(maxsize=4)  # tests build many runs in one process; the tensors are never modified
def make_synthetic(n, size=32, seed=0):
    """n labelled images (uint8 (n,3,size,size), int64 (n,)) with real class structure, in seconds:
    10 classes = 5 shapes (disk, square, triangle, ring, cross) x 2 fills (plain, striped), under a
    random colour (no class information), position, scale, tilt, stripe frequency, background
    gradient and noise. As in photographs, shapes stand upright (tilted by at most 1/4 radian) and
    scenes are lit from above, so that predicting rotations has something to learn."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    y = torch.randint(0, 10, (n,), generator=g)
    coords = (torch.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    yy, xx = coords.view(1, -1, 1), coords.view(1, 1, -1)
    cy, cx, scale, angle = (u(n, 1, 1) - 0.5) * 0.8, (u(n, 1, 1) - 0.5) * 0.8, 0.35 + 0.3 * u(n, 1, 1), u(n, 1, 1)
    dy, dx, angle = (yy - cy) / scale, (xx - cx) / scale, (angle - 0.5) / 2
    a, b = dx * angle.cos() + dy * angle.sin(), -dx * angle.sin() + dy * angle.cos()  # rotated shape frame
    r = (a**2 + b**2).sqrt()
    cross = ((a.abs() < 0.3) & (b.abs() < 1)) | ((b.abs() < 0.3) & (a.abs() < 1))
    masks = torch.stack([r < 1, torch.maximum(a.abs(), b.abs()) < 0.8, (b > -0.5) & (b < 1 - 1.732 * a.abs()),
                         (r > 0.55) & (r < 1), cross], 1)  # (n, 5, H, W): disk, square, triangle, ring, cross
    inside = masks[torch.arange(n), y % 5][:, None]  # (n, 1, H, W): the class's shape
    phase = u(n, 1, 1) * math.pi
    stripes = torch.sin((a * phase.cos() + b * phase.sin()) * (6 + 6 * u(n, 1, 1)) + u(n, 1, 1) * 6.3) > 0
    fg, fg2, bg, bg2 = (u(n, 3, 1, 1) for _ in range(4))
    fill = torch.where(((y >= 5)[:, None, None] & stripes)[:, None], 0.3 * fg2 + 0.7 * (1 - fg), fg)
    t = ((xx * (u(n, 1, 1) - 0.5) + yy * (u(n, 1, 1) - 0.5)) + 0.5).clamp(0, 1)[:, None]
    light = 1.15 - 0.15 * (yy + 1)  # lit from above: 1.15 at the top, 0.85 at the bottom
    img = torch.where(inside, fill, bg * (1 - t) + bg2 * t) * light + 0.04 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y

CLASS_NAMES = {
    "cifar10": "airplane automobile bird cat deer dog frog horse ship truck".split(),
    "stl10": "airplane bird car cat deer dog horse monkey ship truck".split(),
    "synthetic": [f"{f} {s}" for f in ("plain", "striped") for s in ("disk", "square", "triangle", "ring", "cross")],
}

def _download(name, root):
    """Fetch a small dataset through torchvision into root; return the arrays of its .npz file."""
    if name == "stl10":
        sets = {s: torchvision.datasets.STL10(root, split=s, download=True) for s in ("train", "test", "unlabeled")}
        x = {s: d.data.transpose(0, 2, 3, 1) for s, d in sets.items()}
        return dict(x_train=x["train"], y_train=sets["train"].labels, x_test=x["test"], y_test=sets["test"].labels,
                    x_unlabeled=x["unlabeled"], classes=np.array(sets["train"].classes))
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    tr, te = cls(root, train=True, download=True), cls(root, train=False, download=True)
    return dict(x_train=tr.data, y_train=np.array(tr.targets), x_test=te.data, y_test=np.array(te.targets),
                classes=np.array(tr.classes))

def _load_arrays(name, root, rt):
    """The arrays of root/<name>.npz (x_train, y_train, x_test, y_test, maybe x_unlabeled, classes)."""
    path = os.path.join(root, f"{name}.npz")
    if not os.path.exists(path) and rt.is_main:
        try:
            arrays = _download(name, root)
        except Exception as e:  # offline, blocked, disk full: one clear message, never a silent switch
            raise RunError(f"{name} is not in {os.path.abspath(root)} and could not be downloaded ({type(e).__name__}: "
                           f"{str(e)[:200]}). Put {name}.npz (keys x_train, y_train, x_test, y_test; uint8 HWC images) "
                           "there, point --data_dir or SSL_DATA at it, or run with --dataset=synthetic.") from None
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
    """An ImageNet-style tree root/<class>/<image>, decoded to fixed-size uint8 tensors in workers;
    with subset, a random `subset` of its images drawn with `seed` (the same on every process)."""

    def __init__(self, root, size, subset=0, seed=0):
        try:
            tree = torchvision.datasets.ImageFolder(root, loader=str)
        except (FileNotFoundError, OSError) as e:  # no class folder, or a class folder with no image
            raise RunError(f"--dataset=folder: {root}: {e}") from None
        self.classes, self.items, self.size = tree.classes, tree.samples, size  # classes: the sub-folders, sorted
        if subset:  # the images come class by class: the first N would hold a few classes only
            pick = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(seed))[:subset]
            self.items = [self.items[i] for i in pick.sort().values]
        self.labels = torch.tensor([label for _, label in self.items])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return read_image(self.items[i][0], self.size), self.items[i][1]

class Data:
    """Pretraining images and labelled train/test images of one dataset, as uint8 (B, 3, H, W): whole
    tensors on the device (small sets) or datasets with .labels streamed by a DataLoader (folders).
    steps() yields each process's slice of a global batch drawn from a permutation fixed by (seed,
    epoch), so a resumed run sees the same batches."""

    def __init__(self, name, pretrain, train, test, classes, rt, batch_size, seed):
        self.name, self.classes, self.rt, self.seed = name, classes, rt, seed
        self.pretrain, self.train, self.test = pretrain, train, test  # (x, y) tensors or datasets
        self.global_batch, self.batch = batch_size, batch_size // rt.world_size
        self.steps_per_epoch = len(self.labels("pretrain")) // batch_size
        if self.steps_per_epoch == 0:
            raise RunError(f"--batch_size={batch_size} is larger than the {len(self.labels('pretrain'))} images")

    def labels(self, split):
        s = getattr(self, split)
        return s[1] if isinstance(s, tuple) else s.labels

    def batches(self, split, index_rows, seed=0):
        """uint8 images and labels on the device for each row of indices."""
        s = getattr(self, split)
        if isinstance(s, tuple):  # tensors on the device: index them (one copy of a tensor of rows)
            for i in index_rows.to(s[0].device) if torch.is_tensor(index_rows) else index_rows:
                yield s[0][i], s[1][i]
            return
        loader = torch.utils.data.DataLoader(  # its own generator: the global random state stays untouched
            s, batch_sampler=[r.tolist() for r in index_rows], generator=torch.Generator().manual_seed(seed),
            num_workers=min(8, (os.cpu_count() or 2) // max(1, torch.cuda.device_count())),
            pin_memory=self.rt.device.type == "cuda")
        yield from ((x.to(self.rt.device, non_blocking=True), y.to(self.rt.device)) for x, y in loader)

    def epoch_rows(self, split, epoch, batch_size):
        """This process's slice of each global batch of an epoch: (steps, batch_size / world) indices."""
        n, W, r = len(self.labels(split)), self.rt.world_size, self.rt.rank
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        rows = perm[: n // batch_size * batch_size].view(-1, batch_size)  # (steps, batch_size): the global batches
        return rows[:, r * batch_size // W:(r + 1) * batch_size // W]

    def steps(self, start, stop):
        """(step, x, y) for steps start..stop-1, x this process's part of the global batch. Each step
        seeds torch's generators from (seed, step, rank): a resumed run draws what the whole run drew."""
        batches = None
        for step in range(start, stop):
            epoch, i = divmod(step, self.steps_per_epoch)
            if batches is None or i == 0:
                batches = self.batches("pretrain", self.epoch_rows("pretrain", epoch, self.global_batch)[i:], epoch)
            torch.manual_seed((self.seed * 1_000_003 + step) * 1_009 + self.rt.rank)
            yield (step, *next(batches))

    def eval_batches(self, split, batch_size, rows=None):
        """This process's contiguous share of a split (or of its images `rows`), in order (for feature extraction)."""
        rows = torch.arange(len(self.labels(split))) if rows is None else rows
        share = rows.tensor_split(self.rt.world_size)[self.rt.rank]
        return self.batches(split, share.split(batch_size))

def load_data(cfg, rt):
    """The dataset cfg.dataset as a Data object (prints its sizes). subset=N trains on N images: the
    first N of an .npz set (whose order is mixed), a random N of a folder (drawn with cfg.seed)."""
    root = os.environ.get("SSL_DATA", cfg.data_dir) if cfg.data_dir == "./data" else cfg.data_dir
    if cfg.dataset == "folder":
        train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
        if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
            raise RunError(f"--dataset=folder reads {os.path.abspath(root)}/train/<class>/* and .../val/<class>/*; "
                           "one of them is missing (set --data_dir)")
        pretrain = _Folder(train_dir, round(cfg.image_size * 8 / 7), cfg.subset, cfg.seed)  # room for random crops
        train, test = _Folder(train_dir, cfg.image_size, cfg.subset, cfg.seed), _Folder(val_dir, cfg.image_size)
        if train.classes != test.classes:
            only = lambda a, b: ", ".join(sorted(set(a.classes) - set(b.classes))[:5]) or "none"  # noqa: E731
            raise RunError(f"{train_dir} and {val_dir} hold different class folders (only in train: "
                           f"{only(train, test)}; only in val: {only(test, train)}): their labels would not match")
        classes = train.classes
    else:
        names, splits = [], ("x_train", "y_train", "x_test", "y_test")
        if cfg.dataset == "synthetic":
            a = dict(zip(splits, make_synthetic(10_000, 32, seed=0) + make_synthetic(2_000, 32, seed=1)))
        else:
            arrays = _load_arrays(cfg.dataset, root, rt)
            names = [str(c) for c in arrays.pop("classes", [])]  # written by the download; absent in hand-made files
            a = {k: torch.from_numpy(v).permute(0, 3, 1, 2).contiguous() if k[0] == "x" else torch.from_numpy(v).long()
                 for k, v in arrays.items()}
        n, dev = cfg.subset or None, rt.device  # small sets live on the device: no loader, no copies per step
        train = pretrain = (a["x_train"][:n].to(dev), a["y_train"][:n].to(dev))
        if "x_unlabeled" in a:  # STL-10: pretrain on train + 100k unlabeled, as its SSL protocol does
            x = torch.cat([a["x_train"], a["x_unlabeled"]])[:n].to(dev)
            pretrain = (x, torch.full((len(x),), -1, device=dev))
        test = (a["x_test"].to(dev), a["y_test"].to(dev))
        classes = CLASS_NAMES.get(cfg.dataset) or names or [str(i) for i in range(int(a["y_train"].max()) + 1)]
    data = Data(cfg.dataset, pretrain, train, test, classes, rt, cfg.batch_size, cfg.seed)
    print0(f"data: {cfg.dataset} | pretrain {len(data.labels('pretrain'))} | train {len(data.labels('train'))} | "
           f"test {len(data.labels('test'))} | {len(classes)} classes | {data.steps_per_epoch} steps per epoch")
    return data

# -------------------------------------------------------------------------------------------------
# augmentation on the device, in batch, with random parameters drawn per image

def to_float(x):
    """uint8 (B,3,H,W) -> float32 in [0, 1]."""
    return x.float() / 255

def resize(x, size):
    """(B,3,H,W) float -> (B,3,size,size), bilinear with antialiasing; unchanged when already that size."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)

def _per_image(x, p):
    """(B,1,1,1) bool: which images an augmentation applied with probability p touches."""
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p

def random_resized_crop(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """Crop a random area fraction `scale` and aspect `ratio` of each square image, resized to size x size.
    Torchvision's rule, vectorized: of `tries` (area, aspect) draws per image the first that fits,
    else the whole image (torchvision's fallback for a square); bilinear sampling of an affine grid,
    without torchvision's antialiasing (which matters only where a crop is shrunk)."""
    B, dev = x.shape[0], x.device
    area = torch.empty(B, tries, device=dev).uniform_(*scale)
    aspect = torch.empty(B, tries, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w, h = (area * aspect).sqrt(), (area / aspect).sqrt()  # (B, tries): fractions of the side
    fits = (w <= 1) & (h <= 1)
    first = fits.int().argmax(1, keepdim=True)  # (B, 1): each image's first draw that fits
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], 1.0)  # (B,), the whole image if none fits
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = w, h  # scale, then a random centre that keeps the crop inside the image
    theta[:, 0, 2] = (torch.rand(B, device=dev) * 2 - 1) * (1 - w)
    theta[:, 1, 2] = (torch.rand(B, device=dev) * 2 - 1) * (1 - h)
    grid = F.affine_grid(theta, (B, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

def random_flip(x, p=0.5):
    """Horizontal flip of each image with probability p."""
    return torch.where(_per_image(x, p), x.flip(3), x)

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
    k = torch.remainder(x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + h + shift * 6, 6)  # hue in sixths of a turn
    return v - c * torch.minimum(k, 4 - k).clamp_(0, 1)  # HSV -> RGB, the three channels at once

def color_jitter(x, brightness, contrast, saturation, hue, p=1.0, masked=None):
    """torchvision's ColorJitter for each image: with probability p, the four adjustments, each with a
    factor of its own, in a random order of its own (SimCLR's v1 and BYOL's TF code differ: an additive
    brightness, a contrast around each channel's mean, a saturation scaled in HSV; their files' tables say
    so). x in [0,1]. In batch: at each of the four places of the order, each adjustment goes to the images
    that have it there. masked (default on CUDA): adjust the whole batch and keep it where due, with no host sync;
    else (the CPU) pick those images out, adjust them and put them back: 4x less work."""
    B, dev = x.shape[0], x.device
    draw = lambda low, high: torch.empty(B, 1, 1, 1, device=dev).uniform_(low, high)  # noqa: E731
    jitter = [  # (strength, factor per image, adjustment), as torchvision.transforms.v2.functional
        (brightness, draw(max(0, 1 - brightness), 1 + brightness), lambda x, f: (f * x).clamp(0, 1)),
        (contrast, draw(max(0, 1 - contrast), 1 + contrast),
         lambda x, f: (f * x + (1 - f) * _gray(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)),
        (saturation, draw(max(0, 1 - saturation), 1 + saturation),
         lambda x, f: (f * x + (1 - f) * _gray(x)).clamp(0, 1)),
        (hue, draw(-hue, hue), _adjust_hue)]
    on = _per_image(x, p).view(B)
    order = torch.rand(B, 4, device=dev).argsort(1)  # (B, 4): each image's order of the four adjustments
    masked, x = x.is_cuda if masked is None else masked, x.clone()
    for place in range(4):
        for k, (strength, factor, adjust) in enumerate(jitter):
            if not strength:  # torchvision skips an adjustment of strength 0
                continue
            now = on & (order[:, place] == k)  # (B,): the images whose adjustment k comes at this place
            if masked:
                x = torch.where(now.view(B, 1, 1, 1), adjust(x, factor), x)
            else:
                idx = now.nonzero()[:, 0]
                x[idx] = adjust(x[idx], factor[idx])
    return x

def random_grayscale(x, p):
    """Replace each image by its luma in all three channels with probability p."""
    return torch.where(_per_image(x, p), _gray(x).expand_as(x), x)

def gaussian_blur(x, p, sigma=(0.1, 2.0), kernel="side"):
    """Blur each image with probability p by a Gaussian of sigma ~ U(sigma) pixels, drawn per image.
    kernel "side": ~10% of the image side, as SimCLR's and BYOL's TF code (3 taps at 32 px: a sigma
    of 2 is cut short); "sigma": reaching 3 sigma of the largest sigma, as PIL's GaussianBlur(radius=
    sigma) in solo-learn's and other torchvision recipes (13 taps for sigma 2); an int: that many taps."""
    B, C, H, W = x.shape
    k = {"side": (H // 10) | 1, "sigma": 2 * math.ceil(3 * sigma[1]) + 1}.get(kernel, kernel)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-t**2 / (2 * torch.empty(B, 1, device=x.device).uniform_(*sigma) ** 2))  # (B, k)
    kern = torch.where(_per_image(x, p).view(B, 1), kern / kern.sum(1, keepdim=True), (t == 0).to(x.dtype))
    kern = kern.repeat_interleave(C, 0)  # (B*C, k): separable, reflect padding
    out = F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
    out = F.conv2d(out, kern.view(-1, 1, k, 1), groups=B * C)
    return F.conv2d(out, kern.view(-1, 1, 1, k), groups=B * C).view(B, C, H, W)

def solarize(x, p, threshold=0.5):
    """Invert the pixels at or above threshold, per image with probability p."""
    return torch.where(_per_image(x, p) & (x >= threshold), 1 - x, x)

def normalize(x, mean=MEAN, std=STD):
    """Standardize channels (x in [0,1])."""
    return (x - x.new_tensor(mean).view(1, -1, 1, 1)) / x.new_tensor(std).view(1, -1, 1, 1)

# -------------------------------------------------------------------------------------------------
# models and optimization

def resnet(arch, small_images=True, in_channels=3, zero_init_residual=False):
    """Backbone without its classifier -> (module: (B,C,H,W) -> (B, width), width). resnet18/34/50
    are torchvision's; small_images swaps in CIFAR's stem (3x3 stride-1 conv, no max-pool), so the
    weights load into a torchvision ResNet given the same stem. zero_init_residual: each residual block's
    last BatchNorm scale starts at 0, so that the block starts as the identity. `tiny`: 4 convs, for CPU runs."""
    if arch == "tiny":
        layers, c_in = [], in_channels
        for c_out, stride in [(16, 1), (32, 2), (64, 2), (128, 2)]:
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c_in
    net = getattr(torchvision.models, arch)(zero_init_residual=zero_init_residual)
    if small_images:
        net.conv1, net.maxpool = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    width, net.fc = net.fc.in_features, nn.Identity()
    return net, width

def param_groups(model, weight_decay):
    """Two named groups: "weights" (decayed) and "biases" (biases and norm parameters: no weight decay,
    no LARS adaptation). set_lr gives a group an lr of its own by its name."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"name": "weights", "params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"name": "biases", "params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True}]

class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rates (You et al. 2017): each layer's step is scaled
    by its trust ratio, except in groups marked lars_exclude (param_groups' "biases", also not decayed).
    With d = g + wd * w, the official codes followed here come in three forms:
      "simclr" (SimCLR, lars_optimizer.py): trust = eta ||w|| / ||d||; v <- m v + lr trust d; w <- w - v
      "byol"   (BYOL, optimizers.py; Barlow Twins, main.py): the same trust; v <- m v + trust d; w <- w - lr v
      "larc"   (solo-learn's LARS; apex's LARC, used by SwAV): as "byol" with trust = eta ||w|| / (||g|| + wd ||w||)
    "simclr" and "byol" differ only while the lr changes (v keeps past lrs). With clip, a layer's rate
    is min(trust, lr) instead of lr * trust (LARC's clip mode; solo-learn's CIFAR recipes)."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, clip=False, form="simclr"):
        if form not in ("simclr", "byol", "larc"):
            raise ValueError(f"LARS form {form!r}: one of simclr, byol, larc")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip,
                                      form=form, lars_exclude=False))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in (p for p in g["params"] if p.grad is not None):
                d, ratio = p.grad.add(p, alpha=g["weight_decay"]), 1.0  # the layer's rate: lr * ratio
                if not g["lars_exclude"]:
                    w_norm, g_norm = p.norm(), p.grad.norm()
                    if g["form"] == "larc":  # a zero w or g: plain SGD on g, not decayed (apex, solo-learn)
                        d = torch.where((w_norm > 0) & (g_norm > 0), d, p.grad)
                    d_norm = g_norm + g["weight_decay"] * w_norm if g["form"] == "larc" else d.norm()
                    ratio = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, 1.0)
                    ratio = (ratio / g["lr"]).clamp(max=1) if g["clip"] else ratio
                v = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)).mul_(g["momentum"])
                if g["form"] == "simclr":
                    p.sub_(v.add_(d * (g["lr"] * ratio)))
                else:
                    p.sub_(v.add_(d * ratio) * g["lr"])

def cosine_lr(step, total_steps, warmup_steps, base_lr, final_lr=0.0):
    """Linear warmup from 0 at step 0 to base_lr at warmup_steps (as the SimCLR, BYOL, Barlow Twins, SwAV and
    MAE codes), then half a cosine down to final_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + (base_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * t))

def set_lr(opt, lr, **by_name):
    """Every group's lr to lr, but a group named in by_name to its own: set_lr(opt, lr, biases=0.01)."""
    for g in opt.param_groups:
        g["lr"] = by_name.get(g.get("name"), lr)

@torch.no_grad()
def ema_update(target, online, momentum):
    """target <- momentum * target + (1 - momentum) * online, for parameters (buffers stay its own)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - momentum)

# -------------------------------------------------------------------------------------------------
# evaluation of frozen features: knn_top1, probe_top1, linear_top1

class Progress:
    """`what done/total | rate | ETA` at most every PROGRESS_SECONDS (the first after 5 s), and the
    duration at the end if it took longer than that; main process only."""

    def __init__(self, what, total):
        self.what, self.total = what, total
        self.start = self.last = time.time()

    def __call__(self, done):
        now, soon = time.time(), min(5, PROGRESS_SECONDS)
        if done < self.total and now - self.last >= (soon if self.last == self.start else PROGRESS_SECONDS):
            self.last, rate = now, done / (now - self.start)
            eta = timedelta(seconds=round((self.total - done) / rate))
            print0(f"{self.what} {done:,}/{self.total:,} | {rate:,.0f} img/s | ETA {eta}")
        elif done >= self.total and now - self.start > soon:
            print0(f"{self.what}: {self.total:,} in {timedelta(seconds=round(now - self.start))}")

@torch.no_grad()
def extract_features(features, data, split, rt, flip=False, batch_size=512):
    """features(uint8 batch) -> (B, D) over a split, shared out over processes and gathered: float32
    (N, D) features and (N,) labels on every process; with flip, the flipped images' too (2N rows)."""
    out, n = [], len(data.labels(split))
    progress = Progress(f"eval: {split} features", n)
    for x, _ in data.eval_batches(split, batch_size):
        with rt.autocast():
            out.append(torch.stack([features(x)] + ([features(x.flip(3))] if flip else [])).float())
        progress(min(n, sum(f.shape[1] for f in out) * rt.world_size))
    feats = torch.cat(out, 1)  # (1 or 2, this process's share, D)
    if _distributed():  # all_gather wants equal sizes: pad every share to the first (largest), trim after
        sizes = [len(s) for s in torch.arange(n).tensor_split(rt.world_size)]
        parts = all_gather(F.pad(feats, (0, 0, 0, sizes[0] - feats.shape[1]))[None])  # (W, 1 or 2, sizes[0], D)
        feats = torch.cat([p[:, :k] for p, k in zip(parts, sizes)], 1)
    return feats.flatten(0, 1), data.labels(split).to(feats.device).repeat(2 if flip else 1)

@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=200, temperature=0.1):
    """Weighted kNN top-1 (Wu et al. 2018, whose code has T = 0.07; k = 200, T = 0.1 are the MoCo
    CIFAR-10 demo's): each of the k most cosine-similar training samples votes for its class with
    weight exp(cos / temperature)."""
    train_feats, test_feats = F.normalize(train_feats.float(), dim=1), F.normalize(test_feats.float(), dim=1)
    n_classes, k, correct = int(train_labels.max()) + 1, min(k, len(train_labels)), 0
    for feats, labels in zip(test_feats.split(1024), test_labels.split(1024)):
        sim, idx = (feats @ train_feats.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(feats), n_classes, device=feats.device).scatter_add_(1, train_labels[idx],
                                                                                     (sim / temperature).exp())
        correct += (votes.argmax(1) == labels).sum()  # on the device: one host sync, at the end
    return float(correct) / len(test_labels)

def linear_probe(train_feats, train_labels, test_feats, test_labels, epochs=100, batch_size=256, lr=1e-2,
                 weight_decay=1e-4, seed=0):
    """probe_top1: a fast linear classifier on precomputed frozen features, standardized so that one lr
    suits every method (AdamW, cosine lr). Not the published protocol: linear_eval is."""
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    xtr, xte = (train_feats - mean) / std, (test_feats - mean) / std
    torch.manual_seed(seed)
    clf = nn.Linear(xtr.shape[1], int(train_labels.max()) + 1).to(xtr.device)
    opt, steps = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay), max(1, len(xtr) // batch_size)
    with torch.enable_grad():
        for epoch in range(epochs):
            perm = torch.randperm(len(xtr), device=xtr.device)
            for i, idx in enumerate(perm[:steps * batch_size].split(batch_size)):  # `steps` full batches
                set_lr(opt, cosine_lr(epoch * steps + i, epochs * steps, 0, lr))
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(clf(xtr[idx]), train_labels[idx]).backward()
                opt.step()
    return (clf(xte).argmax(1) == test_labels).float().mean().item()

def linear_eval(features, data, rt, epochs=100, batch_size=256, lr=0.1, seed=0):
    """linear_top1, the linear evaluation of published numbers (MoCo's main_lincls.py; solo-learn's offline
    configs, with CIFAR crops of area 8-100%), on features(uint8) -> (B, D) of a model frozen in eval mode: each
    epoch, every training image once as a random resized crop and flip; SGD (momentum 0.9, no weight decay) on
    batches of 256, the lr dropped 10x at 60% and 80% of the epochs; tested on the test images as they are.
    Those codes tune the lr per method (MoCo 30, solo-learn 0.1 to 30); here a BatchNorm without affine weights
    standardizes the features first (MAE's probe, He et al. 2022 App. A.2: still a linear map), so one lr
    serves every method: 0.1 per 256, the best of 0.01-1.0 on held-out CIFAR-10 training images."""
    test_x, test_y = extract_features(features, data, "test", rt)
    split = "pretrain" if data.name == "folder" else "train"  # a folder: crops of its larger (8/7) decode
    side = data.test[0].shape[-1] if isinstance(data.test, tuple) else data.test.size
    W, B = rt.world_size, min(batch_size, len(data.labels(split))) // rt.world_size * rt.world_size  # W | B
    torch.manual_seed(seed * 1_000_003 + rt.rank)
    clf = nn.Sequential(nn.BatchNorm1d(test_x.shape[1], affine=False), nn.Linear(test_x.shape[1], len(data.classes)))
    nn.init.normal_(clf[1].weight, std=0.01), nn.init.zeros_(clf[1].bias)  # as MoCo's and SimSiam's main_lincls
    clf.to(rt.device)
    if _distributed():  # every process starts from process 0's classifier (their seeds differ: their crops do)
        for p in clf.parameters():
            dist.broadcast(p.data, 0)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps, k = len(data.labels(split)) // B, max(1, 2048 // B)  # k classifier steps per pass through the backbone
    progress = Progress("eval: linear, training crops", epochs * steps * B)
    for epoch in range(epochs):
        set_lr(opt, lr * B / 256 * 0.1 ** ((epoch >= 0.6 * epochs) + (epoch >= 0.8 * epochs)))
        chunks = [rows.flatten() for rows in data.epoch_rows(split, epoch, B).split(k)]
        for i, (x, y) in enumerate(data.batches(split, chunks, seed + epoch)):  # this process's share of k batches
            crops = random_flip(random_resized_crop(to_float(x), side))
            with torch.no_grad(), rt.autocast():
                h = features((crops * 255).round().to(torch.uint8)).float()  # uint8 crops, as a PIL pipeline's
            # every process takes the same k steps on the global batches: the shares (W, k, B/W) -> (k, B)
            h, y = (all_gather(t).unflatten(0, (W, -1, B // W)).transpose(0, 1).flatten(1, 2) for t in (h, y))
            for hb, yb in zip(h, y):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(clf(hb), yb).backward()
                opt.step()
            progress((epoch * steps + min(steps, (i + 1) * k)) * B)
    return (clf.eval()(test_x).argmax(1) == test_y).float().mean().item()

def evaluate(model, features, data, rt, probe_epochs=0, linear_epochs=0):
    """The evaluations of features(uint8 batch) -> (B, D) of the model frozen in eval mode (None if not run):
    knn_top1     weighted kNN (k 200, T 0.1) on features of the un-augmented images;
    probe_top1   linear_probe on features of the training images and their flips (if probe_epochs);
    linear_top1  linear_eval, the standard protocol (if linear_epochs; -1: 100 on CUDA, none on the CPU)."""
    if linear_epochs == -1:
        linear_epochs = 100 if rt.device.type == "cuda" else 0
        if not linear_epochs:
            print0("eval: linear_top1 not run: on the CPU only when asked, --linear_epochs=N (its 100 epochs through "
                   "the backbone take hours for a ResNet here)")
    model.eval()
    train, train_y = extract_features(features, data, "train", rt, flip=probe_epochs > 0)
    test, test_y = extract_features(features, data, "test", rt)
    n = len(data.labels("train"))
    out = {"knn_top1": knn_accuracy(train[:n], train_y[:n], test, test_y),
           "probe_top1": linear_probe(train, train_y, test, test_y, epochs=probe_epochs) if probe_epochs else None,
           "linear_top1": linear_eval(features, data, rt, epochs=linear_epochs) if linear_epochs else None}
    model.train()
    return out

# -------------------------------------------------------------------------------------------------
# bookkeeping: progress of training, checkpoints, results

class Logger:
    """A progress line and a log.jsonl record after the first step, then every log_every steps, at
    each epoch's end and at least every PROGRESS_SECONDS, with images/s and ETA; stops the run on a
    NaN/inf loss. Metrics stay on the device between log steps (no host sync)."""
    NEVER = 2**62  # first_bad while every loss has been finite

    def __init__(self, cfg, rt, steps_per_epoch, start_step, stop_step):
        self.cfg, self.rt, self.spe, self.stop, self.start = cfg, rt, steps_per_epoch, stop_step, start_step
        self.first_bad = torch.tensor(self.NEVER, device=rt.device)  # first step whose loss was not finite
        self.t_last, self.step_last, self.train_seconds = time.time(), start_step, 0.0  # time in training steps

    def step(self, step, **metrics):
        """Call once per step with the loss (a device tensor) and other metrics (tensors or floats)."""
        bad = ~torch.isfinite(metrics["loss"].detach()) & (self.first_bad == self.NEVER)
        self.first_bad = torch.where(bad, step, self.first_bad)
        now, done, first = time.time(), step + 1, step == self.start
        counted = first or done % self.cfg.log_every == 0 or done % self.spe == 0 or done == self.stop
        if not (counted or (self.rt.is_main and now - self.t_last >= PROGRESS_SECONDS)):
            return
        if counted or not _distributed():  # processes meet in check() at counted steps: their clocks differ
            self.check()
        dt, ds = now - self.t_last, done - self.step_last
        self.t_last, self.step_last, self.train_seconds = now, done, self.train_seconds + dt
        eta_s = round((self.stop - done) * dt / max(ds, 1))
        values = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        rec = {"step": done, "epoch": round(done / self.spe, 3), **values,
               "images_per_second": round(ds * self.cfg.batch_size / max(dt, 1e-9), 1), "eta_seconds": eta_s}
        eta = timedelta(seconds=eta_s)
        self.write(rec, f"step {done}/{self.stop} | epoch {rec['epoch']:.2f} | " +
                   " | ".join(f"{k} {v:.4g}" for k, v in values.items()) +
                   f" | {rec['images_per_second']:.0f} img/s | ETA {eta}" + (f" | first step {dt:.1f} s" * first))
        if first and self.rt.device.type == "cpu" and self.cfg.arch != "tiny":
            print0(f"note: at this speed the run takes {eta} on this CPU. A CPU-sized run that ends in minutes: "
                   f"python {os.path.basename(sys.argv[0])} --arch=tiny --subset=10000 --epochs=3 --batch_size=128 "
                   "--warmup_epochs=0 (tests/results_cpu.md: each method's, with its time)")

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
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)  # the earliest over processes
        if bad.item() != self.NEVER:
            raise RunError(f"loss is NaN or infinite at step {bad.item() + 1}; stopped. The last good checkpoint is "
                           f"{self.cfg.out_dir}/ckpt.pt (if one was written): lower --lr or check the data.")

    def write(self, record, line=None):
        """Append a record to out_dir/log.jsonl and print a line (main process only)."""
        if self.rt.is_main:
            with open(os.path.join(self.cfg.out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            print(line or " | ".join(f"{k} {v}" for k, v in record.items() if v is not None), flush=True)

def save_checkpoint(path, state, rt):
    """Atomic write (temp file, then rename) by the main process; plain types only (weights_only loads)."""
    if rt.is_main:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

RESUME_MAY_CHANGE = ("resume", "max_steps", "log_every", "eval_every", "probe_epochs", "linear_epochs", "out_dir",
                     "data_dir", "device", "dtype", "compile")

def load_checkpoint(cfg, rt):
    """The state in out_dir/ckpt.pt if cfg.resume (else None, as when there is none yet). A run resumes
    only with the settings it started with (but those in RESUME_MAY_CHANGE)."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.resume:
        return None
    if not os.path.exists(path):
        print0(f"resume: no checkpoint at {path} yet, starting from scratch")
        return None
    try:
        state = torch.load(path, map_location=rt.device, weights_only=True)
        saved, step = state["config"], state["step"]  # a file without them is not a checkpoint of these scripts
    except Exception as e:
        raise RunError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
                       "delete it or run without --resume") from None
    changed = [f"{k}={saved.get(k)}" for k, v in dataclasses.asdict(cfg).items()
               if k not in RESUME_MAY_CHANGE and saved.get(k) != v]
    if changed:
        raise RunError(f"--resume with other settings than the checkpoint's ({', '.join(changed)}); resume with those")
    print0(f"resume: step {step} from {path}")
    return state

def write_results(results, cfg, rt):
    """Write results.json (main process; on CUDA with the peak GPU memory) and print it."""
    if rt.device.type == "cuda":
        results["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 2)
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

# colour prediction (colorization.py, splitbrain.py; Zhang et al. 2016, 2017): ab bins, annealed mean, the net

def ab_bins(grid=10.0, L_step=0.1):
    """(Q, 2) centres of the ab cells (side `grid`) that are sRGB colours for some L in [0, 100]: 229 for grid 10
    (8-bit sRGB falls in 32 more, at the gamut's edge; Zhang et al. keep 313, official resources/pts_in_hull.npy)."""
    side = torch.arange(-120 // grid, 120 // grid + 1) * grid  # |a|, |b| < 120 for every sRGB colour
    ab, L = torch.cartesian_prod(side, side), torch.arange(0, 100 + L_step / 2, L_step)  # (G, 2), (nL,)
    lab = torch.cat([L.view(-1, 1, 1).expand(-1, len(ab), 1), ab.expand(len(L), -1, -1)], 2)  # (nL, G, 3)
    rgb = lab_to_rgb(lab.permute(2, 0, 1)[None], clamp=False)[0]  # (3, nL, G), unclamped
    return ab[((rgb >= 0) & (rgb <= 1)).all(0).any(0)]  # the cells that some L makes displayable

def bin_distances(ab, bins):
    """ab (B,2,h,w), bins (Q,2) -> (B*h*w, Q) squared distances, pixels in (B, h, w) order."""
    p = ab.permute(0, 2, 3, 1).reshape(-1, 2).float()  # (P, 2)
    return (p[:, :1] - bins[:, 0]) ** 2 + (p[:, 1:] - bins[:, 1]) ** 2  # elementwise: exact (a matmul may be TF32)

def annealed_mean(logits, centres, temperature):
    """logits (B,Q,h,w), bin centres (Q,C) -> (B,C,h,w): the mean of softmax(logits / T), i.e. of p^(1/T)
    re-normalized: T = 1 is the mean, T -> 0 the mode (Zhang et al. 2016 Sec. 2.3: T = 0.38)."""
    return torch.einsum("bqhw,qc->bchw", torch.softmax(logits.float() / temperature, dim=1), centres)

class PixelClassifier(nn.Module):
    """(B,C,H,W) -> logits (B, n_bins, H/4, W/4). backbone: resnet(arch) reading C channels (L, or ab);
    backbone(x) (B, width) is the representation. Head on its last map: 3x3 conv, BN, ReLU, 1x1 conv to the
    bins; those logits are then resized to 1/4 of the side (as the official colorization AlexNet resizes
    its 12 x 12 fc8 to 23 x 23): finer targets, not a finer prediction."""
    stride = 4  # the logits' grid is 1/4 of the image side, as the colorization net's (56 x 56 at 224 px)

    def __init__(self, arch, small_images, in_channels, n_bins):
        super().__init__()
        self.backbone, width = resnet(arch, small_images, in_channels)
        self.mix = nn.Sequential(nn.Conv2d(width, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2),
                                 nn.ReLU(inplace=True))
        self.classify = nn.Conv2d(width // 2, n_bins, 1)

    def forward(self, x):  # the trunk without its pooling and flatten/fc; H/8: CIFAR's stem (H/32 without it)
        logits = self.classify(self.mix(nn.Sequential(*list(self.backbone.children())[:-2])(x)))  # (B, Q, H/8, W/8)
        return F.interpolate(logits, size=(x.shape[2] // self.stride, x.shape[3] // self.stride), mode="bilinear",
                             align_corners=False)  # (B, n_bins, H/4, W/4)
