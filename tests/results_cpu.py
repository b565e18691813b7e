"""Longer CPU runs on CIFAR-10, one per method; writes tests/results_cpu.md (a script, not a test:
about half an hour on 2 cores with the defaults).

    SSL_DATA=../shared/data python tests/results_cpu.py                 # all 15 methods: 10,000 images, 3 epochs
    SSL_DATA=../shared/data python tests/results_cpu.py --subset=0 --epochs=4 simclr moco   # all 50,000 images

Each method trains its `tiny` trunk with the settings of its CIFAR-10 learning test (tests/test_learning.py:
the recipe's defaults but for a short-run lr and CPU-sized heads) on the first `--subset` training images,
its step-0 monitor scoring the random initialisation. A row's command lists every setting that differs
from the file's defaults, and it is exactly what ran: this script runs the command and reads its
log.jsonl and results.json (only --out_dir is added, a temporary folder). The table is rewritten after
every method.
"""

import dataclasses
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import METHODS, ROOT, cifar10_root, tiny  # noqa: E402
from test_learning import CIFAR10  # noqa: E402

PROBE_EPOCHS = 30
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_cpu.md")
HEADER = ("| method | epochs | steps | kNN top-1: init -> trained | probe top-1 | images/s | wall time | run on | "
          "command (from the project root) |")


def command(name, epochs, subset):
    """The command line of a method's row: `SSL_DATA=../shared/data python <name>.py --key=value ...`."""
    module = importlib.import_module(name)
    settings = dict(CIFAR10[name][0], subset=subset, epochs=epochs, eval_every=epochs, probe_epochs=PROBE_EPOCHS,
                    linear_epochs=0, log_every=100)
    settings.pop("test_images", None)  # a test-harness setting: the table scores all 10,000 test images
    cfg = tiny(module.Config, Path("."), dataset="cifar10", **settings)
    defaults = module.Config()
    flags = [f"--{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
             if f.name not in ("out_dir", "data_dir") and getattr(cfg, f.name) != getattr(defaults, f.name)]
    return f"SSL_DATA=../shared/data python {name}.py " + " ".join(flags)


def run(row_command, out_dir, data_dir):
    """Run a row's command (plus --out_dir) from the project root; return (step-0 record, results, seconds)."""
    env_part, python, script, *flags = shlex.split(row_command)
    env = {**os.environ, "SSL_DATA": data_dir}
    t = time.time()
    p = subprocess.run([sys.executable, script, *flags, f"--out_dir={out_dir}"], cwd=ROOT, env=env, text=True,
                       capture_output=True)
    if p.returncode:
        raise RuntimeError(f"{row_command} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    log = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    init = next(r for r in log if r["step"] == 0 and "knn_top1" in r)
    return init, json.load(open(os.path.join(out_dir, "results.json"))), time.time() - t


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    given = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    epochs, subset = int(given.get("epochs", 3)), int(given.get("subset", 10_000))
    data_dir = cifar10_root()
    if not data_dir:
        sys.exit("set SSL_DATA to the folder holding cifar10.npz (e.g. SSL_DATA=../shared/data)")
    rows = kept_rows(epochs, subset)  # method -> row: a rerun of some methods keeps the others' rows
    for name in args or [m for m in METHODS if m in CIFAR10]:
        cmd = command(name, epochs, subset)
        with tempfile.TemporaryDirectory() as tmp:
            init, results, seconds = run(cmd, tmp, data_dir)
        knn = f"{init['knn_top1']:.2%} -> {results['knn_top1']:.2%}"
        rows[name] = (f"| {name} | {epochs} | {results['steps']} | {knn} | "
                      f"{results['probe_top1']:.2%} | {results['images_per_second']:.0f} | {seconds / 60:.1f} min | "
                      f"{time.strftime('%Y-%m-%d')} | "
                      f"`{cmd}` |")
        write(rows, epochs, subset)


def script_command(epochs, subset):
    return f"SSL_DATA=../shared/data python tests/results_cpu.py --subset={subset} --epochs={epochs}"


def kept_rows(epochs, subset):
    """The rows of an earlier results_cpu.md written with the same subset and epochs and the same columns."""
    text = open(OUT).read() if os.path.exists(OUT) else ""
    if script_command(epochs, subset) not in text or HEADER not in text:
        return {}
    rows = [line.rstrip("\n") for line in open(OUT) if line.startswith("| ") and not line.startswith("| method")]
    return {row.split("|")[1].strip(): row for row in rows}


def parse_rows(path=OUT):
    """The table's rows as dicts: method, knn_init, knn, probe (fractions), command."""
    out = []
    for line in open(path):
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            knn_init, knn = (float(v.rstrip("%")) / 100 for v in cells[3].split(" -> "))
            out.append(dict(method=cells[0], knn_init=knn_init, knn=knn, probe=float(cells[4].rstrip("%")) / 100,
                            minutes=float(cells[6].split()[0]), command=cells[8].strip("`")))
    return out


def write(rows, epochs, subset):
    with open(OUT, "w") as f:
        f.write(f"""# CPU results on CIFAR-10 (JPEG q75 copy)

Written by `{script_command(epochs, subset)}` (or a rerun of some rows: each row says when it ran) on
{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, no GPU. Every run trains the `tiny`
trunk (4 convolutions, 128-d features) on the first {subset or 50_000:,} training images with its learning test's
settings (tests/test_learning.py), fixed seed; the command in each row lists every setting that differs from
the file's defaults and reproduces the row (tests/test_results_cpu.py reruns one). kNN top-1 (k=200, weighted,
memory = those training images, on the 10,000 test images): "init" is the very network before its first step
(the step-0 record of log.jsonl), "trained" after its last. probe top-1: probe_top1, the fast {PROBE_EPOCHS}-epoch
probe on frozen features of the training images and their flips. linear_top1, the standard linear evaluation,
is not run on the CPU (--linear_epochs=0). Wall time includes the evaluations. These are minutes-long CPU
runs of a toy trunk, far from the recipes' 100-1000 ResNet-18 epochs: they show that each method learns, not
what it reaches, and are not comparable with published numbers.

{HEADER}
|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows[m] for m in METHODS if m in rows) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
