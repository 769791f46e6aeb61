"""``rlx runs [DIR|SWEEP_DIR ...]``: the runs under some directories, compared without a browser.

Read from the run directories alone (no MLflow needed): ``config.yaml`` (algo, seed), ``metrics.jsonl``
(final metrics, curves), ``tracking.json`` (MLflow name, status, wall time) and Hydra's
``.hydra/overrides.yaml`` (the job's overrides; only those that differ between the listed runs are
shown). ``--plot out.png`` draws every run's training reward and held-out curves on one figure.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlx.errors import RlxError

SKIP_DIRS = {"checkpoints", "final", ".hydra", "mlartifacts", "__pycache__"}
DEFAULT_METRICS = ("eval/exact", "eval/reward", "reward/mean")


@dataclass
class Run:
    """One run directory as `rlx runs` reads it."""

    path: Path
    name: str
    algo: str
    seed: str
    overrides: list[str]
    status: str
    wall_s: float | None
    final: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, float]] = field(default_factory=list)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a killed process
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_run(path: Path) -> Run:
    """A run directory (``config.yaml`` + ``metrics.jsonl``) as a `Run`."""
    import yaml  # a plain YAML reader: the files are data, nothing in them is executed

    from rlx.runinfo import read_sweep, run_name

    try:
        cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RlxError(f"{path}/config.yaml cannot be read ({exc})") from exc
    try:
        overrides = yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError):
        overrides = []
    rows = _read_rows(path / "metrics.jsonl")
    tracking = _read_json(path / "tracking.json")
    final: dict[str, float] = {}
    for row in rows:
        final.update({k: float(v) for k, v in row.items() if k not in ("step", "time") and _number(v)})
    name = tracking.get("run_name") or run_name(cfg, overrides, read_sweep(path.parent).get("swept"))
    started, ended = tracking.get("started"), tracking.get("ended")
    if not (_number(started) and _number(ended)) and len(rows) > 1:  # older runs: from the rows
        started, ended = rows[0].get("time"), rows[-1].get("time")
    wall = float(ended) - float(started) if _number(started) and _number(ended) else None
    status = str(tracking.get("status") or ("FINISHED" if (path / "final").is_dir() else "?"))
    return Run(
        path=path,
        name=str(name),
        algo=str((cfg.get("algo") or {}).get("name", "?")),
        seed=str((cfg.get("trainer") or {}).get("seed", "?")),
        overrides=[str(o) for o in overrides],
        status=status,
        wall_s=wall,
        final=final,
        rows=rows,
    )


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def find_runs(paths: Sequence[Path]) -> list[Run]:
    """Every run directory at or under ``paths`` (a run, a sweep directory, ``outputs/``), in order."""
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if (d / "config.yaml").is_file() and (d / "metrics.jsonl").is_file():
            found.append(d)
            return
        if depth > 6:
            return
        try:
            children = sorted(d.iterdir(), key=lambda p: (not p.name.isdigit(), p.name.zfill(8)))
        except OSError:
            return
        for child in children:
            if child.is_dir() and child.name not in SKIP_DIRS and not child.name.startswith("."):
                walk(child, depth + 1)

    for path in paths:
        if not path.exists():
            raise RlxError(f"{path} does not exist")
        if not path.is_dir():
            raise RlxError(f"{path} is not a directory")
        before = len(found)
        walk(path, 0)
        if len(found) == before:
            raise RlxError(f"{path} holds no rlx run (no config.yaml with a metrics.jsonl beside it)")
    return [read_run(p) for p in dict.fromkeys(found)]


def differing_overrides(runs: Sequence[Run]) -> list[list[str]]:
    """Each run's overrides less those every listed run shares (and algo, seed: columns of their own)."""
    if not runs:
        return []
    common = set(runs[0].overrides).intersection(*(set(r.overrides) for r in runs[1:]))
    own = ("algo", "trainer.seed")
    return [
        [o for o in r.overrides if o not in common and o.lstrip("+~").partition("=")[0] not in own]
        for r in runs
    ]


def metric_columns(runs: Sequence[Run], wanted: Sequence[str] | None = None) -> list[str]:
    """The requested metrics, else the default ones any run has, then other final eval/* metrics."""
    if wanted:
        return list(wanted)
    present = set().union(*(r.final for r in runs)) if runs else set()
    cols = [k for k in DEFAULT_METRICS if k in present]
    cols += sorted(k for k in present if k.startswith("eval/") and k not in cols)
    return cols[:6]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _wall(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def print_table(runs: Sequence[Run], metrics: Sequence[str]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    # On stdout, so it pipes; piped or redirected, wide enough not to fold the columns.
    console = Console(width=None if sys.stdout.isatty() else 250)
    table = Table(title=f"rlx runs: {len(runs)} run(s)", title_justify="left")
    for col in ("name", "algo", "seed", "overrides", *metrics, "status", "wall", "dir"):
        table.add_column(col, justify="right" if col in metrics or col == "wall" else "left")
    for run, diff in zip(runs, differing_overrides(runs)):
        table.add_row(
            run.name,
            run.algo,
            run.seed,
            " ".join(diff),
            *(_fmt(run.final.get(m)) for m in metrics),
            run.status,
            _wall(run.wall_s),
            _shown_path(run.path),
        )
    console.print(table)


def plot_runs(runs: Sequence[Run], out: Path, eval_key: str = "eval/exact") -> Path:
    """Training reward (left) and the held-out metric (right) of every run, one line each."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    fig = Figure(figsize=(12, 4.5))
    ax = fig.subplots(1, 2)
    for run in runs:
        train = [(r["step"], r["reward/mean"]) for r in run.rows if _number(r.get("reward/mean"))]
        line = None
        if train:
            (line,) = ax[0].plot(*zip(*train), lw=1, label=run.name)
        held = [(r["step"], r[eval_key]) for r in run.rows if _number(r.get(eval_key))]
        if held:
            color = line.get_color() if line is not None else None
            ax[1].plot(*zip(*held), marker="o", ms=3, lw=1, color=color, label=run.name)
    ax[0].set(xlabel="iteration", ylabel="reward/mean", title="training reward")
    ax[1].set(xlabel="iteration", ylabel=eval_key, title=f"held-out {eval_key}")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    except OSError as exc:
        raise RlxError(f"--plot {out}: cannot write ({exc.strerror or exc})") from exc
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="rlx runs",
        description="A table of the runs under some directories (run dirs, sweep dirs, outputs/): name, "
        "algo, seed, the overrides that differ, final metrics, status and wall time.",
    )
    parser.add_argument("paths", nargs="*", default=["outputs"], help="run or sweep directories")
    parser.add_argument("--metric", action="append", help="a metric column (repeatable)")
    parser.add_argument("--sort", help="sort by this final metric, best (highest) first")
    parser.add_argument("--plot", type=Path, help="draw the reward and eval curves of all runs to this PNG")
    parser.add_argument("--eval-metric", default="eval/exact", help="the held-out curve --plot draws")
    parser.add_argument("--json", action="store_true", help="one JSON line per run instead of the table")
    ns = parser.parse_args(argv)
    runs = find_runs([Path(p) for p in ns.paths])
    if ns.sort:
        runs.sort(key=lambda r: -r.final.get(ns.sort, -math.inf))
    metrics = metric_columns(runs, ns.metric)
    if ns.json:
        for run, diff in zip(runs, differing_overrides(runs)):
            print(
                json.dumps(
                    {
                        "name": run.name,
                        "dir": str(run.path),
                        "algo": run.algo,
                        "seed": run.seed,
                        "overrides": diff,
                        "status": run.status,
                        "wall_s": run.wall_s,
                        **{m: run.final.get(m) for m in metrics},
                    }
                )
            )
    else:
        print_table(runs, metrics)
    if ns.plot:
        from rlx.tracking import console

        console.print(f"wrote {plot_runs(runs, ns.plot, ns.eval_metric)}")
