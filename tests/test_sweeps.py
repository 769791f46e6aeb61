"""Sweeps as MLflow parent runs, run as users run them: `rlx train -m ...` as a real process, a real
local MLflow store; the basic launcher and the joblib launcher (jobs in other processes)."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, TINY, rlx_in_process, run_rlx


def _runs(store, experiment: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_a_four_job_sweep_is_one_parent_run_with_four_children(tmp_path):
    store = tmp_path / "store"
    res = rlx_in_process(
        "train", "-m", "algo=grpo,dr_grpo", "trainer.seed=0,1", *TINY, "trainer.steps=1",
        f"logger.store_dir={store}", "logger.experiment=sweep", "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    client, parents, children = _runs(store, "sweep")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.run_name == "sweep algo=grpo,dr_grpo trainer.seed=0,1"
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {"algo": "grpo,dr_grpo", "trainer.seed": "0,1"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.info.run_name for c in children) == [
        "dr_grpo-sort-s0", "dr_grpo-sort-s1", "grpo-sort-s0", "grpo-sort-s1",
    ]  # fmt: skip
    assert all(c.info.status == "FINISHED" for c in children)
    # the summary: an MLflow table of the four jobs, and the best job by eval/exact
    path = client.download_artifacts(parent.info.run_id, "sweep_summary.json", str(tmp_path))
    table = json.loads(open(path).read())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted((r["algo"], r["trainer.seed"]) for r in rows) == [
        ("dr_grpo", "0"), ("dr_grpo", "1"), ("grpo", "0"), ("grpo", "1"),
    ]  # fmt: skip
    top = max(c.data.metrics["eval/exact"] for c in children)
    best_name = parent.data.tags["best.run_name"]
    assert best_name in {c.info.run_name for c in children if c.data.metrics["eval/exact"] == top}
    assert parent.data.metrics["best/eval/exact"] == top
    sweep = json.loads((tmp_path / "sweep" / "rlx_sweep.json").read_text())
    assert sweep["parent_run_id"] == parent.info.run_id and sweep["status"] == "FINISHED"


def test_joblib_launcher_jobs_find_their_parent_through_the_sweep_directory(tmp_path):
    """rlx's joblib preset (conf/hydra/launcher/parallel.yaml): jobs in loky worker processes."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    store = tmp_path / "store"
    res = run_rlx(
        "train", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "trainer.seed=0,1", *TINY,
        "trainer.steps=1", f"logger.store_dir={store}", "logger.experiment=joblib",
        "hydra.sweep.dir=sweep", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    _, parents, children = _runs(store, "joblib")
    assert len(parents) == 1 and len(children) == 2
    assert sorted(c.info.run_name for c in children) == ["grpo-sort-s0", "grpo-sort-s1"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert parents[0].info.status == "FINISHED"
    assert {c.data.params["runtime.threads"] for c in children} == {"1"}  # one thread per job side by side


def test_a_failing_sweep_ends_its_parent_run_failed(tmp_path):
    store = tmp_path / "store"
    res = run_rlx(
        "train", "-m", "reward=custom",
        "reward.fn=tests.rewards_for_tests:length,tests.rewards_for_tests:huge",
        *TINY, "trainer.steps=1", f"logger.store_dir={store}", "logger.experiment=fail",
        "hydra.sweep.dir=sweep", cwd=tmp_path, env={"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert res.returncode != 0
    _, parents, children = _runs(store, "fail")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert {c.info.status for c in children} == {"FINISHED", "FAILED"}


def test_an_optuna_search_of_three_trials_names_its_best_trial(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import yaml

    store = tmp_path / "store"
    res = rlx_in_process(
        "train", "hparams_search=sort_grpo", "hydra.sweeper.n_trials=3",
        "hparams_search.objective=reward/mean", *TINY, f"logger.store_dir={store}",
        "logger.experiment=search", "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Directions: ['maximize']" in res.stdout + res.stderr
    client, parents, children = _runs(store, "search")
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name.startswith("search trainer.lr=tag(log, interval(1e-4, 3e-3))")
    assert parent.data.tags["objective"] == "reward/mean" and parent.data.tags["direction"] == "maximize"
    study = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    best = next(c for c in children if c.info.run_name == parent.data.tags["best.run_name"])
    # the parent's best trial is Optuna's best: its value is the maximum and its parameters Optuna's
    assert best.data.metrics["reward/mean"] == max(c.data.metrics["reward/mean"] for c in children)
    assert best.data.metrics["reward/mean"] == pytest.approx(study["best_value"])
    assert float(best.data.params["trainer.lr"]) == pytest.approx(study["best_params"]["trainer.lr"])
    assert "optimization_results.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_search_whose_objective_was_never_logged_stops_in_one_line(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    store = tmp_path / "store"
    res = run_rlx(
        "train", "hparams_search=sort_grpo", "hydra.sweeper.n_trials=2", "hparams_search.objective=eval/nope",
        *TINY, "trainer.steps=1", f"logger.store_dir={store}", "logger.experiment=nope",
        "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 2
    assert "rlx: error: hparams_search.objective='eval/nope' is not a metric this run logged" in res.stderr
    _, parents, children = _runs(store, "nope")
    assert len(parents) == 1 and parents[0].info.status == "FAILED" and len(children) == 1


def test_a_sweep_stopped_by_sigterm_ends_its_parent_killed(tmp_path):
    import signal
    import subprocess
    import time

    from tests.conftest import RLX

    store = tmp_path / "store"
    proc = subprocess.Popen(
        [RLX, "train", "-m", "trainer.seed=0,1", *TINY, "trainer.steps=500", f"logger.store_dir={store}",
         "logger.experiment=stop", "hydra.sweep.dir=sweep"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = tmp_path / "sweep" / "0" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    _, parents, children = _runs(store, "stop")
    assert [c.info.status for c in children] == ["KILLED"]  # the second job never started
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
