"""The sort RLHF pipeline (experiment=rlhf_sort) end to end at toy size, each stage reading the last.

The RL stages: PPO and GRPO on the trained reward model (reward=model), with KL to the SFT model.
"""

from __future__ import annotations

import json

from transformers import AutoConfig

from rlx.cli import main
from rlx.data.sort import write_sort_data
from rlx.train import train
from tests.conftest import TINY_GPT, compose_cfg, rlx_in_process

TOY = [*TINY_GPT, "task.eval_size=16", "logger=none", "trainer.eval_every=0"]


def test_rlhf_sort_pipeline_end_to_end(tmp_path, capsys):
    root = tmp_path / "rlhf"
    write_sort_data(root / "data", train=48, heldout=16, task_eval_size=16)
    # stage 1 through the CLI: the experiment puts the run in rlhf.dir/sft
    res = rlx_in_process(
        "train",
        "experiment=rlhf_sort",
        "algo=sft",
        f"rlhf.dir={root}",
        *TOY,
        "algo.batch_size=8",
        "trainer.steps=3",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (root / "sft" / "final" / "model.safetensors").is_file()
    stage = ["experiment=rlhf_sort", f"rlhf.dir={root}", *TOY]
    # reward model from the SFT trunk, on the pairs
    rm = train(compose_cfg([*stage, "algo=rm", "algo.batch_size=8", "trainer.steps=3"]), run_dir=root / "rm")
    assert 0.0 <= rm["eval/pair_accuracy"] <= 1.0
    assert AutoConfig.from_pretrained(root / "rm" / "final").num_labels == 1
    # DPO from the same SFT model on the same pairs
    cfg = compose_cfg([*stage, "algo=dpo", "algo.batch_size=8", "trainer.steps=3"])
    assert cfg.model.init_from == f"{root}/sft/final" and cfg.data.train == f"{root}/data/pairs_train.jsonl"
    dpo = train(cfg, run_dir=root / "dpo")
    assert "eval/rewards/accuracy" in dpo and "eval/exact" in dpo
    # the RL stages: PPO and GRPO from the SFT model, scored by the reward model, with KL to the SFT model
    on_rm = ["reward=model", f"reward.path={root}/rm/final"]
    small = ["trainer.steps=2", "trainer.prompts_per_step=4", "trainer.group_size=4"]
    for algo in ("grpo", "ppo"):
        cfg = compose_cfg([*stage, f"algo={algo}", *on_rm, *small])
        assert cfg.kl.ref_refresh == 0 and cfg.kl.coef > 0 and cfg.model.init_from == f"{root}/sft/final"
        train(cfg, run_dir=root / algo)
        first = json.loads((root / algo / "metrics.jsonl").read_text().splitlines()[0])
        assert first["kl/ref"] < 1e-5  # the reference is the SFT model the policy starts from
        assert "reward/mean" in first
    # rlx eval reads each stage's directory
    for run in ("sft", "dpo", "grpo", "ppo"):
        main(["eval", str(root / run), "--json", "--device", "cpu"])
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert 0.0 <= out["eval/exact"] <= 1.0
