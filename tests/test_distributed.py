"""Data parallelism under torchrun (trainer.parallel=ddp): real processes, gloo, 2 ranks, one thread each.

- The same math at any world size: one fixed global batch split over 2 ranks gives, after the update
  functions of every aggregation, advantage estimator, PPO (both critics), TRPO, SFT and DPO, the
  parameters one process gives on the whole batch (tests/distributed_worker.py runs both).
- trainer.parallel=fsdp2 (torch's FSDP2, every block and the root sharded over 2 ranks) gives the same
  parameters as one process for GRPO (with a KL to a reference, whitening, entropy), PPO with a
  separate critic and with a value head, TRPO, SFT, DPO, reward-model training, packed SFT and LoRA; ranks
  with fewer micro-batches (an uneven split, an epoch's last smaller batch) pad with zero-weight passes;
  DAPO's dynamic sampling under fsdp2 equals ddp's (h11g).
- Held-out evaluation is sharded: each of 2 ranks generates for (and scores) only its share of the
  held-out prompts (and offline rows), and the metrics equal one process's.
- Bad parallel settings: one line at plan time.

Whole runs under torchrun (kill and resume, a failure on one rank): tests/test_distributed_runs.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlx.data.sort import write_sort_data
from tests.conftest import REPO, TINY_GPT

WORKER = REPO / "tests" / "distributed_worker.py"
sys.path.insert(0, str(REPO))
from tests.distributed_worker import EVALS, EVALS_FSDP2, FSDP2, VARIANTS, write_tiny_hf  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(REPO)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
VOLATILE = ("time", "throughput", "memory")  # wall-clock and memory figures differ between any two runs


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    write_sort_data(out, train=48, heldout=16, task_eval_size=16, candidates=2)
    write_tiny_hf(out / "tiny_hf")  # model=hf for LoRA (h11g)
    return out


@pytest.fixture(scope="module")
def updates(tmp_path_factory: pytest.TempPathFactory, data: Path) -> tuple[Path, Path]:
    """Every variant's parameters after the update: one process, and 2 ranks under torchrun (at once)."""
    out = tmp_path_factory.mktemp("updates")
    one = subprocess.Popen(
        [sys.executable, str(WORKER), str(out / "one"), str(data)],
        cwd=out,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    two = subprocess.run(
        [*TORCHRUN, str(WORKER), str(out / "two"), str(data)],
        cwd=out,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log, _ = one.communicate(timeout=300)
    assert one.returncode == 0, log[-3000:]
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    return out / "one", out / "two"


# the metrics that are exact functions of the global batch (ratio metrics such as clip_frac are means
# of micro-batch means weighted by rows, and move with how rows fall into micro-batches, in one
# process too)
EXACT = (
    "reward/mean",
    "reward/std",
    "frac_reward_zero_std",
    "adv/mean",
    "kl/ref",
    "loss/total",
    "loss/policy",
    "loss/value",
    "loss/kl",
    "grad_norm",
    "value/mean",
    "trpo/kl",
    "rewards/accuracy",
    "loss/sft",
    "early_stop",  # epochs done before the KL early stop (algo.early_stop_kl)
)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_give_the_one_process_update(updates: tuple[Path, Path], variant: str) -> None:
    one, two = (torch.load(d / f"{variant}.pt", weights_only=False) for d in updates)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    if "lengths" in one:  # completions of unequal lengths, so token and sequence means differ
        assert len(set(one["lengths"])) > 1
    assert one["params"].shape == two["params"].shape
    # TRPO's conjugate gradient amplifies the float32 rounding of the Fisher-vector sums (another
    # summation order over ranks): measured 2.3e-6 here against 3.0e-7 between two micro-batch sizes in
    # one process; every SGD update agrees to 1e-8
    tol = 1e-5 if variant == "trpo" else 1e-6
    assert (one["params"] - two["params"]).abs().max().item() < tol
    for m1, m2 in zip(one["metrics"], two["metrics"], strict=True):
        for key in EXACT:
            if key in m1:
                assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    if "kl_coef" in one:
        assert two["kl_coef"] == pytest.approx(one["kl_coef"], rel=1e-9)
    if variant == "ppo_early_stop":  # it did stop early (after the same minibatch on both: EXACT)
        done = [m["early_stop"] for m in one["metrics"]]
        assert all(d < 4 for d in done) and any(d > 0 for d in done), done


@pytest.mark.parametrize("variant", list(FSDP2))
def test_fsdp2_on_two_ranks_gives_the_one_process_update(updates: tuple[Path, Path], variant: str) -> None:
    """The policy sharded by FSDP2 (its gradients reduce-scattered as sums in backward, the global norm
    clipped over the shards, sampling with the parameters gathered): after two updates its gathered
    parameters equal the single process's (the variant without the fsdp2_ prefix) to 1e-6.

    h11g: every rank runs as many forward/backward passes as the others (each is a collective); where
    one has fewer micro-batches (``uneven_``: the global batch split 3 groups + 1; ``_last``: an
    epoch's last batch of 1 row, or of 5 split 3 + 2) it pads with zero-weight passes, and the update
    is still the one process's."""
    base = variant.removeprefix("fsdp2_").removeprefix("uneven_")
    one = torch.load(updates[0] / f"{base}.pt", weights_only=False)
    two = torch.load(updates[1] / f"{variant}.pt", weights_only=False)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    (total0, pad0), (total1, pad1) = two["passes"]
    if base != "trpo":  # (TRPO's passes are its own: `WholeParameters` gathers the weights once)
        assert total0 == total1 > 0  # the same number of passes on both ranks
    padded = {
        "fsdp2_uneven_adv_group_std": (0, 4),
        "fsdp2_uneven_ppo_head": (0, 8),
        "fsdp2_sft_last": (0, 1),
        "fsdp2_rm_last": (0, 1),
        # minibatches drawn from the global batch (`minibatch_rows`): a rank's share of a minibatch may
        # be smaller than the other's (this seeded draw: one micro-batch fewer on each rank, once)
        "fsdp2_ppo_early_stop": (1, 1),
    }
    assert (pad0, pad1) == padded.get(variant, (0, 0))
    assert one["params"].shape == two["params"].shape
    assert (one["params"] - two["params"]).abs().max().item() < 1e-6
    for m1, m2 in zip(one["metrics"], two["metrics"], strict=True):
        for key in EXACT:
            if key in m1:
                assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    if "kl_coef" in one:
        assert two["kl_coef"] == pytest.approx(one["kl_coef"], rel=1e-9)


def test_fsdp2_lora_saves_the_merged_weights_of_one_process(updates: tuple[Path, Path], data: Path) -> None:
    """h11g: LoRA under fsdp2 (frozen base weights and trainable adapters sharded in one unit): what
    final/ holds, the adapters merged into plain GPT-2 weights on rank 0 from the gathered state, equals
    what one process saves after the same updates (to 1e-6), and only the adapted weight moved."""
    from safetensors.torch import load_file

    one = load_file(updates[0] / "sft_lora_final" / "model.safetensors")
    two = load_file(updates[1] / "fsdp2_sft_lora_final" / "model.safetensors")
    assert sorted(one) == sorted(two) and not any("lora" in k for k in two)
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-6
    base = load_file(data / "tiny_hf" / "model.safetensors")
    assert [k for k in two if not torch.equal(two[k], base[k])] == ["transformer.h.0.attn.c_attn.weight"]


def test_fsdp2_dapo_dynamic_sampling_equals_ddp(updates: tuple[Path, Path]) -> None:
    """h11g: DAPO with real rollouts on 2 ranks, a reward that zeroes some groups: the ranks keep
    different numbers of groups (resampling for 2 extra rounds), so their updates have different numbers
    of micro-batches; fsdp2 gives the ddp run's samples, metrics and parameters (to 1e-6)."""
    ddp, fsdp2 = (torch.load(updates[1] / f"{v}_dapo.pt", weights_only=False) for v in ("ddp", "fsdp2"))
    assert ddp["world_size"] == fsdp2["world_size"] == 2
    assert ddp["rows"] == fsdp2["rows"]
    assert any(len(set(step)) > 1 for step in zip(*ddp["rows"]))  # unequal rows on the ranks, some step
    assert ddp["metrics"][0]["dynamic/rounds"] > 0
    assert (ddp["params"] - fsdp2["params"]).abs().max().item() < 1e-6
    for m1, m2 in zip(ddp["metrics"], fsdp2["metrics"], strict=True):
        for key in (*EXACT, "dynamic/rounds", "dynamic/kept_groups"):
            if key in m1:
                assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key


def test_the_updates_moved_the_parameters(updates: tuple[Path, Path], data: Path) -> None:
    """The equality above is not that of two untouched models: the update moved every variant."""
    from rlx.train import build
    from tests.distributed_worker import compose_cfg

    session = build(compose_cfg(VARIANTS["adv_group_std"]), run_dir=updates[0].parent / "fresh")
    start = torch.cat([p.detach().reshape(-1) for p in session.trainer.policy.parameters()])
    session.tracker.close("FINISHED")
    session.release()
    after = torch.load(updates[0] / "adv_group_std.pt", weights_only=False)["params"]
    assert (after[: start.numel()] - start).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", list(EVALS))
def test_held_out_evaluation_is_sharded_and_equals_one_process(
    updates: tuple[Path, Path], variant: str
) -> None:
    """15 held-out prompts: one process generates for all 15 (calls of at most 4), rank 0 for its 8 and
    rank 1 for its 7, never all 15; the task metrics are computed from the gathered rows in the prompts'
    order, so they are equal, not close. Offline, the held-out data's 16 rows: 8 per rank, the loss
    summed over ranks (equal up to float32 rounding of another grouping into micro-batches)."""
    one, two = (torch.load(d / f"{variant}.pt", weights_only=False) for d in updates)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["generated"] == [[4, 4, 4, 3]]
    assert two["generated"] == [[4, 4], [4, 3]]
    m1, m2 = one["metrics"], two["metrics"]
    assert m1["eval/reward"] > 1  # the test reward: the prompt's mean / 7 plus the completion's length
    task_keys = {"eval/reward", "eval/exact", "eval/reward_norm"}
    assert set(m1) == set(m2)
    for key in sorted(set(m1) & task_keys):
        assert m2[key] == m1[key], key
    if variant != "eval_grpo":  # the offline loop's held-out data (data.eval), micro-batches of 3
        assert one["scored"] == [[3, 3, 3, 3, 3, 1]]
        assert two["scored"] == [[3, 3, 2], [3, 3, 2]]
        assert "eval/loss" in m1
        for key in sorted(set(m1) - task_keys):
            assert m2[key] == pytest.approx(m1[key], rel=1e-6, abs=1e-7), key
    else:
        assert one["scored"] == [[]] and two["scored"] == [[], []]


def test_fsdp2_evaluation_with_unequal_numbers_of_generate_calls_equals_one_process(
    updates: tuple[Path, Path],
) -> None:
    """fsdp2: rank 0 answers its 8 held-out prompts in 2 generate calls (7 + 1), rank 1 its 7 in one; the
    sharded parameters are gathered once for the whole evaluation, so no rank waits on a collective the
    other never joins, and the metrics equal one process's (its 15 prompts in calls of 4)."""
    (name,) = EVALS_FSDP2
    one = torch.load(updates[0] / "eval_grpo.pt", weights_only=False)
    two = torch.load(updates[1] / f"{name}.pt", weights_only=False)
    assert two["world_size"] == 2 and two["generated"] == [[7, 1], [7]]
    keys = {"eval/reward", "eval/exact", "eval/reward_norm"} & set(one["metrics"])
    assert "eval/reward" in keys and set(two["metrics"]) == set(one["metrics"])
    for key in sorted(keys):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6), key


# -- bad input: one line before anything runs -------------------------------------------------------
TORCHRUN_ENV = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (
            ["trainer.parallel=ddp"],
            None,
            r"trainer.parallel=ddp needs torchrun's environment \(RANK, WORLD_SIZE",
        ),
        (
            ["trainer.parallel=fsdp2"],
            None,
            r"trainer.parallel=fsdp2 needs torchrun's environment \(RANK, WORLD_SIZE",
        ),
        (["trainer.parallel=zero3"], None, r"trainer.parallel='zero3' is not one of auto, none, ddp, fsdp2"),
        ([], "3", r"trainer.prompts_per_step=4 is not divisible by the world size 3"),
        (["trainer.parallel=none"], "2", r"trainer.parallel=none under torchrun with WORLD_SIZE=2"),
        (["trainer.device=cuda"], "2", r"trainer.device=cuda but no CUDA device is available"),
        (
            [
                "trainer.parallel=fsdp2",
                "optimizer._target_=torch.optim.SGD",
                "~optimizer.betas",
                "~optimizer.eps",
            ],
            "2",
            r"optimizer.fused=true with trainer.parallel=fsdp2: torch has no fused torch.optim.SGD step",
        ),
    ],
)
def test_bad_parallel_settings_are_refused_at_plan_time(monkeypatch, overrides, world, message) -> None:
    from rlx.errors import RlxError
    from rlx.train import plan
    from tests.conftest import TINY, compose_cfg

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    if world is not None:  # the variables torchrun sets for its workers
        for key, value in {**TORCHRUN_ENV, "WORLD_SIZE": world}.items():
            monkeypatch.setenv(key, value)
    if torch.cuda.is_available() and "trainer.device=cuda" in overrides:
        pytest.skip("this machine has CUDA")
    import tests.rollout_standin  # noqa: F401  (registers rollout.engine=standin)

    with pytest.raises(RlxError, match=message):
        plan(compose_cfg([*TINY, "logger=none", *overrides]))


def test_an_offline_batch_the_ranks_cannot_split_is_refused(monkeypatch, data: Path) -> None:
    from rlx.errors import RlxError
    from rlx.train import plan
    from tests.conftest import compose_cfg

    for key, value in {**TORCHRUN_ENV, "WORLD_SIZE": "3"}.items():
        monkeypatch.setenv(key, value)
    cfg = compose_cfg(
        [*TINY_GPT, "algo=dpo", "algo.batch_size=8", f"data.train={data / 'pairs_train.jsonl'}"]
    )
    with pytest.raises(RlxError, match=r"algo.batch_size=8 is not divisible by the world size 3"):
        plan(cfg)


def test_ddp_without_torchrun_is_one_line_from_the_cli(tmp_path: Path) -> None:
    from tests.conftest import TINY, rlx_refused

    env = {k: "" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    res = rlx_refused("train", *TINY, "trainer.parallel=ddp", cwd=tmp_path, env=env)
    assert res.returncode == 2
    assert res.stderr.startswith("rlx: error: trainer.parallel=ddp needs torchrun's environment")
    assert res.stderr.count("\n") == 1 and not (tmp_path / "outputs").exists()
