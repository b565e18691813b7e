"""CLIP: contrastive language-image pre-training.

Radford, Kim, Hallacy, Ramesh, Goh, Agarwal, Sastry, Askell, Mishkin, Clark, Krueger, Sutskever.
ICML 2021. arXiv:2103.00020.

An image tower and a text tower map a batch of N (image, caption) pairs to N image and N text
embeddings in one joint space. With both L2-normalized, the N x N cosine similarities times a
learned scale are logits: each image must pick its own caption among the N captions of the batch,
and each caption its own image (a symmetric cross-entropy, the paper's Fig. 3). The text tower is
a causal transformer whose feature is its output at the end-of-text token. After training, an
image is classified without any labelled example by embedding one caption per class ("a photo of
a {class}.", averaged over several templates) and picking the most similar: zero-shot transfer.

Text is byte-level here: a caption is its UTF-8 bytes (tokens 0..255) between a start and an end
token, padded, so no tokenizer file is needed (the paper's BPE vocabulary: table).

Captions (--captions) come from one of three sources; evaluation is always on --dataset's labels:
  classes   (default) an OFFLINE WEAK-SUPERVISION DEMO: each training image of --dataset gets a
            caption composed from its class name and a template drawn at random per image and per
            step ("a blurry photo of a {}."); the text tower learns the class names, not language.
  X.tsv|csv rows of (image path, caption), paths relative to the file's folder (or --image_dir).
  X.json    COCO captions (captions_train2017.json), read with the json module; the images from
            --image_dir or from train2017/ next to the JSON or next to its annotations/ folder.
File captions stream through common.Data's DataLoader (images decoded in workers, one row per
(image, caption) pair: a COCO epoch sees each image five times); their tokens live in memory.

    python clip.py                                             # 1 GPU: CIFAR-10 demo (captions from class names)
    python clip.py --captions=coco/annotations/captions_train2017.json --dataset=stl10 --image_size=96
    torchrun --standalone --nproc_per_node=8 clip.py           # 8 GPUs, same global batch of 512
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 clip.py
    python clip.py --dataset=synthetic --arch=tiny --text_width=64 --text_layers=2 --epochs=1 --batch_size=256  # CPU

The defaults are a CIFAR-10 demo of this file, NOT a paper recipe: CLIP learned from 400M web pairs,
and no published number exists for this setting; the table lists every departure. Evaluated features:
knn_top1, probe_top1 and linear_top1 on the image tower's pooled trunk output h (512-d for ResNet-18,
before the projection; common.evaluate); zero_shot_top1 on the test set, the projected, normalized
image embedding against each class's prompt ensemble (with --captions=classes those class names were
the training captions: this shows classification through the text tower, not transfer to new words).
Results of this file: not yet measured (README). In the init rows, W and L are the text tower's width and
depth, "attn in" and "MLP in" the input projections of a block's attention and MLP, "outputs" the output
projections of both; "torch's" is PyTorch's default: xavier-uniform for the attention's input projection,
U(+-fan_in^-.5) for the other linear layers (the projections to the joint space included), torchvision's
init for the ResNet. Only the token and position embeddings follow C's init (std 0.02 and 0.01).

Departures from the sources (P: the paper; C: openai/CLIP, the released models and inference, no training):

| setting | paper | official code | this file |
|---|---|---|---|
| pairs | 400M web (image, text) pairs (P Sec. 2.2) | - | CIFAR-10 images, class-name captions |
| batch, epochs | 32,768, 32 (P Sec. 2.5, Tab. 19) | - | 512, 100 |
| image tower | ResNet-D, blur, attention pool; ViT (P Sec. 2.4) | as P (C model.py) | ResNet-18, CIFAR stem, avg pool |
| text tower | 12 x 512, 8 heads (P Sec. 2.4) | QuickGELU (C model.py) | 4 x 256, 4 heads; GELU |
| init: text embeddings | - | normal, std 0.02 tokens, 0.01 positions (C model.py) | as C |
| init: text blocks, proj | - | normal: attn in W^-.5, MLP in (2W)^-.5, outputs (2LW)^-.5, proj W^-.5 (C) | torch's |
| init: image tower | - | ResNets: bottlenecks' bn3 at 0, attention pool normal in^-.5 (C model.py) | torch's |
| text tokens | lower-case BPE: 49,152, max 76 (P Sec. 2.4) | 49,408; 77 with start, end (C clip.py) | 259 (bytes); 77 |
| joint width | 1024 for RN50 (P Tab. 20) | - | 256 |
| lr | 5e-4 for RN50 at batch 32,768 (P Tab. 20) | - | 5e-4 per 256, scaled: 1e-3 at 512 |
| warmup, schedule | 2000 steps, cosine (P Sec. 2.5, Tab. 19) | - | 5 epochs (~490 steps), cosine |
| Adam beta2, eps | 0.999, 1e-8 for ResNets; 0.98, 1e-6 for ViTs (P Tab. 19) | - | the ViTs' (--adam_beta2, _eps) |
| weight decay 0.2 on | weights, not gains or biases (P Sec. 2.5) | - | 2+ dims: not biases, norms, logit scale |
| logit scale | 1/0.07 at first, learned as a log, clipped at 100 (P Sec. 2.5) | init log(1/0.07) (C model.py) | as P |
| augmentation | random square crop of resized images, only (P Sec. 2.3) | - | square crop of 50-100% of the area |
| input | - | CLIP's own mean and std (C clip.py) | ImageNet mean and std |
| zero-shot prompts | 80 templates (ImageNet, P Sec. 3.1.4) | 18 (CIFAR-10, C data/prompts.md) | 8 (also the captions) |
| linear probe | L-BFGS logistic regression (P App. A.3) | sklearn, encode_image (C README) | on h, 3 evaluations |
"""

import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | folder | synthetic: evaluation (and the classes demo)
    data_dir: str = "./data"  # folder of <dataset>.npz (downloaded there if missing); $SSL_DATA replaces this default
    out_dir: str = "out/clip"  # config.json, log.jsonl, ckpt.pt, encoder.pt, results.json
    subset: int = 0  # train on the first N training images (or caption rows) only (0 = all)
    image_size: int = 32  # side of the training crops (96 for STL-10, 224 for ImageNet-size images)
    captions: str = "classes"  # classes (demo: templates + class names) | pairs.tsv / pairs.csv | COCO captions_*.json
    image_dir: str = ""  # images of a caption file ("" = the file's folder; COCO: train2017/ etc. next to it)
    # model
    arch: str = "resnet18"  # image tower: resnet18 | resnet34 | resnet50 | tiny (a 4-conv trunk for CPU runs)
    embed_dim: int = 256  # width of the joint embedding space (paper RN50: 1024)
    context_length: int = 77  # text tokens incl. start and end: UTF-8 bytes here, longer captions are cut
    text_width: int = 256  # text transformer width (paper: 512)
    text_layers: int = 4  # text transformer depth (paper: 12)
    text_heads: int = 4  # attention heads of the text transformer (paper: 8)
    # method
    init_temperature: float = 0.07  # the logit scale starts at 1 / this (paper Sec. 2.5)
    max_logit_scale: float = 100.0  # the logit scale is clipped at this after every step (paper Sec. 2.5)
    crop_min: float = 0.5  # smallest area fraction of the random square crop (a CIFAR demo choice)
    # optim
    epochs: int = 100  # passes over the training pairs
    max_steps: int = 0  # stop after this many steps (0 = no limit); the schedule still spans `epochs`
    batch_size: int = 512  # global batch, split across processes: the contrastive batch (paper: 32768)
    lr: float = 5e-4  # AdamW base lr per 256 pairs, scaled linearly with the batch (paper: 5e-4 at 32768)
    weight_decay: float = 0.2  # decoupled (AdamW); not on gains and biases (paper Sec. 2.5) nor the logit scale
    warmup_epochs: int = 5  # linear warmup, then cosine to 0 (paper: 2000 steps; without, short runs stall at log N)
    adam_beta2: float = 0.98  # paper: 0.98 for its ViTs, 0.999 for its ResNets
    adam_eps: float = 1e-6  # paper: 1e-6 for its ViTs, 1e-8 for its ResNets
    # eval
    eval_every: int = 10  # epochs between kNN and zero-shot monitor runs (0 = only at the end)
    probe_epochs: int = 100  # fast linear probe on precomputed frozen features at the end, epochs (0 = none)
    linear_epochs: int = -1  # standard linear evaluation at the end, epochs (-1: 100 on CUDA, none on CPU; 0: none)
    # system
    seed: int = 0  # weights, data order, crops and caption templates
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32
    compile: str = "auto"  # torch.compile the model: auto (on CUDA only) | true | false
    log_every: int = 50  # steps between progress lines
    resume: bool = False  # continue from out_dir/ckpt.pt

    def __post_init__(self):
        common.check_config(self)
        if self.captions != "classes" and not self.captions.lower().endswith((".tsv", ".csv", ".json")):
            raise ValueError(f"--captions={self.captions} is impossible: it must be classes, a .tsv/.csv file "
                             "of (image path, caption) rows or a COCO captions .json file")
        if self.context_length < 3 or self.embed_dim < 1 or self.text_layers < 1:
            raise ValueError("--context_length must be >= 3 (start, a byte, end), --embed_dim and --text_layers >= 1")
        if self.text_heads < 1 or self.text_width % self.text_heads:
            raise ValueError(f"--text_width={self.text_width} must be divisible by --text_heads={self.text_heads}")
        if self.init_temperature <= 0 or self.max_logit_scale <= 0 or not 0 < self.crop_min <= 1:
            raise ValueError("--init_temperature and --max_logit_scale must be > 0 and --crop_min in (0, 1]")
        if not 0 <= self.adam_beta2 < 1 or self.adam_eps <= 0:
            raise ValueError("--adam_beta2 must be in [0, 1) and --adam_eps > 0")


# -------------------------------------------------------------------------------------------------
# views: the image crop, and text as bytes

START, END, PAD = 256, 257, 258  # special tokens after the 256 byte values
VOCAB = 259
TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of the {}.",
             "a close-up photo of a {}.", "a bright photo of the {}.", "a dark photo of a {}.",
             "a cropped photo of the {}.", "a picture of one {}.")  # captions of the demo and the zero-shot ensemble


def clip_view(x, cfg):
    """The paper's only augmentation, a random square crop (Sec. 2.3): uint8 (B,3,H,W) -> (B,3,S,S)."""
    x = common.to_float(x)
    x = common.random_resized_crop(x, cfg.image_size, scale=(cfg.crop_min, 1.0), ratio=(1.0, 1.0))
    return common.normalize(x)


def tokenize(texts, context_length):
    """Strings -> (N, context_length) int64: START, the text's UTF-8 bytes, END, then PAD.

    A text too long is cut at a character boundary so that START, bytes and END fit: END is kept.
    """
    out = torch.full((len(texts), context_length), PAD, dtype=torch.long)
    for i, text in enumerate(texts):
        b = text.encode("utf-8")[: context_length - 2].decode("utf-8", errors="ignore").encode("utf-8")
        out[i, : len(b) + 2] = torch.tensor([START, *b, END])
    return out


def detokenize(tokens):
    """(N, L) tokens from tokenize -> the N strings (the bytes between START and END)."""
    return [bytes(row[1: row.index(END)]).decode("utf-8") for row in tokens.tolist()]


def prompt_tokens(classes, context_length):
    """(T, C, L) tokens of every template filled with every class name (as written, but "_" read as a space:
    CIFAR-100's "aquarium_fish"; a folder's class names should be words); error if one does not fit."""
    texts = [t.format(c.replace("_", " ")) for t in TEMPLATES for c in classes]
    if too_long := [t for t in texts if len(t.encode("utf-8")) + 2 > context_length]:
        raise common.RunError(f"--context_length={context_length} is too short for the prompt {too_long[0]!r}")
    return tokenize(texts, context_length).view(len(TEMPLATES), len(classes), context_length)


def class_captions(y, prompts):
    """The demo's captions: for labels y (B,), a random template per image -> tokens (B, L)."""
    template = torch.randint(len(prompts), y.shape, device=y.device)  # (B,)
    return prompts[template, y]  # (B, L)


# -------------------------------------------------------------------------------------------------
# model


class TextTower(nn.Module):
    """Causal transformer over byte tokens -> its last layer at the END token, layer-normalized (Sec. 2.4)."""

    def __init__(self, context_length, width, layers, heads):
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, width)
        self.pos_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)  # CLIP's init scales
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                                                activation="gelu", batch_first=True, norm_first=True)
                                     for _ in range(layers)])  # pre-norm blocks, as GPT-2's (Sec. 2.4)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, tokens):
        B, L = tokens.shape
        x = self.token_embedding(tokens) + self.pos_embedding[:L]  # (B, L, W)
        mask = nn.Transformer.generate_square_subsequent_mask(L, device=tokens.device)  # (L, L), -inf above diagonal
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)  # (B, L, W): position t sees positions 0..t only
        x = self.ln_final(x)  # (B, L, W)
        end = (tokens == END).int().argmax(1)  # (B,) position of the end-of-text token
        return x[torch.arange(B, device=x.device), end]  # (B, W): sees the whole caption, never the padding


class CLIP(nn.Module):
    """Image tower (ResNet) and text tower, each with a linear projection to the joint space, and the
    learned log of the logit scale."""

    def __init__(self, arch, small_images, embed_dim, context_length, text_width, text_layers, text_heads,
                 init_temperature):
        super().__init__()
        self.backbone, width = common.resnet(arch, small_images)
        self.image_proj = nn.Linear(width, embed_dim, bias=False)
        self.text = TextTower(context_length, text_width, text_layers, text_heads)
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))  # learned in log space

    def encode_image(self, x):
        return self.image_proj(self.backbone(x))  # (B, embed_dim)

    def encode_text(self, tokens):
        return self.text_proj(self.text(tokens))  # (B, embed_dim)

    def forward(self, images, tokens):
        # the scale leaves forward() as a multiplier, so DDP sees every parameter used in forward
        return self.encode_image(images), self.encode_text(tokens), self.log_logit_scale.exp()


# -------------------------------------------------------------------------------------------------
# loss


def clip_loss(image_emb, text_emb, logit_scale):
    """Symmetric cross-entropy over the N x N image-text similarities (paper Fig. 3).

    image_emb, text_emb: (N, D), not normalized; row i of both is a pair. logit_scale: the
    multiplier of the cosines (exp of the learned log-parameter, not its log), a float or 0-d
    tensor. Returns the mean of the image->text and the text->image cross-entropies; float32.
    """
    img = F.normalize(image_emb.float(), dim=1)  # (N, D)
    txt = F.normalize(text_emb.float(), dim=1)  # (N, D)
    logits = logit_scale * (img @ txt.T)  # (N, N): image i against caption j
    target = torch.arange(len(img), device=img.device)  # (N,) the pair is on the diagonal
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# -------------------------------------------------------------------------------------------------
# caption files and zero-shot evaluation


def read_caption_file(path, image_dir):
    """[(image path, caption)] from a .tsv/.csv of (image path, caption) rows (an optional header
    line: a first field without a file extension) or from a COCO captions .json."""
    if not os.path.isfile(path):
        raise common.RunError(f"--captions={path}: no such file")
    folder = os.path.dirname(os.path.abspath(path))
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
        split = os.path.splitext(os.path.basename(path))[0].rpartition("_")[2]  # captions_train2017 -> train2017
        root = image_dir or next((d for d in (os.path.join(folder, split), os.path.join(os.path.dirname(folder), split))
                                  if os.path.isdir(d)), folder)
        names = {im["id"]: im["file_name"] for im in coco["images"]}
        rows = [(os.path.join(root, names[a["image_id"]]), a["caption"].strip()) for a in coco["annotations"]]
    else:
        tsv = path.lower().endswith(".tsv")  # TSV: no quoting, a caption may hold any quote; CSV: standard quoting
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
            table = [r for r in reader if r]
        if table and not os.path.splitext(table[0][0])[1]:
            table = table[1:]  # a header line
        if bad := [i for i, r in enumerate(table) if len(r) < 2]:
            raise common.RunError(f"{path}: row {bad[0] + 1} is not (image path, caption)")
        rows = [(os.path.join(image_dir or folder, r[0]), r[1].strip()) for r in table]
    missing = sorted({p for p, _ in rows if not os.path.isfile(p)})
    if missing or not rows:
        raise common.RunError(f"{path}: {len(missing)} image files missing (first: {missing[:1]}) or no rows; "
                              "set --image_dir to the images' folder")
    return rows


class CaptionPairs(torch.utils.data.Dataset):
    """(image path, caption tokens) rows -> (uint8 (3,S,S) image, (L,) int16 tokens). `labels` holds the
    tokens: it is what common.Data counts and hands out as y."""

    def __init__(self, paths, tokens, size):
        self.paths, self.labels, self.size = paths, tokens.to(torch.int16), size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return common.read_image(self.paths[i], self.size), self.labels[i]


def caption_data(cfg, data, rt):
    """A common.Data that pretrains on the caption file's pairs and evaluates on data's labelled sets."""
    rows = read_caption_file(cfg.captions, cfg.image_dir)[: cfg.subset or None]
    tokens = tokenize([c for _, c in rows], cfg.context_length)
    common.print0(f"captions: {len(rows)} pairs from {cfg.captions} | {int((tokens[:, -1] != PAD).sum())} "
                  f"fill all {cfg.context_length} tokens (longer ones are cut there)")
    pairs = CaptionPairs([p for p, _ in rows], tokens, cfg.image_size)
    return common.Data("captions", pairs, data.train, data.test, data.classes, rt, cfg.batch_size, cfg.seed)


@torch.no_grad()
def zero_shot_top1(raw_model, prompts, data, rt):
    """Test top-1 of predicting the class whose prompt ensemble is the most cosine-similar to the image
    (paper Sec. 3.1.4): the normalized text embeddings of all T templates of a class are averaged
    and renormalized. prompts: (T, C, L) tokens."""
    T, C, L = prompts.shape
    raw_model.eval()
    with rt.autocast():
        text = raw_model.encode_text(prompts.view(T * C, L))  # (T*C, E)
    classes = F.normalize(F.normalize(text.float(), dim=1).view(T, C, -1).mean(0), dim=1)  # (C, E)
    image, labels = common.extract_features(lambda x: raw_model.encode_image(common.normalize(common.to_float(x))),
                                            data, "test", rt)  # (N, E) on every process
    raw_model.train()
    return ((F.normalize(image, dim=1) @ classes.T).argmax(1) == labels).float().mean().item()


# -------------------------------------------------------------------------------------------------
# training


def train(cfg: Config) -> dict:
    rt = common.setup(cfg)  # processes, device, precision, seed, out_dir
    data = common.load_data(cfg, rt)  # uint8 images; small datasets live on the device
    if cfg.captions != "classes":  # pretrain on the file's pairs; --dataset stays the evaluation set
        data = caption_data(cfg, data, rt)
    elif cfg.dataset == "stl10":  # the 100k unlabeled images have no class name to caption them with
        data = common.Data("stl10", data.train, data.train, data.test, data.classes, rt, cfg.batch_size, cfg.seed)
        common.print0(f"captions=classes: pretraining on the {len(data.train[1])} labelled STL-10 images only")
    prompts = prompt_tokens(data.classes, cfg.context_length).to(rt.device)  # (T, C, L)
    steps_per_epoch = data.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (Goyal et al. 2017) from the base lr per 256 pairs
    common.print0(f"clip: {total_steps} steps, AdamW lr {lr:.3g}, captions {cfg.captions}")

    raw_model = CLIP(cfg.arch, cfg.image_size <= 64, cfg.embed_dim, cfg.context_length, cfg.text_width,
                     cfg.text_layers, cfg.text_heads, cfg.init_temperature)
    raw_model = common.sync_batchnorm(raw_model.to(rt.device), rt)  # the image trunk's BN, world > 1 on CUDA
    model = common.compile_and_ddp(raw_model, rt)
    # decay on weights (matrices, embeddings, convolutions) only: not on gains, biases or the logit scale
    opt = torch.optim.AdamW(common.param_groups(raw_model, cfg.weight_decay), lr=lr, betas=(0.9, cfg.adam_beta2),
                            eps=cfg.adam_eps)
    start_step = 0
    if state := common.load_checkpoint(cfg, rt):
        raw_model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step = state["step"]

    def features(x):  # the image tower's trunk output h of un-augmented uint8 images
        return raw_model.backbone(common.normalize(common.to_float(x)))

    def monitor(step, epoch):  # the kNN monitor (and the method's own metrics) after `step` steps
        log.write({"step": step, "epoch": epoch, **common.evaluate(raw_model, features, data, rt),
                   "zero_shot_top1": zero_shot_top1(raw_model, prompts, data, rt)})

    log = common.Logger(cfg, rt, steps_per_epoch, start_step, stop_step)
    if cfg.eval_every and start_step == 0:
        with log.paused():  # the monitor at random initialisation: the baseline to beat
            monitor(0, 0)
    for step, x, y in data.steps(start_step, stop_step):  # x: this process's share of the batch, uint8
        lr_now = common.cosine_lr(step, total_steps, cfg.warmup_epochs * steps_per_epoch, lr)
        common.set_lr(opt, lr_now)
        images = clip_view(x, cfg)  # (B, 3, S, S)
        tokens = class_captions(y, prompts) if cfg.captions == "classes" else y.long()  # (B, L)
        with rt.autocast():
            image_emb, text_emb, logit_scale = model(images, tokens)  # (B, E), (B, E), ()
        # every process scores all N = world * B images against all N captions: the GLOBAL batch
        loss = clip_loss(common.gather_with_grad(image_emb.float()), common.gather_with_grad(text_emb.float()),
                         logit_scale.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # Sec. 2.5: clipped so that the logits are never scaled by more than 100
            raw_model.log_logit_scale.clamp_(max=math.log(cfg.max_logit_scale))
        log.step(step, loss=loss, lr=lr_now, logit_scale=logit_scale.detach())

        if (step + 1) % steps_per_epoch == 0 or step + 1 == stop_step:  # end of an epoch, or of the run
            with log.paused():
                epoch = (step + 1) // steps_per_epoch
                if cfg.eval_every and epoch % cfg.eval_every == 0 and step + 1 < stop_step:
                    monitor(step + 1, epoch)
                common.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                    "config": dataclasses.asdict(cfg)}, rt)

    metrics = common.evaluate(raw_model, features, data, rt, cfg.probe_epochs, cfg.linear_epochs)
    metrics["zero_shot_top1"] = zero_shot_top1(raw_model, prompts, data, rt)
    if rt.is_main:  # the image trunk alone, loadable into a torchvision ResNet with the same stem (README)
        torch.save(raw_model.backbone.state_dict(), os.path.join(cfg.out_dir, "encoder.pt"))
    results = {"method": "clip", "dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "steps": stop_step,
               **metrics, "logit_scale": round(raw_model.log_logit_scale.exp().item(), 3), "captions": cfg.captions,
               "train_seconds": round(log.train_seconds, 1), "images_per_second": round(log.images_per_second(), 1)}
    common.write_results(results, cfg, rt)
    common.cleanup()
    return results


if __name__ == "__main__":
    train(common.parse_config(Config))
