"""Context Encoders: feature learning by inpainting.

Pathak, Krahenbuhl, Donahue, Darrell, Efros. CVPR 2016. arXiv:1604.07379.

A region of each image is removed (filled with the dataset's mean colour) and an encoder-decoder F
must paint it back from the context around it. The loss is a masked L2 reconstruction, weighted
0.999, plus 0.001 times an adversarial loss from a discriminator D that tells real hole contents
from predicted ones (paper Sec. 3.2; D sees the predicted region, not the context, as the official
code's default). The decoder predicts a slightly larger region than the hole, and squared errors in
the band where it overlaps the visible context weigh 10 times as much (official code's overlapPred).
Encoder and decoder are joined by the paper's channel-wise fully-connected layer (Sec. 3.1), so
every painted pixel can depend on the whole image. D and F are trained in turns: a D step on real
and (detached) predicted regions, then an F step; each has its own Adam optimizer. To fill the hole
well the encoder must understand what the image shows; its features are the representation.

    python inpainting.py                                         # 1 GPU: CIFAR-10, central 16 px hole
    torchrun --standalone --nproc_per_node=8 inpainting.py       # 8 GPUs, same global batch of 64
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 inpainting.py
    python inpainting.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=64   # CPU smoke run
    python inpainting.py --mask=regions                          # random-region holes (also: --mask=blocks)

Defaults: no CIFAR-10 recipe was published, so the official code's 128 px recipe is scaled to 32 px:
a central hole of a quarter of the image (64 of 128 px there, 16 of 32 px here), a 1 px overlap band
(4 px at 128 px), weights 0.999 / 0.001, batch 64, Adam with betas (0.5, 0.999), D at lr 2e-4 and the
encoder-decoder at 10x that (the official code's rule for the joint loss), no weight decay, 500
epochs (its niter=500), the hole filled with the training set's mean colour. Published number for
reference (not CIFAR-10): AlexNet context encoder on ImageNet, 56.5% PASCAL VOC 2007 classification
mAP after fine-tuning (paper Table 2). Results of this file: not yet measured (see README).
Evaluated features: the ResNet trunk's pooled output (512-d for ResNet-18) on UN-masked images; the
decoder sees the trunk's last feature map before pooling; kNN and linear probe as simclr.py.
Pretext metric: hole_mse, the test-set mean squared error inside the hole (pixels in [0, 1]), next
to hole_mse_mean_fill, the same for the hole left at the mean colour.
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

MASKS = ("center", "blocks", "regions")


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
    d_width: int = 64  # discriminator's first conv width (DCGAN's ndf, official code)
    # method
    mask: str = "center"  # center (paper default) | blocks | regions: every kind removes exactly 1/4 of the image
    overlap: int = 1  # px the prediction reaches beyond the hole (official 4 px at 128 px, scaled to 32 px)
    overlap_weight: float = 10.0  # weight of squared errors in that overlap band (official code), 1 in the hole
    rec_weight: float = 0.999  # lambda_rec of the joint loss (paper Sec. 3.2)
    adv_weight: float = 0.001  # lambda_adv of the joint loss (paper Sec. 3.2); 0 = L2 only
    crop_min: float = 0.5  # smallest area fraction of the random resized crop (plus a random flip)
    # optim
    epochs: int = 500  # passes over the training images (official niter=500)
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 64  # global batch, split across processes (official 64)
    lr: float = 2e-3  # Adam lr of encoder + decoder: 10x D's (official code, joint loss); not scaled with the batch
    d_lr: float = 2e-4  # Adam lr of the discriminator (official code, DCGAN); not scaled with the batch
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
    compile: str = "auto"  # torch.compile both networks: auto (on CUDA only) | true | false
    log_every: int = 50  # steps between progress lines
    resume: bool = False  # continue from out_dir/ckpt.pt

    def __post_init__(self):
        common.check_config(self)
        if self.mask not in MASKS:
            raise ValueError(f"--mask={self.mask} is impossible: it must be one of {', '.join(MASKS)}")
        if self.image_size % 32:
            raise ValueError(f"--image_size={self.image_size} is impossible: it must be a multiple of 32 (hole, "
                             "blocks and the decoder's up-convolutions tile it exactly)")
        if not 0 <= self.overlap < self.image_size // 4:
            raise ValueError(f"--overlap must be in [0, {self.image_size // 4}) px, got {self.overlap}")
        if self.overlap_weight <= 0 or min(self.rec_weight, self.adv_weight) < 0 or not self.rec_weight + self.adv_weight:
            raise ValueError("--overlap_weight must be > 0, --rec_weight and --adv_weight >= 0 and not both 0")
        if self.d_lr <= 0 or self.d_width < 1 or not 0 <= self.beta1 < 1 or not 0 < self.crop_min <= 1:
            raise ValueError("--d_lr must be > 0, --d_width >= 1, --beta1 in [0, 1) and --crop_min in (0, 1]")


# -------------------------------------------------------------------------------------------------
# views and masks


def inpainting_view(x, cfg):
    """A random crop and flip of each image (the official loader crops and flips): uint8 -> (B,3,S,S) in [0,1]."""
    x = common.random_resized_crop(common.to_float(x), cfg.image_size, scale=(cfg.crop_min, 1.0))
    return common.random_flip(x)


def eval_view(x, size):
    """Un-augmented uint8 images -> float [0,1] at the training side (the fully-connected layer fixes it)."""
    x = common.to_float(x)
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)


def random_mask(n, size, kind, device=None, generator=None):
    """(n, 1, size, size) float masks, 1 = removed, each covering exactly a quarter of its image.

    center:  the central (size/2)^2 square (the paper's 64 px hole in 128 px images).
    blocks:  4 random cells of a 4x4 grid of (size/4)^2 squares, the grid shifted by a random offset
             of less than a cell with wrap-around (paper Sec. 3.3: several smaller blocks).
    regions: the lowest quarter of uniform 8x8 noise upsampled bicubically: a union of random blobs,
             as the official random-region pattern (thresholded upsampled noise, density 0.25, about
             8 noise cells per image side); the quarter is taken per image, so the area is exact.
    """
    rand = lambda *shape: torch.rand(*shape, device=device, generator=generator)  # noqa: E731
    S = size
    if kind == "center":
        m = torch.zeros(n, 1, S, S, device=device)
        m[:, :, S // 4: S // 4 + S // 2, S // 4: S // 4 + S // 2] = 1
        return m
    if kind == "blocks":
        cell = S // 4
        cells = torch.zeros(n, 16, device=device).scatter_(1, rand(n, 16).topk(4, 1).indices, 1.0)  # (n, 16): 4 chosen
        shift = (rand(n, 2) * cell).long()  # (n, 2) grid offset in px
        rows = (torch.arange(S, device=device) + shift[:, :1]) // cell % 4  # (n, S) grid row of each pixel row
        cols = (torch.arange(S, device=device) + shift[:, 1:]) // cell % 4  # (n, S)
        return cells.gather(1, (rows[:, :, None] * 4 + cols[:, None, :]).flatten(1)).view(n, 1, S, S)
    noise = F.interpolate(rand(n, 1, 8, 8), size=(S, S), mode="bicubic", align_corners=False).flatten(1)  # (n, S*S)
    lowest = noise.topk(S * S // 4, 1, largest=False).indices  # (n, S*S/4)
    return torch.zeros(n, S * S, device=device).scatter_(1, lowest, 1.0).view(n, 1, S, S)


def predicted_region(hole, overlap):
    """The hole grown by `overlap` px in every direction (a square dilation): what the decoder must paint."""
    return F.max_pool2d(hole, 2 * overlap + 1, stride=1, padding=overlap) if overlap else hole


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
        stride = 8 if arch == "tiny" or small_images else 32  # the trunk's total downsampling (common.resnet)
        widths = [max(min(width // 2, 512) >> i, 16) for i in range(stride.bit_length())]  # 1x1 conv, then one per up
        layers = [ChannelwiseFC(width, image_size // stride), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
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


def reconstruction_loss(pred, target, hole, overlap, overlap_weight):
    """Masked L2 of paper Eq. 2 with the official overlap weighting.

    pred, target: (B,3,H,W) pixels in [-1,1]; hole: (B,1,H,W), 1 = removed. The prediction covers the
    hole grown by `overlap` px; squared errors weigh 1 in the hole, overlap_weight in the band around
    it and 0 in the rest of the context. Per image: the weighted sum over the predicted region divided
    by its 3 * pixels (the official code's MSE over the predicted patch), then the mean over images (so
    the mean over processes equals the one-process loss). Computed in float32.
    """
    pred, target, hole = pred.float(), target.float(), hole.float()
    region = predicted_region(hole, overlap)  # (B,1,H,W): hole and band
    weight = hole + overlap_weight * (region - hole)  # (B,1,H,W): 1 hole, overlap_weight band, 0 elsewhere
    err = (pred - target).square() * weight  # (B,3,H,W)
    return (err.sum((1, 2, 3)) / (3 * region.sum((1, 2, 3)))).mean()


def discriminator_loss(d_real, d_fake):
    """D's loss (paper Eq. 3, maximized by D): -log D(real) - log(1 - D(fake)), batch means, summed as the
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
    """(3,) mean colour in [0,1] of the pretraining images (ImageNet's for folder datasets, as the paper)."""
    if not isinstance(data.pretrain, tuple):
        return torch.tensor(common.MEAN, device=data.rt.device)
    x = data.pretrain[0]
    return sum(c.float().sum((0, 2, 3)) for c in x.split(4096)) / (x.numel() / 3) / 255


@torch.no_grad()
def hole_mse(raw_model, data, fill, cfg, rt):
    """Test-set mean squared error inside the hole (pixels in [0,1]) of F's prediction and of the mean fill.

    Random masks come from a generator seeded per process, so the same images get the same masks at
    every evaluation (for blocks and regions, which masks they are depends on the number of processes).
    """
    raw_model.eval()
    g = torch.Generator().manual_seed(cfg.seed * 1000 + rt.rank)
    sums = torch.zeros(3, device=rt.device)  # squared errors of prediction and mean fill, hole values
    for x, _ in data.eval_batches("test", 512):
        img = eval_view(x, cfg.image_size)  # (b,3,S,S)
        hole = random_mask(len(img), cfg.image_size, cfg.mask, generator=g).to(rt.device)  # (b,1,S,S)
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
    g = torch.Generator().manual_seed(cfg.seed)  # the same masks in every grid of the run
    hole = random_mask(len(img), cfg.image_size, cfg.mask, generator=g).to(img.device)
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
    lr, d_lr = cfg.lr, cfg.d_lr  # constant rule: the official Adam GAN rates (batch 64), not scaled with the batch
    fill = dataset_mean(data)  # (3,) the colour of the hole in F's input
    common.print0(f"inpainting: {total_steps} steps, Adam lr {lr:.3g} (F) / {d_lr:.3g} (D), mask {cfg.mask}, "
                  f"fill {[round(v, 3) for v in fill.tolist()]}")

    raw_model = common.sync_batchnorm(ContextEncoder(cfg.arch, cfg.image_size <= 64, cfg.image_size).to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    raw_disc = common.sync_batchnorm(Discriminator(cfg.image_size, cfg.d_width).to(rt.device), rt)
    disc = common.compile_and_ddp(raw_disc, rt)
    opt = torch.optim.Adam(common.param_groups(raw_model, cfg.weight_decay), lr=lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(raw_disc.parameters(), lr=d_lr, betas=(cfg.beta1, 0.999))
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        raw_disc.load_state_dict(state["disc"])
        opt.load_state_dict(state["opt"])
        opt_d.load_state_dict(state["opt_d"])
        start_step = state["step"]

    def features(x):  # the trunk's pooled output on un-masked, un-augmented uint8 images
        return raw_model.backbone(common.normalize(common.to_float(x)))

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
        common.set_lr(opt_d, lr_now * d_lr / lr)  # D follows the same schedule at its own scale
        img = inpainting_view(x, cfg)  # (B, 3, S, S) in [0, 1]
        hole = random_mask(len(img), cfg.image_size, cfg.mask, device=rt.device)  # (B, 1, S, S), 1 = removed
        region = predicted_region(hole, cfg.overlap)  # (B, 1, S, S): hole and overlap band
        target = img * 2 - 1  # (B, 3, S, S) in [-1, 1], the paper's pixel range
        with rt.autocast():
            pred = model(common.normalize(mask_image(img, hole, fill)))  # (B, 3, S, S): F(masked x)
        pred = pred.float()

        # (1) D step: real regions -> 1, predicted regions -> 0; the prediction is detached, F is untouched
        with rt.autocast():
            d_real, d_fake = disc(target * region), disc(pred.detach() * region)  # (B,) logits each
        d_loss = discriminator_loss(d_real, d_fake)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        # (2) F step: joint loss (paper Eq. 4) through the just-updated D; D's gradients from it are
        # discarded by opt_d.zero_grad() before D's next backward, and opt holds F's parameters only
        with rt.autocast():
            d_fake = disc(pred * region)  # (B,)
        rec = reconstruction_loss(pred, target, hole, cfg.overlap, cfg.overlap_weight)
        adv = adversarial_loss(d_fake)
        loss = cfg.rec_weight * rec + cfg.adv_weight * adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(step, loss=loss, lr=lr_now, rec=rec, adv=adv, d_loss=d_loss)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "disc": raw_disc.state_dict(), "opt": opt.state_dict(),
                    "opt_d": opt_d.state_dict(), "step": step + 1, "config": dataclasses.asdict(cfg)}, rt)

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
