"""`rlx runs` and `rlx eval` over several runs, as users run them: a real 2-job sweep, then the table,
its JSON, the comparison figure and the evaluation of both models."""

from __future__ import annotations

import json

from tests.conftest import TINY, rlx_in_process


def test_rlx_runs_table_json_plot_and_eval_of_a_sweep(tmp_path):
    res = rlx_in_process(
        "train", "-m", "trainer.lr=1e-3,2e-3", *TINY, "trainer.eval_every=1",
        f"logger.store_dir={tmp_path / 'store'}", "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    res = rlx_in_process("runs", "sweep", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    runs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["name"] for r in runs] == ["grpo-sort-s0-lr=0.001", "grpo-sort-s0-lr=0.002"]
    assert [r["overrides"] for r in runs] == [["trainer.lr=0.001"], ["trainer.lr=0.002"]]  # only what differs
    for r, job in zip(runs, ("0", "1")):
        rows = [json.loads(x) for x in (tmp_path / "sweep" / job / "metrics.jsonl").read_text().splitlines()]
        assert r["eval/exact"] == rows[-1]["eval/exact"] and r["status"] == "FINISHED"
        assert r["algo"] == "grpo" and r["seed"] == "0" and r["wall_s"] > 0

    res = rlx_in_process("runs", "sweep", "--plot", "cmp.png", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "grpo-sort-s0-lr=0.001" in res.stdout and "trainer.lr=0.002" in res.stdout
    png = (tmp_path / "cmp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    res = rlx_in_process("eval", "sweep/0", "sweep/1", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    evals = [json.loads(line) for line in res.stdout.splitlines()]
    assert [e["model_dir"] for e in evals] == ["sweep/0/final", "sweep/1/final"]
    assert [e["eval/exact"] for e in evals] == [r["eval/exact"] for r in runs]


def test_rlx_runs_on_a_directory_without_runs_is_one_line(tmp_path):
    res = rlx_in_process("runs", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 2
    assert (
        res.stderr.strip()
        == f"rlx: error: {tmp_path} holds no rlx run (no config.yaml with a metrics.jsonl beside it)"
    )
