"""MLflow run names and tags: names that say what ran (never MLflow's seeded random names), MLflow's
standard tags (user, source, git commit), rlx's own tags; against a real local store."""

from __future__ import annotations

import random
import subprocess

from mlflow.tracking import MlflowClient

from rlx.runinfo import run_name, sweep_suffix
from rlx.train import build, train
from tests.conftest import TINY, compose_cfg


def test_two_runs_with_the_default_seed_get_different_names_and_full_tags(tmp_path, monkeypatch):
    repo = tmp_path / "repo"  # launched from a git repository: its commit is tagged
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(repo)
    store = tmp_path / "store"
    ids = []
    for algo in ("grpo", "dr_grpo"):
        cfg = compose_cfg([f"algo={algo}", *TINY, "trainer.steps=1", f"logger.store_dir={store}"])
        ids.append(train(cfg, run_dir=tmp_path / algo)["mlflow_run_id"])
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    runs = [client.get_run(i) for i in ids]
    assert [r.info.run_name for r in runs] == ["grpo-sort-s0", "dr_grpo-sort-s0"]
    for run, algo in zip(runs, ("grpo", "dr_grpo")):
        tags = run.data.tags
        assert tags["mlflow.runName"] == run.info.run_name
        assert {k: tags[k] for k in ("algo", "model", "task", "reward", "seed")} == {
            "algo": algo,
            "model": "tiny_gpt",
            "task": "sort",
            "reward": "sort",
            "seed": "0",
        }
        assert tags["mlflow.source.git.commit"] == commit
        assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.name"] == "rlx train"
        assert tags["run_dir"] == str((tmp_path / algo).resolve())


def test_mlflow_never_draws_from_the_seeded_random_stream(tmp_path):
    """The MLflow run is created before the training seed is set: after `build`, Python's `random`
    is exactly the seeded stream (it used to be one draw further: MLflow's random run name)."""
    store = tmp_path / "store"
    session = build(compose_cfg([*TINY, f"logger.store_dir={store}", "trainer.seed=7"]), tmp_path / "a")
    try:
        assert random.random() == random.Random(7).random()
    finally:
        session.tracker.close("FINISHED")
    run = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}").get_run(session.tracker.run_id)
    assert run.info.run_name == "grpo-sort-s7" and run.info.status == "FINISHED"


def test_name_of_a_sweep_job_and_of_an_offline_run_and_the_override():
    c = compose_cfg(["algo=sft", "data.train=data/sort/sft_train.jsonl", "trainer.seed=3"])
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(c, resolve=True)
    assert run_name(c) == "sft-sft_train-s3"
    ovs = ["algo=sft", "trainer.lr=0.00123456", "algo.epochs=2", "trainer.seed=3"]
    assert sweep_suffix(ovs, ["algo", "trainer.lr", "trainer.seed"]) == "lr=0.001235"
    assert run_name(c, ovs, ["trainer.lr", "algo.epochs"]) == "sft-sft_train-s3-lr=0.001235-epochs=2"
    c["logger"]["run_name"] = "mine"
    assert run_name(c, ovs, ["trainer.lr"]) == "mine-lr=0.001235"
