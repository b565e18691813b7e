"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (CPU, gloo): a short
training run of each method named on the command line, in one launch (torch starts once).

usage: torchrun --standalone --nproc_per_node=2 tests/dist_smoke.py OUT_DIR simclr moco ...
"""

import importlib
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny  # noqa: E402


class Folder:  # tiny() wants a path-like with "/"
    def __init__(self, path):
        self.path = path

    def __truediv__(self, name):
        return os.path.join(self.path, name)


dist.init_process_group("gloo")  # once: every train() below reuses it (common.cleanup leaves it)
out = sys.argv[1]
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    cfg = tiny(module.Config, Folder(os.path.join(out, name)), subset=64, batch_size=32, probe_epochs=1, log_every=1)
    results = module.train(cfg)
    if int(os.environ["RANK"]) == 0:
        assert json.load(open(os.path.join(cfg.out_dir, "results.json"))) == results
        print(f"SMOKE OK {name} steps={results['steps']} knn={results['knn_top1']:.3f}", flush=True)
dist.barrier()  # nobody leaves while the other still talks to it: gloo aborts at exit otherwise
dist.destroy_process_group()
