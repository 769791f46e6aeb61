"""``rlx sync RUN_DIR``: upload what a run directory holds to MLflow, without duplicating anything.

For runs whose tracking server was down at start or went down mid-run (training went on, metrics
kept going to ``metrics.jsonl``). The run's MLflow run (``tracking.json``) is reused when the target
store has it, else a new run is created with the config as params. Then every (metric, step) of
``metrics.jsonl`` that MLflow lacks is logged with its original timestamp, artifacts that are missing
are uploaded, and the run gets the status the training process ended with. Running it twice adds
nothing the second time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rlx.errors import RlxError
from rlx.runinfo import run_name
from rlx.tracking import TRACKING_FILE, ensure_experiment, flatten, http_settings, local_store, log_params

ARTIFACTS = ("config.yaml", "metrics.jsonl", "samples.jsonl", "reward_curve.png")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines):  # only the last line may be cut short (a run killed mid-write)
                raise RlxError(f"{path}: line {i} is not JSON") from None
    return rows


def sync_run(run_dir: Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Upload ``run_dir`` to MLflow; returns what was added (run id, metric values, artifacts)."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run_dir = Path(run_dir)
    metrics_file, config_file = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not metrics_file.is_file() or not config_file.is_file():
        raise RlxError(f"{run_dir} is not an rlx run directory (needs metrics.jsonl and config.yaml)")
    cfg = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    assert isinstance(cfg, dict)
    info_file = run_dir / TRACKING_FILE
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    logger = cfg.get("logger", {})
    artifact_root, lock = None, None
    uri = tracking_uri or info.get("tracking_uri") or logger.get("tracking_uri")
    if not uri:
        uri, artifact_root, lock = local_store(logger.get("store_dir"), Path.cwd())
    if str(uri).startswith(("http://", "https://")):
        http_settings(logger)
    experiment = str(info.get("experiment") or logger.get("experiment") or "rlx")
    try:
        from filelock import FileLock

        client = MlflowClient(tracking_uri=str(uri))
        if lock is not None:
            with FileLock(str(lock)):
                exp_id = ensure_experiment(client, experiment, artifact_root)
        else:
            exp_id = ensure_experiment(client, experiment, artifact_root)
        run_id = info.get("run_id")
        existing: set[tuple[str, int]] = set()
        created = False
        try:
            run = client.get_run(run_id) if run_id else None
        except MlflowException:
            run = None
        if run is None:
            tags = {"run_dir": str(run_dir.resolve()), "rlx.synced": "true"}
            for key in ("algo", "model", "task", "reward"):
                tags[key] = str(cfg.get(key, {}).get("name"))
            name = info.get("run_name") or run_name(cfg)  # never an MLflow random name
            run = client.create_run(exp_id, run_name=name, tags=tags)
            run_id = run.info.run_id
            log_params(client, run_id, flatten(cfg))
            created = True
        else:
            for key in run.data.metrics:
                existing |= {(key, m.step) for m in client.get_metric_history(run_id, key)}
        batch: list[Metric] = []
        for row in _read_rows(metrics_file):
            step, stamp = int(row["step"]), int(float(row.get("time", 0)) * 1000)
            for key, value in row.items():
                if key in ("step", "time") or (key, step) in existing:
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    batch.append(Metric(key, float(value), stamp, step))
                    existing.add((key, step))
        for i in range(0, len(batch), 1000):  # MLflow's limit per log_batch call
            client.log_batch(run_id, metrics=batch[i : i + 1000])
        present = {a.path for a in client.list_artifacts(run_id)}
        uploaded = []
        for name in ARTIFACTS:
            if (run_dir / name).is_file() and name not in present:
                client.log_artifact(run_id, str(run_dir / name))
                uploaded.append(name)
        if (run_dir / "final").is_dir() and "model" not in present:
            client.log_artifacts(run_id, str(run_dir / "final"), "model")
            uploaded.append("model")
        status = info.get("status") or ("FINISHED" if (run_dir / "final").is_dir() else "KILLED")
        if status == "RUNNING":  # the process never closed its run (kill -9)
            status = "FINISHED" if (run_dir / "final").is_dir() else "KILLED"
        client.set_terminated(run_id, status=status)
    except MlflowException as exc:
        raise RlxError(f"MLflow at {uri}: {str(exc).splitlines()[0]}") from exc
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise RlxError(f"cannot reach MLflow at {uri}: {exc}") from exc
    info.update(tracking_uri=str(uri), experiment=experiment, run_id=run_id, status=status, mlflow_ok=True)
    tmp = run_dir / f".{TRACKING_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    tmp.replace(info_file)
    return {
        "run_id": run_id,
        "created_run": created,
        "metrics_added": len(batch),
        "artifacts_added": uploaded,
        "tracking_uri": str(uri),
    }
