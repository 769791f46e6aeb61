"""Rollout engines (``rollout.engine``): the interface, tested on CPU with a stand-in engine.

vLLM is GPU-only and not installed here, so `rlx.rollout.vllm_engine.VLLMEngine` itself never runs in
these tests. What they show instead: a stand-in engine that samples with its *own copy* of the policy
model (so a missed weight push would show) gets a push after every iteration's update, carrying the
policy's current weights; it receives the same sampling settings the hf engine gets; the old
log-probs the policy recomputes for its tokens make the first ratio 1; a GRPO run through it
completes. Plus the pure parts of the vLLM engine (settings mapping, output padding) and the refusals.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlx.cli import main
from rlx.errors import RlxError
from rlx.loops import chunks
from rlx.models import Policy, Sampling, build_tiny_gpt
from rlx.rollout import sample_groups
from rlx.rollout.engines import checksum, policy_weights, vllm_installed
from rlx.rollout.vllm_engine import pad_completions, sampling_params_kwargs
from rlx.tasks.sort import SortTask
from rlx.train import build, plan, train
from tests.conftest import REPO, TINY, compose_cfg
from tests.rollout_standin import BUILT, StandInEngine
from tests.test_resume import VOLATILE

SAMPLING = ["rollout.temperature=0.7", "rollout.top_k=5", "rollout.top_p=0.9", "rollout.max_new_tokens=3"]


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without what varies between runs of the same config (timings, wall time)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def own_weights_equal(engine: StandInEngine, policy: Policy) -> bool:
    mine = dict(engine.copy.model.named_parameters())
    return all(torch.equal(mine[n], p) for n, p in policy.model.named_parameters())


def test_a_push_after_every_update_carries_the_policys_current_weights(tmp_path):
    session = build(compose_cfg([*TINY, "rollout.engine=standin", "logger=none"]), run_dir=tmp_path)
    trainer = session.trainer
    engine = BUILT[-1]
    assert isinstance(engine, StandInEngine) and trainer.engine is engine
    names = [n for n, _ in trainer.policy.model.named_parameters()]
    seen = set()
    for k in (1, 2):
        before = checksum(policy_weights(trainer.policy))
        trainer.iteration()
        trainer.step += 1
        after = checksum(policy_weights(trainer.policy))
        assert after != before  # the update moved the policy
        # the last push is of step k, every parameter by name, and carries exactly the current weights
        assert engine.pushes[-1]["step"] == k and engine.pushes[-1]["names"] == names
        assert engine.pushes[-1]["checksum"] == after
        assert own_weights_equal(engine, trainer.policy)
        seen.add(after)
    # step 0 (before the first sampling) and one push per update, each with different weights
    assert [p["step"] for p in engine.pushes] == [0, 1, 2]
    assert len({p["checksum"] for p in engine.pushes}) == 3
    session.tracker.close()


def test_sampling_settings_reach_the_engine_as_they_reach_the_hf_engine_and_draw_the_same_tokens(tmp_path):
    # the same seed: hf and the stand-in (whose copy holds the same weights) draw the same tokens
    got = {}
    for name in ("hf_recording", "standin"):
        cfg = compose_cfg([*TINY, *SAMPLING, f"rollout.engine={name}", "logger=none"])
        session = build(cfg, run_dir=tmp_path / name)
        batch = session.trainer.collect()
        got[name] = (BUILT[-1].calls, batch.rollout)
        session.tracker.close()
    (hf_calls, hf_ro), (si_calls, si_ro) = got["hf_recording"], got["standin"]
    assert hf_calls == si_calls == [Sampling(0.7, 5, 0.9, 3)]
    assert torch.equal(hf_ro.tokens, si_ro.tokens) and torch.equal(hf_ro.mask, si_ro.mask)
    # recorded as drawn (hf) and recomputed by the policy (stand-in): the same log-probs
    assert torch.allclose(hf_ro.old_logp, si_ro.old_logp, atol=1e-5)
    assert (si_ro.old_logp[si_ro.mask == 0] == 0).all()


@pytest.mark.parametrize("micro_batch_size", [None, 3])
def test_recomputed_old_logp_make_the_first_ratio_one(tmp_path, micro_batch_size):
    mbs = f"trainer.micro_batch_size={micro_batch_size or 'null'}"
    session = build(compose_cfg([*TINY, *SAMPLING, mbs, "rollout.engine=standin", "logger=none"]), tmp_path)
    trainer, learner = session.trainer, session.trainer.learner
    batch = trainer.collect()
    ro = batch.rollout
    rows = torch.arange(len(ro.tokens))
    with torch.no_grad():  # what the update's first epoch computes, micro-batch by micro-batch
        for idx in chunks(rows, learner.micro_batch_size):
            scores, _ = learner.forward(ro, idx, entropy=True)
            ratio = torch.exp(scores.logp - ro.old_logp[idx]) * ro.mask[idx]
            assert torch.allclose(ratio, ro.mask[idx], atol=1e-5)  # the tolerance of test_models' ratio test
            assert torch.equal(scores.logp * ro.mask[idx], ro.old_logp[idx])  # and in fact exactly 1
    session.tracker.close()


def test_grpo_run_through_the_stand_in_completes_and_ends_with_the_policys_weights(tmp_path):
    summary = train(
        compose_cfg([*TINY, "algo=grpo", "rollout.engine=standin", "logger=none"]), run_dir=tmp_path
    )
    engine = BUILT[-1]
    assert isinstance(engine, StandInEngine)
    assert [p["step"] for p in engine.pushes] == [0, 1, 2]
    assert len(engine.calls) == 2  # one rollout per iteration
    final = load_file(tmp_path / "final" / "model.safetensors")
    mine = dict(engine.copy.model.named_parameters())
    assert all(torch.equal(mine[k], final[k]) for k in mine if k in final)
    assert summary is not None and (tmp_path / "metrics.jsonl").is_file()


def test_a_resumed_run_pushes_the_restored_weights_before_it_samples(tmp_path):
    overrides = [*TINY, "rollout.engine=standin", "logger=none", "trainer.save_every=1"]
    whole = tmp_path / "whole"
    train(compose_cfg(overrides), run_dir=whole)
    uninterrupted = BUILT[-1]
    cut = tmp_path / "cut"  # a run "interrupted" after step 1: its checkpoint and its rows
    shutil.copytree(whole / "checkpoints" / "step_000001", cut / "checkpoints" / "step_000001")
    shutil.copy(whole / "metrics.jsonl", cut / "metrics.jsonl")
    train(compose_cfg(overrides), run_dir=cut)  # trainer.resume=auto
    resumed = BUILT[-1]
    assert resumed is not uninterrupted
    # the restored step-1 weights pushed before the resumed run's first sampling, then step 2's
    assert [p["step"] for p in resumed.pushes] == [1, 2]
    assert [p["checksum"] for p in resumed.pushes] == [p["checksum"] for p in uninterrupted.pushes[1:]]
    assert metrics(cut) == metrics(whole)  # and the resumed run is the same run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_under_torchrun_every_rank_pushes_the_same_weights_into_its_own_engine(tmp_path, parallel):
    """2 ranks (gloo, one thread each), a stand-in engine per rank: each samples its half of the global
    batch and gets the same pushes (the ranks' policies are equal after every all-reduced update; under
    fsdp2 each push gathers the sharded parameters whole)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(REPO)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    worker = REPO / "tests" / "rollout_standin_worker.py"
    res = subprocess.run(
        [*torchrun, str(worker), str(tmp_path), f"trainer.parallel={parallel}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        assert [p["step"] for p in r["pushes"]] == [0, 1, 2]
        assert r["rows"] == [8, 8]  # 4 prompts x 4 completions per iteration, half on each rank
    assert [p["checksum"] for p in ranks[0]["pushes"]] == [p["checksum"] for p in ranks[1]["pushes"]]
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    names = ranks[0]["pushes"][-1]["names"]
    assert ranks[0]["final"] == ranks[1]["final"] == checksum((n, final[n]) for n in names)


# -- the vLLM engine's CPU-testable parts --------------------------------------------------------
def test_vllm_sampling_params_are_rlx_sampling_settings():
    kw = sampling_params_kwargs(Sampling(0.7, 5, 0.9, 3), 3, eos_id=2)
    assert kw["temperature"] == 0.7 and kw["top_k"] == 5 and kw["top_p"] == 0.9 and kw["max_tokens"] == 3
    assert kw["stop_token_ids"] == [2] and kw["ignore_eos"] is False
    assert kw["n"] == 1 and kw["min_p"] == 0.0 and kw["repetition_penalty"] == 1.0 and kw["min_tokens"] == 0
    off = sampling_params_kwargs(Sampling(), 4, eos_id=None)
    assert off["top_k"] == -1 and off["top_p"] == 1.0 and off["temperature"] == 1.0  # vLLM's "off"
    assert off["stop_token_ids"] is None and off["ignore_eos"] is True  # no EOS: always max_tokens


def test_vllm_outputs_padded_as_policy_generate_returns_them():
    task = SortTask(length=4, vocab=10, eval_size=8)
    torch.manual_seed(0)
    policy = build_tiny_gpt(task, n_layer=1, n_embd=32, n_head=2)
    ro = sample_groups(policy, task.train_batch(0, 6), 3, Sampling(max_new_tokens=4))
    eos = policy.eos_id
    assert eos is not None and (ro.mask == 0).any()  # some rows ended early
    # what vLLM hands back: each row's ids through its EOS (stop) or max_tokens ids (length)
    lists = [row[m.bool()].tolist() for row, m in zip(ro.tokens, ro.mask)]
    stopped = [eos in ids for ids in lists]
    tokens, mask = pad_completions(lists, stopped, 4, eos, policy.pad_id)
    assert torch.equal(tokens, ro.tokens) and torch.equal(mask, ro.mask)
    # a vLLM version that leaves the stop token out of token_ids: the EOS is put back
    tokens, mask = pad_completions([[5], [5, 6, 7, 8]], [True, False], 4, eos, policy.pad_id)
    assert tokens.tolist() == [[5, eos, policy.pad_id, policy.pad_id], [5, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_importing_the_vllm_engine_does_not_import_vllm():
    code = "import sys, rlx.rollout.vllm_engine; from rlx.rollout.engines import ENGINES; ENGINES.names(); "
    code += "assert 'vllm' not in sys.modules, 'vllm was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- bad input: one line, exit 2 -----------------------------------------------------------------
def _bad(args: list[str], capsys, tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlx: error: ") and "\n" not in err, err
    assert not (tmp_path / "outputs").exists()  # refused before anything was written
    return err


def test_unknown_engine_is_refused(capsys, tmp_path, monkeypatch):
    err = _bad(["rollout.engine=sglang"], capsys, tmp_path, monkeypatch)
    assert "rollout.engine='sglang' is not a rollout engine; known: " in err and "hf" in err and "vllm" in err


@pytest.mark.skipif(vllm_installed(), reason="vLLM is installed in this environment")
def test_vllm_engine_without_vllm_installed_is_refused(capsys, tmp_path, monkeypatch):
    err = _bad(["rollout.engine=vllm"], capsys, tmp_path, monkeypatch)
    assert "rollout.engine=vllm needs vLLM, which is not installed: pip install 'rlx[vllm]'" in err


def test_vllm_engine_without_a_gpu_is_refused(capsys, tmp_path, monkeypatch):
    # an importable (empty) package named vllm stands for an installed vLLM: the check only finds it
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert vllm_installed()
    err = _bad(["rollout.engine=vllm", "trainer.device=cpu"], capsys, tmp_path, monkeypatch)
    assert "rollout.engine=vllm needs a CUDA GPU" in err and "the training device is cpu" in err
    assert "vllm" not in sys.modules  # found, never imported


def test_engine_settings_are_checked(tmp_path):
    with pytest.raises(RlxError, match=r"rollout\.vllm_gpu_memory_utilization must be in \(0, 1\], got 1.5"):
        plan(compose_cfg([*TINY, "rollout.vllm_gpu_memory_utilization=1.5"]))
    with pytest.raises(RlxError, match=r"rollout\.vllm_max_model_len must be in \[1, 2\*\*31\)"):
        plan(compose_cfg([*TINY, "rollout.vllm_max_model_len=0"]))
    assert plan(compose_cfg(TINY)).rollout.engine == "hf"  # the default


def test_readme_names_the_engines():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "rollout.engine=vllm" in readme and "untested here" in readme
