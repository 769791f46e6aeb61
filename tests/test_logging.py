"""Logging as users see it, in real `rlx train` processes: the console through rich's RichHandler and
the same records in Hydra's job log (train.log); -q and -v; the progress bar's rate and time left."""

from __future__ import annotations

import re

from rlx.tracking import LiveProgress, as_text
from tests.conftest import TINY, rlx_in_process


def _summary_lines(text: str) -> list[str]:
    """The summary table's lines, without the log file's ``[time][logger][LEVEL] - `` prefix."""
    lines = [re.sub(r"^\[[^]]*\]\[[^]]*\]\[[^]]*\] - ", "", ln).strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln.startswith(("│", "rlx train:"))]


def test_train_log_holds_what_the_console_showed_and_q_silences_it(tmp_path):
    res = rlx_in_process("train", *TINY, "logger=none", "hydra.run.dir=run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    shown = _summary_lines(res.stderr)
    assert any("eval/exact" in ln for ln in shown) and shown[0].startswith("rlx train: algo=grpo")
    assert shown == _summary_lines(log)  # the summary table, line for line
    assert "[rlx][INFO] - train 2/2 (" in log and "it/s" in log  # progress lines, file only

    res = rlx_in_process("train", "-q", *TINY, "logger=none", "hydra.run.dir=quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.strip() == "" and res.stdout.strip() == ""
    assert (tmp_path / "quiet" / "final" / "model.safetensors").is_file()


def test_v_adds_rlx_debug_records(tmp_path):
    res = rlx_in_process(
        "train", "-v", *TINY, "trainer.steps=1", "logger=none", "hydra.run.dir=run", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"[rlx][DEBUG] - run grpo-sort-s0 in {tmp_path / 'run'};" in log


def test_progress_bar_shows_iterations_per_second_and_time_left():
    bar = LiveProgress(100, "train", enabled=True)
    with bar:
        for step in range(1, 6):
            bar.update(step, {"reward/mean": 0.5})
        shown = as_text(bar.progress.make_tasks_table(bar.progress.tasks))
    assert "5/100" in shown and "it/s" in shown and "reward=0.5" in shown
    assert "< 0:" in shown  # time remaining after the elapsed time
