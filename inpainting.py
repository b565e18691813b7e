"""Context Encoders: feature learning by inpainting.

Pathak, Krahenbuhl, Donahue, Darrell, Efros. CVPR 2016. arXiv:1604.07379.

A region of each image is removed (filled with the mean colour) and an encoder-decoder F must paint
it back from the context around it, under a masked L2 reconstruction loss (paper Sec. 3.2). Encoder
and decoder are joined by a channel-wise fully-connected layer (Sec. 3.1), so that every painted
pixel can depend on the whole image. To fill the hole well the encoder must understand what the
image shows; its features are the representation. Two recipes:
  features (the default): random-region holes and the L2 loss alone. A central hole teaches features
      that latch onto the hole's boundary (Sec. 3.3), so the paper's feature experiments use random
      regions, trained with the reconstruction loss only (Sec. 5.2; official README: the released
      features are "trained with reconstruction loss");
  inpainting (--mask=center --overlap=1 --adv_weight=0.001): the central hole, the joint loss 0.999 L2
      + 0.001 adversarial, where a DCGAN discriminator D tells real regions from painted ones and D and
      F take Adam steps in turns, and F painting a region slightly larger than the hole, its squared
      errors in the band where it overlaps the visible context weighing 10 times as much (Sec. 4,
      official train.lua): sharper pictures in inpainting*.png.

    python inpainting.py                                         # 1 GPU: CIFAR-10, the feature recipe
    python inpainting.py --mask=center --overlap=1 --adv_weight=0.001   # the inpainting recipe, with D
    torchrun --standalone --nproc_per_node=8 inpainting.py       # 8 GPUs, same global batch of 64
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 inpainting.py
    python inpainting.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=64   # CPU smoke run

Defaults: no CIFAR recipe was published; the official code's 128 px recipe scaled to 32 px ("this
file" below). Evaluated features: the trunk's pooled output (512-d for ResNet-18) on un-masked images
resized to image_size, for knn_top1, probe_top1 and linear_top1 (common.evaluate); the decoder reads
the trunk's last map before pooling. Pretext metric: hole_mse, the test-set mean squared error in the
hole (pixels in [0, 1]), next to hole_mse_mean_fill for the hole left at the fill colour. Published
number for reference (not CIFAR-10): AlexNet context encoder on ImageNet, 56.5% PASCAL VOC 2007
classification mAP after fine-tuning (P Table 2). Results of this file: not yet measured (README).

Departures from the sources (P: the paper, arXiv v2; C: the official Torch code, pathak22/context-encoder):

| setting | paper | official code | this file |
|---|---|---|---|
| encoder | AlexNet to pool5 (P Sec. 3.1) | strided convs to a 4000-d code (C train.lua, README) | ResNet's last map |
| encoder to decoder | channel-wise FC, then a conv (P Sec. 3.1) | none (C train.lua) | as P (1x1), + BN, ReLU |
| decoder | 5 up-convolutions (P Sec. 3.1) | 5 up-convs to the 64 px region (C train.lua) | 3 at 32 px, whole image |
| image, region | - | 128 px, central 64 px (C train.lua) | 32 px, central 16 px |
| random regions | VOC shapes, <= 1/4 (P Sec. 3.3) | noise, 20-30%, batch-wide (C train_random.lua) | 1/4, per image |
| random blocks | features as good as regions' (P Sec. 3.3) | - | not offered |
| overlap band | 7 px (P Sec. 4) | center 4 px: hole 56 of 64; regions 0 (C README) | center 1 px: 14 of 16; regions 0 |
| L2, center | hole; 7 px band 10x (P Sec. 3.2, 4) | 64 px patch; 4 px band 10x (C train.lua) | as C (--overlap=1) |
| L2, regions | the dropped region (P Sec. 3.2) | whole image, weight 1 (C train_random.lua, README) | as P: hole only |
| loss | L2 alone for features (P Sec. 5.2) | 0.999 L2 + 0.001 adversarial (C README) | as P; as C: a flag |
| lr | F's 10x D's (P Sec. 4) | Adam 2e-4, F 10x if 0 < adv weight < 1 (C train.lua) | as C, not scaled by batch |
| D's input | not the context (P Sec. 3.2) | region; whole image (C train_random.lua) | image times region |
| F's adversarial grad | - | D's output before its step, through its updated weights (C) | through the updated D |
| fill colour | constant mean value (P Sec. 4) | (117, 104, 123) / 255 (C train.lua) | training set's mean |
| crop, input | - | 128 px of 350 px, flip, [-1, 1] (C donkey_folder.lua) | 50-100% area, flip, standardized |
| schedule, init | - | constant lr, 500 epochs; N(0, 0.02) (C README, train.lua) | cosine to 0; PyTorch's init |
| evaluation | fine-tuned on PASCAL VOC (P Sec. 5.2) | - | frozen trunk (common.evaluate) |
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

MASKS = ("regions", "center")


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic
    data_dir: str = "./data"  # folder of <dataset>.npz (downloaded there if missing); $SSL_DATA replaces this default
    out_dir: str = "out/inpainting"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json, inpainting*.png
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the training images, a multiple of 32 (96 for STL-10, 224 for ImageNet)
    # model
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs)
    d_width: int = 64  # discriminator's first conv width (DCGAN's ndf, official code), if adv_weight > 0
    # method
    mask: str = "regions"  # regions (the paper's for features) | center (for pictures): a quarter of the image
    overlap: int = 0  # px of the region's band that F sees: 0 (official random regions); center 1 (4 of 128 px)
    overlap_weight: float = 10.0  # weight of squared errors in that band (official code), 1 in the hole
    adv_weight: float = 0.0  # lambda_adv; lambda_rec = 1 - it. 0: L2 alone (paper Sec. 5.2); 0.001: the joint loss
    crop_min: float = 0.5  # smallest area fraction of the random resized crop (plus a random flip)
    # optim
    epochs: int = 500  # passes over the training images (official niter=500)
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 64  # global batch, split across processes (official 64)
    lr: float = 2e-4  # Adam lr of D and of F; under the joint loss F's is 10x (official code); not scaled with batch
    beta1: float = 0.5  # Adam beta1 of both optimizers (DCGAN, official code); beta2 is 0.999
    weight_decay: float = 0.0  # encoder-decoder weights only (not biases and BN); the official code uses none
    warmup_epochs: int = 0  # linear warmup, then cosine decay to 0 (the official code keeps lr constant)
    # eval
    eval_every: int = 10  # epochs between kNN monitor runs and PNG grids (0 = only at the end)
    probe_epochs: int = 100  # fast linear probe on precomputed frozen features at the end, epochs (0 = none)
    linear_epochs: int = -1  # standard linear evaluation at the end, epochs (-1: 100 on CUDA, none on CPU; 0: none)
    # system
    seed: int = 0  # weights, data order, crops and masks
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    compile: str = "auto"  # torch.compile the networks: auto (on CUDA only) | true | false
    log_every: int = 50  # steps between progress lines
    resume: bool = False  # continue from out_dir/ckpt.pt

    def __post_init__(self):
        common.check_config(self)
        if self.mask not in MASKS:
            raise ValueError(f"--mask={self.mask} is impossible: it must be one of {', '.join(MASKS)}")
        if self.image_size % 32:
            raise ValueError(f"--image_size={self.image_size} is impossible: it must be a multiple of 32 (the "
                             "central region and the decoder's up-convolutions tile it exactly)")
        if not 0 <= self.overlap < self.image_size // 4:
            raise ValueError(f"--overlap must be in [0, {self.image_size // 4}) px, got {self.overlap}")
        if self.overlap_weight <= 0 or not 0 <= self.adv_weight <= 1:
            raise ValueError("--overlap_weight must be > 0 and --adv_weight in [0, 1]")
        if self.lr <= 0 or self.d_width < 1 or not 0 <= self.beta1 < 1 or not 0 < self.crop_min <= 1:
            raise ValueError("--lr must be > 0, --d_width >= 1, --beta1 in [0, 1) and --crop_min in (0, 1]")


# -------------------------------------------------------------------------------------------------
# views and masks


def inpainting_view(x, cfg):
    """A random crop and flip of each image (the official loader crops and flips): uint8 -> (B,3,S,S) in [0,1]."""
    x = common.random_resized_crop(common.to_float(x), cfg.image_size, scale=(cfg.crop_min, 1.0))
    return common.random_flip(x)


def eval_view(x, size):
    """Un-augmented uint8 images -> float [0,1] at the training side (the scale the trunk learned, as rotnet.py)."""
    return common.resize(common.to_float(x), size)


def central_region(n, size, device=None):
    """(n,1,S,S), 1 = to paint: the central (S/2)^2 square, a quarter of the image (train.lua: 64 of 128 px)."""
    m = torch.zeros(n, 1, size, size, device=device)
    m[:, :, size // 4: size - size // 4, size // 4: size - size // 4] = 1
    return m


def random_regions(n, size, device=None, generator=None):
    """(n,1,S,S), 1 = to paint: random blobs covering exactly a quarter of each image, where uniform 8x8
    noise upsampled bicubically is lowest. train_random.lua thresholds upsampled noise the same way
    (density 0.25, about 8 noise cells per image side); the paper pastes deformed PASCAL VOC shapes."""
    noise = torch.rand(n, 1, 8, 8, device=device, generator=generator)
    noise = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False).flatten(1)  # (n, S*S)
    lowest = noise.topk(size * size // 4, 1, largest=False).indices  # (n, S*S/4)
    return torch.zeros(n, size * size, device=device).scatter_(1, lowest, 1.0).view(n, 1, size, size)


def predicted_region(kind, n, size, device=None, generator=None):
    """(n,1,S,S): the region F paints, of the mask kind `kind`."""
    return central_region(n, size, device) if kind == "center" else random_regions(n, size, device, generator)


def hole_in(region, overlap):
    """The hole removed from F's input: the region shrunk by `overlap` px on every side, so that F still sees
    the band it must paint consistently (train.lua fills 56 px of its 64 px region). (B,1,S,S) -> (B,1,S,S)."""
    if not overlap:
        return region
    return -F.max_pool2d(-region, 2 * overlap + 1, stride=1, padding=overlap)  # erosion: a min-pool, -max(-x)


def mask_image(img, hole, fill):
    """img (B,3,S,S) in [0,1] with the hole (B,1,S,S) set to the colour fill (3,), as the paper's input."""
    return torch.where(hole.bool(), fill.view(1, 3, 1, 1), img)


# -------------------------------------------------------------------------------------------------
# model


def feature_map(backbone, x):
    """The trunk's last feature map before pooling: (B,3,H,W) -> (B, width, H/stride, W/stride)."""
    if isinstance(backbone, nn.Sequential):  # tiny: all but its AdaptiveAvgPool2d and Flatten
        return backbone[:-2](x)
    b = backbone  # torchvision ResNet: its forward without avgpool and fc
    x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
    return b.layer4(b.layer3(b.layer2(b.layer1(x))))


class ChannelwiseFC(nn.Module):
    """Paper Sec. 3.1: each channel fully connected over its own n x n map (C n^4 weights instead of the
    C^2 n^4 of a full layer), so that every decoder unit can reason about the whole image."""

    def __init__(self, channels, side):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, side * side, side * side) / side)  # std 1/sqrt(fan_in)

    def forward(self, h):
        B, C, n, _ = h.shape
        out = torch.bmm(h.flatten(2).transpose(0, 1), self.weight)  # (C, B, n*n): one matrix per channel
        return out.transpose(0, 1).reshape(B, C, n, n)  # (B, C, n, n)


class ContextEncoder(nn.Module):
    """F: masked image -> ResNet trunk's last map -> channel-wise FC -> 1x1 conv (mixes channels, Sec. 3.1)
    -> DCGAN up-convolutions -> (B, 3, S, S) in [-1, 1] (tanh, as the paper's images)."""

    def __init__(self, arch, small_images, image_size):
        super().__init__()
        self.backbone, width = common.resnet(arch, small_images)
        n_up = 3 if arch == "tiny" or small_images else 5  # the trunk shrinks the side 8x (CIFAR stem, tiny) or 32x
        # widths: the 1x1 conv's, then each up-convolution's, halving as DCGAN's generator does, from half the
        # trunk's width (at most 512), never below 16. ResNet-18 at 32 px: 256, 128, 64, 32; tiny: 64, 32, 16, 16
        first = min(width // 2, 512)
        widths = [max(first // 2**i, 16) for i in range(n_up + 1)]
        layers = [ChannelwiseFC(width, image_size // 2**n_up), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                  nn.Conv2d(width, widths[0], 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(widths, widths[1:]):  # each up-convolution doubles the side
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        self.decoder = nn.Sequential(*layers, nn.Conv2d(widths[-1], 3, 3, 1, 1), nn.Tanh())

    def forward(self, x):
        h = feature_map(self.backbone, x)  # (B, width, n, n)
        return self.decoder(h)  # (B, 3, S, S)


class Discriminator(nn.Module):
    """D (DCGAN's, as the official code): 4x4 stride-2 convs, BN but on the first, LeakyReLU 0.2, down to
    4 x 4, then one conv to a logit per image (the sigmoid lives in the loss)."""

    def __init__(self, image_size, width):
        super().__init__()
        layers, c_in, c, side = [], 3, width, image_size
        while side > 4:
            layers += [nn.Conv2d(c_in, c, 4, 2, 1, bias=False)] + ([nn.BatchNorm2d(c)] if layers else [])
            layers += [nn.LeakyReLU(0.2, inplace=True)]
            c_in, c, side = c, min(2 * c, 8 * width), side // 2
        self.net = nn.Sequential(*layers, nn.Conv2d(c_in, 1, side))

    def forward(self, x):
        return self.net(x).flatten()  # (B,) logits


# -------------------------------------------------------------------------------------------------
# loss


def reconstruction_loss(pred, target, hole, region, overlap_weight):
    """Masked L2 of paper Sec. 3.2 with the official overlap weighting.

    pred, target: (B,3,H,W) pixels in [-1,1]; hole, region: (B,1,H,W), the removed pixels and the larger
    region F paints. Squared errors weigh 1 in the hole, overlap_weight in the band (region less hole)
    and 0 in the rest of the context. Per image: the weighted sum over the region divided by its
    3 * pixels (train.lua's MSE over its predicted patch), then the mean over images (so the
    mean over processes equals the one-process loss). Computed in float32.
    """
    pred, target, hole, region = pred.float(), target.float(), hole.float(), region.float()
    weight = hole + overlap_weight * (region - hole)  # (B,1,H,W): 1 hole, overlap_weight band, 0 elsewhere
    err = (pred - target).square() * weight  # (B,3,H,W)
    return (err.sum((1, 2, 3)) / (3 * region.sum((1, 2, 3)))).mean()


def discriminator_loss(d_real, d_fake):
    """D's loss (paper Sec. 3.2, maximized by D): -log D(real) - log(1 - D(fake)), batch means, summed as the
    official code. d_real, d_fake: (B,) logits; in float32 through log-sigmoid, never sigmoid then log."""
    d_real, d_fake = d_real.float(), d_fake.float()
    return (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) +
            F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))


def adversarial_loss(d_fake):
    """F's adversarial loss -log D(F(x)), the non-saturating form the official code trains. d_fake: (B,) logits."""
    d_fake = d_fake.float()
    return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))


# -------------------------------------------------------------------------------------------------
# pretext metric, pictures, fill colour


def dataset_mean(data):
    """(3,) mean colour in [0,1] of the pretraining images (ImageNet's for folder datasets)."""
    if not isinstance(data.pretrain, tuple):
        return torch.tensor(common.MEAN, device=data.rt.device)
    x = data.pretrain[0]
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    return sum(c.float().sum((0, 2, 3)) for c in x.split(4096)) / pixels / 255


def eval_hole(n, cfg, generator):
    """(n,1,S,S) holes of n test images on the CPU, their regions drawn from `generator`."""
    return hole_in(predicted_region(cfg.mask, n, cfg.image_size, generator=generator), cfg.overlap)


@torch.no_grad()
def hole_mse(raw_model, data, fill, cfg, rt):
    """Test-set mean squared error inside the hole (pixels in [0,1]) of F's prediction and of the mean fill.

    Random regions come from a generator seeded per process, so the same images get the same masks at
    every evaluation (which masks they are depends on the number of processes).
    """
    raw_model.eval()
    g = torch.Generator().manual_seed(cfg.seed * 1000 + rt.rank)
    sums = torch.zeros(3, device=rt.device)  # squared errors of prediction and mean fill, hole values
    for x, _ in data.eval_batches("test", 512):
        img = eval_view(x, cfg.image_size)  # (b,3,S,S)
        hole = eval_hole(len(img), cfg, g).to(rt.device)  # (b,1,S,S)
        with rt.autocast():
            pred = raw_model(common.normalize(mask_image(img, hole, fill)))
        pred = (pred.float() + 1) / 2  # [-1,1] -> [0,1]
        err_pred, err_fill = (pred - img).square() * hole, (fill.view(1, 3, 1, 1) - img).square() * hole  # (b,3,S,S)
        sums += torch.stack([err_pred.sum(), err_fill.sum(), 3 * hole.sum()])
    sums = common.all_reduce_sum(sums)  # sums over the whole test set, on every process
    raw_model.train()
    return {"hole_mse": (sums[0] / sums[2]).item(), "hole_mse_mean_fill": (sums[1] / sums[2]).item()}


@torch.no_grad()
def save_inpaintings(raw_model, x, fill, cfg, rt, name):
    """PNG grid in out_dir, a column per image: masked input / prediction pasted into the hole / ground truth."""
    if not rt.is_main:
        return
    raw_model.eval()
    img = eval_view(x, cfg.image_size)
    hole = eval_hole(len(img), cfg, torch.Generator().manual_seed(cfg.seed)).to(img.device)  # the same each time
    masked = mask_image(img, hole, fill)
    pred = (raw_model(common.normalize(masked)).float() + 1) / 2
    common.save_image_grid([masked, torch.where(hole.bool(), pred, img), img], os.path.join(cfg.out_dir, name))
    raw_model.train()


# -------------------------------------------------------------------------------------------------
# training


def train(cfg: Config) -> dict:
    rt = common.setup(cfg)  # processes, device, precision, seed, out_dir
    data = common.load_data(cfg, rt)  # uint8 images; small datasets live on the device
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    adversarial = cfg.adv_weight > 0  # the joint loss: D is built and trained; with L2 alone there is no D
    lr = cfg.lr * 10 if 0 < cfg.adv_weight < 1 else cfg.lr  # F's: 10x D's under the joint loss only (C train.lua)
    fill = dataset_mean(data)  # (3,) the colour of the hole in F's input
    common.print0(f"inpainting: {total_steps} steps, Adam lr {lr:.3g} (F)" + (f" / {cfg.lr:.3g} (D)" if adversarial
                  else ", L2 alone, no D") + f", mask {cfg.mask}, fill {[round(v, 3) for v in fill.tolist()]}")

    raw_model = common.sync_batchnorm(ContextEncoder(cfg.arch, cfg.image_size <= 64, cfg.image_size).to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    opt = torch.optim.Adam(common.param_groups(raw_model, cfg.weight_decay), lr=lr, betas=(cfg.beta1, 0.999))
    if adversarial:
        raw_disc = common.sync_batchnorm(Discriminator(cfg.image_size, cfg.d_width).to(rt.device), rt)
        disc = common.compile_and_ddp(raw_disc, rt)
        opt_d = torch.optim.Adam(raw_disc.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if adversarial:
            raw_disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["opt_d"])
        start_step = state["step"]

    def features(x):  # the trunk's pooled output on un-masked, un-augmented uint8 images, at the training side
        return raw_model.backbone(common.normalize(eval_view(x, cfg.image_size)))

    shown = next(data.eval_batches("test", 8))[0]  # the first 8 test images, for the PNG grids

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt),
                   **hole_mse(raw_model, data, fill, cfg, rt)})
        save_inpaintings(raw_model, shown, fill, cfg, rt, f"inpainting_epoch{epoch:04d}.png")

    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, _ in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = common.cosine_lr(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        common.set_lr(opt, lr_now)
        img = inpainting_view(x, cfg)  # (B, 3, S, S) in [0, 1]
        region = predicted_region(cfg.mask, len(img), cfg.image_size, device=rt.device)  # (B, 1, S, S): to paint
        hole = hole_in(region, cfg.overlap)  # (B, 1, S, S): removed from F's input, 1 = removed
        target = img * 2 - 1  # (B, 3, S, S) in [-1, 1], the paper's pixel range
        with rt.autocast():
            pred = model(common.normalize(mask_image(img, hole, fill)))  # (B, 3, S, S): F(masked x)
        pred = pred.float()
        rec = reconstruction_loss(pred, target, hole, region, cfg.overlap_weight)
        loss, extra = (1 - cfg.adv_weight) * rec, {}

        if adversarial:
            # (1) D step: real regions -> 1, painted regions -> 0; the prediction is detached, F is untouched
            common.set_lr(opt_d, lr_now * cfg.lr / lr)  # D follows the same schedule at its own scale
            with rt.autocast():
                d_real, d_fake = disc(target * region), disc(pred.detach() * region)  # (B,) logits each
            d_loss = discriminator_loss(d_real, d_fake)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            # (2) F's adversarial term through the just-updated D; D's gradients from it are discarded by
            # opt_d.zero_grad() before D's next backward, and opt holds F's parameters only
            with rt.autocast():
                adv = adversarial_loss(disc(pred * region))  # (B,) logits -> scalar
            loss, extra = loss + cfg.adv_weight * adv, dict(adv=adv, d_loss=d_loss)

        # F step: the L2 loss alone, or the joint loss (paper Sec. 3.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(step, loss=loss, lr=lr_now, rec=rec, **extra)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                players = dict(disc=raw_disc.state_dict(), opt_d=opt_d.state_dict()) if adversarial else {}
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "opt": opt.state_dict(), **players, "step": step + 1,
                    "config": dataclasses.asdict(cfg)}, rt)

    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    pretext = hole_mse(raw_model, data, fill, cfg, rt)
    save_inpaintings(raw_model, shown, fill, cfg, rt, "inpainting.png")
    if rt.is_main:  # the encoder alone, loadable into a torchvision ResNet with the same stem (README)
        torch.save(raw_model.backbone.state_dict(), os.path.join(cfg.out_dir, "encoder.pt"))
    results = {"method": "inpainting", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs,
               "steps": stop_step, **metrics, **pretext, "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
