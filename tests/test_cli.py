"""The command line, run as users run it: bad input, help, sweeps, and `rlx eval`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rlx.cli import config_groups, main
from tests.conftest import REPO, TINY, compose_cfg, rlx_in_process, rlx_refused, run_rlx

BAD_INPUT = [
    (
        ["algo=nope"],
        "unknown algo 'nope'; choose from: dapo, dpo, dr_grpo, grpo, gspo, ipo, ppo, reinforce, "
        "reinforce_pp, rloo, rm, sft, spo, trpo",
    ),
    (["model=gpt9"], "unknown model 'gpt9'; choose from: char_gpt, hf, tiny_gpt, tiny_policy, toy_sort"),
    (["trainer.bogus=1"], "unknown key 'trainer.bogus'; keys of trainer: device,"),
    (["loss.eps_hihg=0.3"], "unknown key 'loss.eps_hihg'; keys of loss: dual_clip, eps_high, eps_low, name"),
    (["trainer.group_size=1"], "adv_norm=group_std needs trainer.group_size >= 2, got 1"),
    (["task.length=0"], "task.length must be at least 1, got 0"),
    (["trainer.lr=-1e-3"], "trainer.lr must be positive, got -0.001"),
    (["trainer.steps=abc"], "trainer.steps must be int, got 'abc'"),
    (["adv_norm.eps=x"], "adv_norm.eps must be float, got 'x'"),
    (["loss.dual_clip=0.5"], "dual_clip must be > 1"),
    (["reward=custom"], "reward=custom needs reward.fn=my_module:my_reward"),
    (["reward=custom", "reward.fn=nomodule:fn"], "reward.fn='nomodule:fn' cannot be imported"),
    (["rollout.temperature=0"], "rollout.temperature must be > 0"),
    (["algo.minibatches=3"], "do not split into algo.minibatches=3"),
    (["kl=k3", "kl.placement=elsewhere"], "kl.placement must be loss or reward"),
    (["-m", "trainer.lr=1e-3,-1"], "job trainer.lr=-1: trainer.lr must be positive"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlx: error: ") and "\n" not in err, err
    assert message in err
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("metrics.jsonl"))


def test_missing_cuda_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(SystemExit) as exc:
        main(["train", f"trainer.device={device}"])
    assert exc.value.code == 2
    assert "no CUDA device is available" in capsys.readouterr().err or torch.cuda.is_available()


def test_installed_script_from_another_directory_bad_input(tmp_path):
    res = run_rlx("train", "algo=nope", cwd=tmp_path)
    assert res.returncode == 2
    assert (
        res.stderr.strip() == "rlx: error: unknown algo 'nope'; choose from: "
        "dapo, dpo, dr_grpo, grpo, gspo, ipo, ppo, reinforce, reinforce_pp, rloo, rm, sft, spo, trpo"
    )
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [("algo=nope", "unknown algo 'nope'"), ("trainer.lrr=1", "unknown key 'trainer.lrr'")],
)
def test_a_typo_is_refused_before_torch_and_transformers_are_imported(tmp_path, override, message):
    """An unknown option or key fails Hydra's compose: refused in a second, not after the ~8 s imports
    that planning the run needs (a real process: which modules it loaded is the point)."""
    probe = (
        "import sys\nfrom rlx.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "    print('exit', e.code, 'imported', heavy)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe, "train", override],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.stdout.strip() == "exit 2 imported []", (res.stdout, res.stderr[-2000:])
    assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


def test_help_and_cfg_job_work_from_any_directory(tmp_path):
    res = run_rlx("train", "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for group in (
        "algo: dapo, dpo, dr_grpo, grpo, gspo, ipo, ppo, reinforce, reinforce_pp, rloo, rm, sft, spo, trpo",
        "adv_norm:",
        "experiment: arithmetic_r1, baby_rlhf, lecture_sort, rlhf_sort",
    ):
        assert group in res.stdout
    res = run_rlx("train", "algo=dapo", "--cfg", "job", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "eps_high: 0.28" in res.stdout and "dynamic_sampling: true" in res.stdout


def test_every_option_of_every_group_composes_and_plans(tmp_path):
    from rlx.models.reward_model import build_tiny_reward_model
    from rlx.models.tokenizer import build_number_tokenizer
    from rlx.train import plan

    tok = build_number_tokenizer(10)  # a reward model on disk for reward=model
    build_tiny_reward_model(tok, n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    groups = config_groups()
    assert set(groups) >= {
        "algo",
        "model",
        "task",
        "reward",
        "loss",
        "kl",
        "adv_norm",
        "logger",
        "experiment",
    }
    for group, options in groups.items():
        for option in options:
            overrides = [f"{group}={option}"]
            if (group, option) == ("reward", "custom"):
                overrides.append("reward.fn=tests.rewards_for_tests:length")
            if (group, option) == ("adv_norm", "gae"):  # GAE needs a critic's values
                overrides += ["algo.critic=head", "kl.placement=reward"]
            if (group, option) == ("reward", "model"):
                overrides.append(f"reward.path={tmp_path}")
            if group == "algo" and option in ("sft", "rm", "dpo", "ipo", "spo"):  # offline: need data
                kind = "sft" if option == "sft" else "pairs"
                overrides.append(f"data.train={REPO / 'tests' / 'data' / f'sort_{kind}_tiny.jsonl'}")
            if (group, option) == ("experiment", "arithmetic_r1"):  # h15: its task reads arith.dir/data
                from rlx.data.arithmetic import write_arithmetic_data

                write_arithmetic_data(tmp_path / "arith" / "data", train=20, heldout=4, sft=4)
                overrides.append(f"arith.dir={tmp_path / 'arith'}")
            if (group, option) == ("task", "text"):
                overrides += [f"task.path={REPO / 'tests' / 'data' / 'dolly_tiny.jsonl'}", "task.eval_size=2"]
                overrides += ["reward=custom", "reward.fn=tests.rewards_for_tests:text_length"]
            cfg = compose_cfg(overrides)
            plan(cfg)  # raises on any inconsistency


def test_a_run_then_rlx_eval(tmp_path):
    store = tmp_path / "store"
    res = run_rlx(
        "train", *TINY, "trainer.steps=3", f"logger.store_dir={store}", "hydra.run.dir=run", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "samples.jsonl", "reward_curve.png", "final"} <= {
        p.name for p in run.iterdir()
    }
    assert (store / "mlflow.db").is_file()
    assert not (tmp_path / "mlflow.db").exists()  # nothing written outside the configured store
    res = rlx_in_process("eval", str(run), "--json", cwd=tmp_path)  # the run above is the real process
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    final = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert metrics["eval/exact"] == final["eval/exact"]  # the same greedy evaluation, reproduced
    assert metrics["eval/reward"] == pytest.approx(final["eval/reward"])
    res = rlx_refused("eval", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("rlx: error: ")


def test_multirun_sweep_runs_every_job_and_closes_every_mlflow_run(tmp_path):
    store = tmp_path / "store"
    res = rlx_in_process(
        "train",
        "-m",
        "algo=grpo,dapo",
        *TINY,
        "trainer.steps=1",
        f"logger.store_dir={store}",
        "logger.experiment=sweep",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and all((j / "final" / "model.safetensors").is_file() for j in jobs)
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("sweep").experiment_id)
    runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]  # the jobs, not the sweep's parent run
    assert sorted(r.data.params["algo.name"] for r in runs) == ["dapo", "grpo"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_resolving_the_run_directory_leaves_hydras_job_config_as_it_was():
    """`rlx train` resolves ``hydra.run.dir`` (its ``${now:...}``) before Hydra starts; a ``train()``
    called later in the same process must not find that half-built job config (no output_dir) in
    Hydra's singleton."""
    from hydra.core.hydra_config import HydraConfig

    from rlx.cli import _hydra_run_dir

    before = HydraConfig.instance().cfg
    assert _hydra_run_dir(["hydra.run.dir=somewhere"]) == "somewhere"
    assert HydraConfig.instance().cfg is before


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["trian"])
    assert exc.value.code == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_readme_commands_exist():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
