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
import importlib.metadata
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console, ConsoleRenderable
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from rlx.runtime import dist_rank

console = Console(stderr=True)
log = logging.getLogger("rlx")


class _LevelStyledHandler(RichHandler):
    """rich's RichHandler on rlx's console (so log lines print above the live progress bar), the
    message alone on the console (the job's log file has time, logger and level), warnings in yellow
    and errors in red."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False) and super().filter(record)

    def render_message(self, record: logging.LogRecord, message: str) -> ConsoleRenderable:
        text = super().render_message(record, message)
        if isinstance(text, Text) and record.levelno >= logging.WARNING:
            text.stylize("red" if record.levelno >= logging.ERROR else "yellow")
        return text


def rich_handler() -> logging.Handler:
    """The console handler of rlx's Hydra job logging (conf/hydra/job_logging/rlx.yaml)."""
    return _LevelStyledHandler(
        console=console, show_time=False, show_level=False, show_path=False, markup=False, highlighter=None
    )


def ensure_logging() -> None:
    """Outside Hydra's job logging (tests, `rlx eval`): rlx's records still reach the console."""
    if not logging.getLogger().handlers and not log.handlers:
        log.addHandler(rich_handler())
        log.setLevel(logging.INFO)


def as_text(renderable: Any) -> str:
    """A rich renderable (a table) as the console would show it, for the log: console and file alike."""
    import io

    out = Console(file=io.StringIO(), width=console.width, color_system=None, force_terminal=False)
    out.print(renderable)
    lines = out.file.getvalue().rstrip("\n").splitlines()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in lines)


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
        system_metrics: float | None = None,
    ) -> None:
        self.run_id: str | None = None
        self.tracking_uri = tracking_uri
        self.resumed = False
        self._ok = True
        self._monitor: Any = None
        # Metric batches go out asynchronously to the local store (SQLite writes would otherwise
        # cost a few ms per step); to a server they are sent synchronously, so a lost server is
        # noticed at once instead of filling a queue of retries.
        self._async = not tracking_uri.startswith(("http://", "https://"))
        self._pending: list[Any] = []  # RunOperations of asynchronous metric batches
        self._logged: dict[str, int] = {}  # a resumed run: the last step MLflow has of each metric
        self._guard(
            "start", self._start, artifact_root, experiment, run_name, params, tags, resume_run_id, store_lock
        )
        if system_metrics and self.run_id is not None:
            self._guard("system metrics", self._start_system_metrics, float(system_metrics))

    def _start_system_metrics(self, interval: float) -> None:
        """MLflow's own monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) on this run, every
        ``interval`` seconds, as ``system/*`` metrics; a resumed run continues its steps."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # a lost server: rlx warns once
        self._monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=interval,
            resume_logging=self.resumed,
            tracking_uri=self.tracking_uri,
        )
        self._monitor.start()

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
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # log_table re-reads its file
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
            self._logged = logged_steps(self.client, resume_run_id)
            return
        if resume_run_id:
            log.warning(
                f"rlx: warning: MLflow run {resume_run_id} of the checkpoint is not in "
                f"{self.tracking_uri}; the resumed run is logged as a new MLflow run"
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
            log.warning(
                f"rlx: warning: MLflow ({self.tracking_uri}) failed at {what}: "
                f"{type(exc).__name__}: {reason}. Training continues; metrics keep going to "
                "metrics.jsonl; `rlx sync <run dir>` uploads them later."
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        def send() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [
                Metric(k, float(v), now, step)
                for k, v in metrics.items()
                if math.isfinite(v)
                and step > self._logged.get(k, -1)  # resumed: never a (metric, step) twice
            ]
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

    def log_table(self, data: Mapping[str, list[Any]], artifact_file: str) -> None:
        """An MLflow table (``MlflowClient.log_table``): the UI shows it, and compares it across runs;
        rows logged again to the same file are appended."""

        def send() -> None:
            self.client.log_table(self.run_id, data=dict(data), artifact_file=artifact_file)

        self._guard("log_table", send)

    def log_transformers_model(self, model_dir: Path, name: str = "model") -> None:
        """The saved model through MLflow's transformers flavor (a text-generation pipeline), so it can
        be registered and loaded with ``mlflow.transformers.load_model``."""

        def send() -> None:
            import huggingface_hub.constants
            import mlflow.transformers
            from transformers import pipeline
            from transformers.utils import logging as hf_logging

            previous = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(self.tracking_uri)  # the flavor logs through the fluent API
            # The model is a local directory: the flavor still asks the hub for a model card and a
            # license under its name (a path here), a minute of retries on an offline machine.
            offline = huggingface_hub.constants.HF_HUB_OFFLINE
            huggingface_hub.constants.HF_HUB_OFFLINE = True
            logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)  # no card, no license: known
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                path = str(model_dir)
                pipe = pipeline("text-generation", model=path, tokenizer=path, device="cpu")
                # Requirements named, not inferred (MLflow's inference imports the model in a subprocess).
                reqs = [f"{m}=={importlib.metadata.version(m)}" for m in ("mlflow", "transformers", "torch")]
                # The run is entered and left by the fluent API, which marks it FINISHED on the way out;
                # Tracker.close sets its real status right after (this is the last thing logged).
                with mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
                    mlflow.transformers.log_model(pipe, name=name, pip_requirements=reqs)
            finally:
                mlflow.set_tracking_uri(previous)
                huggingface_hub.constants.HF_HUB_OFFLINE = offline
                if bars:
                    hf_logging.enable_progress_bar()

        self._guard("log_model", send)

    def close(self, status: str) -> None:
        def end() -> None:
            if self._monitor is not None:
                self._monitor.finish()
                self._monitor = None
            # Wait on this run's own batches. (mlflow.flush_async_logging() would go through the
            # fluent API, which opens a default store, an mlflow.db in the working directory.)
            for ops in self._pending:
                ops.wait()
            self._pending.clear()
            self.client.set_terminated(self.run_id, status=status)

        if self.run_id is not None:
            self._guard("close", end)


# MLflow 3's UI opens an experiment by its kind (the tag below; values from the UI's own enum): without
# it, it guesses, and an experiment of rlx runs opened as a GenAI app (Traces, "No data available").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def ensure_experiment(client: Any, name: str, artifact_root: str | None) -> str:
    """The id of experiment ``name``, created (with its artifacts under ``artifact_root``) if new, and
    marked as model training unless someone chose its kind already."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            location = f"{artifact_root}/{name}" if artifact_root else None
            client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by a parallel job on a server
            pass
        exp = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return str(exp.experiment_id)


def log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    batch = [Param(k, _param_value(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(batch), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=batch[i : i + 100])


def logged_steps(client: Any, run_id: str) -> dict[str, int]:
    """The last step of every metric the MLflow run already has (a resumed run logs only later steps:
    the steps between its checkpoint and the kill were logged before, with the same values on CPU)."""
    keys = client.get_run(run_id).data.metrics
    return {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1) for k in keys}


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
COMPLETIONS_TABLE = "eval_completions.json"

# Listeners of held-out evaluations: `rlx.evaluate.evaluate` hands each one its per-prompt rows, and a
# tracker logs them as an MLflow table with the evaluation's metrics (the loops stay unaware of it).
EVAL_ROW_SINKS: list[Callable[[list[dict[str, Any]]], None]] = []


def publish_eval_rows(rows: list[dict[str, Any]]) -> None:
    for sink in list(EVAL_ROW_SINKS):
        sink(rows)


def completions_table(rows: list[dict[str, Any]], step: int) -> dict[str, list[Any]]:
    """Evaluation rows as table columns: step, prompt, completion, reward, exact."""

    def text(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    return {
        "step": [step] * len(rows),
        "prompt": [text(r.get("prompt_text", r.get("prompt"))) for r in rows],
        "completion": [text(r.get("completion_text", r.get("completion"))) for r in rows],
        "reward": [float(r.get("reward", math.nan)) for r in rows],
        "exact": [bool(r.get("exact")) for r in rows],
    }


def is_stock_transformers(model_dir: Path) -> bool:
    """A model directory whose ``config.json`` names an architecture transformers itself ships (not one
    registered at run time, like rlx's toy models): the MLflow transformers flavor can load it."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, ImportError):
        return False
    return model_type in CONFIG_MAPPING_NAMES


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
        ensure_logging()
        self.run_dir = run_dir
        self.run_name = run_name or logger_cfg.get("run_name")
        self.rank, _ = dist_rank()
        self.enabled = self.rank == 0
        self.history: list[dict[str, float]] = []
        self.mlflow: MlflowSink | None = None
        self._jsonl = None
        self._table_rows = 0
        self._staged: list[dict[str, Any]] = []
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
                system_metrics=float(logger_cfg.get("system_metrics_interval") or 10)
                if logger_cfg.get("system_metrics", True)
                else None,
            )
            self._table_rows = int(logger_cfg.get("completions_table_rows", 32) or 0)
            if self._table_rows:
                EVAL_ROW_SINKS.append(self._stage_eval_rows)
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
        try:
            tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
            tmp.replace(self.run_dir / TRACKING_FILE)
        except OSError as exc:  # a full disk: say so, never a traceback on the way out
            tmp.unlink(missing_ok=True)
            console.print(f"[yellow]rlx: warning: could not write {TRACKING_FILE} ({exc.strerror})[/yellow]")

    @property
    def run_id(self) -> str | None:
        return self.mlflow.run_id if self.mlflow else None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        assert self._jsonl is not None
        # NaN/inf are written as null: json.dumps would write Infinity, which is not JSON (h14)
        line = json.dumps(
            {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}
        )
        try:
            self._jsonl.write(line + "\n")
            self._jsonl.flush()
        except OSError as exc:
            from rlx.errors import RlxError

            raise RlxError(f"cannot write {self.run_dir / 'metrics.jsonl'}: {exc.strerror or exc}") from exc
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step)
            if self._staged and any(k.startswith("eval/") for k in metrics):
                self.mlflow.log_table(completions_table(self._staged, step), COMPLETIONS_TABLE)
                self._staged = []

    def _stage_eval_rows(self, rows: list[dict[str, Any]]) -> None:
        """The rows of the evaluation just run: logged with its metrics, at its step (`log_metrics`)."""
        self._staged = list(rows[: self._table_rows])

    def log_model(self, model_dir: Path, how: str | bool) -> str | None:
        """The final model: ``how`` = auto (MLflow's transformers flavor for a stock transformers model,
        else the plain directory), transformers, artifact, or false. Returns what was logged."""
        if not (self.enabled and self.mlflow) or how in (False, "false", "none", None):
            return None
        if how in ("auto", True, "true"):
            how = "transformers" if is_stock_transformers(model_dir) else "artifact"
        if how == "transformers":
            self.mlflow.log_transformers_model(model_dir)
        else:
            self.mlflow.log_artifact(model_dir, "model")
        return str(how)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled and self.mlflow and path.exists():
            self.mlflow.log_artifact(path, artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self._stage_eval_rows in EVAL_ROW_SINKS:
            EVAL_ROW_SINKS.remove(self._stage_eval_rows)
        if self.mlflow:
            self.mlflow.close(status)
        if self.enabled and self._jsonl:
            self.ended = time.time()
            self._write_tracking_file(status)
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None


class RateColumn(ProgressColumn):
    """Iterations per second (rich's own speed columns count bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("? it/s", style="progress.data.speed")
        return Text(
            f"{speed:.2f} it/s" if speed >= 0.1 else f"{1 / speed:.1f} s/it", style="progress.data.speed"
        )


class LiveProgress:
    """A rich progress bar over training iterations with the key metrics beside it."""

    KEYS: ClassVar[dict[str, str]] = {
        "reward/mean": "reward",
        "eval/exact": "eval_exact",
        "kl/ref": "kl",
        "entropy": "entropy",
    }

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.total, self.description = total, description
        self._next_log = 0  # the log file gets a progress line every 10% (the console has the bar)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("<"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            disable=not (enabled and log.isEnabledFor(logging.INFO)),  # -q: no bar
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
        if step >= self._next_log or step == self.total:
            self._next_log = step + max(self.total // 10, 1)
            task = self.progress.tasks[0]
            speed = task.speed or 0.0
            left = (
                f", {time.strftime('%H:%M:%S', time.gmtime(task.time_remaining))} left"
                if task.time_remaining
                else ""
            )
            log.info(
                f"{self.description} {step}/{self.total} ({speed:.2f} it/s{left}) {shown}",
                extra={"file_only": True},
            )


def summary_table(title: str, rows: Mapping[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    return table
