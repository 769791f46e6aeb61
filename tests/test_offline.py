"""The offline loop: a few real steps of SFT, RM, DPO, IPO and SPO on CPU, masks, metrics, state."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from rlx.data.encode import pad_batch
from rlx.data.sort import write_sort_data
from rlx.errors import RlxError
from rlx.models import load_pretrained
from rlx.tasks.sort import SortTask
from rlx.train import build, plan, train
from tests.conftest import TINY_GPT, compose_cfg

OFFLINE = [*TINY_GPT, "task.eval_size=16", "logger=none", "trainer.steps=2", "algo.batch_size=8"]


@pytest.fixture(scope="module")
def sort_data(tmp_path_factory) -> dict[str, Path]:
    # one pair per prompt (sorted vs wrong), so pair files have 48 rows like the SFT files
    out = tmp_path_factory.mktemp("data")
    return write_sort_data(out, train=48, heldout=16, task_eval_size=16, candidates=2)


def data_args(sort_data, kind: str) -> list[str]:
    return [f"data.train={sort_data[f'{kind}_train']}", f"data.eval={sort_data[f'{kind}_heldout']}"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory, sort_data) -> dict[str, torch.Tensor]:
    # the policy as a run builds it (seeded), before any step
    run = tmp_path_factory.mktemp("init")
    session = build(compose_cfg(["algo=sft", *OFFLINE, *data_args(sort_data, "sft")]), run_dir=run)
    session.trainer.policy.save(run / "initial")
    session.tracker.close()
    return load_file(run / "initial" / "model.safetensors")


EXPECTED = {
    "sft": ({"loss/sft", "grad_norm", "lr"}, {"eval/loss", "eval/exact", "eval/reward"}),
    "rm": ({"rm/accuracy", "rm/margin"}, {"eval/pair_accuracy", "eval/margin", "eval/loss"}),
    "dpo": (
        {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen"},
        {"eval/rewards/accuracy", "eval/rewards/margin", "eval/exact"},
    ),
    "ipo": ({"rewards/margin", "rewards/accuracy"}, {"eval/rewards/accuracy", "eval/exact"}),
    "spo": ({"rewards/margin", "score/gap"}, {"eval/rewards/accuracy", "eval/exact"}),
}


@pytest.mark.parametrize("algo", ["sft", "rm", "dpo", "ipo", "spo"])
def test_each_offline_algo_trains_a_few_steps(algo, tmp_path, sort_data, initial_weights):
    kind = "sft" if algo == "sft" else "pairs"
    summary = train(compose_cfg([f"algo={algo}", *OFFLINE, *data_args(sort_data, kind)]), run_dir=tmp_path)
    logged = rows(tmp_path)
    assert logged[0]["step"] == 0 and logged[0]["data/rows"] == 48  # the data report
    train_rows = [r for r in logged if "loss/total" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    step_keys, eval_keys = EXPECTED[algo]
    step_keys = {*step_keys, "time/update_s", "memory/peak_rss_gb"}
    assert step_keys <= set(train_rows[0]), step_keys - set(train_rows[0])
    assert eval_keys <= set(summary), eval_keys - set(summary)
    assert all(math.isfinite(v) for r in logged for v in r.values())
    final = load_file(tmp_path / "final" / "model.safetensors")
    if algo == "rm":  # a sequence-classification checkpoint with a scalar head
        config = AutoConfig.from_pretrained(tmp_path / "final")
        assert config.architectures == ["GPT2ForSequenceClassification"] and config.num_labels == 1
        assert final["score.weight"].shape[0] == 1
        with pytest.raises(RlxError, match="is a reward model"):  # rlx eval / sample refuse it
            load_pretrained(tmp_path / "final", SortTask(eval_size=4), "rm")
    else:
        assert any(not torch.equal(final[k], initial_weights[k]) for k in initial_weights)


def test_sft_loss_covers_completion_tokens_only(tmp_path, sort_data):
    cfg = compose_cfg(["algo=sft", *OFFLINE, *data_args(sort_data, "sft")])
    session = build(cfg, run_dir=tmp_path)
    t = session.trainer
    # the completion mask covers the completion and its EOS, nothing of the prompt
    assert len(t.data.first[0]) == 4 + 1 and t.data.first[0][-1] == t.policy.eos_id
    loss, _ = t.feed.micro_loss(t.data, [0], None, norm=5.0)
    # by hand: one row, no padding; NLL of the 5 completion tokens from a plain forward pass
    ids = torch.tensor([t.data.prompts[0] + t.data.first[0]])
    with torch.no_grad():
        logp = torch.log_softmax(t.policy.model(input_ids=ids).logits[0].float(), -1)
    p = len(t.data.prompts[0])
    manual = -sum(logp[j - 1, ids[0, j]] for j in range(p, ids.shape[1])) / 5
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # and changing the prompt tokens' own likelihood does not enter: the loss is unchanged when the
    # prompt row is scored with a different (left) padding width
    p_ids, p_mask, c_ids, c_mask = pad_batch([[0, 0, *t.data.prompts[0]]], [t.data.first[0]], 0, t.device)
    p_mask[0, :2] = 0
    with torch.no_grad():
        lp = torch.log_softmax(t.policy.completion_logits(p_ids, p_mask, c_ids, c_mask).float(), -1)
    padded = -lp.gather(-1, c_ids.unsqueeze(-1)).squeeze(-1)[c_mask.bool()].mean()
    assert padded.item() == pytest.approx(manual.item(), rel=1e-4)
    session.tracker.close()


def test_reward_model_score_does_not_depend_on_batch_padding(tmp_path, sort_data):
    cfg = compose_cfg(["algo=rm", *OFFLINE, *data_args(sort_data, "pairs")])
    session = build(cfg, run_dir=tmp_path)
    t = session.trainer
    t.data.texts[1].chosen = "0 1 2 3 4 5 6 7"  # a longer row: row 0 is padded in a batch with it
    with torch.no_grad():
        alone_c, alone_r = t.feed.rewards(t.data, [0])
        batch_c, batch_r = t.feed.rewards(t.data, [0, 1])
    assert batch_c[0].item() == pytest.approx(alone_c.item(), abs=1e-5)
    assert batch_r[0].item() == pytest.approx(alone_r.item(), abs=1e-5)
    session.tracker.close()


def test_dpo_starts_at_zero_implicit_reward_and_log2_loss(tmp_path, sort_data):
    cfg = compose_cfg(["algo=dpo", *OFFLINE, *data_args(sort_data, "pairs"), "trainer.steps=1"])
    train(cfg, run_dir=tmp_path)
    first = next(r for r in rows(tmp_path) if "loss/total" in r)
    # pi_ref is the starting policy, so at the first step z = 0 and L = log 2
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss/total"] == pytest.approx(math.log(2), abs=1e-6)


def test_precomputed_reference_gives_the_same_updates(tmp_path, sort_data):
    base = ["algo=dpo", *OFFLINE, *data_args(sort_data, "pairs"), "trainer.steps=3", "trainer.eval_every=0"]
    train(compose_cfg(base), run_dir=tmp_path / "batch")
    train(compose_cfg([*base, "algo.precompute_ref=true"]), run_dir=tmp_path / "pre")
    a = [r["loss/total"] for r in rows(tmp_path / "batch") if "loss/total" in r]
    b = [r["loss/total"] for r in rows(tmp_path / "pre") if "loss/total" in r]
    assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("algo", ["sft", "dpo"])
def test_micro_batches_give_the_same_update(algo, tmp_path, sort_data):
    kind = "sft" if algo == "sft" else "pairs"
    base = [f"algo={algo}", *OFFLINE, *data_args(sort_data, kind), "trainer.steps=1", "algo.task_eval=false"]
    train(compose_cfg(base), run_dir=tmp_path / "whole")
    train(compose_cfg([*base, "trainer.micro_batch_size=3"]), run_dir=tmp_path / "micro")
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "micro" / "final" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


def test_sft_with_packing_trains(tmp_path, sort_data):
    cfg = compose_cfg(["algo=sft", *OFFLINE, *data_args(sort_data, "sft"), "algo.packing=true"])
    session = build(cfg, run_dir=tmp_path)
    assert len(session.trainer.packed) < 48  # several examples per row
    ids, labels, pos = session.trainer.packed[0]
    assert sum(labels) == 5 * (len(ids) // 11) and pos[:11] == list(range(11))  # 6 prompt + 5 completion
    session.tracker.close()
    train(cfg, run_dir=tmp_path / "run")
    assert rows(tmp_path / "run")[-1]["eval/loss"] > 0


def test_truncation_is_counted_not_dropped(tmp_path, sort_data):
    cfg = compose_cfg(["algo=sft", *OFFLINE, *data_args(sort_data, "sft"), "algo.max_completion_len=3"])
    with pytest.warns(RuntimeWarning, match="truncated 0 prompt"):
        train(cfg, run_dir=tmp_path)
    report = rows(tmp_path)[0]
    assert report["data/truncated_completions"] == 48 and report["data/rows"] == 48


def test_offline_trainer_state_round_trips(tmp_path, sort_data):
    cfg = compose_cfg(["algo=dpo", *OFFLINE, *data_args(sort_data, "pairs"), "algo.batch_size=20"])
    a = build(cfg, run_dir=tmp_path / "a")
    for _ in range(4):  # batches of 20, 20, 8 (the epoch's rest), then 20 of the next epoch
        a.trainer.train_step(a.trainer.next_batch())
        a.trainer.step += 1
    torch.save(a.trainer.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    b = build(cfg, run_dir=tmp_path / "b")
    b.trainer.load_state_dict(state)
    assert (b.trainer.step, b.trainer.epoch, b.trainer.index) == (4, 1, 20) == (a.trainer.step, 1, 20)
    assert b.trainer.next_batch() == a.trainer.next_batch()  # the same batches from here on
    for (k, x), (_, y) in zip(
        a.trainer.feed.ref.model.state_dict().items(), b.trainer.feed.ref.model.state_dict().items()
    ):
        assert torch.equal(x, y), k
    a.tracker.close()
    b.tracker.close()


def test_offline_bad_input_fails_in_plan(sort_data, tmp_path):
    with pytest.raises(RlxError, match=r"algo=dpo needs data.train=FILE"):
        plan(compose_cfg(["algo=dpo", *OFFLINE]))
    with pytest.raises(RlxError, match=r"data.train=.*nope.jsonl: no such file"):
        plan(compose_cfg(["algo=sft", *OFFLINE, f"data.train={tmp_path / 'nope.jsonl'}"]))
    with pytest.raises(RlxError, match=r"valid keys: beta, label_smoothing"):
        plan(compose_cfg(["algo=dpo", *OFFLINE, *data_args(sort_data, "pairs"), "+algo.loss.margin=1"]))
    with pytest.raises(RlxError, match=r"algo.packing is for algo=sft only"):
        plan(compose_cfg(["algo=dpo", *OFFLINE, *data_args(sort_data, "pairs"), "algo.packing=true"]))
    # an SFT file given to DPO: the missing columns are named
    cfg = compose_cfg(["algo=dpo", *OFFLINE, f"data.train={sort_data['sft_train']}"])
    with pytest.raises(RlxError, match=r"missing chosen \(column 'chosen'\), rejected"):
        build(cfg, run_dir=tmp_path / "x")


@pytest.mark.parametrize("algo", ["sft", "dpo", "rm"])
def test_a_row_longer_than_the_context_is_cut_not_a_crash(algo, tmp_path, sort_data):
    # issue 14: one 70-token completion on tiny_gpt (64 positions) was an IndexError in the position
    # embedding; algo.max_completion_len (512) is not the limit that matters, the model's context is
    kind = "sft" if algo == "sft" else "pairs"
    lines = sort_data[f"{kind}_train"].read_text().splitlines()[:7]
    long = " ".join(str(i % 10) for i in range(70))
    row = {"prompt": "3 1 0 2", "completion": long} if kind == "sft" else {}
    if kind == "pairs":
        row = {"prompt": "3 1 0 2", "chosen": long, "rejected": "0 1 2 3"}
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join([json.dumps(row), *lines]) + "\n")
    cfg = compose_cfg(
        [f"algo={algo}", *OFFLINE, f"data.train={path}", f"data.eval={path}", "trainer.steps=1"]
    )
    with pytest.warns(RuntimeWarning, match="1 row\\(s\\) cut to fit the model's context of 64 positions"):
        summary = train(cfg, run_dir=tmp_path / "run")
    report = rows(tmp_path / "run")[0]
    assert report["data/rows"] == 8 and report["data/truncated_completions"] == 1
    assert report["eval_data/truncated_completions"] == 1 and report["data/truncated_prompts"] == 0
    assert all(math.isfinite(v) for v in summary.values() if isinstance(v, float))
    session = build(cfg, run_dir=tmp_path / "built")
    data = session.trainer.data
    assert max(len(p) + len(c) for p, c in zip(data.prompts, data.first)) == 64  # filled, not over
    session.tracker.close()
