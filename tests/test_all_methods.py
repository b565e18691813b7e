"""The method-file contract, checked the same way for every method file that exists."""

import dataclasses
import importlib
import os
import subprocess
import sys

import pytest

from conftest import METHODS, ROOT

PRESENT = [m for m in METHODS if os.path.exists(os.path.join(ROOT, f"{m}.py"))]


@pytest.mark.slow  # 15 runs: a minute and a half
def test_copy_of_one_file_plus_common_runs_alone(tmp_path):
    """<method>.py + common.py in an empty folder: the smoke run works with nothing else."""
    p = subprocess.run([sys.executable, "tests/copy_paste_runner.py", str(tmp_path), *PRESENT], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800, env={**os.environ, "SSL_DATA": ""})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    for m in PRESENT:
        assert f"COPY OK {m} " in p.stdout, m


@pytest.mark.parametrize("name", PRESENT)
def test_help_lists_every_field_with_default_and_comment(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        module.common.parse_config(module.Config, ["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for f in dataclasses.fields(module.Config):
        line = next((x for x in lines if x.strip().startswith(f"--{f.name}=")), None)
        assert line is not None, f"{name}: --{f.name} missing from --help"
        flag, _, comment = line.strip().partition(" ")
        assert flag == f"--{f.name}={f.default}" and comment.strip(), \
            f"{name}: {line!r} needs its default and a comment"


def test_importing_a_method_has_no_side_effects(tmp_path):
    """No output, no files, no downloads: import every method file from an empty folder."""
    code = f"import sys; sys.path.insert(0, {ROOT!r}); " + "; ".join(f"import {m}" for m in PRESENT)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and p.stderr == "", (p.stdout, p.stderr)
    assert os.listdir(tmp_path) == []
