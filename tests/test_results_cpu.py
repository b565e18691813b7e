"""tests/results_cpu.md: each row's printed command is the whole configuration that ran, and one row,
rerun from its command, gives the row's numbers."""

import dataclasses
import importlib
import shlex

import pytest

from conftest import cifar10_dir

import results_cpu


@pytest.mark.parametrize("name", sorted(results_cpu.CIFAR10))
def test_a_row_command_states_every_setting_of_the_run(name):
    """The command, parsed as the method parses its command line, is the Config the row's run would get."""
    module = importlib.import_module(name)
    cmd = results_cpu.command(name, epochs=3, subset=10_000)
    env, python, script, *flags = shlex.split(cmd)
    assert (env, python, script) == ("SSL_DATA=../shared/data", "python", f"{name}.py")
    parsed = module.common.parse_config(module.Config, flags)
    settings = dict(results_cpu.CIFAR10[name][0], subset=10_000, epochs=3, eval_every=3, linear_epochs=0,
                    probe_epochs=results_cpu.PROBE_EPOCHS, log_every=100)
    settings.pop("test_images", None)
    expected = results_cpu.tiny(module.Config, results_cpu.Path("."), dataset="cifar10", **settings)
    assert dataclasses.replace(parsed, out_dir=expected.out_dir) == expected
    if name == "simclr":  # what the old table left out: its default warmup is 10 epochs, the run had none
        assert "--warmup_epochs=0" in flags


@pytest.mark.slow  # one CPU run of the quickest row: about a minute
def test_the_quickest_row_reproduces_from_its_command(tmp_path):
    data_dir = cifar10_dir()
    rows = results_cpu.parse_rows()
    row = min(rows, key=lambda r: r["minutes"])
    init, results, _ = results_cpu.run(row["command"], str(tmp_path / "out"), data_dir)
    # the table prints percentages with 2 decimals; a run on other hardware sums floats in another order
    assert init["knn_top1"] == pytest.approx(row["knn_init"], abs=0.003), row
    assert results["knn_top1"] == pytest.approx(row["knn"], abs=0.003), row
    assert results["probe_top1"] == pytest.approx(row["probe"], abs=0.005), row
