"""SwAV: swapping assignments between views (unsupervised learning of visual features by
contrasting cluster assignments).

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin. NeurIPS 2020. arXiv:2006.09882.

Online clustering instead of pairwise comparison. Each crop of an image is encoded, projected and
L2-normalized to z; its scores against K learnable prototypes c_k (unit vectors) are the cosines
c_k . z. The codes q of the two global crops, soft assignments of the batch to the prototypes, are
computed without gradient by a few Sinkhorn-Knopp iterations that spread the batch equally over
the prototypes (equipartition, paper Sec. 3.1): this is what prevents collapse. Then the code of
each global crop is predicted from every other crop of the same image, by a softmax over the
prototype scores at temperature tau ("swapped prediction", Eq. 1 and 2). Multi-crop (Sec. 3.2) adds
small crops that are only predictors, never targets. With small batches, a queue of the features
of the last batches joins the batch when the codes are computed (their scores only, no gradient).
The prototypes are frozen for the first epochs and put back on the unit sphere after every step.
Under DDP the Sinkhorn sums are summed over processes: the codes are those of the global batch.
After training, h = f(x) is the representation.

    python swav.py                                               # 1 GPU: CIFAR-10, solo-learn's recipe
    torchrun --standalone --nproc_per_node=8 swav.py             # 8 GPUs, same global batch of 256
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 swav.py
    python swav.py --dataset=synthetic --arch=tiny --epochs=1 --batch_size=256   # CPU smoke run

The paper has no CIFAR recipe; the defaults are solo-learn's CIFAR-10 SwAV (S below: scripts/pretrain/
cifar/swav.yaml, augmentations/symmetric.yaml, solo/methods/swav.py, solo/utils/lars.py), for which
solo-learn reports 89.17% top-1 (its README does not say: online or offline linear). tau 0.1, 3000 prototypes of 128-d,
epsilon 0.05, 3 Sinkhorn iterations, a queue of 3840 and weight decay 1e-6 are the paper's, the
official code's and S's alike (the head's hidden width, 2048, is C's and S's). No small crops at 32 px
(S: none; a 5-14% crop of 32 px is 7-12 px a side); the paper's are `--crop_min=0.14 --n_small_crops=6`
(16 px: about 96/224 of the side). The official batch-256 ImageNet run (C bs256:
scripts/swav_200ep_bs256_pretrain.sh; 400 epochs: swav_400ep_bs256_pretrain.sh) is, in this file's flags,
`--dataset=folder --data_dir=<ImageNet> --arch=resnet50 --image_size=224 --epochs=200 --crop_min=0.14
--n_small_crops=6 --small_crop_size=96 --lars_eta=0.001 --lars_clip=false --exclude_bias_n_norm=false
--final_lr_ratio=0.001 --warmup_epochs=0 --freeze_prototypes_epochs=1 --queue_start_epoch=15`; its batch (256),
lr (0.6), small-crop areas (0.05-0.14), tau, epsilon, Sinkhorn iterations, prototypes, queue and weight decay
are the defaults. What still differs: the rows below that cite C, bfloat16 autocast for C's apex fp16, and the
crops, cut from each image's 256 px centre square (common's folder loader) where C crops the whole image.
Evaluated features: the backbone's pooled h (512-d for ResNet-18) for knn_top1, probe_top1 and
linear_top1 (common.evaluate). Results of this file: not yet measured (README).

Departures (P: the paper; C: the official code, bs256: its batch-256 script; S: solo-learn, above):

| setting | paper | official code | this file |
|---|---|---|---|
| trunk | ResNet-50 (P 4) | as P (C) | ResNet-18, CIFAR stem (S; it pads 2 px) |
| batch, epochs | 4096, up to 800; 256 (P 4.1, 4.3) | 256 on 4 GPUs, 200 or 400 (C bs256) | 256, 1000 (S) |
| global crops | 2 x 224 px, area 0.14-1 (P A.2; A.7: 0.08-1) | as P (C bs256; 2x224: 0.08-1) | 2 x 32 px, 0.08-1 (S) |
| small crops | 6 x 96 px, area 0.05-0.14 (P A.2) | as P (C bs256) | none (S) |
| crop resize | - | bilinear (C) | as C (S: bicubic) |
| blur | SimCLR's, p 0.5 (P A.2) | PIL's, radius = sigma in 0.1-2, p 0.5 (C) | as C and S (kernel sized by sigma) |
| input | - | ImageNet's mean and std (C; std 0.228 for 0.229) | ImageNet's (S: CIFAR-10's) |
| BN batches | - | one pass per crop size (C) | as C (S: one per crop) |
| loss | sum over the pairs of crops (P Eq. 6) | mean over the pairs (C) | as C and S |
| prototypes | back on the sphere after each step (P A.1) | before each step (C) | as P (S: weight-normalized) |
| prototypes frozen | first epoch (P A.1) | 5005 steps: an ImageNet epoch (C bs256) | 2 epochs (S) |
| queue | from epoch 15 (P A.6) | made at epoch 15, used once full (C) | fills from step 0, used from epoch 50 (S) |
| LARS | LARS (P A.1) | apex LARC: eta 0.001, no clip (C) | S's: eta 0.02, rates capped at lr; form "larc" as C |
| LARS on biases and BN | - | adapted and decayed (C) | neither (S) |
| lr | 4.8 at 4096; 0.6 at 256 (P A.1, A.6) | as P, not scaled (C) | 0.6 per 256 images (S), scaled linearly |
| warmup | 10 epochs at 4096 (P A.1) | as P; none at 256 (C bs256) | 10 epochs (S) |
| final lr | lr / 1000 (P A.1, A.6) | as P (C) | 0 (S) |
| evaluation | SGD 0.3, 100 epochs, crops, flips (P A.3) | as P (C eval_linear.py) | linear_eval (S: online linear) |
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
    out_dir: str = "out/swav"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json
    subset: int = 0  # train on the first N training images only (0 = all)
    image_size: int = 32  # side of the 2 global crops (96 for STL-10, 224 for ImageNet)
    # model
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs)
    proj_hidden: int = 2048  # hidden width of the projection head (official code)
    proj_dim: int = 128  # output width: features and prototypes live on this unit sphere
    n_prototypes: int = 3000  # K, the number of prototypes (paper, ImageNet and solo-learn CIFAR)
    # method
    temperature: float = 0.1  # tau of the swapped-prediction softmax (paper, solo-learn)
    epsilon: float = 0.05  # entropy regularization of the Sinkhorn codes (paper)
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations (paper)
    freeze_prototypes_epochs: int = 2  # the prototypes get no update in these first epochs (solo-learn; paper: 1)
    queue_size: int = 3840  # features of earlier batches used in the codes, global (0 = none); a multiple of the batch
    queue_start_epoch: int = 50  # the queue joins the codes from this epoch on (solo-learn CIFAR; paper: 15)
    crop_min: float = 0.08  # global crops cover area fractions (crop_min, 1) (solo-learn; paper: 0.14)
    n_small_crops: int = 0  # small crops per image (0 at 32 px as solo-learn; paper: 6)
    small_crop_size: int = 16  # side of the small crops (96 on ImageNet)
    small_crop_min: float = 0.05  # small crops cover area fractions (small_crop_min, small_crop_max) (paper)
    small_crop_max: float = 0.14  # the largest area fraction of a small crop (paper)
    blur: bool = True  # Gaussian blur with p=0.5 on every crop (official code, solo-learn)
    # optim
    epochs: int = 1000  # passes over the training images
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 256  # global batch, split across processes
    lr: float = 0.6  # LARS base lr per 256 images, scaled linearly with the batch
    weight_decay: float = 1e-6  # weight decay (paper, solo-learn; not on biases and BN with exclude_bias_n_norm)
    lars_eta: float = 0.02  # LARS trust coefficient (solo-learn; official code: 0.001)
    lars_clip: bool = True  # cap each layer's adapted lr at lr (solo-learn; official code: false)
    exclude_bias_n_norm: bool = True  # biases and BN: no LARS, no weight decay (solo-learn; official code: false)
    warmup_epochs: int = 10  # linear warmup, then cosine decay to lr * final_lr_ratio
    final_lr_ratio: float = 0.0  # the cosine ends at lr times this (solo-learn: 0; paper: 0.001)
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
        checks = [
            ("temperature", self.temperature > 0, "positive"),
            ("lars_eta", self.lars_eta > 0, "positive"),
            ("epsilon", self.epsilon >= 0.03, "at least 0.03: exp(+-1/epsilon) must stay in float32's range"),
            ("sinkhorn_iters", self.sinkhorn_iters >= 1, "at least 1"),
            ("n_prototypes", self.n_prototypes >= 1, "at least 1"),
            ("queue_size", self.queue_size >= 0, "0 (no queue) or more"),
            ("queue_size", self.queue_size % self.batch_size == 0, f"a multiple of --batch_size={self.batch_size}"),
            ("crop_min", 0 < self.crop_min <= 1, "in (0, 1]"),
            ("small_crop_min", 0 < self.small_crop_min <= self.small_crop_max, "in (0, small_crop_max]"),
            ("small_crop_max", self.small_crop_max <= 1, "at most 1"),
            ("final_lr_ratio", 0 <= self.final_lr_ratio <= 1, "in [0, 1]"),
            ("n_small_crops", self.n_small_crops >= 0, "0 or more"),
            ("small_crop_size", self.small_crop_size >= 8, "at least 8"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ValueError(f"--{key}={getattr(self, key)} is impossible: it must be {expected}")


# -------------------------------------------------------------------------------------------------
# views


def distort(x, blur):
    """Flip, SimCLR's colour distortion at strength 1 and blur with p=0.5, as the official
    multicropdataset.py and solo-learn: the blur is PIL's GaussianBlur with radius sigma ~ U(0.1, 2), a
    kernel reaching 3 sigma (a kernel of 10% of the side, SimCLR's TF code, would cut it at 32 px)."""
    x = common.random_flip(x)
    x = common.color_jitter(x, 0.8, 0.8, 0.8, 0.2, p=0.8)
    x = common.random_grayscale(x, p=0.2)
    if blur:
        x = common.gaussian_blur(x, p=0.5, sigma=(0.1, 2.0), kernel="sigma")
    return common.normalize(x)


def swav_views(x, cfg):
    """Multi-crop (paper Sec. 3.2): uint8 (B,3,H,W) -> 2 global crops (2B,3,S,S) and n_small_crops
    small ones (nB,3,s,s) or None, crop-major (rows [vB, (v+1)B) are crop v of the B images)."""
    x = common.to_float(x)
    big = common.random_resized_crop(x.repeat(2, 1, 1, 1), cfg.image_size, scale=(cfg.crop_min, 1.0))
    if not cfg.n_small_crops:
        return distort(big, cfg.blur), None
    small = common.random_resized_crop(x.repeat(cfg.n_small_crops, 1, 1, 1), cfg.small_crop_size,
                                       scale=(cfg.small_crop_min, cfg.small_crop_max))
    return distort(big, cfg.blur), distort(small, cfg.blur)


# -------------------------------------------------------------------------------------------------
# model


class SwAV(nn.Module):
    """Encoder f (ResNet), projection head g and K prototypes: crops -> (z on the unit sphere, scores)."""

    def __init__(self, arch, small_images, proj_hidden, proj_dim, n_prototypes):
        super().__init__()
        self.backbone, width = common.resnet(arch, small_images)
        # g: 2-layer MLP with BN (official code)
        self.projector = nn.Sequential(
            nn.Linear(width, proj_hidden), nn.BatchNorm1d(proj_hidden), nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_dim))
        # the prototypes c_k are the rows of a bias-free linear layer: scores = z @ C.T; unit rows from the start
        self.prototypes = nn.Linear(proj_dim, n_prototypes, bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, x_big, x_small=None):
        # one backbone pass per resolution, as the official code; BN statistics per resolution
        h = self.backbone(x_big) if x_small is None else torch.cat([self.backbone(x_big), self.backbone(x_small)])
        z = F.normalize(self.projector(h), dim=1)  # (V*B, proj_dim) on the unit sphere
        with torch.autocast(z.device.type, enabled=False):  # float32: Sinkhorn takes exp(scores / 0.05)
            scores = self.prototypes(z.float())  # (V*B, K): cosines c_k . z
        return z, scores


# -------------------------------------------------------------------------------------------------
# loss


@torch.no_grad()
def sinkhorn(scores, epsilon, n_iters):
    """Codes Q of a batch by Sinkhorn-Knopp (paper Sec. 3.1; the official distributed_sinkhorn).

    scores: (B, K) cosines of this process's B features (the queue's included) to the K prototypes.
    Returns (B, K) float32 codes, no gradient: Q = diag(u) exp(scores / epsilon) diag(v) with each
    row summing to 1 (a soft assignment of the sample) and each column summing to about N / K over
    the global batch of N rows (equipartition; exact in the limit of many iterations). Under DDP the
    column sums are summed over processes, so each process gets its rows of the codes that one
    process would compute on the global batch. The constant normalizations of the official code
    (1/K, 1/N, the total) cancel out and are left out. Scores must be cosines: exp(+-1/epsilon)
    stays in float32's range for epsilon >= 0.03.
    """
    q = torch.exp(scores.detach().float() / epsilon)  # (B, K)
    for _ in range(n_iters):
        q = q / common.all_reduce_sum(q.sum(0, keepdim=True))  # (B, K): each prototype sums to 1 over the GLOBAL batch
        q = q / q.sum(1, keepdim=True)  # (B, K): every sample's code sums to 1
    return q


def swav_loss(scores, codes, temperature):
    """Swapped prediction (paper Eq. 1 and 2), averaged over the pairs of crops and the batch.

    scores: (V, B, K) prototype scores of V crops of the same B images, the first 2 the global
    crops; codes: (2, B, K) Sinkhorn codes of the 2 global crops (targets, no gradient). The code
    of global crop i is predicted from every other crop v != i: cross-entropy between q_i and
    softmax(scores_v / temperature). Computed in float32.
    """
    V = scores.shape[0]
    logits = scores.float() / temperature  # (V, B, K)
    loss = 0.0
    for i in range(2):
        others = [v for v in range(V) if v != i]
        # soft targets: -sum_k q_ik log softmax(scores_v / tau)_k, mean over the (V - 1) * B predictions
        loss = loss + F.cross_entropy(logits[others].flatten(0, 1), codes[i].repeat(V - 1, 1))
    return loss / 2


# -------------------------------------------------------------------------------------------------
# training


def train(cfg: Config) -> dict:
    rt = common.setup(cfg)  # processes, device, precision, seed, out_dir
    data = common.load_data(cfg, rt)  # uint8 images; small datasets live on the device
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (lr per 256 images)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    B, V = data.batch, 2 + cfg.n_small_crops  # this process's images per step, crops per image
    freeze_steps = cfg.freeze_prototypes_epochs * steps_per_epoch  # prototypes frozen at first (paper A.1)
    # the queue fills from step 0; its features join the codes from epoch queue_start_epoch, once it is full
    steps_to_fill = cfg.queue_size // cfg.batch_size  # global queue / global batch
    queue_start = max(cfg.queue_start_epoch * steps_per_epoch, steps_to_fill)
    common.print0(f"swav: {total_steps} steps, LARS lr {lr:.3g} (eta {cfg.lars_eta}, clip {cfg.lars_clip}), "
                  f"{cfg.n_prototypes} prototypes, {V} crops, queue {cfg.queue_size} from step "
                  f"{queue_start if cfg.queue_size else '-'}")

    raw_model = SwAV(cfg.arch, cfg.image_size <= 64, cfg.proj_hidden, cfg.proj_dim, cfg.n_prototypes)
    raw_model = common.sync_batchnorm(raw_model.to(rt.device), rt)
    model = common.compile_and_ddp(raw_model, rt)
    # LARS in the form of solo-learn's and of apex's LARC (official code); solo-learn spares biases and BN
    # (no adaptation, no weight decay), the official code adapts and decays every parameter
    groups = (common.param_groups(raw_model, cfg.weight_decay) if cfg.exclude_bias_n_norm
              else [{"params": list(raw_model.parameters()), "weight_decay": cfg.weight_decay}])
    opt = common.LARS(groups, lr=lr, momentum=0.9, eta=cfg.lars_eta, clip=cfg.lars_clip, form="larc")
    # this process's queue: (2 global crops, queue_size / world, proj_dim), newest features first
    queue = torch.zeros(2, cfg.queue_size // rt.world_size, cfg.proj_dim, device=rt.device)
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        # the checkpoint holds the global queue, (Q, 2, D) in rank order: take this process's share
        queue.copy_(state["queue"].tensor_split(rt.world_size)[rt.rank].transpose(0, 1))
        start_step = state["step"]

    def features(x):  # the representation h = f(x) of un-augmented uint8 images
        return raw_model.backbone(common.normalize(common.to_float(x)))

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt)})

    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, _ in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = common.cosine_lr(step, total_steps, warmup_steps, lr, final_lr=lr * cfg.final_lr_ratio)
        common.set_lr(opt, lr_now)
        x_big, x_small = swav_views(x, cfg)  # (2B, 3, S, S), (n_small * B, 3, s, s) or None
        with rt.autocast():
            z, scores = model(x_big, x_small)  # (V*B, proj_dim), (V*B, K)
        scores = scores.float().view(V, B, -1)  # (V, B, K)
        use_queue = cfg.queue_size > 0 and step >= queue_start
        with torch.no_grad():  # codes of the 2 global crops: targets only
            codes = []
            for i in range(2):
                s = scores[i]  # (B, K)
                if use_queue:  # the stored features, scored against the current prototypes, join the batch
                    s = torch.cat([s, queue[i] @ raw_model.prototypes.weight.float().T])  # (B + Q/W, K)
                codes.append(sinkhorn(s, cfg.epsilon, cfg.sinkhorn_iters)[:B])  # the batch's rows; sums: global
            codes = torch.stack(codes)  # (2, B, K)
        loss = swav_loss(scores, codes, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < freeze_steps:
            raw_model.prototypes.weight.grad = None  # frozen prototypes: no step, no momentum, no weight decay
        opt.step()
        with torch.no_grad():  # after the step: prototypes back on the unit sphere (paper A.1), the queue updated
            raw_model.prototypes.weight.copy_(F.normalize(raw_model.prototypes.weight, dim=1))
            if cfg.queue_size:  # shift by one batch (the oldest B fall out), then write this batch first
                queue[:, B:] = queue[:, :-B].clone()
                queue[:, :B] = z[:2 * B].detach().float().view(2, B, -1)  # (2, B, D): this step's global crops
        z_std = z[:B].detach().float().std(0).mean()  # collapse monitor: ~1/sqrt(D) healthy, 0 collapsed
        log.step(step, loss=loss, lr=lr_now, z_std=z_std)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                    "queue": common.all_gather(queue.transpose(0, 1)),  # the global queue: (Q, 2, D)
                    "config": dataclasses.asdict(cfg)}, rt)

    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    if rt.is_main:  # the encoder alone, loadable into a torchvision ResNet with the same stem (README)
        torch.save(raw_model.backbone.state_dict(), os.path.join(cfg.out_dir, "encoder.pt"))
    results = {"method": "swav", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, "train_seconds": round(log.train_seconds, 1),
               "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
