"""``rlx sync RUN_DIR ...``: upload run directories to MLflow after a lost tracking server
(the work is `rlx.sync.sync_run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rlx.sync import sync_run


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="rlx sync",
        description="Upload a run directory's metrics and artifacts to MLflow, skipping what is there.",
    )
    parser.add_argument("run_dirs", nargs="+", help="run directories (with metrics.jsonl and config.yaml)")
    parser.add_argument("--tracking-uri", default=None, help="default: the run's own (tracking.json)")
    ns = parser.parse_args(argv)
    for run_dir in ns.run_dirs:
        out = sync_run(Path(run_dir), ns.tracking_uri)
        what = ", ".join(out["artifacts_added"]) or "no artifacts"
        new = " (new MLflow run)" if out["created_run"] else ""
        print(
            f"{run_dir}: run {out['run_id']}{new} at {out['tracking_uri']}: "
            f"{out['metrics_added']} metric values and {what} added"
        )
