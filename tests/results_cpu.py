"""Longer CPU runs on CIFAR-10, one per method; writes tests/results_cpu.md (a script, not a test:
about half an hour on 2 cores with the defaults).

    SSL_DATA=../shared/data python tests/results_cpu.py                 # all 15 methods: 10,000 images, 3 epochs
    SSL_DATA=../shared/data python tests/results_cpu.py --subset=0 --epochs=4 simclr moco   # all 50,000 images

Each method trains its `tiny` trunk with the settings of its CIFAR-10 learning test
(tests/test_learning.py: the recipe's defaults but for a short-run lr and CPU-sized heads) on the
first `--subset` training images (0 = all 50,000). Its monitor scores the random initialisation
before the first step and the run's final evaluation scores the trained encoder, both with kNN
(k=200) and a linear probe on the un-augmented images, on the 10,000 test images. The table is rewritten after every method.
"""

import importlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import METHODS, cifar10_root, learning_run  # noqa: E402
from test_learning import CIFAR10  # noqa: E402

PROBE_EPOCHS = 30
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_cpu.md")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    flag = lambda key, default: int(next((a.split("=")[1] for a in sys.argv[1:] if a.startswith(f"--{key}=")), default))  # noqa: E731
    epochs, subset = flag("epochs", 3), flag("subset", 10_000)
    names = args or [m for m in METHODS if m in CIFAR10]
    data_dir = cifar10_root()
    if not data_dir:
        sys.exit("set SSL_DATA to the folder holding cifar10.npz (e.g. SSL_DATA=../shared/data)")
    rows = kept_rows(epochs, subset)  # method -> row: a rerun of some methods keeps the others' rows
    for name in names:
        settings = dict(CIFAR10[name][0], subset=subset, epochs=epochs, test_images=0, log_every=100)
        settings.pop("probe_epochs", None)  # every run here has the same probe
        t = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            init, results, _ = learning_run(importlib.import_module(name), Path(tmp), probe_epochs=PROBE_EPOCHS,
                                            dataset="cifar10", data_dir=data_dir, **settings)
        flags = " ".join(f"--{k}={v}" for k, v in settings.items() if k not in ("log_every", "test_images"))
        rows[name] = (f"| {name} | {epochs} | {results['steps']} | {init['knn_top1']:.2%} -> {results['knn_top1']:.2%} | "
                    f"{init['linear_top1']:.2%} -> {results['linear_top1']:.2%} | {results['images_per_second']:.0f} | "
                    f"{(time.time() - t) / 60:.1f} min | `python {name}.py --dataset=cifar10 --arch=tiny {flags}` |")
        write(rows, epochs, subset)


def command(epochs, subset):
    return f"SSL_DATA=../shared/data python tests/results_cpu.py --subset={subset} --epochs={epochs}"


def kept_rows(epochs, subset):
    """The rows of an earlier results_cpu.md written with the same subset and epochs."""
    if not os.path.exists(OUT) or command(epochs, subset) not in open(OUT).read():
        return {}
    rows = [line.rstrip("\n") for line in open(OUT) if line.startswith("| ") and not line.startswith("| method")]
    return {row.split("|")[1].strip(): row for row in rows}


def write(rows, epochs, subset):
    with open(OUT, "w") as f:
        f.write(f"""# CPU results on CIFAR-10 (JPEG q75 copy)

Written by `{command(epochs, subset)}` on {time.strftime('%Y-%m-%d')}:
{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, no GPU. Every run trains the `tiny`
trunk (4 convolutions, 128-d features) on the first {subset or 50_000:,} training images with its learning test's
settings (tests/test_learning.py), fixed seed; "init -> trained" compares the very network before
its first step and after its last. kNN: k=200, weighted, memory = those training images, on the 10,000 test images; linear:
{PROBE_EPOCHS}-epoch probe on frozen features of the training images and their flips. Wall time includes
the evaluations. These are minutes-long CPU runs of a toy trunk, far from the recipes' 100-1000
ResNet-18 epochs: they show that each method learns, not what it reaches.

| method | epochs | steps | kNN top-1: init -> trained | linear top-1: init -> trained | images/s | wall time | command |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows[m] for m in METHODS if m in rows) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
