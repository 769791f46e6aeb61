"""Screenshots of MLflow's UI for the README: real rlx runs, a real `mlflow server`, a real browser.

    python scripts/screenshots.py [--out docs] [--steps 60] [--workdir DIR]   (or: make screenshots)

1. Starts `mlflow server` on 127.0.0.1 (a free port; SQLite backend and artifacts under the work
   directory, a temporary one unless --workdir is given).
2. Trains into it as a user would, through the installed `rlx`: a 2-job sweep
   (`rlx train -m algo=grpo,dr_grpo ...`: one parent run, two children, --steps iterations each) and one
   single GRPO run (`trainer.seed=1 trainer.lr=1e-3`, --single-steps iterations), on the sort task with
   16 prompts x 8 completions per iteration and held-out evaluations every 10 iterations.
3. Drives Debian's chromium (`apt-get install chromium`) headless through Playwright
   (`pip install playwright`; its own browser download is not needed: the system's chromium is used)
   and saves PNGs under --out:
   - mlflow_runs.png: the experiment's runs list, the sweep's parent run expanded to its children;
   - mlflow_run_charts.png: one run's metric charts (reward/mean, eval/exact, kl/ref);
   - mlflow_completions.png: the held-out completions table (eval_completions.json) of that run, at
     a page of its last evaluation's rows.
Everything started here is stopped at the end (the server's process group).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Run as `python scripts/screenshots.py`, this folder comes first on sys.path, and its numbers.py (the
# README's figures) would shadow the standard library's `numbers`, which mlflow's imports need.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

BIN = Path(sys.executable).parent
EXPERIMENT = "sort-demo"
SMALL = ["trainer.prompts_per_step=16", "trainer.group_size=8", "trainer.eval_every=10", "task.eval_size=64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1; returns (process, tracking URI) once /health answers."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    log = (root / "server.log").open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rlx(*args: str, cwd: Path) -> None:
    cmd = [str(BIN / "rlx"), "train", *args]
    print("$", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, cwd=cwd, check=True, env=env)


def train(uri: str, work: Path, sweep_steps: int, single_steps: int) -> None:
    common = [*SMALL, f"logger.tracking_uri={uri}", f"logger.experiment={EXPERIMENT}"]
    rlx("-m", "algo=grpo,dr_grpo", f"trainer.steps={sweep_steps}", *common, "hydra.sweep.dir=sweep", cwd=work)
    rlx("trainer.seed=1", "trainer.lr=1e-3", f"trainer.steps={single_steps}", *common, "hydra.run.dir=single",
        cwd=work)  # fmt: skip


def ui_state(experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """The UI's own saved preferences (browser localStorage), as a user's clicks would leave them: the
    model-training view, the assistant panel closed, the sweep's parent run expanded, and columns for
    the runs' tags and final metrics."""
    columns = ["tags.`algo`", "tags.`seed`", "metrics.`eval/exact`", "metrics.`eval/reward`",
               "metrics.`reward/mean`", "tags.`best.run_name`"]  # fmt: skip
    order = ["attributes.`Run Name`", "runDateAndNestInfo", "duration", *columns]
    page = {
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": columns, "columnOrder": order, "columnWidths": {"attributes.`Run Name`": 260},
        "runsExpanded": {parent_run_id: True}, "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {},
        "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False, "runListHidden": False,
        "isAccordionReordered": False, "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
        "groupBy": None, "groupsExpanded": {}, "autoRefreshEnabled": False,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }  # fmt: skip
    return {
        f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState': json.dumps(page),
        "mlflow.workflowType_v1": json.dumps("machine_learning"),
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        "mlflow.detectIssues.guidanceShown_v1": "true",
    }


def shoot(uri: str, out: Path, chromium: str) -> list[Path]:
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([exp])
    parent = next(r for r in runs if r.data.tags.get("rlx.sweep") == "true").info.run_id
    single = next(r for r in runs if r.info.run_name == "grpo-sort-s1").info.run_id
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        ctx = browser.new_context(viewport={"width": 1500, "height": 480})
        ctx.add_init_script(
            f"for (const [k, v] of Object.entries({json.dumps(ui_state(exp, parent))}))"
            " { if (localStorage.getItem(k) === null) localStorage.setItem(k, v); }"
        )
        page = ctx.new_page()
        # (a) the runs list: the sweep's parent expanded to its two children, and the single run
        page.goto(f"{uri}/#/experiments/{exp}/runs?workflowType=machine_learning", wait_until="load")
        page.get_by_text("dr_grpo-sort-s0", exact=True).wait_for(timeout=60_000)
        page.wait_for_timeout(2000)
        shots.append(out / "mlflow_runs.png")
        page.screenshot(path=shots[-1])
        # (b) one run's metric charts, filtered to reward/mean, eval/exact and kl/ref
        page.set_viewport_size({"width": 1000, "height": 1480})
        page.goto(f"{uri}/#/experiments/{exp}/runs/{single}/model-metrics", wait_until="load")
        search = page.get_by_placeholder("Search metric charts")
        search.wait_for(timeout=60_000)
        search.fill("reward/mean|eval/exact|kl/ref")
        page.wait_for_timeout(4000)
        shots.append(out / "mlflow_run_charts.png")
        page.screenshot(path=shots[-1])
        # (c) the held-out completions of that run: the MLflow table eval_completions.json, as a table
        page.set_viewport_size({"width": 1400, "height": 760})
        page.goto(f"{uri}/#/experiments/{exp}/runs/{single}/artifacts", wait_until="load")
        page.get_by_text("eval_completions.json", exact=True).click(timeout=60_000)
        page.get_by_text("View as table").wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        pages = page.locator("li[class*='pagination-item']")
        pages.last.click()
        page.wait_for_timeout(1000)
        pages.nth(pages.count() - 2).click()  # the page before the last: a full page of the last evaluation
        page.wait_for_timeout(2000)
        shots.append(out / "mlflow_completions.png")
        page.screenshot(path=shots[-1])
        browser.close()
    return shots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs"), help="where the PNGs go")
    ap.add_argument("--steps", type=int, default=60, help="iterations of each sweep job")
    ap.add_argument("--single-steps", type=int, default=200, help="iterations of the single run")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="runs and the MLflow store (default: temporary)"
    )
    ap.add_argument("--skip-training", action="store_true", help="shoot the runs already in --workdir")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = ap.parse_args()
    if not args.chromium:
        raise SystemExit("screenshots: no chromium on PATH (Debian: apt-get install chromium)")
    if args.skip_training and not args.workdir:
        raise SystemExit("screenshots: --skip-training needs the --workdir of an earlier run")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rlx-screens-"))
    (work / "server").mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    proc, uri = start_server(work / "server")
    try:
        print(f"mlflow server at {uri}; runs in {work}", flush=True)
        if not args.skip_training:
            train(uri, work, args.steps, args.single_steps)
        for path in shoot(uri, out, args.chromium):
            print(f"{path} {path.stat().st_size // 1024} KiB")
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
