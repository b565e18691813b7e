"""Benchmarks (a script, not a test): prints markdown tables, everything measured in one run.

    python tests/bench.py                 # CPU rows; CUDA rows too when a GPU is visible
    python tests/bench.py --quick         # fewer repetitions
    python tests/bench.py --methods       # section 4 only
    python tests/bench.py --augmentation  # section 1 only

1. Augmentation throughput: common's batched SimCLR recipe (simclr.simclr_view) vs the same recipe
   in torchvision.transforms.v2 applied image by image, as a DataLoader worker would (32 px); on the
   CPU, 5 rounds of both in turn (the medians, and each round's ratio).
2. One SimCLR training step (two views, ResNet-18 + projector, NT-Xent, LARS) vs a bare ResNet-18
   forward+backward on the same two views: the cost of everything that is not the backbone.
3. On CUDA: SimCLR ResNet-18 at batch 512, bf16, compiled: images/s and model FLOPs utilisation.
4. Every method's training loop at one small CPU configuration (tiny trunk, synthetic data, batch
   128, 24 steps, the learning tests' CPU-sized heads): training images/s as train() reports it
   (evaluation excluded), its ratio to a bare tiny-trunk forward+backward on two 32 px views of the
   same batch (what a two-view method cannot avoid), and the peak resident memory of the process
   during train() (torch and the data included: the synthetic set is made before). Each method runs
   in a fresh process.
"""

import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import common  # noqa: E402
import simclr  # noqa: E402
from conftest import METHODS  # noqa: E402

QUICK = "--quick" in sys.argv
METHODS_ONLY = "--methods" in sys.argv  # section 4 only
AUGMENTATION_ONLY = "--augmentation" in sys.argv  # section 1 only
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # dense


def timed(fn, device, repeat, warmup=2):
    """Median seconds of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def augmentation(device, n=512, rounds=5):
    """images/s of the batched recipe vs torchvision v2 per image (CPU only for the latter). On the CPU both
    are measured in turn, `rounds` times: a shared machine's speed drifts, and each ratio compares two
    measurements taken together. The medians, and every round's ratio, sorted."""
    cfg = simclr.Config(image_size=32)
    x = common.make_synthetic(n, 32, seed=0)[0].to(device)
    batched = lambda: n / timed(lambda: simclr.simclr_view(x, cfg), device, 3 if QUICK else 10)  # noqa: E731
    if device.type != "cpu":
        return {"device": device.type, "batched": batched()}
    s = cfg.jitter_strength
    per_image = T.Compose([
        T.RandomResizedCrop(32, scale=(cfg.crop_min, 1.0), antialias=True), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8), T.RandomGrayscale(0.2),
        T.ToDtype(torch.float32, scale=True), T.Normalize(common.MEAN, common.STD)])
    pairs = [(batched(), n / timed(lambda: torch.stack([per_image(img) for img in x]), device, 1 if QUICK else 3, 1))
             for _ in range(1 if QUICK else rounds)]
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"device": "cpu", "batched": median([b for b, _ in pairs]), "per_image": median([p for _, p in pairs]),
            "ratios": sorted(b / p for b, p in pairs)}


def simclr_step_vs_backbone(device, batch, dtype=torch.float32, compile_model=False):
    """Seconds of one full SimCLR step and of a bare backbone fwd+bwd on the same two views."""
    cfg = simclr.Config(image_size=32)
    torch.manual_seed(0)
    raw = simclr.SimCLR("resnet18", True, cfg.proj_dim).to(device)
    model = torch.compile(raw) if compile_model else raw
    backbone = torch.compile(raw.backbone) if compile_model else raw.backbone
    opt = common.LARS(common.param_groups(raw, cfg.weight_decay), lr=1.0)
    x = common.make_synthetic(batch, 32, seed=0)[0].to(device)
    views = torch.cat([simclr.simclr_view(x, cfg), simclr.simclr_view(x, cfg)])

    def step():  # what train() does per step, minus logging
        x1, x2 = simclr.simclr_view(x, cfg), simclr.simclr_view(x, cfg)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            z = model(torch.cat([x1, x2]))
        loss = simclr.nt_xent_loss(*z.float().chunk(2), cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def bare():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            h = backbone(views)
        raw.zero_grad(set_to_none=True)
        h.float().sum().backward()

    repeat = 2 if device.type == "cpu" else (10 if QUICK else 30)
    return timed(step, device, repeat), timed(bare, device, repeat), raw, views


def flops_per_step(raw, views):
    """Model FLOPs of one forward+backward of the SimCLR model on both views (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        z = raw(views)
        F.normalize(z, dim=1).sum().backward()
    return counter.get_total_flops()


METHOD_RUN = """
import importlib, json, os, sys, tempfile, threading, time
sys.path[:0] = [{root!r}, {tests!r}]
from pathlib import Path
from conftest import tiny
from test_learning import SYNTHETIC
module = importlib.import_module({name!r})
settings = {{k: v for k, v in SYNTHETIC[{name!r}][0].items()
            if k not in ("epochs", "subset", "batch_size", "probe_epochs")}}
module.common.make_synthetic(10_000, 32, seed=0), module.common.make_synthetic(2_000, 32, seed=1)  # cached: made before
peak, done = [0], threading.Event()  # the resident memory of the process, sampled every 5 ms during train()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        time.sleep(0.005)

threading.Thread(target=sample, daemon=True).start()
with tempfile.TemporaryDirectory() as tmp:
    cfg = tiny(module.Config, Path(tmp), subset=3072, batch_size=128, epochs=1, max_steps=24, log_every=8,
               probe_epochs=0,
               **settings)
    results = module.train(cfg)
done.set()
print("BENCH", json.dumps(dict(images_per_second=results["images_per_second"], peak_mb=peak[0] / 2**20)))
"""


def method_rows(methods):
    """(method, images/s, peak MB) for each method, each in a fresh process (2 threads, CPU)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for name in methods:
        code = METHOD_RUN.format(root=root, tests=os.path.join(root, "tests"), name=name)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        line = next((x for x in p.stdout.splitlines() if x.startswith("BENCH ")), None)
        if line is None:
            raise SystemExit(f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        r = json.loads(line[6:])
        rows.append((name, r["images_per_second"], r["peak_mb"]))
    return rows


def bare_tiny_images_per_second(batch=128):
    """Images/s of a bare tiny-trunk forward+backward on two 32 px views of each image (CPU)."""
    torch.manual_seed(0)
    trunk = common.resnet("tiny")[0]
    views = torch.randn(2 * batch, 3, 32, 32)

    def step():
        trunk.zero_grad(set_to_none=True)
        trunk(views).sum().backward()

    return batch / timed(step, torch.device("cpu"), 5)


def main():
    cpu = torch.device("cpu")
    devices = [cpu] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    cpu_name = platform.processor() or platform.machine()
    print(f"# nanossl bench: {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, CPU {cpu_name} "
          f"x {os.cpu_count()} cores ({torch.get_num_threads()} threads), GPU {gpu}\n")

    if not METHODS_ONLY:
        print("## 1. Augmentation (SimCLR CIFAR recipe, 512 images of 32 px)\n")
        print("| device | batched on device (img/s) | torchvision v2 per image (img/s) | speed-up, each round |")
        print("|---|---|---|---|")
        for d in devices:
            r = augmentation(d)
            per = r.get("per_image")
            rounds = ", ".join(f"{v:.1f}x" for v in r["ratios"]) if per else "n/a"
            print(f"| {d.type} | {r['batched']:,.0f} | {f'{per:,.0f}' if per else 'n/a'} | {rounds} |")
        if AUGMENTATION_ONLY:
            return

        print("\n## 2. SimCLR step vs bare ResNet-18 forward+backward (same two views)\n")
        print("| device | batch (images) | SimCLR step (s) | bare backbone (s) | ratio |")
        print("|---|---|---|---|---|")
        step, bare, _, _ = simclr_step_vs_backbone(cpu, 64)
        print(f"| cpu, float32 | 64 | {step:.3f} | {bare:.3f} | {step / bare:.3f} |")

        if torch.cuda.is_available():
            cuda = torch.device("cuda")
            step, bare, raw, views = simclr_step_vs_backbone(cuda, 512, torch.bfloat16, compile_model=True)
            print(f"| cuda, bf16, compiled | 512 | {step:.4f} | {bare:.4f} | {step / bare:.3f} |")
            flops = flops_per_step(raw, views)
            peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
            mfu = f"{flops / step / (peak * 1e12):.1%}" if peak else "n/a (unknown peak)"
            print("\n## 3. SimCLR ResNet-18 training throughput on CUDA (batch 512, bf16, compiled)\n")
            print("| GPU | images/s | model TFLOP/s | MFU (bf16 dense peak) |")
            print("|---|---|---|---|")
            print(f"| {gpu} | {512 / step:,.0f} | {flops / step / 1e12:.1f} | {mfu} |")

    print("\n## 4. Every method's training loop (CPU: tiny trunk, synthetic data, batch 128, 24 steps)\n")
    bare = bare_tiny_images_per_second()
    print(f"bare tiny trunk, forward+backward of 2 views of 32 px: {bare:,.0f} images/s\n")
    print("| method | training images/s | time per image / bare two-view trunk "
          "| peak resident memory in train() (MB) |")
    print("|---|---|---|---|")
    for name, ips, mb in method_rows(METHODS):
        print(f"| {name} | {ips:,.0f} | {bare / ips:.2f} | {mb:,.0f} |")


if __name__ == "__main__":
    main()
