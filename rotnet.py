"""RotNet: unsupervised representation learning by predicting image rotations.

Gidaris, Singh, Komodakis. ICLR 2018. arXiv:1803.07728.

A ConvNet is shown every image rotated by 0, 90, 180 and 270 degrees and must say which of the
four rotations it sees (a 4-way classification). To recognise that a picture is upside down, the
network has to find the objects in it and know their canonical orientation (where the head of a
cat is, which way a car stands), so the features it learns for this are semantic. As in the
paper, each image of the batch appears in all four rotations in the same batch, which makes the
four classes balanced and lets the network compare the rotations of one image.

    python rotnet.py                                             # 1 GPU: CIFAR-10, the paper's recipe
    torchrun --standalone --nproc_per_node=8 rotnet.py           # 8 GPUs, same global batch of 128
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 rotnet.py
    python rotnet.py --arch=nin                                  # the paper's CIFAR model: 4-block NIN
    python rotnet.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=128   # CPU smoke run

Defaults: the paper's CIFAR-10 recipe (Sec. 3.1), checked against the official code
gidariss/FeatureLearningRotNet (config/CIFAR10_RotNet_NIN4blocks.py, dataloader.py), on a ResNet-18
trunk; `--arch=nin` is the paper's 4-block Network-In-Network. For it the paper reports 89.06% CIFAR-10
test top-1 with a non-linear classifier on the feature maps of block 2 (Table 1; the official
config/CIFAR10_MultLayerClassifier_on_RotNet_NIN4blocks_Conv2_feats.py: 3 FC layers of 200, 200 and
10 units with BN on the flattened 192x8x8 maps). Evaluated features: knn_top1, probe_top1 and
linear_top1 on the trunk's pooled output (512-d for ResNet-18, 192-d for NIN); since the paper finds
earlier blocks better, knn_top1_mid, probe_top1_mid and linear_top1_mid on the pooled output of an
intermediate block (ResNet layer3: 256-d; NIN block 2: 192-d; tiny: its third conv). pretext_top1 is
the rotation accuracy on the test images, each shown in one rotation. Results of this file: not yet
measured (README).

Departures from the sources (P: the paper, arXiv v1; C: the official code; C config: its
config/CIFAR10_RotNet_NIN4blocks.py):

| setting | paper | official code | this file |
|---|---|---|---|
| trunk | NIN, 3 to 5 blocks (P Tab. 1) | NIN, 4 blocks (C NetworkInNetwork.py) | ResNet-18; --arch=nin: C's |
| optimizer | SGD 0.9, lr 0.1, wd 5e-4 (P Sec. 3.1) | as P, Nesterov (C config) | as C |
| schedule | 100 epochs, lr / 5 at 30, 60, 80 (P 3.1) | 200, lr / 5 at 60, 120, 160 (C LUT_lr) | as P (or cosine) |
| input | - | CIFAR-10 mean, std (C dataloader.py) | ImageNet mean, std (common.normalize) |
| pretext_top1 | - | each test image in all 4 rotations | in one, the 4 equally often |
| evaluation | non-linear, block 2 (P Tab. 1) | 3 FC; best epoch logged (C Algorithm.py) | see above; last epoch |
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
    out_dir: str = "out/rotnet"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the network's input (96 for STL-10, 224 for ImageNet)
    # model
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | nin (the paper's CIFAR net) | tiny (4 convs, CPU runs)
    nin_blocks: int = 4  # conv blocks of the NIN (3 to 5 in the paper; 4 is its best); only with --arch=nin
    # method
    crop_pad: int = 4  # random crop after zero padding by this many pixels (official CIFAR code: 4)
    # optim
    epochs: int = 100  # passes over the training images (the paper's CIFAR-10 schedule)
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 128  # global batch of images, split across processes; each is shown in 4 rotations
    lr: float = 0.2  # SGD base lr per 256 images, scaled linearly (the paper's 0.1 at 128 images)
    momentum: float = 0.9  # SGD momentum (Nesterov, as the official code)
    weight_decay: float = 5e-4  # on all parameters, as the official code
    schedule: str = "step"  # step: lr / 5 after 30%, 60% and 80% of the epochs (the paper's) | cosine: to 0
    warmup_epochs: int = 0  # linear warmup before either schedule (none in the paper)
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
        common.check_config(self, archs=common.ARCHS + ("nin",))
        if self.nin_blocks < 3:
            raise ValueError(f"--nin_blocks={self.nin_blocks} is impossible: the NIN has at least 3 blocks")
        if not 0 <= self.crop_pad < self.image_size or not 0 <= self.momentum < 1:
            raise ValueError("--crop_pad must be in [0, image_size) and --momentum in [0, 1)")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"--schedule={self.schedule} is unknown: step | cosine")


# -------------------------------------------------------------------------------------------------
# views


def random_crop(x, pad):
    """torchvision's RandomCrop(size, padding=pad) per image: zero-pad each side by `pad`, cut the
    original size back out at a random offset. (B,3,H,W) -> (B,3,H,W)."""
    B, _, H, W = x.shape
    x = F.pad(x, (pad, pad, pad, pad))
    top, left = torch.randint(0, 2 * pad + 1, (2, B, 1), device=x.device)  # (B, 1) each
    rows = (top + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (left + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    return x[torch.arange(B, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, 3, H, W)


def rotnet_view(x, cfg):
    """The official CIFAR augmentation, on the device: uint8 (B,3,H,W) -> normalized (B,3,S,S)."""
    x = common.resize(common.to_float(x), cfg.image_size)
    x = random_crop(x, cfg.crop_pad)
    x = common.random_flip(x)
    return common.normalize(x)


def rotate_batch(x):
    """Every image in all four rotations: (B,C,H,W) square -> ((4B,C,H,W), labels (4B,)).

    Row k*B + i is torch.rot90(x[i], k, dims=(1, 2)) (k quarter turns counter-clockwise, as
    np.rot90 and the official code's rotate_img), with label k.
    """
    B = x.shape[0]
    images = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])  # (4B, C, H, W)
    labels = torch.arange(4, device=x.device).repeat_interleave(B)  # (4B,): 0 0 .. 1 1 .. 2 2 .. 3 3
    return images, labels


# -------------------------------------------------------------------------------------------------
# model


def nin(blocks):
    """The paper's CIFAR Network-In-Network (official architectures/NetworkInNetwork.py): blocks of
    three conv-BN-ReLU (k x k, 1x1, 1x1), 192 channels (block 1: 192, 160, 96), 3x3 stride-2
    max-pool after block 1 and average-pool after block 2 -> (module: (B,3,H,W) -> (B,192), 192)."""
    def conv(c_in, c_out, k):
        return [nn.Conv2d(c_in, c_out, k, 1, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    stages = [nn.Sequential(*conv(3, 192, 5), *conv(192, 160, 1), *conv(160, 96, 1), nn.MaxPool2d(3, 2, 1)),
              nn.Sequential(*conv(96, 192, 5), *conv(192, 192, 1), *conv(192, 192, 1), nn.AvgPool2d(3, 2, 1))]
    stages += [nn.Sequential(*conv(192, 192, 3), *conv(192, 192, 1), *conv(192, 192, 1)) for _ in range(blocks - 2)]
    return nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 192


class RotNet(nn.Module):
    """Trunk f (ResNet or NIN) and a linear 4-way rotation classifier on its pooled output."""

    def __init__(self, arch, small_images, nin_blocks):
        super().__init__()
        self.backbone, width = nin(nin_blocks) if arch == "nin" else common.resnet(arch, small_images)
        self.head = nn.Linear(width, 4)
        # where the intermediate features are taken: the first `mid` modules of a Sequential trunk
        self.mid = {"nin": 2, "tiny": 9}.get(arch)  # NIN: blocks 1-2; tiny: its first 3 conv-BN-ReLU
        self.mid_name = {"nin": "block2", "tiny": "conv3"}.get(arch, "layer3")

    def forward(self, x):
        h = self.backbone(x)  # (B, width): pooled trunk output
        return self.head(h)  # (B, 4) rotation logits

    def mid_features(self, x):
        """Pooled output of the intermediate block: (B,3,H,W) -> (B, D_mid)."""
        b = self.backbone
        if self.mid is None:  # torchvision ResNet: stem, layer1, layer2, layer3
            h = b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))))
        else:
            h = b[:self.mid](x)
        return h.mean((2, 3))  # (B, D_mid): global average pooling


# -------------------------------------------------------------------------------------------------
# loss


def rotation_loss(logits, labels):
    """Cross-entropy of the 4-way rotation prediction (the paper's objective), averaged over the rotated images.

    logits: (4B, 4); labels: (4B,) in 0..3, the number of quarter turns. Computed in float32.
    """
    return F.cross_entropy(logits.float(), labels)


# -------------------------------------------------------------------------------------------------
# method helpers


def step_lr(step, total_steps, warmup_steps, base_lr, drops=(0.3, 0.6, 0.8), factor=0.2):
    """The paper's schedule: base_lr, divided by 5 after 30%, 60% and 80% of the steps (P Sec. 3.1:
    after epochs 30, 60, 80 of 100; the official config: 60, 120, 160 of 200), after a linear warmup."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps  # from 0, as common.cosine_lr
    return base_lr * factor ** sum(step >= d * total_steps for d in drops)


@torch.no_grad()
def rotation_accuracy(model, data, rt, size, batch_size=512):
    """Top-1 rotation accuracy over the un-augmented test images, image i of a batch turned by i % 4
    quarter turns (the four classes equally often, at a quarter of the cost of all four rotations).

    Every process scores its share of the test split; the counts are summed over processes.
    """
    model.eval()
    counts = torch.zeros(2, device=rt.device)  # correct, seen
    for x, _ in data.eval_batches("test", batch_size):
        images, labels = rotate_batch(common.normalize(common.resize(common.to_float(x), size)))  # (4b, ...)
        i = torch.arange(len(x), device=x.device)
        pick = (i % 4) * len(x) + i  # row k*b + i is image i turned k times: take k = i % 4
        images, labels = images[pick], labels[pick]  # (b, 3, S, S), (b,)
        with rt.autocast():
            logits = model(images)  # (b, 4)
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
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule, counted in images (not rotated copies)
    common.print0(f"rotnet: {total_steps} steps, SGD lr {lr:.3g} ({cfg.schedule} schedule), "
                  f"{4 * cfg.batch_size} rotated images a step")

    raw_model = common.sync_batchnorm(RotNet(cfg.arch, cfg.image_size <= 64, cfg.nin_blocks).to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    opt = torch.optim.SGD(raw_model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=True)
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # pooled trunk output of un-augmented, upright uint8 images
        return raw_model.backbone(common.normalize(common.resize(common.to_float(x), cfg.image_size)))

    def mid_features(x):  # pooled intermediate block (ResNet layer3, NIN block 2)
        return raw_model.mid_features(common.normalize(common.resize(common.to_float(x), cfg.image_size)))

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt),
                   "pretext_top1": rotation_accuracy(raw_model, data, rt, cfg.image_size)})

    schedule = step_lr if cfg.schedule == "step" else common.cosine_lr  # lr(step, total, warmup, base)
    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, _ in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = schedule(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        common.set_lr(opt, lr_now)
        images, labels = rotate_batch(rotnet_view(x, cfg))  # (4B, 3, S, S), (4B,): all four rotations of each image
        with rt.autocast():
            logits = model(images)  # (4B, 4)
        # the mean over this process's 4B images; DDP averages the gradients: the global batch's mean
        loss = rotation_loss(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pretext_acc = (logits.detach().argmax(1) == labels).float().mean()  # rotation accuracy on this batch
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
    mid = common.evaluate(raw_model, mid_features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    pretext_top1 = rotation_accuracy(raw_model, data, rt, cfg.image_size)
    if rt.is_main:  # the trunk alone (ResNets: loadable into a torchvision ResNet with the same stem, README)
        torch.save(raw_model.backbone.state_dict(), os.path.join(cfg.out_dir, "encoder.pt"))
    results = {"method": "rotnet", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1), "pretext_top1": pretext_top1,
               **{f"{name}_mid": value for name, value in mid.items()},  # knn_top1_mid, probe_top1_mid, linear_top1_mid
               "mid_features": raw_model.mid_name}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
