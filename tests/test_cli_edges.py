"""Edges of the command line, each as a user meets it: Hydra's shell completion through `rlx`,
Hydra's hints kept, `rlx --version`, `+key` refused, `rlx sample` prompts in the format `rlx eval`
prints, and a saved model that transformers' pipeline runs as `rlx sample` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlx.cli import main
from rlx.train import train
from tests.conftest import TINY, compose_cfg, rlx_in_process, rlx_refused, run_rlx

BIN = str(Path(sys.executable).parent)


def test_bash_completion_installed_through_hydra_completes_rlx_train(tmp_path):
    script = run_rlx("train", "-sc", "install=bash", cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    assert "complete -o nospace -o default -F hydra_bash_completion rlx" in script.stdout
    probe = """
eval "$SCRIPT"
for line in "rlx train algo=gr" "rlx train trainer.se" "rlx tr"; do
  COMP_LINE="$line"; COMP_WORDS=($line); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); COMP_POINT=${#line}
  hydra_bash_completion; echo "${COMPREPLY[*]}"
done
"""
    env = {**os.environ, "SCRIPT": script.stdout, "PATH": f"{BIN}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["algo=grpo", "trainer.seed=", "train"]
    assert "unknown command" not in out.stderr


def test_a_forgotten_m_keeps_hydras_hint(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "algo=grpo,dapo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("rlx: error: Ambiguous value for argument 'algo=grpo,dapo'")
    assert "To sweep over it, add --multirun to your command line" in err


def test_version(tmp_path):
    res = run_rlx("--version", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "rlx 0.1.0"


def test_an_added_unknown_key_is_refused_with_the_sections_keys(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "+trainer.foo=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("rlx: error: unknown key 'trainer.foo' (rlx would ignore it); keys of trainer: ")
    assert "group_size, keep_checkpoints, lr," in err
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("metrics.jsonl"))


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    """A saved initial model: random weights run to the answer length rather than stop at once."""
    run = tmp_path_factory.mktemp("run")
    train(compose_cfg([*TINY, "trainer.steps=0", "logger=none"]), run_dir=run)
    return run


def test_sample_takes_prompts_as_rlx_eval_prints_them(untrained_run, tmp_path):
    lists = rlx_in_process(
        "sample", str(untrained_run), "-p", "[8, 2, 7, 0]", "--no-base", "--json", cwd=tmp_path
    )
    texts = rlx_in_process("sample", str(untrained_run), "-p", "8 2 7 0", "--no-base", "--json", cwd=tmp_path)
    assert lists.returncode == 0 and texts.returncode == 0, lists.stderr + texts.stderr
    assert json.loads(lists.stdout) == json.loads(texts.stdout)
    assert json.loads(lists.stdout)["prompt"] == "8 2 7 0"
    bad = rlx_refused("sample", str(untrained_run), "-p", "8 x 7 0", "--no-base", cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "cannot be encoded by model tiny_gpt" in bad.stderr and "look like '" in bad.stderr


def test_generation_config_makes_transformers_pipeline_answer_like_rlx_sample(untrained_run, tmp_path):
    from transformers import pipeline

    final = untrained_run / "final"
    gen = json.loads((final / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == 4 and gen["do_sample"] is False
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 0
    prompts = ["8 2 7 0", "3 1 0 2", "9 5 5 1"]
    pipe = pipeline("text-generation", model=str(final), tokenizer=str(final), device="cpu")
    answers = [pipe(p, return_full_text=False)[0]["generated_text"].strip() for p in prompts]
    res = rlx_in_process("sample", str(untrained_run), *(a for p in prompts for a in ("-p", p)), "--no-base",
                  "--json", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    rlx_answers = [json.loads(line)["model"].strip() for line in res.stdout.splitlines()]
    assert answers == rlx_answers
    # and it stopped where rlx stops: the task's 4 answer tokens (or EOS), not transformers' max_length
    tok = pipe.tokenizer
    new_tokens = [
        len(pipe(p, return_tensors=True)[0]["generated_token_ids"]) - len(tok(p)["input_ids"])
        for p in prompts
    ]
    assert max(new_tokens) == 4 and min(new_tokens) >= 1
