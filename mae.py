"""MAE: masked autoencoders are scalable vision learners.

He, Chen, Xie, Li, Dollar, Girshick. CVPR 2022. arXiv:2111.06377.

An image is cut into non-overlapping p x p patches and a random 75% of them are removed, a fresh
draw per image and step. A ViT encoder sees only the visible 25% (plus a cls token); a light
transformer decoder gets the encoded visible patches back in place, a shared learned mask token in
every removed place, fixed position embeddings on all of them, and predicts the pixels of every
patch. The loss is the mean squared error on the removed patches only, each target patch
standardized by its own mean and variance (norm_pix_loss). Encoding a quarter of the patches makes
pre-training cheap; the high ratio makes the task hard enough to need semantics. After training,
the decoder is thrown away and the encoder sees whole, un-masked images.

    python mae.py                                                # 1 GPU: CIFAR-10, ViT-Tiny with 4 px patches
    torchrun --standalone --nproc_per_node=8 mae.py              # 8 GPUs, same global batch of 4096
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 mae.py
    python mae.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run

Defaults: the paper has no CIFAR recipe. Sizes and schedule follow IcarusWizard/MAE (I), a CIFAR-10
adaptation: ViT-Tiny, a 4-block decoder of the same width, batch 4096, AdamW 1.5e-4 per 256 images,
2000 epochs; where I departs from the paper's method, this file keeps the paper's (table). I's README
reports 89.77% top-1 after FINE-TUNING (its best test epoch of 100); no linear-probe number exists.
Evaluated features: the encoder's cls-token output after its final LayerNorm (192-d for ViT-Tiny) on
whole, un-masked images, for knn_top1, probe_top1 and linear_top1 (common.evaluate): the token the
paper's linear probe reads. Pretext metric: test_loss, mae_loss on the test images under masks fixed
for the run. Results of this file: not yet measured (README).

Departures from the sources (P: the paper, arXiv v3; C: facebookresearch/mae; I: IcarusWizard/MAE):

| setting | paper | official code | this file |
|---|---|---|---|
| data, encoder | ImageNet 224 px, ViT-L/16 (P Sec. 4) | ViT-B/L/H (C models_mae.py) | CIFAR-10 32 px, ViT-Tiny (as I) |
| patch size | 16 (P Sec. 4) | 16; 14 for ViT-H (C models_mae.py) | 4 px: 64 patches (I: 2 px, 256) |
| decoder | 8 blocks, 512 wide (P Tab. 1a, 1b) | as P, 16 heads (C models_mae.py) | 4 blocks, 192 wide, 3 heads (as I) |
| blocks, init | - | qkv bias, LN eps 1e-6, xavier linears (C models_mae.py) | as C (I: timm defaults, torch init) |
| position embeddings | fixed 2-D sin-cos (P App. A.1) | as P (C util/pos_embed.py) | as P (I: learned) |
| target | normalized patches (P Sec. 3, Tab. 1d) | raw; --norm_pix_loss in C PRETRAIN.md | as P (I: raw pixels) |
| augmentation | resized crop (P Tab. 8) | area 0.2-1, bicubic; flip (C main_pretrain.py) | as C, bilinear (I: none) |
| epochs, warmup | 800 to 1600, 40 (P Sec. 4, Tab. 8) | 800, 40 (C PRETRAIN.md) | 2000, 200 (as I) |
| lr schedule | cosine after warmup (P Tab. 8) | as P, per step (C util/lr_sched.py) | as C (I: per epoch) |
| input, precision | - | ImageNet mean, std; float16 autocast, loss scaler (C) | as C, but bfloat16 (I: 0.5, 0.5) |
| weight decay 0.05 on | - | all but 1-D params and biases: tokens too (C main_pretrain.py) | as C (I: all) |
| evaluated feature | cls token; avg pooling as good (P App. A.1) | cls token, normed (C main_linprobe.py) | as C |
| linear probe | BN w/o affine, LARS 0.1, batch 16384, 90 ep. (P A.2) | as P (C FINETUNE.md) | BN, SGD, 256, 100 ep. |
| published numbers | fine-tuned (P Tab. 3); linear probe (P Tab. 1) | - | no fine-tuning (I's 89.77% is fine-tuned) |
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

import common

VITS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12),  # encoder width, depth, heads
        "tiny": (64, 2, 2)}


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic
    data_dir: str = "./data"  # folder of <dataset>.npz (downloaded there if missing); $SSL_DATA replaces this default
    out_dir: str = "out/mae"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json, reconstruction PNGs
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the augmented views (96 for STL-10, 224 for ImageNet)
    # model
    arch: str = "vit_tiny"  # encoder: vit_tiny | vit_small | vit_base | tiny (64 wide, 2 layers: CPU runs)
    patch_size: int = 4  # side p of a patch: 32 px -> 8 x 8 = 64 patches (16 for 224 px, as the paper)
    decoder_dim: int = 192  # decoder width (paper: 512 for ViT-B/L/H)
    decoder_depth: int = 4  # decoder transformer layers (paper: 8)
    decoder_heads: int = 3  # decoder attention heads (official code: 16)
    # method
    mask_ratio: float = 0.75  # fraction of patches removed per image (paper Sec. 4.1)
    norm_pix_loss: bool = True  # target = each patch standardized by its own mean and variance (paper Table 1d)
    crop_min: float = 0.2  # smallest area fraction of the random resized crop (official main_pretrain.py)
    # optim
    epochs: int = 2000  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 4096  # global batch, split across processes
    lr: float = 1.5e-4  # AdamW base lr per 256 images, scaled linearly with the batch
    weight_decay: float = 0.05  # decoupled; on matrices and the tokens, not on biases and norms (official code)
    warmup_epochs: int = 200  # linear warmup, then cosine decay to 0
    # eval
    eval_every: int = 50  # epochs between kNN monitor runs and reconstruction PNGs (0 = only at the end)
    probe_epochs: int = 100  # fast linear probe on precomputed frozen features at the end, epochs (0 = none)
    linear_epochs: int = -1  # standard linear evaluation at the end, epochs (-1: 100 on CUDA, none on CPU; 0: none)
    # system
    seed: int = 0  # weights, data order, augmentations and masks
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    compile: str = "auto"  # torch.compile the model: auto (on CUDA only) | true | false
    log_every: int = 50  # steps between progress lines
    resume: bool = False  # continue from out_dir/ckpt.pt

    def __post_init__(self):
        common.check_config(self, archs=tuple(VITS))
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"--patch_size={self.patch_size} must divide --image_size={self.image_size}")
        L = (self.image_size // self.patch_size) ** 2
        if not 0 < self.mask_ratio < 1 or not 0 < int(L * (1 - self.mask_ratio)) < L:
            raise ValueError(f"--mask_ratio={self.mask_ratio} must be in (0, 1) and remove some but not all "
                             f"of the {L} patches")
        if self.decoder_dim % 4 or self.decoder_dim % self.decoder_heads or self.decoder_depth < 1:
            raise ValueError("--decoder_dim must be a multiple of 4 and of --decoder_heads; --decoder_depth >= 1")
        if not 0 < self.crop_min <= 1:
            raise ValueError(f"--crop_min={self.crop_min} must be in (0, 1]")


# -------------------------------------------------------------------------------------------------
# views


def mae_view(x, cfg):
    """The official code's only augmentation, a random resized crop and a flip (the paper lists the
    crop, Tab. 8; no colour jitter): uint8 (B,3,H,W) -> normalized (B,3,S,S)."""
    x = common.to_float(x)
    x = common.random_resized_crop(x, cfg.image_size, scale=(cfg.crop_min, 1.0))
    x = common.random_flip(x)
    return common.normalize(x)


def patchify(imgs, p):
    """(B, 3, H, W) -> (B, L, p*p*3): patches in row-major order, pixels ordered (row, col, channel)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p):
    """(B, L, p*p*3) -> (B, 3, H, W) for a square grid: the inverse of patchify."""
    B, L, _ = x.shape
    h = round(L**0.5)
    x = x.reshape(B, h, h, p, p, 3)  # (B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, 3, h * p, h * p)


def random_masking(x, mask_ratio):
    """Keep int(L * (1 - mask_ratio)) tokens of each sample, chosen uniformly at random (paper Sec. 3).

    x: (B, L, D). The tokens kept are the first of a random permutation (argsort of uniform noise),
    so each sample gets its own subset. The count rounds down, as the official code: L=64, 0.75 -> 16 kept.
    Returns x_visible (B, L_keep, D), mask (B, L) with 1 = removed, 0 = kept, in the original
    order, and ids_restore (B, L), the permutation that puts the shuffled sequence back in order.
    """
    B, L, D = x.shape
    n_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(B, L, device=x.device)
    ids_shuffle = noise.argsort(1)  # (B, L): kept tokens first
    ids_restore = ids_shuffle.argsort(1)  # (B, L)
    ids_keep = ids_shuffle[:, :n_keep]  # (B, L_keep)
    x_visible = x.gather(1, ids_keep[..., None].expand(-1, -1, D))  # (B, L_keep, D)
    mask = (ids_restore >= n_keep).float()  # (B, L): position l was shuffled past the kept ones
    return x_visible, mask, ids_restore


# -------------------------------------------------------------------------------------------------
# model


def sincos_pos_embed(dim, grid):
    """(1 + grid*grid, dim) fixed 2-D sin-cos position embeddings: a zero row for the cls token, then
    per patch (row-major) sin and cos of its column and of its row at dim/4 frequencies each."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))  # (dim/4,) frequencies
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # (grid, grid) each
    col = cols.reshape(-1, 1) * omega  # (L, dim/4): column angles
    row = rows.reshape(-1, 1) * omega  # (L, dim/4): row angles
    patches = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], 1)  # (L, dim)
    return torch.cat([torch.zeros(1, dim), patches])  # (1 + L, dim)


def transformer(dim, depth, heads):
    """Pre-norm ViT blocks from torch's own layers (attention by scaled_dot_product_attention)."""
    return nn.Sequential(*[nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                                      layer_norm_eps=1e-6, batch_first=True, norm_first=True)
                           for _ in range(depth)])


class MAE(nn.Module):
    """ViT encoder on the visible patches, light decoder on all of them: images -> pixel predictions."""

    def __init__(self, image_size, patch_size, dim, depth, heads, decoder_dim, decoder_depth, decoder_heads):
        super().__init__()
        self.p, grid = patch_size, image_size // patch_size
        self.patch_embed = nn.Linear(3 * patch_size**2, dim)  # = the paper's stride-p conv, on patchified pixels
        # (1, 1, D) as in the official code, whose optimizer decays the tokens and spares only 1-D
        # parameters (biases, norms): common.param_groups applies that same rule by ndim
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid), persistent=False)  # fixed, not trained
        self.blocks = transformer(dim, depth, heads)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_dim, grid), persistent=False)
        self.decoder_blocks = transformer(decoder_dim, decoder_depth, decoder_heads)
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, 3 * patch_size**2)
        for m in self.modules():  # the official initialization: xavier-uniform linear layers, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_encoder(self, patches, mask_ratio):
        """patches (B, L, p*p*3) -> (tokens (B, 1 + L_keep, dim), mask (B, L), ids_restore (B, L)).

        mask_ratio 0 encodes every patch in order (evaluation); token 0 is the cls token.
        """
        x = self.patch_embed(patches) + self.pos_embed[1:]  # (B, L, dim)
        if mask_ratio > 0:
            x, mask, ids_restore = random_masking(x, mask_ratio)  # (B, L_keep, dim): removed patches are gone
        else:
            mask = x.new_zeros(x.shape[:2])
            ids_restore = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        cls = (self.cls_token + self.pos_embed[0]).expand(x.shape[0], 1, -1)  # (B, 1, dim)
        return self.norm(self.blocks(torch.cat([cls, x], 1))), mask, ids_restore

    def forward_decoder(self, h, ids_restore):
        """h (B, 1 + L_keep, dim), ids_restore (B, L) -> pixel predictions (B, L, p*p*3) of every patch."""
        x = self.decoder_embed(h)  # (B, 1 + L_keep, Dd)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)  # (B, L - L_keep, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], 1)  # (B, L, Dd), shuffled order: kept first
        x_ = x_.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # (B, L, Dd), image order
        x = torch.cat([x[:, :1], x_], 1) + self.decoder_pos_embed  # (B, 1 + L, Dd)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, 1:])  # (B, L, p*p*3): the cls token predicts nothing

    def forward(self, imgs, mask_ratio):
        h, mask, ids_restore = self.forward_encoder(patchify(imgs, self.p), mask_ratio)
        return self.forward_decoder(h, ids_restore), mask  # (B, L, p*p*3), (B, L)


# -------------------------------------------------------------------------------------------------
# loss


def mae_loss(imgs, pred, mask, p, norm_pix_loss):
    """Mean squared error on the removed patches (paper Sec. 3, "Reconstruction target").

    imgs (B,3,H,W) normalized images; pred (B, L, p*p*3); mask (B, L), 1 = removed. Each patch's
    error is the mean over its p*p*3 values; the loss averages that over removed patches only. With
    norm_pix_loss each target patch is (x - mean) / sqrt(var + 1e-6), its own mean and unbiased
    variance, as the official code. Computed in float32.
    """
    target = patchify(imgs.float(), p)  # (B, L, p*p*3)
    if norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)  # (B, L, 1) each
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


# -------------------------------------------------------------------------------------------------
# reconstructions


def eval_view(x, size):
    """Un-augmented uint8 images -> normalized float at the training side (the positional embedding's grid)."""
    return common.normalize(common.resize(common.to_float(x), size))


@torch.no_grad()
def test_loss(model, data, cfg, rt, batch_size=512):
    """mae_loss on the un-augmented test images, with the same random masks at every evaluation of a
    run (a fixed seed per process): the pretext metric. Every process scores its share of the
    split; the sums are summed over processes."""
    model.eval()
    sums = torch.zeros(2, device=rt.device)  # summed loss, images
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):  # the training's draws stay
        torch.manual_seed(cfg.seed * 1_000_003 + rt.rank)
        for x, _ in data.eval_batches("test", batch_size):
            imgs = eval_view(x, cfg.image_size)  # (b, 3, S, S)
            with rt.autocast():
                pred, mask = model(imgs, cfg.mask_ratio)  # (b, L, p*p*3), (b, L)
            loss = mae_loss(imgs, pred.float(), mask, cfg.patch_size, cfg.norm_pix_loss)
            sums += torch.stack([loss * len(x), torch.tensor(float(len(x)), device=rt.device)])
    model.train()
    sums = common.all_reduce_sum(sums)  # global: the whole test split
    return {"test_loss": (sums[0] / sums[1]).item()}


@torch.no_grad()
def save_reconstructions(model, x, cfg, path):
    """PNG of three rows: originals, masked inputs (removed patches grey), reconstructions with the
    visible patches pasted back. x: uint8 (N,3,H,W). With norm_pix_loss the predictions are
    standardized patches: for display only, each is given back its true patch's mean and std."""
    imgs = eval_view(x, cfg.image_size)
    pred, mask = model(imgs, cfg.mask_ratio)  # (N, L, p*p*3), (N, L)
    target = patchify(imgs, cfg.patch_size)
    if cfg.norm_pix_loss:
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    m = mask[..., None]  # (N, L, 1)
    mean, std = imgs.new_tensor(common.MEAN).view(1, 3, 1, 1), imgs.new_tensor(common.STD).view(1, 3, 1, 1)

    def rgb(patches):  # (N, L, p*p*3) normalized -> (N, 3, S, S) in [0, 1]; a zeroed patch shows grey
        return unpatchify(patches, cfg.patch_size) * std + mean

    common.save_image_grid([rgb(target), rgb(target * (1 - m)), rgb(target * (1 - m) + pred * m)], path)


# -------------------------------------------------------------------------------------------------
# training


def train(cfg: Config) -> dict:
    rt = common.setup(cfg)  # processes, device, precision, seed, out_dir
    data = common.load_data(cfg, rt)  # uint8 images; small datasets live on the device
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (paper App. A.1: lr = base lr x batch / 256)
    dim, depth, heads = VITS[cfg.arch]
    L = (cfg.image_size // cfg.patch_size) ** 2
    common.print0(f"mae: {total_steps} steps, AdamW lr {lr:.3g}, {cfg.arch} ({dim} wide, {depth} layers), "
                  f"{L} patches of {cfg.patch_size} px, {round(L * cfg.mask_ratio)} removed per image")

    raw_model = MAE(cfg.image_size, cfg.patch_size, dim, depth, heads, cfg.decoder_dim, cfg.decoder_depth,
                    cfg.decoder_heads)
    raw_model = common.sync_batchnorm(raw_model.to(rt.device), rt)  # a ViT has no BatchNorm: nothing to convert
    model = common.compile_and_ddp(raw_model, rt)
    opt = torch.optim.AdamW(common.param_groups(raw_model, cfg.weight_decay), lr=lr, betas=(0.9, 0.95))
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # the encoder's cls token on whole, un-masked, un-augmented uint8 images, at image_size
        patches = patchify(eval_view(x, cfg.image_size), cfg.patch_size)
        return raw_model.forward_encoder(patches, 0.0)[0][:, 0]

    def reconstructions(name):  # the first 8 test images, masked, through the whole model
        if rt.is_main:
            x = next(iter(data.eval_batches("test", 8)))[0]
            save_reconstructions(raw_model, x, cfg, os.path.join(cfg.out_dir, name))

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt),
                   **test_loss(raw_model, data, cfg, rt)})
        reconstructions(f"reconstruction_epoch{epoch}.png")

    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, _ in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = common.cosine_lr(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        common.set_lr(opt, lr_now)
        imgs = mae_view(x, cfg)  # (B, 3, S, S)
        with rt.autocast():
            pred, mask = model(imgs, cfg.mask_ratio)  # (B, L, p*p*3), (B, L): a fresh mask per image
        # every process removes the same number of patches, so DDP's average of the per-process
        # means is the mean over the removed patches of the GLOBAL batch
        loss = mae_loss(imgs, pred, mask, cfg.patch_size, cfg.norm_pix_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(step, loss=loss, lr=lr_now)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                    "config": dataclasses.asdict(cfg)}, rt)

    metrics = {**common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs),
               **test_loss(raw_model, data, cfg, rt)}
    reconstructions("reconstruction_final.png")
    if rt.is_main:  # the encoder alone (patch embedding, cls token, blocks, norm): the decoder is discarded;
        # the fixed position embeddings are not saved: sincos_pos_embed(dim, image_size // patch_size) rebuilds them
        encoder = {k: v for k, v in raw_model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
        torch.save(encoder, os.path.join(cfg.out_dir, "encoder.pt"))
    results = {"method": "mae", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
