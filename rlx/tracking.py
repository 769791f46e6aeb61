"""Tracking: ``metrics.jsonl`` (always), MLflow (by default), and the rich console.

- ``metrics.jsonl`` in the run directory gets every logged row whatever the logger, so a run's numbers
  survive a missing or unreachable tracking server.
- MLflow: one run per job in an embedded SQLite store under ``outputs/`` unless ``logger.tracking_uri``
  names another (a real ``mlflow server``). Params are the flattened config; metrics are logged
  asynchronously by step; artifacts are added at the end. The run is always ended, with status
  FINISHED, FAILED or KILLED. If MLflow fails mid-run, training goes on: one warning, and the metrics
  keep going to ``metrics.jsonl``.
- Only rank 0 writes anything (``RANK`` from torchrun), so data-parallel jobs log once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

console = Console(stderr=True)


def dist_rank() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists are kept whole (as JSON in MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _param_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)


class MlflowSink:
    """One MLflow run through ``MlflowClient``; any failure disables it after one warning."""

    def __init__(
        self,
        *,
        tracking_uri: str,
        artifact_root: str | None,
        experiment: str,
        run_name: str | None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
    ) -> None:
        self.run_id: str | None = None
        self.tracking_uri = tracking_uri
        self._ok = True
        self._pending: list[Any] = []  # RunOperations of asynchronous metric batches
        self._guard("start", self._start, artifact_root, experiment, run_name, params, tags)

    def _start(
        self,
        artifact_root: str | None,
        experiment: str,
        run_name: str | None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
    ) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "Creating initial tables" chatter
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                location = f"{artifact_root}/{experiment}" if artifact_root else None
                exp_id = self.client.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # created meanwhile by a parallel job
                exp_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        batch = [Param(k, _param_value(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=batch[i : i + 100])

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        if not self._ok:
            return
        try:
            fn(*args)
        except Exception as exc:  # a lost server must never stop training
            self._ok = False
            warnings.warn(
                f"MLflow ({self.tracking_uri}) failed at {what}: {type(exc).__name__}: {exc}. "
                "Training continues; metrics keep going to metrics.jsonl.",
                RuntimeWarning,
                stacklevel=2,
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        def send() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
            ops = self.client.log_batch(self.run_id, metrics=batch, synchronous=False)
            if ops is not None:
                self._pending.append(ops)
            if len(self._pending) > 256:  # keep the list short: wait for the oldest half
                for done in self._pending[:128]:
                    done.wait()
                del self._pending[:128]

        self._guard("log_metrics", send)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        def send() -> None:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

        self._guard("log_artifact", send)

    def close(self, status: str) -> None:
        def end() -> None:
            # Wait on this run's own batches. (mlflow.flush_async_logging() would go through the
            # fluent API, which opens a default store, an mlflow.db in the working directory.)
            for ops in self._pending:
                ops.wait()
            self._pending.clear()
            self.client.set_terminated(self.run_id, status=status)

        if self.run_id is not None:
            self._guard("close", end)


class Tracker:
    """What the loops log through: rows to ``metrics.jsonl``, MLflow, and the console."""

    def __init__(
        self,
        run_dir: Path,
        logger_cfg: Mapping[str, Any],
        *,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        launch_dir: Path,
    ) -> None:
        self.run_dir = run_dir
        self.rank, _ = dist_rank()
        self.enabled = self.rank == 0
        self.history: list[dict[str, float]] = []
        self.mlflow: MlflowSink | None = None
        self._jsonl = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        name = logger_cfg.get("name", "none")
        if name == "mlflow":
            uri = logger_cfg.get("tracking_uri")
            artifact_root = None
            if not uri:
                store = Path(logger_cfg.get("store_dir") or "outputs")
                store = store if store.is_absolute() else launch_dir / store
                store.mkdir(parents=True, exist_ok=True)
                uri = f"sqlite:///{store / 'mlflow.db'}"
                artifact_root = (store / "mlartifacts").as_uri()
            self.mlflow = MlflowSink(
                tracking_uri=str(uri),
                artifact_root=artifact_root,
                experiment=str(logger_cfg.get("experiment") or "rlx"),
                run_name=logger_cfg.get("run_name"),
                params=params,
                tags=tags,
            )

    @property
    def run_id(self) -> str | None:
        return self.mlflow.run_id if self.mlflow else None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled and self.mlflow and path.exists():
            self.mlflow.log_artifact(path, artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self.mlflow:
            self.mlflow.close(status)
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None


class LiveProgress:
    """A rich progress bar over training iterations with the key metrics beside it."""

    KEYS: ClassVar[dict[str, str]] = {
        "reward/mean": "reward",
        "eval/exact": "eval_exact",
        "kl/ref": "kl",
        "entropy": "entropy",
    }

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task(description, total=total, metrics="")
        self.latest: dict[str, float] = {}

    def __enter__(self) -> LiveProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        self.latest.update(metrics)
        shown = " ".join(
            f"{label}={self.latest[k]:.3g}" for k, label in self.KEYS.items() if k in self.latest
        )
        self.progress.update(self.task, completed=step, metrics=shown)


def summary_table(title: str, rows: Mapping[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    return table
