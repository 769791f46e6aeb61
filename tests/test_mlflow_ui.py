"""What MLflow's UI shows of a sweep, checked against a real `mlflow server` on 127.0.0.1: its REST API
(what the UI's pages are drawn from: run names, the parent/child nesting through the
``mlflow.parentRunId`` tag, the experiment's kind, the completions table) and, where Debian's chromium
and Playwright are installed, the runs list itself in a headless browser."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.conftest import REPO, TINY, rlx_in_process

EXPERIMENT = "ui"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(uri: str, path: str, **query: str) -> dict:
    url = f"{uri}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(uri: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{uri}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server_with_a_sweep(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, served artifacts) and a 2-job sweep trained into it."""
    root = tmp_path_factory.mktemp("mlflow-ui")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    log = (root / "server.log").open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.time() < deadline, (root / "server.log").read_text()[-2000:]
                time.sleep(0.3)
        res = rlx_in_process(
            "train", "-m", "algo=grpo,dr_grpo", *TINY, f"logger.tracking_uri={uri}",
            f"logger.experiment={EXPERIMENT}", "hydra.sweep.dir=sweep", cwd=root,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server, its workers and job consumers
        proc.wait()


def test_the_server_api_shows_named_runs_nested_under_the_sweep(server_with_a_sweep):
    uri = server_with_a_sweep
    exp = _get(uri, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    runs = _post(uri, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    names = {r["info"]["run_id"]: r["info"]["run_name"] for r in runs}
    parents = [i for i, t in tags.items() if "mlflow.parentRunId" not in t]
    assert len(runs) == 3 and len(parents) == 1
    parent = parents[0]
    assert names[parent] == "sweep algo=grpo,dr_grpo"
    children = sorted(i for i in tags if i != parent)
    assert {tags[i]["mlflow.parentRunId"] for i in children} == {parent}
    assert sorted(names[i] for i in children) == ["dr_grpo-sort-s0", "grpo-sort-s0"]
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}
    assert tags[parent]["best.run_name"] in {names[i] for i in children}
    for child in children:  # the held-out completions table the UI shows under Artifacts
        files = _get(uri, "/api/2.0/mlflow/artifacts/list", run_id=child).get("files", [])
        assert "eval_completions.json" in {f["path"] for f in files}
    with urllib.request.urlopen(f"{uri}/", timeout=30) as r:  # the UI itself is served
        assert r.status == 200 and b"<div id=" in r.read()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser  # not in `make test` (CI has no browser): `make test-browser`
def test_the_runs_list_in_a_browser_nests_the_jobs_under_the_sweep(server_with_a_sweep):
    """The UI's runs list: the parent shows, its jobs hidden until it is expanded, then both shown."""
    assert _chromium(), "needs Debian's chromium (apt-get install chromium)"
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    spec = importlib.util.spec_from_file_location("screenshots", REPO / "scripts" / "screenshots.py")
    shots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shots)
    uri = server_with_a_sweep
    exp = MlflowClient(uri).get_experiment_by_name(EXPERIMENT).experiment_id
    state = shots.ui_state(exp, parent_run_id="none")  # the model-training view, nothing expanded
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            ctx = browser.new_context(viewport={"width": 1500, "height": 600})
            ctx.add_init_script(
                f"for (const [k, v] of Object.entries({json.dumps(state)})) localStorage.setItem(k, v);"
            )
            page = ctx.new_page()
            page.goto(f"{uri}/#/experiments/{exp}/runs?workflowType=machine_learning", wait_until="load")
            names = page.locator("[col-id='attributes.`Run Name`']")  # the Run Name column's cells
            names.get_by_text("sweep algo=grpo,dr_grpo", exact=True).wait_for(timeout=60_000)
            assert names.get_by_text("grpo-sort-s0", exact=True).count() == 0  # nested, collapsed
            assert names.get_by_text("dr_grpo-sort-s0", exact=True).count() == 0
            row = page.locator(".ag-row", has_text="sweep algo=grpo,dr_grpo")
            row.locator("button[data-component-id*='runnamecellrenderer']").click()  # the +/- expander
            names.get_by_text("grpo-sort-s0", exact=True).wait_for(timeout=30_000)
            assert names.get_by_text("dr_grpo-sort-s0", exact=True).is_visible()
        finally:
            browser.close()
