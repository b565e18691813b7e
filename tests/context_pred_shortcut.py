"""How much of context_pred's pretext accuracy the neighbour patch alone explains (a script, not a test).

The 3x3 grid nearly fills a small image, so where the neighbour patch lies, and so what it shows (sky at the
top, background at the corners), gives away part of its label without the centre patch. This script trains
context_pred twice per image size on the same CIFAR-10 images: once as it is, once with the centre patch
blanked (zeros) in training and in the pretext evaluation. If the blanked run reaches the same pretext_top1,
the network has learned the position shortcut, not the relation between the two patches.

    SSL_DATA=../shared/data python tests/context_pred_shortcut.py            # 64 and 96 px: under 5 minutes on 2 cores
    SSL_DATA=../shared/data python tests/context_pred_shortcut.py 64         # one image size
"""

import os
import sys
import tempfile

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]
import context_pred  # noqa: E402
from conftest import cifar10_root  # noqa: E402

SETTINGS = dict(subset=10000, arch="tiny", epochs=3, batch_size=64, lr=0.04, eval_every=0, probe_epochs=0,
                linear_epochs=0, device="cpu", log_every=1000)  # the CPU results row's, without its evaluations
pairs_as_they_are = context_pred.patch_pairs


def without_centre(x, cfg):
    centre, neighbour, labels = pairs_as_they_are(x, cfg)
    return torch.zeros_like(centre), neighbour, labels


if __name__ == "__main__":
    if not (root := cifar10_root()):
        sys.exit("set SSL_DATA to the folder holding cifar10.npz (e.g. SSL_DATA=../shared/data)")
    rows = []
    for size in [int(a) for a in sys.argv[1:]] or [64, 96]:
        for name, pairs in [("both patches", pairs_as_they_are), ("neighbour alone", without_centre)]:
            context_pred.patch_pairs = pairs
            with tempfile.TemporaryDirectory() as out:
                cfg = context_pred.Config(dataset="cifar10", data_dir=root, image_size=size, out_dir=out, **SETTINGS)
                results = context_pred.train(cfg)
            rows.append(f"| {size} px | {name} | {results['pretext_top1']:.2%} | {results['knn_top1']:.2%} |")
    print("\n| image size | the network sees | pretext_top1 | knn_top1 |\n|---|---|---|---|\n" + "\n".join(rows))
