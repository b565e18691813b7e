"""Run by tests/test_all_methods.py: for each method named on the command line, copy ONLY
<method>.py and common.py into an empty folder and run the file's smoke run there as __main__, with
nothing else from the repository importable. One Python process (torch is imported once); each
method gets a fresh `common` module from its own folder.

usage: python tests/copy_paste_runner.py WORK_DIR simclr moco ...
"""

import json
import os
import runpy
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
work = sys.argv[1]
sys.path = [p for p in sys.path if os.path.abspath(p or ".") not in (ROOT, os.path.join(ROOT, "tests"))]
for name in sys.argv[2:]:
    folder = os.path.join(work, name)
    os.makedirs(folder)
    for f in (f"{name}.py", "common.py"):
        shutil.copy(os.path.join(ROOT, f), folder)
    os.chdir(folder)
    sys.path.insert(0, folder)
    for m in ("common", name):
        sys.modules.pop(m, None)
    sys.argv = [f"{name}.py", "--dataset=synthetic", "--arch=tiny", "--subset=64", "--batch_size=32", "--epochs=1",
                "--eval_every=0", "--probe_epochs=1", "--warmup_epochs=0", "--log_every=1", "--device=cpu",
                "--out_dir=out"]
    runpy.run_path(f"{name}.py", run_name="__main__")
    assert sys.modules["common"].__file__ == os.path.join(folder, "common.py")
    results = json.load(open(os.path.join(folder, "out", "results.json")))
    assert set(os.listdir(folder)) - {"__pycache__"} == {"common.py", f"{name}.py", "out"}, os.listdir(folder)
    print(f"COPY OK {name} knn={results['knn_top1']:.3f}", flush=True)
    sys.path.remove(folder)
