"""Speed and memory (issue 12): torch's thread count, start-up imports, and sampling that keeps no
full-vocabulary logits."""

from __future__ import annotations

import pytest

from tests.conftest import TINY, run_rlx


@pytest.mark.parametrize(
    ("threads", "env", "expected"),
    [
        ("2", {"OMP_NUM_THREADS": "1"}, 2),  # an explicit count beats the environment
        ("auto", {"OMP_NUM_THREADS": "2", "LOCAL_WORLD_SIZE": "2"}, 1),  # a parallel launcher: one each
    ],
)
def test_trainer_threads_is_applied_in_a_real_run(threads, env, expected, tmp_path):
    run = tmp_path / "run"
    out = run_rlx(
        "train",
        *TINY,
        "trainer.steps=0",
        "logger=none",
        f"trainer.threads={threads}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"torch threads: {expected} (trainer.threads={threads})" in out.stdout + out.stderr


def test_trainer_threads_refuses_a_negative_count(tmp_path):
    out = run_rlx("train", *TINY, "trainer.threads=-1", "logger=none", cwd=tmp_path)
    assert out.returncode == 2
    assert "trainer.threads must be auto" in out.stderr
