"""A run speaks at once: a progress line after the first step and at least every PROGRESS_SECONDS, the
evaluations' progress, and a notice when a GPU recipe runs on the CPU."""

import time

import pytest
import torch

from conftest import first_test_images, read_log, tiny

import common
import simclr


def logged_steps(cfg):
    return [r["step"] for r in read_log(cfg, steps=True)]


def test_progress_after_the_first_step_then_every_log_every_steps(tmp_path):
    cfg = tiny(simclr.Config, tmp_path, max_steps=4, log_every=100, probe_epochs=0)
    simclr.train(cfg)
    assert logged_steps(cfg) == [1, 4]  # the first step, then the last: log_every is far


def test_slow_steps_print_progress_before_log_every_steps(tmp_path, monkeypatch):
    """Steps slower than PROGRESS_SECONDS: a line after every step although log_every=100."""
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0.2)
    real = simclr.nt_xent_loss
    monkeypatch.setattr(simclr, "nt_xent_loss", lambda *args: time.sleep(0.3) or real(*args))
    cfg = tiny(simclr.Config, tmp_path, max_steps=4, log_every=100, probe_epochs=0)
    simclr.train(cfg)
    assert logged_steps(cfg) == [1, 2, 3, 4]


def test_one_process_stops_at_a_nan_on_a_line_the_clock_asked_for(tmp_path, monkeypatch):
    """Across processes the NaN check waits for a counted step (tests/dist_common.py); one process checks on every
    line it prints."""
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0.0)
    cfg = tiny(simclr.Config, tmp_path, log_every=100)
    log = common.Logger(cfg, common.setup(cfg), steps_per_epoch=100, start_step=0, stop_step=50)
    for step in range(3):
        log.step(step, loss=torch.tensor(1.0))
    with pytest.raises(common.RunError, match="at step 4;"):
        log.step(3, loss=torch.tensor(float("nan")))


def test_evaluations_print_their_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0.0)
    cfg = tiny(simclr.Config, tmp_path, max_steps=1, probe_epochs=0)
    simclr.train(cfg)
    out = capsys.readouterr().out
    assert "eval: train features 512/" not in out  # a line is printed only before the end: done/total, rate, ETA
    assert "eval: test features" in out and "img/s | ETA" in out
    assert "eval: test features: 2,000 in" in out  # and the duration at the end


def test_a_gpu_recipe_on_the_cpu_says_so_first_then_how_long_it_would_take(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_data", first_test_images(common.load_data, 64))  # a cheap final evaluation
    cfg = tiny(simclr.Config, tmp_path, arch="resnet18", subset=16, batch_size=8, max_steps=1, probe_epochs=0)
    simclr.train(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("note: a GPU recipe (resnet18, batch 8, 1 epochs) is running on the CPU")
    note = next(line for line in lines if line.startswith("note: at this speed the run takes"))
    assert "python" in note and "--arch=tiny" in note


def test_a_cpu_sized_run_has_no_notice(tmp_path, capsys):
    simclr.train(tiny(simclr.Config, tmp_path, max_steps=1, probe_epochs=0))
    assert "note:" not in capsys.readouterr().out


def test_evaluation_progress_comes_5_seconds_in_then_every_30_then_its_duration(monkeypatch, capsys):
    clock = iter([0.0, 4.0, 6.0, 20.0, 36.5, 40.0])  # what time.time() says at each call

    class Clock:
        time = staticmethod(lambda: next(clock))

    monkeypatch.setattr(common, "time", Clock)
    progress = common.Progress("eval: x", 100)  # t = 0
    for done in (10, 20, 30, 40, 100):  # at t = 4, 6, 20, 36.5, 40
        progress(done)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in lines] == ["eval: x 20/100", "eval: x 40/100", "eval: x: 100 in 0:00:40"]


def test_a_loss_of_inf_stops_the_run_as_nan_does(tmp_path):
    """The check is for any non-finite loss: +inf (an overflow) stops the run at the step it appeared."""
    cfg = tiny(simclr.Config, tmp_path, log_every=100)
    log = common.Logger(cfg, common.setup(cfg), steps_per_epoch=100, start_step=0, stop_step=50)
    with pytest.raises(common.RunError, match="at step 1;"):
        log.step(0, loss=torch.tensor(float("inf")))


def test_a_record_at_each_epochs_end(tmp_path):
    """Besides the first step, every log_every steps and the last: a record at the end of each epoch."""
    cfg = tiny(simclr.Config, tmp_path, log_every=100)
    log = common.Logger(cfg, common.setup(cfg), steps_per_epoch=3, start_step=0, stop_step=8)
    for step in range(8):
        log.step(step, loss=torch.tensor(1.0))
    assert logged_steps(cfg) == [1, 3, 6, 8]


def test_records_of_a_resumed_run_count_its_own_steps(tmp_path, monkeypatch):
    """A run resumed at step 10 of 20 (5 steps per epoch, batch 64), its steps 2 s apart: each record holds the
    epoch done, 64 images per 2 s over the steps since the last record, the ETA of the steps left at that pace;
    images_per_second() counts this run's 5 steps in its 10 s only."""
    clock = iter(range(0, 100, 2))  # what time.time() says at each call: 0, 2, 4, ...

    class Clock:
        time = staticmethod(lambda: next(clock))

    cfg = tiny(simclr.Config, tmp_path, log_every=5)
    rt = common.setup(cfg)
    monkeypatch.setattr(common, "time", Clock)
    log = common.Logger(cfg, rt, steps_per_epoch=5, start_step=10, stop_step=20)  # t = 0
    for step in range(10, 15):  # t = 2, 4, ..., 10: records after steps 11 (the first) and 15 (log_every)
        log.step(step, loss=torch.tensor(1.0))
    records = read_log(cfg)
    assert [(r["step"], r["epoch"], r["images_per_second"], r["eta_seconds"]) for r in records] == [
        (11, 2.2, 32.0, 18), (15, 3.0, 32.0, 10)]
    assert log.images_per_second() == 32


def test_the_cpu_note_comes_once(tmp_path, capsys):
    """A GPU recipe on the CPU: "note: at this speed ..." after its first step only, not with every line."""
    cfg = tiny(simclr.Config, tmp_path, arch="resnet18", log_every=1)
    log = common.Logger(cfg, common.setup(cfg), steps_per_epoch=10, start_step=0, stop_step=10)
    for step in range(3):
        log.step(step, loss=torch.tensor(1.0))
    assert capsys.readouterr().out.count("note: at this speed") == 1
