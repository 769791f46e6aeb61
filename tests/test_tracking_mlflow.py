"""MLflow as its users expect, against a real local store: the experiment opens as model training,
MLflow's own system metrics, a table of held-out completions per evaluation, the final model through
MLflow's transformers flavor (loaded back and run) or, for a toy model, as plain artifacts."""

from __future__ import annotations

import json

import mlflow
import mlflow.transformers
from mlflow.tracking import MlflowClient

from rlx.train import train
from tests.conftest import TINY, compose_cfg


def test_a_run_as_mlflow_users_expect_it(tmp_path):
    store = tmp_path / "store"
    cfg = compose_cfg(
        [*TINY, "trainer.steps=3", "trainer.eval_every=1", f"logger.store_dir={store}",
         "logger.system_metrics_interval=0.2", "logger.completions_table_rows=5"]
    )  # fmt: skip
    summary = train(cfg, run_dir=tmp_path / "run")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("rlx")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # MLflow's SystemMetricsMonitor on the run
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        run.data.metrics
    )
    # one MLflow table of completions, 5 rows per evaluation (steps 1, 2 and the final one at 3)
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [
        {"path": "eval_completions.json", "type": "table"}
    ]
    table = json.loads(
        open(client.download_artifacts(run.info.run_id, "eval_completions.json", str(tmp_path))).read()
    )
    assert table["columns"] == ["step", "prompt", "completion", "reward", "exact"]
    assert [row[0] for row in table["data"]] == [1] * 5 + [2] * 5 + [3] * 5
    assert all(isinstance(row[1], str) and len(row[1].split()) == 4 for row in table["data"])
    # the final model through MLflow's transformers flavor: loads back as a pipeline and generates
    (logged,) = client.search_logged_models([exp.experiment_id], f"source_run_id = '{run.info.run_id}'")
    mlflow.set_tracking_uri(uri)
    try:
        pipe = mlflow.transformers.load_model(logged.model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    out = pipe("8 2 7 0")[0]["generated_text"]
    assert out.startswith("8 2 7 0")


def test_a_toy_model_keeps_the_plain_artifact_and_system_metrics_can_be_off(tmp_path):
    store = tmp_path / "store"
    cfg = compose_cfg(
        ["model=toy_sort", *TINY[3:], f"logger.store_dir={store}", "logger.system_metrics=false"]
    )
    summary = train(cfg, run_dir=tmp_path / "run")
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert not any(k.startswith("system/") for k in run.data.metrics)
    assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
    exp = client.get_experiment_by_name("rlx")
    assert not client.search_logged_models([exp.experiment_id], f"source_run_id = '{run.info.run_id}'")
