"""model=hf on a tiny GPT-2 that the test builds and saves (no hub), LoRA, text tasks, rlx sample."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rlx.errors import RlxError
from rlx.models.hf import build_hf
from rlx.tasks.sort import SortTask
from rlx.train import train
from tests.conftest import REPO, compose_cfg, rlx_in_process

DATA = REPO / "tests" / "data"


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A 1-layer GPT-2 with a word-level tokenizer that has EOS but NO pad token (like GPT-2's)."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    words = ["<|endoftext|>", "<unk>", *map(str, range(10))]
    words += "a an the name primary colour is water wet say hello give number summarise text".split()
    words += ["###", "instruction:", "response:", "input:", "below", "animal", "from", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(words), n_positions=256, n_embd=32, n_layer=1, n_head=2, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_loads_a_local_directory_and_handles_the_missing_pad_token(tiny_gpt2):
    policy = build_hf(SortTask(eval_size=4), name_or_path=str(tiny_gpt2))
    assert policy.tokenizer.pad_token == "<|endoftext|>" and policy.tokenizer.padding_side == "left"
    _, mask = policy.encode(([3, 1], [5, 4, 2, 0]))
    assert mask[0].tolist() == [0, 0, 1, 1]  # left padded
    assert not policy.chat_template  # this tokenizer has no chat template


def test_chat_template_wraps_prompts_when_the_tokenizer_has_one(tiny_gpt2, tmp_path):
    policy = build_hf(SortTask(eval_size=4), name_or_path=str(tiny_gpt2))
    policy.tokenizer.chat_template = "{% for m in messages %}say {{ m['content'] }} ###{% endfor %}"
    policy.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((tiny_gpt2 / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((tiny_gpt2 / "model.safetensors").read_bytes())
    chat = build_hf(SortTask(eval_size=4), name_or_path=str(tmp_path))
    assert chat.chat_template and chat.format_prompts(["3 1"]) == ["say 3 1 ###"]
    assert chat.prompt_token_ids(["3 1"]) == [chat.tokenizer("say 3 1 ###")["input_ids"]]
    plain = build_hf(SortTask(eval_size=4), name_or_path=str(tmp_path), chat_template=False)
    assert plain.format_prompts(["3 1"]) == ["3 1"]


def test_missing_directory_and_uncached_hub_id_fail_in_one_line(tmp_path, hub_offline):
    with pytest.raises(RlxError, match="no such directory"):
        build_hf(SortTask(eval_size=4), name_or_path=str(tmp_path / "nope"))
    with pytest.raises(RlxError, match=r"not in the Hugging Face cache, and the machine is offline"):
        build_hf(SortTask(eval_size=4), name_or_path="rlx-test/not-a-cached-model")


def test_sft_and_dpo_on_an_hf_model(tiny_gpt2, tmp_path):
    common = ["model=hf", f"model.name_or_path={tiny_gpt2}", "task.eval_size=8", "logger=none"]
    common += ["trainer.steps=2", "algo.batch_size=4"]
    train(
        compose_cfg(["algo=sft", *common, f"data.train={DATA / 'sort_sft_tiny.jsonl'}"]),
        run_dir=tmp_path / "sft",
    )
    sft_final = tmp_path / "sft" / "final"
    model = AutoModelForCausalLM.from_pretrained(sft_final)  # a plain transformers directory
    assert model.config.n_layer == 1
    cfg = compose_cfg(
        [
            "algo=dpo",
            *common,
            f"model.init_from={sft_final}",
            f"data.train={DATA / 'sort_pairs_tiny.jsonl'}",
            f"data.eval={DATA / 'sort_pairs_tiny.jsonl'}",
        ]
    )
    summary = train(cfg, run_dir=tmp_path / "dpo")
    assert "eval/rewards/accuracy" in summary


def test_lora_trains_adapters_and_saves_merged_weights(tiny_gpt2, tmp_path):
    import peft  # noqa: F401  (the lora extra: `make install` installs it, so this test always runs)

    cfg = compose_cfg(
        [
            "algo=sft",
            "model=hf",
            f"model.name_or_path={tiny_gpt2}",
            "model.lora.r=4",
            "model.lora.target_modules=[c_attn]",
            f"data.train={DATA / 'sort_sft_tiny.jsonl'}",
            "task.eval_size=8",
            "logger=none",
            "trainer.steps=3",
            "trainer.lr=0.05",
            "algo.batch_size=4",
        ]
    )
    train(cfg, run_dir=tmp_path)
    final = load_file(tmp_path / "final" / "model.safetensors")
    base = load_file(tiny_gpt2 / "model.safetensors")
    assert not any("lora" in k for k in final)  # merged: loads as a plain GPT-2
    assert not torch.equal(
        final["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"]
    )
    assert torch.equal(final["transformer.h.0.mlp.c_fc.weight"], base["transformer.h.0.mlp.c_fc.weight"])


def test_dolly_file_as_a_text_task_for_online_training(tiny_gpt2, tmp_path):
    cfg = compose_cfg(
        [
            "model=hf",
            f"model.name_or_path={tiny_gpt2}",
            "task=text",
            f"task.path={DATA / 'dolly_tiny.jsonl'}",
            "task.eval_size=2",
            "task.max_new_tokens=4",
            "reward=custom",
            "reward.fn=tests.rewards_for_tests:text_length",
            "trainer.steps=2",
            "trainer.prompts_per_step=2",
            "trainer.group_size=2",
            "trainer.eval_every=0",
            "logger=none",
        ]
    )
    summary = train(cfg, run_dir=tmp_path / "grpo")
    assert summary["eval/exact"] == 0.0 and summary["eval/reward"] >= 0
    sample = json.loads((tmp_path / "grpo" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("Below is an instruction") and sample["prompt"].endswith(
        "### Response:\n"
    )
    # SFT on the same Dolly file (instruction/context/response recognised)
    cfg = compose_cfg(
        [
            "algo=sft",
            "model=hf",
            f"model.name_or_path={tiny_gpt2}",
            "task=text",
            f"task.path={DATA / 'dolly_tiny.jsonl'}",
            "task.eval_size=2",
            f"data.train={DATA / 'dolly_tiny.jsonl'}",
            "trainer.steps=1",
            "logger=none",
        ]
    )
    summary = train(cfg, run_dir=tmp_path / "sft")
    assert "eval/exact" not in summary  # no ground truth: no task evaluation


def test_rlx_sample_shows_the_base_model_beside_the_trained_one(tiny_gpt2, tmp_path):
    args = ["algo=sft", "model=hf", f"model.name_or_path={tiny_gpt2}", "task.eval_size=8", "logger=none"]
    args += [f"data.train={DATA / 'sort_sft_tiny.jsonl'}", "trainer.steps=2", "hydra.run.dir=run"]
    assert rlx_in_process("train", *args, cwd=tmp_path).returncode == 0
    res = rlx_in_process("sample", "run", "-p", "3 1 0 2", "-p", "5 4 1 1", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["3 1 0 2", "5 4 1 1"] and all(
        "base" in r and "model" in r for r in rows
    )
    res = rlx_in_process("sample", "run", cwd=tmp_path)
    assert res.returncode == 2 and "rlx: error: give prompts" in res.stderr
