"""rlx's Hydra launcher presets (conf/hydra/launcher/): a sweep through submitit's local executor run as a
user runs it, the SLURM preset composed and rendered into the sbatch script submitit would submit (no
SLURM here), and SLURM's task variables turned into a working torch.distributed rendezvous."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, TINY, rlx_in_process, rlx_refused, run_rlx


def test_a_submitit_local_sweep_of_two_jobs_completes_with_a_parent_run(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    store = tmp_path / "store"
    res = run_rlx(
        "train", "-m", "hydra/launcher=slurm_local", "trainer.seed=0,1", *TINY,
        f"logger.store_dir={store}", "logger.experiment=submitit", "hydra.sweep.dir=sweep",
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in res.stdout + res.stderr
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        rows = [json.loads(x) for x in (sweep / job / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
        assert (sweep / job / "final").is_dir()
    # every job ran in a process submitit started: its logs and result are in the sweep's .submitit/
    results = list((sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("submitit").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "sweep trainer.seed=0,1"
    assert parents[0].info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == ["grpo-sort-s0", "grpo-sort-s1"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.info.status for c in children} == {"FINISHED"}
    # jobs side by side take one thread each (trainer.threads=auto under a parallel launcher)
    assert {c.data.params["runtime.threads"] for c in children} == {"1"}


def _launcher_node(tmp_path, *overrides: str) -> dict:
    res = rlx_in_process(
        "train", "hydra/launcher=slurm", *overrides, "--cfg", "hydra", "-p", "hydra.launcher", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("# @package hydra.launcher")
    return yaml.safe_load(res.stdout)


def test_the_slurm_preset_composes_with_its_settings(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    node = _launcher_node(tmp_path)
    assert node["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert node["timeout_min"] == 240 and node["nodes"] == 1 and node["gpus_per_node"] == 1
    assert node["tasks_per_node"] == "${.gpus_per_node}"  # one rank per GPU
    assert node["max_num_timeout"] == 3 and node["signal_delay_s"] == 120
    assert node["partition"] is None and node["cpus_per_task"] == 8
    node = _launcher_node(tmp_path, "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8",
                          "hydra.launcher.nodes=2")  # fmt: skip
    assert (node["partition"], node["gpus_per_node"], node["nodes"]) == ("gpu", 8, 2)


def _compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="rlx.conf", version_base="1.3"):
            return compose(config_name="train", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def test_the_slurm_preset_becomes_the_sbatch_flags_submitit_submits(tmp_path):
    """The preset's values, resolved as the launcher gets them, through submitit's own sbatch writer into the
    sbatch script it would submit (submitit's parameter names, as the launcher maps them)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    cfg = _compose_with_hydra(
        ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8", "hydra.launcher.nodes=2",
         "hydra.launcher.partition=gpu", "hydra.sweep.dir=sweep"]
    )  # fmt: skip
    launcher = instantiate(cfg.hydra.launcher)  # the SlurmLauncher Hydra builds, with its resolved params
    params = {k: v for k, v in launcher.params.items() if v is not None}
    assert params["tasks_per_node"] == 8  # ${.gpus_per_node}, resolved
    assert params.pop("max_num_timeout") == 3  # submitit's executor: requeues after a timeout/preemption
    folder = tmp_path / params.pop("submitit_folder")
    # submitit's own names for the launcher's generic keys (timeout_min -> time, ...); SlurmExecutor itself
    # cannot be built here (it looks for srun), so its sbatch writer is called as the executor calls it
    names = SlurmExecutor._equivalence_dict()
    script = _make_sbatch_string(
        command="python -u -m submitit.core._submit x", folder=folder,
        **{names.get(k, k): v for k, v in params.items()},
    )  # fmt: skip
    for flag in ("--gpus-per-node=8", "--ntasks-per-node=8", "--nodes=2", "--partition=gpu",
                 "--time=240", "--cpus-per-task=8", "--signal=USR2@120", "--job-name=train"):  # fmt: skip
        assert f"#SBATCH {flag}\n" in script, script
    assert "\nexport SUBMITIT_EXECUTOR=slurm\nsrun " in script


SLURM_TASK = """
import json, os, sys
import torch.distributed as dist
from rlx.launchers import export_torch_env_from_slurm
exported = export_torch_env_from_slurm()
dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
t = __import__("torch").tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(json.dumps({**exported, "sum": t.item()}))
dist.destroy_process_group()
"""


def _slurm_env(procid: int, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
        SLURM_NODEID="0", SLURM_PROCID=str(procid), SLURM_LOCALID=str(procid), SLURM_JOB_NODELIST="localhost",
        OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
    )  # fmt: skip
    env.update(extra)
    return env


def test_slurm_tasks_get_a_working_torch_rendezvous(tmp_path):
    """Two processes with the variables SLURM gives two tasks of one job (srun --ntasks=2): rlx's
    callback exports torch's env:// variables and gloo's rendezvous and an all-reduce work."""
    pytest.importorskip("submitit")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SLURM_TASK],
            env=_slurm_env(i),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    got = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert [(g["RANK"], g["LOCAL_RANK"]) for g in got] == [("0", "0"), ("1", "1")]
    assert {(g["WORLD_SIZE"], g["LOCAL_WORLD_SIZE"], g["MASTER_ADDR"]) for g in got} == {
        ("2", "2", "localhost")
    }
    assert got[0]["MASTER_PORT"] == got[1]["MASTER_PORT"]  # drawn from the job id: the same in both tasks
    assert [g["sum"] for g in got] == [3.0, 3.0]


def test_slurm_env_is_left_alone_for_one_task_or_under_torchrun():
    pytest.importorskip("submitit")
    code = "import json; from rlx.launchers import export_torch_env_from_slurm as f; print(json.dumps(f()))"
    for extra in ({"SLURM_NTASKS": "1"}, {"RANK": "0"}, {"SUBMITIT_EXECUTOR": "local"}):
        out = subprocess.run([sys.executable, "-c", code], env=_slurm_env(0, **extra), capture_output=True,
                             text=True, timeout=60, check=True)  # fmt: skip
        assert json.loads(out.stdout) == {}, extra


def test_a_launcher_preset_without_its_plugin_names_the_extra(tmp_path):
    """A preset built on a launcher plugin that is not installed (here: one that does not exist), as
    Hydra reports it when composing, becomes one line naming the install extra."""
    from hydra.errors import HydraException

    from rlx.cli import _explain_hydra_error

    (tmp_path / "hydra" / "launcher").mkdir(parents=True)
    (tmp_path / "hydra" / "launcher" / "mine.yaml").write_text("defaults:\n  - submitit_cloud\n")
    overrides = [f"hydra.searchpath=[file://{tmp_path}]", "hydra/launcher=mine"]
    with pytest.raises(HydraException) as exc:
        _compose_with_hydra(overrides)
    line = _explain_hydra_error(exc.value, overrides)
    assert "Could not load 'hydra/launcher/submitit_cloud'" in line
    assert line.endswith("(Hydra's plugin is not installed: pip install 'rlx[submitit]')")


@pytest.mark.parametrize("preset", ["slurm", "submitit_slurm"])
def test_a_slurm_sweep_without_slurm_stops_in_one_line_before_any_file(tmp_path, preset):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    if shutil.which("sbatch") and shutil.which("srun"):
        pytest.skip("this machine has SLURM: the sweep would be submitted")
    res = rlx_refused("train", "-m", f"hydra/launcher={preset}", "trainer.seed=0,1", "hydra.sweep.dir=sweep",
                      cwd=tmp_path)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"rlx: error: hydra/launcher={preset} submits the jobs to SLURM, but sbatch/srun are not on this "
        "machine's PATH; run them here as separate processes with hydra/launcher=slurm_local"
    )
    assert not (tmp_path / "sweep").exists()


def test_a_preempted_submitit_job_is_requeued_and_resumes_from_its_checkpoint(tmp_path):
    """Preemption as submitit handles it on SLURM (USR2 to the job: checkpoint the launcher's call,
    requeue), with submitit's local executor, which requeues by restarting the job: the same Hydra job
    starts again in its run directory and rlx's trainer.resume=auto continues from the newest checkpoint.
    One MLflow run, every step logged once."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import psutil

    from tests.conftest import RLX, TINY_GPT

    store = tmp_path / "store"
    proc = subprocess.Popen(
        [RLX, "train", "-m", "hydra/launcher=slurm_local", "trainer.seed=0", *TINY_GPT,
         "trainer.prompts_per_step=4", "trainer.group_size=4", "trainer.steps=80", "trainer.eval_every=0",
         "trainer.save_every=5", "task.eval_size=16", f"logger.store_dir={store}", "logger.experiment=rq",
         "hydra.sweep.dir=sweep"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    checkpoints = tmp_path / "sweep" / "0" / "checkpoints"  # at step 5 of 80: seconds of steps still to go
    deadline = time.time() + 240
    while not (checkpoints.is_dir() and any(checkpoints.glob("step_*"))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    tasks = [
        p for p in psutil.Process(proc.pid).children(recursive=True)
        if "submitit.core._submit" in " ".join(p.cmdline())
    ]  # fmt: skip
    assert len(tasks) == 1
    tasks[0].send_signal(signal.SIGUSR2)  # submitit's preemption / timeout signal
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    (log,) = (tmp_path / "sweep" / ".submitit").glob("*/*_0_log.err")
    text = log.read_text()
    assert "this job is preempted" in text and "Requeued job" in text
    assert f"resumedfrom{checkpoints}/step_" in "".join(text.split())  # rich wraps the long path
    rows = [json.loads(x) for x in (tmp_path / "sweep" / "0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == list(range(1, 81))
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rq").experiment_id])
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED"
    assert len(client.get_metric_history(child.info.run_id, "reward/mean")) == 80
