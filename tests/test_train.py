"""A few real training steps per algorithm preset on CPU, with MLflow and metrics.jsonl checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from rlx.errors import NonFiniteError
from rlx.runtime import peak_rss_bytes
from rlx.train import build, train
from tests.conftest import TINY, TINY_RUN, compose_cfg

ALGOS = ["reinforce", "rloo", "grpo", "dr_grpo", "dapo"]
COMMON_METRICS = {
    "reward/mean",
    "reward/std",
    "frac_reward_zero_std",
    "adv/mean",
    "loss/total",
    "loss/policy",
    "kl/old",
    "entropy",
    "grad_norm",
    "lr",
    "time/rollout_s",
    "time/update_s",
    "throughput/tokens_per_s",
}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The TINY model as every run below initialises it (same seed): a 0-step run saves it."""
    run = tmp_path_factory.mktemp("init")
    train(compose_cfg([*TINY, "trainer.steps=0", "logger=none"]), run_dir=run)
    return load_file(run / "final" / "model.safetensors")


@pytest.mark.parametrize("algo", ALGOS)
def test_algo_preset_trains_and_logs(algo, tmp_path, mlflow_store, initial_weights):
    summary = train(
        compose_cfg([f"algo={algo}", *TINY, f"logger.store_dir={mlflow_store}"]), run_dir=tmp_path
    )

    # the policy's parameters changed
    final = load_file(tmp_path / "final" / "model.safetensors")
    assert any(not torch.equal(final[k], initial_weights[k]) for k in initial_weights)

    # metrics.jsonl has every iteration and the final evaluation
    logged = rows(tmp_path)
    assert [r["step"] for r in logged if "reward/mean" in r] == [1, 2]
    assert COMMON_METRICS <= set(logged[0])
    assert "eval/exact" in logged[-1] and "eval/reward" in logged[-1]

    # the same run in MLflow: params = flattened config, metrics by step, artifacts, FINISHED
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_store / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["algo.name"] == algo
    assert run.data.params["trainer.group_size"] == "4"
    assert COMMON_METRICS | {"eval/exact", "eval/reward"} <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    assert sorted(m.step for m in history) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "samples.jsonl", "reward_curve.png"} <= artifacts
    # tiny_gpt is a stock GPT-2: logged through MLflow's transformers flavor (logger.log_model=auto)
    (logged,) = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
    model_files = {Path(a.path).name for a in client.list_logged_model_artifacts(logged.model_id, "model")}
    assert {"model.safetensors", "config.json"} <= model_files


def test_logger_none_still_writes_metrics(tmp_path):
    before = peak_rss_bytes() / 2**30
    summary = train(compose_cfg([*TINY, "logger=none"]), run_dir=tmp_path)
    after = peak_rss_bytes() / 2**30
    # every step logs this process's peak resident set so far, in GiB: between the peak before the run
    # and the peak after it, never falling (KiB or bytes taken for GiB would miss the bounds by 2**10)
    peaks = [r["memory/peak_rss_gb"] for r in rows(tmp_path) if "reward/mean" in r]
    assert before <= peaks[0] <= peaks[-1] <= after and 0.05 < after < 64, (before, peaks, after)
    assert summary["mlflow_run_id"] is None
    assert len([r for r in rows(tmp_path) if "reward/mean" in r]) == 2
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "completion", "reward", "advantage"} <= set(samples[0])


@pytest.mark.parametrize("reward", ["sort", "sort_inclusion", "sort_exact", "sort_tokens"])
def test_every_reward_trains(reward, tmp_path):
    train(compose_cfg([*TINY, f"reward={reward}", "logger=none"]), run_dir=tmp_path)
    assert rows(tmp_path)[-1]["eval/reward"] >= 0


@pytest.mark.parametrize("model", ["toy_sort", "tiny_policy"])
def test_toy_models_train(model, tmp_path):
    train(compose_cfg([*TINY_RUN, f"model={model}", "logger=none"]), run_dir=tmp_path)
    assert (tmp_path / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("placement", ["loss", "reward"])
def test_kl_to_the_reference(placement, tmp_path):
    cfg = compose_cfg(
        [*TINY, "kl=k3", "kl.coef=0.1", f"kl.placement={placement}", "trainer.steps=3", "logger=none"]
    )
    train(cfg, run_dir=tmp_path)
    logged = [r for r in rows(tmp_path) if "reward/mean" in r]
    assert logged[0]["kl/ref"] == pytest.approx(0.0, abs=1e-5)  # pi_ref starts as the policy
    assert logged[-1]["kl/ref"] > 1e-4  # and the policy moves away from it
    assert ("loss/kl" in logged[-1]) == (placement == "loss")


def test_reference_refresh_every_iteration_keeps_kl_at_zero(tmp_path):
    cfg = compose_cfg([*TINY, "kl=k3", "kl.ref_refresh=1", "trainer.steps=3", "logger=none"])
    train(cfg, run_dir=tmp_path)
    for r in rows(tmp_path):
        if "kl/ref" in r:
            assert r["kl/ref"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
)
def test_micro_batches_give_the_same_update(aggregation, tmp_path):
    """Gradient accumulation over micro-batches = the unsplit minibatch (padding included: the
    tiny model samples EOS early in some rows)."""
    base = [
        *TINY,
        "trainer.steps=1",
        "logger=none",
        f"algo.aggregation={aggregation}",
        "algo.entropy_coef=0.01",
        "kl=k3",
        "kl.coef=0.1",
        "trainer.samples_every=0",
        # plain SGD, so the weights' difference is the gradients' (Adam's first step divides each
        # gradient by its own size, and an element that is rounding noise moves by noise / noise)
        "optimizer._target_=torch.optim.SGD",
        "~optimizer.betas",
        "~optimizer.eps",
        "trainer.lr=0.05",
    ]
    train(compose_cfg(base), run_dir=tmp_path / "whole")
    train(compose_cfg([*base, "trainer.micro_batch_size=3"]), run_dir=tmp_path / "micro")
    train(compose_cfg([*base, "trainer.steps=0"]), run_dir=tmp_path / "init")
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "micro" / "final" / "model.safetensors")
    a0 = load_file(tmp_path / "init" / "final" / "model.safetensors")
    for k in a:
        # float32 summation order differs between the two (and so does the prompts' sharing: a
        # micro-batch of 3 rows splits a group of 4): the weights must agree to 1e-4 of the step the
        # update took on that tensor (or 1e-8)
        step = (a[k] - a0[k]).abs().max().item()
        diff = (a[k] - b[k]).abs().max().item()
        assert diff <= max(1e-8, 1e-4 * step), (k, diff, step)
        assert step > 0, k


def test_epochs_and_minibatches_make_several_optimizer_steps(tmp_path):
    cfg = compose_cfg([*TINY, "trainer.steps=1", "algo.epochs=3", "algo.minibatches=2", "logger=none"])
    session = build(cfg, run_dir=tmp_path)
    session.trainer.iteration()
    assert session.trainer.scheduler.last_epoch == 6  # 3 epochs x 2 minibatches
    session.tracker.close()


def test_dynamic_sampling_replaces_groups_without_spread(tmp_path):
    # sort_exact on an untrained model is almost always 0: nearly every group has zero spread
    cfg = compose_cfg([*TINY, "algo=dapo", "reward=sort_exact", "algo.max_resample_rounds=2", "logger=none"])
    session = build(cfg, run_dir=tmp_path)
    batch = session.trainer.collect()
    ro, rewards, metrics = batch.rollout, batch.rewards, batch.metrics
    assert metrics["dynamic/rounds"] == 2  # it kept looking
    groups = rewards.view(-1, 4)
    assert (groups.amax(1) != groups.amin(1)).all() or metrics["dynamic/kept_groups"] == 0
    assert len(ro.tokens) == len(rewards) == ro.group_size * ro.num_groups
    session.tracker.close()


def test_dynamic_sampling_keeps_a_full_batch_when_groups_have_spread(tmp_path):
    cfg = compose_cfg([*TINY, "algo=dapo", "reward=sort", "trainer.group_size=8", "logger=none"])
    session = build(cfg, run_dir=tmp_path)
    batch = session.trainer.collect()
    ro, rewards, metrics = batch.rollout, batch.rewards, batch.metrics
    assert metrics["dynamic/kept_groups"] == 4 == ro.num_groups
    groups = rewards.view(-1, 8)
    assert (groups.amax(1) != groups.amin(1)).all()
    session.tracker.close()


def test_lecture_experiment_runs(tmp_path):
    cfg = compose_cfg(["experiment=lecture_sort", "trainer.steps=2", "logger=none"])
    assert cfg.model.name == "toy_sort" and cfg.reward.name == "sort_inclusion"
    summary = train(cfg, run_dir=tmp_path)
    assert 0 <= summary["eval/reward"] <= 5


def test_nan_loss_stops_after_saving_a_checkpoint(tmp_path, mlflow_store):
    # a finite reward so large that -A * logp overflows: the loss is inf at the first iteration
    cfg = compose_cfg(
        [
            *TINY,
            "reward=custom",
            "reward.fn=tests.rewards_for_tests:huge",
            "adv_norm=none",
            f"logger.store_dir={mlflow_store}",
            "logger.run_name=nan-test",
        ]
    )
    with pytest.raises(NonFiniteError, match="non-finite loss") as err:
        train(cfg, run_dir=tmp_path)
    # the state it reached is kept for inspection, apart from the checkpoints a resume would use
    assert "nonfinite_step_000000" in str(err.value)
    assert (tmp_path / "checkpoints" / "nonfinite_step_000000" / "config.json").is_file()
    assert not list((tmp_path / "checkpoints").glob("step_*"))
    assert not (tmp_path / "final").exists()  # nothing is passed off as a finished model
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_store / 'mlflow.db'}")
    runs = client.search_runs(
        client.get_experiment_by_name("rlx").experiment_id, "attributes.run_name = 'nan-test'"
    )
    assert runs[0].info.status == "FAILED"


def test_on_nonfinite_skip_drops_those_updates_and_counts_them(tmp_path):
    # completions that start with 0 get a reward whose loss overflows: those updates are skipped
    cfg = compose_cfg(
        [
            *TINY,
            "trainer.steps=4",
            "reward=custom",
            "reward.fn=tests.rewards_for_tests:huge_if_first_is_zero",
            "adv_norm=none",
            "trainer.on_nonfinite=skip",
            "trainer.max_nonfinite=100",
            "logger=none",
        ]
    )
    session = build(cfg, run_dir=tmp_path)
    before = [p.detach().clone() for p in session.trainer.policy.parameters()]
    session.trainer.run()
    session.tracker.close()
    skipped = [r["nonfinite/skipped"] for r in rows(tmp_path)]
    assert skipped[-1] > 0 and skipped == sorted(skipped)  # counted, cumulatively
    after = list(session.trainer.policy.parameters())
    assert all(torch.isfinite(p).all() for p in after)  # a skipped update never reached the weights
    assert skipped[-1] < 4 or all(torch.equal(a, b) for a, b in zip(before, after))


def test_on_nonfinite_skip_stops_after_max_in_a_row(tmp_path):
    cfg = compose_cfg(
        [
            *TINY,
            "reward=custom",
            "reward.fn=tests.rewards_for_tests:huge",
            "adv_norm=none",
            "trainer.on_nonfinite=skip",
            "trainer.max_nonfinite=2",
            "logger=none",
        ]
    )
    with pytest.raises(NonFiniteError, match="2 updates in a row skipped"):
        train(cfg, run_dir=tmp_path)


def test_custom_reward_gets_task_columns(tmp_path):
    cfg = compose_cfg([*TINY, "reward=custom", "reward.fn=tests.rewards_for_tests:length", "logger=none"])
    train(cfg, run_dir=tmp_path)
    assert 0 < rows(tmp_path)[0]["reward/mean"] <= 4


def test_rewards_can_read_prompt_and_completion_text(tmp_path):
    cfg = compose_cfg(
        [*TINY, "reward=custom", "reward.fn=tests.rewards_for_tests:text_digits", "logger=none"]
    )
    train(cfg, run_dir=tmp_path)
    assert 0 < rows(tmp_path)[0]["reward/mean"] <= 4


def test_trainer_state_round_trips(tmp_path):
    cfg = compose_cfg([*TINY, "kl=k3", "logger=none"])
    a = build(cfg, run_dir=tmp_path / "a")
    a.trainer.iteration()
    a.trainer.step = 1
    state = a.trainer.state_dict()
    b = build(cfg, run_dir=tmp_path / "b")
    b.trainer.load_state_dict(state)
    assert b.trainer.step == 1
    for (k, x), (_, y) in zip(
        a.trainer.ref.model.state_dict().items(), b.trainer.ref.model.state_dict().items()
    ):
        assert torch.equal(x, y), k
    a.tracker.close()
    b.tracker.close()


def test_checkpoints_are_kept_to_the_newest(tmp_path):
    cfg = compose_cfg(
        [*TINY, "trainer.steps=4", "trainer.save_every=1", "trainer.keep_checkpoints=2", "logger=none"]
    )
    train(cfg, run_dir=tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000003", "step_000004"]


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_weights_after_a_finite_update_stop_the_run(mode, tmp_path):
    """Issue 14 item 6: lr=1e30 turns a finite gradient into inf weights; the optimizer step notices
    (whatever on_nonfinite says: the step cannot be undone) instead of crashing in the next rollout."""
    cfg = compose_cfg([*TINY, "trainer.lr=1e30", f"trainer.on_nonfinite={mode}", "logger=none"])
    with pytest.raises(
        NonFiniteError, match="weights became non-finite after the optimizer step of iteration 1"
    ):
        train(cfg, run_dir=tmp_path)
    assert not (tmp_path / "final").exists()
