"""Run several of the tests' torchrun scripts in one launch: `torchrun --nproc_per_node=2 tests/dist_all.py
OUT_DIR SCRIPT[:ARG] ...` (CPU, gloo). Starting torchrun and importing torch twice costs seconds per
launch; the quick loop's cross-process checks share one (conftest.dist_scripts).

The group is made once; each script runs as its own `__main__` (its init_process_group and
destroy_process_group become no-ops), its stdout captured, and each process writes what every script
printed, and whether it finished, to OUT_DIR/rank<r>.json. A script that raises stops the launch (the
other process is then waiting in a collective): the scripts after it are reported as not run.
"""

import contextlib
import io
import json
import os
import runpy
import sys
import traceback
from datetime import timedelta

import torch.distributed as dist

here = os.path.dirname(os.path.abspath(__file__))
dist.init_process_group("gloo", timeout=timedelta(minutes=5))
rank = dist.get_rank()
init, destroy = dist.init_process_group, dist.destroy_process_group
dist.init_process_group = dist.destroy_process_group = lambda *args, **kwargs: None

out_dir, report = sys.argv[1], {}
for item in sys.argv[2:]:
    script, _, arg = item.partition(":")
    sys.argv, stdout, failed = [script] + ([arg] if arg else []), io.StringIO(), None
    try:
        with contextlib.redirect_stdout(stdout):
            runpy.run_path(os.path.join(here, script), run_name="__main__")
    except BaseException:
        failed = traceback.format_exc()
    report[script] = {"ok": failed is None, "stdout": stdout.getvalue(), "error": failed}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if failed:
        print(f"rank {rank}: {script} failed\n{failed}", file=sys.stderr, flush=True)
        sys.exit(1)

dist.barrier()  # nobody leaves while the other still talks to it: gloo aborts at exit otherwise
destroy()
