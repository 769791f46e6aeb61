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

import contextlib
import json
import logging
import math
import os
import time
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

from rlx.runtime import dist_rank

console = Console(stderr=True)


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
        resume_run_id: str | None = None,
        store_lock: Path | None = None,
    ) -> None:
        self.run_id: str | None = None
        self.tracking_uri = tracking_uri
        self.resumed = False
        self._ok = True
        # Metric batches go out asynchronously to the local store (SQLite writes would otherwise
        # cost a few ms per step); to a server they are sent synchronously, so a lost server is
        # noticed at once instead of filling a queue of retries.
        self._async = not tracking_uri.startswith(("http://", "https://"))
        self._pending: list[Any] = []  # RunOperations of asynchronous metric batches
        self._guard(
            "start", self._start, artifact_root, experiment, run_name, params, tags, resume_run_id, store_lock
        )

    def _start(
        self,
        artifact_root: str | None,
        experiment: str,
        run_name: str | None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        resume_run_id: str | None,
        store_lock: Path | None,
    ) -> None:
        from filelock import FileLock
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "Creating initial tables" chatter
        # Parallel jobs on one SQLite store: creating its tables and the experiment is serialised by a
        # file lock beside the database (MLflow's schema set-up is not safe to run concurrently).
        lock = FileLock(str(store_lock)) if store_lock else contextlib.nullcontext()
        with lock:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            exp_id = ensure_experiment(self.client, experiment, artifact_root)
        if resume_run_id and _run_exists(self.client, resume_run_id):
            self.run_id = resume_run_id
            self.resumed = True
            self.client.update_run(resume_run_id, status="RUNNING")
            return
        if resume_run_id:
            console.print(
                f"[yellow]rlx: warning: MLflow run {resume_run_id} of the checkpoint is not in "
                f"{self.tracking_uri}; the resumed run is logged as a new MLflow run[/yellow]",
                highlight=False,
                soft_wrap=True,
            )
        run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, params)

    @property
    def ok(self) -> bool:
        """False once any MLflow call failed: from then on only metrics.jsonl has the run."""
        return self._ok

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        if not self._ok:
            return
        try:
            fn(*args)
        except Exception as exc:  # a lost server must never stop training
            self._ok = False
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            console.print(
                f"[yellow]rlx: warning: MLflow ({self.tracking_uri}) failed at {what}: "
                f"{type(exc).__name__}: {reason}. Training continues; metrics keep going to "
                "metrics.jsonl; `rlx sync <run dir>` uploads them later.[/yellow]",
                highlight=False,
                soft_wrap=True,
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        def send() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
            ops = self.client.log_batch(self.run_id, metrics=batch, synchronous=not self._async)
            if ops is not None and self._async:
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


def ensure_experiment(client: Any, name: str, artifact_root: str | None) -> str:
    """The id of experiment ``name``, created (with its artifacts under ``artifact_root``) if new."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        location = f"{artifact_root}/{name}" if artifact_root else None
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException:  # created meanwhile by a parallel job on a server
        return str(client.get_experiment_by_name(name).experiment_id)


def log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    batch = [Param(k, _param_value(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(batch), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=batch[i : i + 100])


def _run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


def local_store(store_dir: str | Path | None, launch_dir: Path) -> tuple[str, str, Path]:
    """(tracking URI, artifact root, lock file) of the embedded SQLite store under ``store_dir``."""
    store = Path(store_dir or "outputs")
    store = store if store.is_absolute() else launch_dir / store
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}", (store / "mlartifacts").as_uri(), store / "mlflow.db.lock"


def http_settings(logger_cfg: Mapping[str, Any]) -> None:
    """Short retries for a tracking server, so a lost one costs seconds, not minutes (MLflow's own
    default is 7 retries with exponential backoff and a 120 s timeout). Environment variables the
    user set win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(logger_cfg.get("http_retries", 2))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(logger_cfg.get("http_timeout", 10))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # one rlx warning, not one per retry


TRACKING_FILE = "tracking.json"


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
        resume_run_id: str | None = None,
        fresh: bool = True,
        run_name: str | None = None,
        parent: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.run_name = run_name or logger_cfg.get("run_name")
        self.rank, _ = dist_rank()
        self.enabled = self.rank == 0
        self.history: list[dict[str, float]] = []
        self.mlflow: MlflowSink | None = None
        self._jsonl = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:  # a new run in a directory that held another one: keep the old rows aside
            for name in ("metrics.jsonl", "samples.jsonl"):
                if (run_dir / name).exists():
                    (run_dir / name).replace(run_dir / f"{name}.prev")
        self._jsonl = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self.started = time.time()
        self.ended: float | None = None
        self.experiment = str(logger_cfg.get("experiment") or "rlx")
        name = logger_cfg.get("name", "none")
        if name == "mlflow":
            uri = logger_cfg.get("tracking_uri")
            artifact_root, lock = None, None
            if not uri:
                uri, artifact_root, lock = local_store(logger_cfg.get("store_dir"), launch_dir)
            else:
                http_settings(logger_cfg)
            tags = dict(tags)
            if (  # a sweep job: its parent run, when both live in the same store and experiment
                parent
                and parent.get("parent_run_id")
                and parent.get("tracking_uri") == str(uri)
                and parent.get("experiment") == self.experiment
            ):
                tags["mlflow.parentRunId"] = str(parent["parent_run_id"])
            self.mlflow = MlflowSink(
                tracking_uri=str(uri),
                artifact_root=artifact_root,
                experiment=self.experiment,
                run_name=self.run_name,
                params=params,
                tags=tags,
                resume_run_id=resume_run_id,
                store_lock=lock,
            )
        self._write_tracking_file("RUNNING")

    def _write_tracking_file(self, status: str) -> None:
        """``tracking.json``: where this run's MLflow record lives, for `rlx sync` and for resuming."""
        info = {
            "tracking_uri": self.mlflow.tracking_uri if self.mlflow else None,
            "experiment": self.experiment,
            "run_id": self.run_id,
            "run_name": self.run_name,
            "status": status,
            "mlflow_ok": bool(self.mlflow and self.mlflow.ok),
            "started": self.started,  # wall clock (epoch seconds) of this process's part of the run
            "ended": self.ended,
        }
        tmp = self.run_dir / f".{TRACKING_FILE}.tmp"
        tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.run_dir / TRACKING_FILE)

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
        if self.enabled and self._jsonl:
            self.ended = time.time()
            self._write_tracking_file(status)
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
