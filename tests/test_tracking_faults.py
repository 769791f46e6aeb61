"""A lost tracking server and parallel jobs, for real: an `mlflow server` started on 127.0.0.1 by
the test, stopped mid-run and restarted, then `rlx sync`; four `rlx train` processes at once on one
embedded store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import RLX, TINY_GPT, rlx_in_process

STEPS = 30
RUN = [
    *TINY_GPT,
    "trainer.prompts_per_step=4",
    "trainer.group_size=4",
    f"trainer.steps={STEPS}",
    "trainer.eval_every=10",
    "task.eval_size=16",
    "trainer.device=cpu",
]
FAST_FAIL = ["logger.http_retries=0", "logger.http_timeout=5"]
MLFLOW = str(Path(sys.executable).parent / "mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend that outlives restarts."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        cmd = [
            MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'backend.db'}",
            "--default-artifact-root", str(self.root / "artifacts"),
        ]  # fmt: skip
        log = (self.root / "server.log").open("ab")
        # MLflow 3's GenAI job executor (huey workers) is not part of tracking and makes each start
        # take ~35 s here instead of ~10 s; tests/test_mlflow_ui.py keeps a server with the defaults.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(
            f"mlflow server did not come up: {(self.root / 'server.log').read_text()[-2000:]}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn workers, abruptly
            self.proc.wait()
            self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "server", free_port())
    srv.root.mkdir()
    yield srv
    srv.stop()


def mlflow_warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("rlx: warning: MLflow")]


def metric_steps(client: MlflowClient, run_id: str, key: str = "reward/mean") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_server_lost_mid_run_then_rlx_sync(tmp_path, server):
    server.start()
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen(
        [RLX, "train", *RUN, *FAST_FAIL, f"logger.tracking_uri={server.uri}", "hydra.run.dir=run"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    server.stop()  # the tracking server dies mid-run
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]  # training went on
    assert len(mlflow_warnings(err)) == 1, err[-3000:]  # one warning, not one per step
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == list(range(1, STEPS + 1))
    info = json.loads((tmp_path / "run" / "tracking.json").read_text())
    assert info["run_id"] and not info["mlflow_ok"]

    server.start()  # back up, with what it had stored before it died
    client = MlflowClient(tracking_uri=server.uri)
    assert len(metric_steps(client, info["run_id"])) < STEPS
    res = rlx_in_process("sync", "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    run = client.get_run(info["run_id"])
    assert metric_steps(client, info["run_id"]) == list(range(1, STEPS + 1))  # complete, no step twice
    assert run.info.status == "FINISHED"
    assert {"config.yaml", "metrics.jsonl", "model"} <= {
        a.path for a in client.list_artifacts(info["run_id"])
    }
    again = rlx_in_process("sync", "run", cwd=tmp_path)
    assert "0 metric values and no artifacts added" in again.stdout
    assert metric_steps(client, info["run_id"]) == list(range(1, STEPS + 1))


def test_server_down_at_start_then_rlx_sync_creates_the_run(tmp_path, server):
    res = rlx_in_process(
        "train",
        *RUN,
        "trainer.steps=3",
        f"logger.tracking_uri={server.uri}",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(mlflow_warnings(res.stderr)) == 1
    assert json.loads((tmp_path / "run" / "tracking.json").read_text())["run_id"] is None
    server.start()
    res = rlx_in_process("sync", "run", cwd=tmp_path)
    assert res.returncode == 0 and "(new MLflow run)" in res.stdout, res.stderr[-2000:]
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=server.uri)
    assert metric_steps(client, run_id) == [1, 2, 3]
    assert client.get_run(run_id).data.params["trainer.steps"] == "3"


def test_sync_without_a_server_is_one_clear_error(tmp_path, server):
    res = rlx_in_process("train", *RUN, "trainer.steps=1", "logger=none", "hydra.run.dir=run", cwd=tmp_path)
    assert res.returncode == 0
    res = rlx_in_process("sync", "run", "--tracking-uri", server.uri, cwd=tmp_path)  # nothing listens there
    assert res.returncode == 2
    assert res.stderr.strip().startswith("rlx: error:") and len(res.stderr.strip().splitlines()) == 1


def test_four_parallel_jobs_share_the_local_store(tmp_path):
    store = tmp_path / "store"  # new: the four race to create its tables and the experiment
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    procs = [
        subprocess.Popen(
            [
                RLX,
                "train",
                *RUN,
                "trainer.steps=4",
                f"trainer.seed={i}",
                f"logger.store_dir={store}",
                f"hydra.run.dir=job{i}",
                f"logger.run_name=job{i}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        assert not mlflow_warnings(err), err[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rlx").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1", "job2", "job3"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert metric_steps(client, r.info.run_id) == [1, 2, 3, 4]
