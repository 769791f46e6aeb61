"""A sweep (``rlx train -m ...``) as one parent MLflow run with a child run per job.

`SweepCallback` is a Hydra callback (``hydra.callbacks`` in conf/train.yaml), so it runs in the
process that drives the sweep whatever the sweeper (basic, Optuna) and the launcher (basic, joblib,
submitit): Hydra calls ``on_multirun_start`` before the sweeper launches any job and
``on_multirun_end`` after the last one. At the start it creates the parent run (named after the
sweep; the swept overrides as params and tags) and writes ``rlx_sweep.json`` into the sweep
directory; each job reads that file (`rlx.runinfo.read_sweep`), so a job in another process or on
another machine finds its parent through the file system, and tags its own run with
``mlflow.parentRunId``. At the end the parent gets a summary table of its children (an MLflow table,
``sweep_summary.json``), the best job by the objective (``hparams_search.objective``, default
``eval/exact``, maximised unless ``hparams_search.direction=minimize``), an Optuna search's
``optimization_results.yaml``, and status FINISHED; a sweep that dies leaves it FAILED (atexit).
"""

from __future__ import annotations

import atexit
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rlx.runinfo import read_sweep, source_tags, write_sweep

DEFAULT_OBJECTIVE = "eval/exact"
SUMMARY_FILE = "sweep_summary.json"


def objective_of(cfg: Mapping[str, Any] | DictConfig) -> tuple[str, str]:
    """(metric, direction) a sweep is judged by: ``hparams_search.objective`` / ``.direction``."""
    hs = cfg.get("hparams_search") or {}
    direction = str(hs.get("direction") or "maximize").lower()
    return str(hs.get("objective") or DEFAULT_OBJECTIVE), direction


def objective_value(cfg: Mapping[str, Any] | DictConfig, summary: Mapping[str, Any]) -> float | None:
    """The value of ``hparams_search.objective`` for a finished run: its final metrics (summary), else
    the last value the run logged under that name (``metrics.jsonl``); None when it logged none."""
    import json

    objective, _ = objective_of(cfg)
    if isinstance(summary.get(objective), (int, float)):
        return float(summary[objective])
    value = None
    path = Path(str(summary.get("run_dir", ""))) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if isinstance(row.get(objective), (int, float)):
                value = float(row[objective])
    return value


def _set_search_direction(config: DictConfig, direction: str) -> None:
    """Optuna's sweeper minimises unless told otherwise; rlx's objective is maximised by default. Unless
    the command line sets ``hydra.sweeper.direction``, it follows ``hparams_search.direction``."""
    from omegaconf import open_dict, read_write

    if "optuna" not in str(OmegaConf.select(config, "hydra.sweeper._target_") or "").lower():
        return
    if any(str(o).startswith("hydra.sweeper.direction=") for o in config.hydra.overrides.hydra):
        return
    with read_write(config.hydra.sweeper), open_dict(config.hydra.sweeper):
        config.hydra.sweeper.direction = direction


def swept_overrides(config: DictConfig) -> tuple[list[str], list[str]]:
    """(the sweep's overrides that vary, their keys): command-line sweeps (``a=1,2``, ``range``,
    Optuna's ``interval(...)``) and the sweeper's ``params`` (an hparams_search preset)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    swept: list[str] = []
    keys: list[str] = []
    for ov in OmegaConf.to_container(config.hydra.overrides.task, resolve=False) or []:
        try:
            (parsed,) = parser.parse_overrides([str(ov)])
        except Exception:  # a syntax only the configured sweeper knows: count it as swept
            swept.append(str(ov))
            keys.append(str(ov).partition("=")[0].lstrip("+~"))
            continue
        if parsed.is_sweep_override() or "(" in str(parsed.value()):
            swept.append(str(ov))
            keys.append(parsed.key_or_group)
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    for key, value in params.items():
        if key not in keys:
            swept.append(f"{key}={value}")
            keys.append(str(key))
    return swept, keys


class SweepCallback(Callback):
    """Hydra callback: the parent MLflow run of a multirun and its summary (see the module doc)."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None
        self.info: dict[str, Any] = {}
        self._ended = False

    # ------------------------------------------------------------------ start
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from rlx.tracking import MlflowSink, http_settings, local_store

        launch_dir = Path(str(config.hydra.runtime.cwd))
        # absolute: the atexit hook that ends a dead sweep may run after the working directory changed
        self.sweep_dir = launch_dir / str(config.hydra.sweep.dir)
        swept, keys = swept_overrides(config)
        logger = OmegaConf.to_container(config.logger, resolve=True) if "logger" in config else {}
        assert isinstance(logger, dict)
        objective, direction = objective_of(config)
        _set_search_direction(config, direction)
        search = "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_") or "").lower()
        name = str(logger.get("run_name") or ("search " if search else "sweep ") + " ".join(swept))[:250]
        self.info = {
            "name": name,
            "swept": keys,
            "overrides": [str(o) for o in config.hydra.overrides.task],
            "objective": objective,
            "direction": direction,
            "started": time.time(),
        }
        if logger.get("name") == "mlflow":
            uri, artifact_root, lock = logger.get("tracking_uri"), None, None
            if not uri:
                uri, artifact_root, lock = local_store(logger.get("store_dir"), launch_dir)
            else:
                http_settings(logger)
            experiment = str(logger.get("experiment") or "rlx")
            params = {k: v.partition("=")[2] for k, v in zip(keys, swept)}
            tags = {
                **source_tags(launch_dir),
                "rlx.sweep": "true",
                "rlx.sweep_dir": str(self.sweep_dir.resolve()),
                "overrides": " ".join(self.info["overrides"])[:5000],
                "objective": objective,
                "direction": direction,
                **{f"sweep.{k}": v.partition("=")[2][:5000] for k, v in zip(keys, swept)},
            }
            sink = MlflowSink(
                tracking_uri=str(uri),
                artifact_root=artifact_root,
                experiment=experiment,
                run_name=name,
                params=params,
                tags=tags,
                store_lock=lock,
            )
            if sink.ok and sink.run_id:
                self.info.update(parent_run_id=sink.run_id, tracking_uri=str(uri), experiment=experiment)
        write_sweep(self.sweep_dir, self.info)
        atexit.register(self._end, "FAILED")  # the sweep died before on_multirun_end

    # ------------------------------------------------------------------ end
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        if self._ended or not self.info.get("parent_run_id"):
            return
        self._ended = True
        atexit.unregister(self._end)  # a sweep run in-process (the Python API) leaves no hook behind
        try:
            summarise(self.info, self.sweep_dir, status)
        except Exception as exc:  # the sweep's own results are on disk already; say so and go on
            from rlx.tracking import log

            log.warning(f"rlx: warning: could not summarise the sweep in MLflow: {exc}")


def _better(a: float, b: float, direction: str) -> bool:
    return a < b if direction.startswith("min") else a > b


def summarise(info: Mapping[str, Any], sweep_dir: Path | None, status: str) -> dict[str, Any]:
    """Summary table, best child and study results into the parent run; then end it with ``status``.

    Returns the summary (rows and best), also written into ``rlx_sweep.json``."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=str(info["tracking_uri"]))
    parent = str(info["parent_run_id"])
    exp_id = client.get_run(parent).info.experiment_id
    children = client.search_runs(
        [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000
    )
    children = sorted(children, key=lambda r: r.info.start_time or 0)
    states = {r.info.status for r in children}
    if status == "FAILED" and "KILLED" in states and "FAILED" not in states:
        status = "KILLED"  # the sweep was stopped by SIGINT/SIGTERM, not by a failing job
    objective, direction = str(info["objective"]), str(info["direction"])
    swept = list(info.get("swept") or [])
    metric_keys = sorted({k for r in children for k in r.data.metrics if k.startswith("eval/")})
    for key in (objective, "reward/mean"):
        if key not in metric_keys and any(key in r.data.metrics for r in children):
            metric_keys.insert(0, key)
    table: dict[str, list[Any]] = {"run_name": [], "run_id": [], "status": [], "job": []}
    table.update({k: [] for k in swept})
    table.update({k: [] for k in metric_keys})
    table["wall_s"] = []
    best: Any = None
    for r in children:
        table["run_name"].append(r.info.run_name)
        table["run_id"].append(r.info.run_id)
        table["status"].append(r.info.status)
        table["job"].append(Path(r.data.tags.get("run_dir", "")).name)
        for k in swept:
            # a config group (algo=...) is recorded as its name param (algo.name) and tag
            table[k].append(r.data.params.get(k) or r.data.params.get(f"{k}.name") or r.data.tags.get(k, ""))
        for k in metric_keys:
            table[k].append(r.data.metrics.get(k))
        end = r.info.end_time or r.info.start_time
        table["wall_s"].append(round(((end or 0) - (r.info.start_time or 0)) / 1000, 1))
        value = r.data.metrics.get(objective)
        if r.info.status == "FINISHED" and value is not None and math.isfinite(value):
            if best is None or _better(value, best.data.metrics[objective], direction):
                best = r
    if children:
        client.log_table(parent, data=table, artifact_file=SUMMARY_FILE)
    summary: dict[str, Any] = {"jobs": len(children), "objective": objective, "direction": direction}
    if best is not None:
        value = float(best.data.metrics[objective])
        summary.update(best_run_id=best.info.run_id, best_run_name=best.info.run_name, best_value=value)
        client.set_tag(parent, "best.run_name", best.info.run_name)
        client.set_tag(parent, "best.run_id", best.info.run_id)
        client.set_tag(parent, f"best.{objective}", f"{value:.6g}")
        client.set_tag(best.info.run_id, "rlx.best_of_sweep", "true")
        client.log_batch(parent, metrics=[Metric(f"best/{objective}", value, int(time.time() * 1000), 0)])
    if sweep_dir is not None and (sweep_dir / "optimization_results.yaml").is_file():
        client.log_artifact(parent, str(sweep_dir / "optimization_results.yaml"))  # Optuna's study result
    if sweep_dir is not None:
        if (sweep_dir / "multirun.yaml").is_file():  # the sweep's composed config, as Hydra saved it
            client.log_artifact(parent, str(sweep_dir / "multirun.yaml"))
        write_sweep(sweep_dir, {**read_sweep(sweep_dir), "status": status, "summary": summary})
    client.set_terminated(parent, status=status)
    return summary
