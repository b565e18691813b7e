"""The GPU check: every method's default recipe on CUDA, its speed, and one real SimCLR number, in about
ten minutes of one GPU. Writes tests/results_gpu.md (never edit it by hand); the exit status is 0 only
if every part passed.

    mkdir -p data && cp ../shared/data/cifar10_jpeg.npz data/   # 53 MiB: the one data file to bring along
    python tests/gpu_check.py                                     # on a machine with one CUDA GPU
    python tests/gpu_check.py --dry-run                           # the same plan on the CPU, in minutes

1. data: data/cifar10.npz from data/cifar10_jpeg.npz (CIFAR-10 as JPEG bytes; else the one in $SSL_DATA or
   ../shared/data), decoded by torchvision.io in batches on the GPU (nvJPEG), checked against the
   cifar10.npz there when there is one. A dry run with no such file decodes synthetic images.
2. recipes: all 15 files with their CIFAR-10 defaults (ResNet-18 or ViT-Tiny, the recipe's batch, bf16,
   torch.compile on), --steps steps each, --parallel processes at once (compilations overlap): exit
   status, first step (compilation included), steady images/s, peak GPU memory, last loss finite.
3. simclr: SimCLR ResNet-18 on all of CIFAR-10 for as many epochs as fit in --minutes (the epoch time
   measured in part 2), with its kNN monitor, knn_top1, probe_top1 and linear_top1 (100 epochs).
4. throughput: SimCLR ResNet-18 at batch 512: images/s and model FLOPs utilisation (FLOPs counted by
   torch.utils.flop_counter), bf16 compiled, bf16 eager, float32 (TF32) eager.
--dry-run: tiny trunk, synthetic data, a few steps, 1,000 images decoded, CPU, no compile, no MFU; the
output goes to out/gpu_check/results_dryrun.md unless --out says otherwise. tests/test_gpu_check.py runs it.
"""

import concurrent.futures
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

import numpy as np
import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import bench  # noqa: E402
import common  # noqa: E402
from conftest import METHODS  # noqa: E402

# H200 SXM: 1,979 TFLOP/s of dense-equivalent bf16 "with sparsity" in NVIDIA's H200 datasheet, so 989 dense
PEAK_BF16_TFLOPS = bench.PEAK_BF16_TFLOPS


def arg(name, default):
    """--name=value from the command line, as the type of default."""
    text = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"--{name}=")), None)
    return default if text is None else type(default)(text)


DRY = "--dry-run" in sys.argv
OUT_DIR = os.path.join(ROOT, "out", "gpu_check")
REPORT = arg("out", os.path.join(OUT_DIR, "results_dryrun.md") if DRY else
             os.path.join(ROOT, "tests", "results_gpu.md"))
STEPS = arg("steps", 4 if DRY else 40)
PARALLEL = arg("parallel", 2 if DRY else 4)
MINUTES = arg("minutes", 0.1 if DRY else 5.0)


def build_cifar10(jpeg_path, out_path, device, limit=None):
    """Decode CIFAR-10's JPEG bytes (cifar10_jpeg.npz) into out_path in the .npz layout the methods read."""
    d, arrays = np.load(jpeg_path), {}
    for split in ("train", "test"):
        blob, offsets = torch.from_numpy(d[f"{split}_jpeg"]), d[f"{split}_offsets"]
        n = min(limit or len(offsets) - 1, len(offsets) - 1)
        files = [blob[offsets[i]:offsets[i + 1]] for i in range(n)]
        images = []
        for i in range(0, n, 4096):  # batched decoding: nvJPEG on CUDA, one image at a time on the CPU
            images += [img.cpu() for img in torchvision.io.decode_jpeg(files[i:i + 4096], device=device)]
        arrays[f"x_{split}"] = torch.stack(images).permute(0, 2, 3, 1).numpy()  # (n, 32, 32, 3) uint8 HWC
        arrays[f"y_{split}"] = d[f"y_{split}"][:n]
    np.savez(out_path, **arrays)
    return arrays


SHARED = [d for d in (os.environ.get("SSL_DATA", ""), os.path.join(ROOT, "..", "shared", "data")) if d]


def synthetic_jpeg(path, n=1000):
    """For a dry run without CIFAR-10 at hand: n synthetic images per split in cifar10_jpeg.npz's layout."""
    arrays = {}
    for split, seed in (("train", 0), ("test", 1)):
        x, y = common.make_synthetic(n, 32, seed)
        files = [torchvision.io.encode_jpeg(img, quality=75).numpy() for img in x]
        arrays[f"{split}_jpeg"], arrays[f"y_{split}"] = np.concatenate(files), y.numpy().astype(np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(f) for f in files])
    np.savez(path, **arrays)
    return path


def part_data(device):
    places = [arg("jpeg", ""), os.path.join(ROOT, "data", "cifar10_jpeg.npz")]
    jpeg = next((p for p in places + [os.path.join(d, "cifar10_jpeg.npz") for d in SHARED] if p and os.path.exists(p)),
                None)
    if jpeg is None and not DRY:
        raise FileNotFoundError("no cifar10_jpeg.npz in data/ (or --jpeg=..., $SSL_DATA, ../shared/data): "
                                "mkdir -p data && cp ../shared/data/cifar10_jpeg.npz data/")
    if jpeg is None:
        os.makedirs(OUT_DIR, exist_ok=True)
        print("gpu_check: no cifar10_jpeg.npz at hand: the dry run decodes synthetic images", flush=True)
        jpeg = synthetic_jpeg(os.path.join(OUT_DIR, "synthetic_jpeg.npz"))
    data_dir = os.path.join(OUT_DIR, "data") if DRY else os.path.join(ROOT, "data")
    os.makedirs(data_dir, exist_ok=True)
    t = time.time()
    arrays = build_cifar10(jpeg, os.path.join(data_dir, "cifar10.npz"), device, limit=1000 if DRY else None)
    seconds = time.time() - t
    row = {"images": len(arrays["y_train"]) + len(arrays["y_test"]), "seconds": seconds, "device": device.type}
    reference = next((os.path.join(d, "cifar10.npz") for d in SHARED if os.path.exists(os.path.join(d, "cifar10.npz"))),
                     "")
    if reference and "synthetic" not in jpeg:  # the same images, decoded once before: about 0.2 of 255 apart
        with np.load(reference) as ref:
            n = len(arrays["x_test"])
            row["mean_abs_diff"] = float(np.abs(ref["x_test"][:n].astype(np.float32) - arrays["x_test"]).mean())
            row["labels_equal"] = bool((ref["y_test"][:n] == arrays["y_test"]).all())
    row["ok"] = arrays["x_train"].shape[1:] == (32, 32, 3) and row.get("mean_abs_diff", 0) < 1.0 and row.get(
        "labels_equal", True)
    return row, data_dir


def run_method(name, data_dir, steps, extra=()):
    """One method's default recipe for `steps` steps in its own process; its numbers from log.jsonl etc."""
    out = os.path.join(OUT_DIR, name)
    os.makedirs(out, exist_ok=True)
    for f in ("log.jsonl", "results.json"):
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    flags = [f"--max_steps={steps}", "--eval_every=0", "--probe_epochs=0", "--linear_epochs=0",
             f"--log_every={max(1, steps // 4)}", f"--out_dir={out}", f"--data_dir={data_dir}", *extra]
    if DRY:
        flags += ["--dataset=synthetic", "--arch=tiny", "--batch_size=64", "--subset=512", "--device=cpu"]
    t = time.time()
    p = subprocess.run([sys.executable, f"{name}.py", *flags], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"} if DRY else None)
    row = {"method": name, "exit": p.returncode, "wall": time.time() - t,
           "command": f"python {name}.py " + " ".join(flags)}
    try:
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        steps_log = [r for r in log if "loss" in r]
        batch = json.load(open(os.path.join(out, "config.json")))["batch_size"]
        results = json.load(open(os.path.join(out, "results.json")))
        row.update(first_step=batch / steps_log[0]["images_per_second"], images_per_second=steps_log[-1][
            "images_per_second"], loss=steps_log[-1]["loss"], gpu_gb=results.get("peak_gpu_memory_gb"),
                   knn=results["knn_top1"], batch=batch)
    except Exception as e:  # the run failed before writing them: keep its output for the report
        row["error"] = f"{type(e).__name__}: {e}; stderr: {p.stderr[-1500:]}"
    row["ok"] = p.returncode == 0 and "error" not in row and math.isfinite(row.get("loss", math.nan))
    return row


def part_recipes(data_dir):
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:  # processes run at once; threads only wait
        return list(pool.map(lambda m: run_method(m, data_dir, STEPS), METHODS))


def part_simclr(data_dir, recipe_row):
    """Epochs that fit in MINUTES at the speed measured in part 2, then the real run with every evaluation."""
    n_train = 1000 if DRY else 50_000
    epoch_seconds = n_train / recipe_row["images_per_second"]
    epochs = max(1, int(MINUTES * 60 / epoch_seconds))
    extra = ["--dataset=synthetic", "--arch=tiny", "--batch_size=64", "--subset=1000", "--device=cpu",
             "--linear_epochs=2", "--probe_epochs=5"] if DRY else []
    flags = [f"--epochs={epochs}", f"--eval_every={max(1, epochs // 4)}", f"--warmup_epochs={min(10, epochs // 10)}",
             f"--data_dir={data_dir}", f"--out_dir={os.path.join(OUT_DIR, 'simclr_full')}", *extra]
    t = time.time()
    p = subprocess.run([sys.executable, "simclr.py", *flags], cwd=ROOT, capture_output=True, text=True)
    row = {"epochs": epochs, "epoch_seconds": epoch_seconds, "wall": time.time() - t, "exit": p.returncode,
           "command": "python simclr.py " + " ".join(flags)}
    try:
        out = os.path.join(OUT_DIR, "simclr_full")
        results = json.load(open(os.path.join(out, "results.json")))
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        row.update(results=results, monitor=[(r["epoch"], r["knn_top1"]) for r in log if "knn_top1" in r])
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}; stderr: {p.stderr[-1500:]}"
    row["ok"] = p.returncode == 0 and "error" not in row and row["results"]["knn_top1"] > 0.1
    return row


def part_throughput(device):
    """images/s and MFU of one SimCLR training step, three ways."""
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    batch = 16 if DRY else 512
    rows = []
    for dtype, compiled in [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, False)]:
        name = f"{str(dtype)[6:]}, {'compiled' if compiled else 'eager'}"
        if DRY and compiled:
            rows.append({"variant": name, "skipped": "compile is not run on the CPU dry run", "ok": True})
            continue
        step, _, raw, views = bench.simclr_step_vs_backbone(device, batch, dtype, compile_model=compiled)
        flops = bench.flops_per_step(raw, views)
        mfu = flops / step / (peak * 1e12) if peak and dtype == torch.bfloat16 and device.type == "cuda" else None
        rows.append({"variant": name, "batch": batch, "images_per_second": batch / step,
                     "tflops": flops / step / 1e12, "mfu": mfu, "ok": step > 0})
    return rows, peak


def guarded(name, fn, *args):
    """Run one part; a failure is reported, not raised, so that the other parts still run."""
    print(f"gpu_check: {name} ...", flush=True)
    try:
        return fn(*args)
    except Exception:
        print(traceback.format_exc(), flush=True)
        return {"ok": False, "error": traceback.format_exc()[-1500:]}


def report(data, recipes, full, throughput, peak, device, seconds):
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else f"none (CPU: {platform.machine()})"
    lines = [f"# GPU check{' (dry run on the CPU)' if DRY else ''}", "",
             f"Written by `python tests/gpu_check.py{' --dry-run' if DRY else ''}` on {time.strftime('%Y-%m-%d')}: "
             f"GPU {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, {seconds / 60:.1f} minutes in all.", ""]
    lines += ["## 1. Data", "", "| images decoded | device | seconds | mean abs diff to cifar10.npz (of 255) | ok |",
              "|---|---|---|---|---|",
              f"| {data.get('images', '-')} | {data.get('device', '-')} | {data.get('seconds', 0):.1f} | "
              f"{data.get('mean_abs_diff', float('nan')):.3f} | {data.get('ok')} |", ""]
    lines += ["## 2. Every default recipe, briefly", "", f"{STEPS} steps each, {PARALLEL} processes at once.", "",
              "| method | exit | batch | first step (s, compile included) | images/s (last steps) "
              "| peak GPU memory (GiB) "
              "| last loss | ok |", "|---|---|---|---|---|---|---|---|"]
    for r in recipes if isinstance(recipes, list) else []:
        lines.append(f"| {r['method']} | {r['exit']} | {r.get('batch', '-')} | {r.get('first_step', math.nan):.1f} | "
                     f"{r.get('images_per_second', math.nan):,.0f} | {r.get('gpu_gb') or '-'} | "
                     f"{r.get('loss', math.nan):.4g} | {r['ok']} |")
    failed = [r for r in recipes if not r["ok"]] if isinstance(recipes, list) else []
    lines += [""] + [f"- {r['method']} failed: `{r['command']}`: {r.get('error', '')[-600:]}" for r in failed]
    dry_note = " (dry run: tiny trunk, synthetic)" if DRY else ""
    lines += ["", "## 3. SimCLR ResNet-18 on all of CIFAR-10" + dry_note, ""]
    if "results" in full:
        res = full["results"]
        lines += [f"`{full['command']}`: {full['epochs']} epochs (an epoch measured at "
                  f"{full['epoch_seconds']:.1f} s in "
                  f"part 2), {full['wall'] / 60:.1f} minutes with its evaluations.", "",
                  "| knn_top1 | probe_top1 | linear_top1 | kNN monitor (epoch: top-1) "
                  "| published figure at these epochs |",
                  "|---|---|---|---|---|",
                  f"| {res['knn_top1']:.2%} | {res['probe_top1']:.2%} | "
                  f"{'-' if res['linear_top1'] is None else format(res['linear_top1'], '.2%')} | "
                  + ", ".join(f"{e:g}: {k:.1%}" for e, k in full["monitor"]) + " | none known to this project |"]
    else:
        lines.append(f"failed: {full.get('error', '')[-800:]}")
    lines += ["", "## 4. SimCLR ResNet-18 training step: throughput and MFU", "",
              "Model FLOPs of a forward+backward (torch.utils.flop_counter) per second, over the GPU's "
              f"dense bf16 peak "
              f"({peak or 'unknown'} TFLOP/s; H200: NVIDIA's datasheet gives 1,979 with sparsity).", "",
              "| variant | batch | images/s | model TFLOP/s | MFU |", "|---|---|---|---|---|"]
    for r in throughput if isinstance(throughput, list) else []:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | - | - | - | {r['skipped']} |")
        else:
            mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
            lines.append(f"| {r['variant']} | {r['batch']} | {r['images_per_second']:,.0f} | {r['tflops']:.2f} "
                         f"| {mfu} |")
    ok = data.get("ok") and isinstance(recipes, list) and all(r["ok"] for r in recipes) and full.get("ok") and \
        isinstance(throughput, list) and all(r["ok"] for r in throughput)
    lines += ["", f"Every part passed: {bool(ok)}.", ""]
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    with open(REPORT, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines), flush=True)
    return bool(ok)


def main():
    device = torch.device("cpu" if DRY else "cuda")
    if not DRY and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU is visible; `python tests/gpu_check.py --dry-run` runs the plan on the CPU")
    t = time.time()
    result = guarded("1. data", part_data, device)
    data, data_dir = result if isinstance(result, tuple) else (result, os.path.join(ROOT, "data"))
    recipes = guarded("2. every default recipe", part_recipes, data_dir)
    simclr_row = next((r for r in recipes if r["method"] == "simclr" and r["ok"]), None) if isinstance(recipes, list) \
        else None
    full = guarded("3. SimCLR on all of CIFAR-10", part_simclr, data_dir, simclr_row) if simclr_row else \
        {"ok": False, "error": "part 2's simclr run failed: no epoch time to plan with"}
    result = guarded("4. throughput", part_throughput, device)
    throughput, peak = result if isinstance(result, tuple) else (result, None)
    sys.exit(0 if report(data, recipes, full, throughput, peak, device, time.time() - t) else 1)


if __name__ == "__main__":
    main()
