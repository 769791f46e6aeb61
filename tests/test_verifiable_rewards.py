"""Verifiable rewards: dataset columns reach rewards, reward=math (math-verify), reward=format,
reward=combined with weights and per-component metrics, chat prompts, the arithmetic example."""

from __future__ import annotations

import json
import signal
import threading

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from rlx.data import read_examples
from rlx.errors import RlxError
from rlx.evaluate import evaluate
from rlx.models import Sampling
from rlx.models.hf import build_hf
from rlx.models.tokenizer import build_char_tokenizer, tiny_gpt2_config
from rlx.rewards import REWARDS, check_combined, score_completions, verified_correct
from rlx.rewards.format import R1_TEMPLATE
from rlx.tasks.text import TextPromptTask
from rlx.train import StopSignals, plan, train
from tests.conftest import compose_cfg, rlx_in_process, rlx_refused

TINY_CHAR = ["model=char_gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "logger=none"]
TINY_ONLINE = [
    "trainer.steps=2",
    "trainer.prompts_per_step=2",
    "trainer.group_size=2",
    "trainer.eval_every=0",
    "task.max_new_tokens=8",
    "task.eval_size=2",
]

# -- rewards the tests name with reward=custom reward.fn=tests.test_verifiable_rewards:... ---------


def answer_matches_prompt(prompts, completions, answer, level):
    """Passes only if each completion's `answer` and `level` are those of its own prompt's row."""
    for prompt, ans, lvl in zip(prompts, answer, level):
        a, b = (int(x) for x in prompt.removeprefix("What is ").removesuffix("?").split(" + "))
        assert ans == f"{a} + {b} = {a + b}\n#### {a + b}", (prompt, ans)
        assert lvl == (1 if a < 10 else 2), (prompt, lvl)
    return [1.0 for _ in completions]


def every_column(prompts, completions, **columns):
    """A reward with **kwargs gets every column of the dataset."""
    assert {"question", "answer", "source", "reference", "completion_text"} <= set(columns), sorted(columns)
    assert all(s == "gsm8k-like" for s in columns["source"])
    return [0.5 for _ in completions]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _sums(n: int, start: int = 1) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        a, b = i % 37 + 1, (7 * i) % 53 + 2
        rows.append({"prompt": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- 1. every column reaches the reward ------------------------------------------------------------


def test_every_dataset_column_reaches_a_custom_reward(tmp_path):
    rows = [{**r, "level": 1 if int(r["prompt"].split()[2]) < 10 else 2} for r in _sums(12)]
    data = _jsonl(tmp_path / "sums.jsonl", rows)
    cfg = compose_cfg(
        [
            *TINY_CHAR,
            *TINY_ONLINE,
            "task=text",
            f"task.path={data}",
            "reward=custom",
            "reward.fn=tests.test_verifiable_rewards:answer_matches_prompt",
        ]
    )
    train(cfg, run_dir=tmp_path / "run")
    first = _metrics(tmp_path / "run")[0]
    assert first["reward/mean"] == 1.0  # the reward ran (and its assertions held) on every completion


def test_mapped_prompt_column_and_kwargs_reward_get_all_columns(tmp_path):
    rows = [{"question": r["prompt"], "answer": r["answer"], "source": "gsm8k-like"} for r in _sums(10)]
    data = _jsonl(tmp_path / "q.jsonl", rows)
    task = TextPromptTask(path=str(data), columns={"prompt": "question"}, eval_size=2)
    batch = task.train_batch(0, 4)
    assert all(p.startswith("What is") for p in batch.prompts)
    for i, p in enumerate(batch.prompts):  # columns stay aligned with their prompt
        assert batch.columns["question"][i] == p
        assert batch.columns["answer"][i].startswith(p.removeprefix("What is ").removesuffix("?"))
    cfg = compose_cfg(
        [
            *TINY_CHAR,
            *TINY_ONLINE,
            "task=text",
            f"task.path={data}",
            "task.columns.prompt=question",
            "reward=custom",
            "reward.fn=tests.test_verifiable_rewards:every_column",
        ]
    )
    train(cfg, run_dir=tmp_path / "run")
    assert _metrics(tmp_path / "run")[0]["reward/mean"] == 0.5


# -- 2. reward=math ----------------------------------------------------------------------------------


def math(completions, golds, **kw) -> list[float]:
    reward = REWARDS.resolve({"name": "math", **kw}, where="reward")
    return reward(["q"] * len(completions), completions, answer=golds)


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("37 + 58 = 95, so the answer is 95.", "37 + 58 = 95\n#### 95", 1.0),  # right, GSM8K reference
        ("The answer is 96.", "37 + 58 = 95\n#### 95", 0.0),  # wrong
        ("I am not sure.", "#### 95", 0.0),  # no answer
        ("", "#### 95", 0.0),  # empty
        ("First 3 + 4 = 7, then 7 * 2 = 14, so \\boxed{12} (not 14).", "12", 1.0),  # boxed among numbers
        ("Half of it: \\boxed{\\frac{1}{2}}", "0.5", 1.0),  # equivalent forms
        ("It is 0.5", "\\frac{2}{4}", 1.0),
        ("That makes 1,000 apples.", "Total ... #### 1000", 1.0),  # thousands separator
        ("#### 1000", "Total ... #### 1,000", 1.0),
        ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),  # algebraically equal
        ("\\boxed{x^2 + 1}", "(x+1)^2", 0.0),
    ],
)
def test_math_reward_on_hand_written_completions(completion, gold, expected):
    assert math([completion], [gold]) == [expected]


def test_math_reward_extraction_modes():
    text = "<think>37+58=95, or maybe 94</think><answer>95</answer>"
    assert math([text], ["#### 95"], extract="answer_tag") == [1.0]
    assert math(["<think>95</think>"], ["#### 95"], extract="answer_tag") == [0.0]  # no <answer>
    assert math(["the sum is 95"], ["#### 95"], extract="boxed") == [0.0]  # boxed mode wants \boxed{}
    assert math(["the sum is \\boxed{95}"], ["#### 95"], extract="boxed") == [1.0]
    assert math(["95 then #### 94"], ["#### 95"], extract="gsm8k") == [0.0]
    assert math(["94 then #### 95"], ["#### 95"], extract="gsm8k") == [1.0]
    with pytest.raises(RlxError, match=r"reward\.extract='nope'"):
        REWARDS.get("math").meta["check"]({"extract": "nope"})


def test_math_reward_runs_under_rlx_signal_handlers_and_off_the_main_thread():
    right = ["so \\boxed{\\frac{3}{6}}"]
    with StopSignals():  # training's SIGINT/SIGTERM handlers stay in place, math-verify's alarm works
        before = signal.getsignal(signal.SIGINT)
        assert math(right, ["0.5"]) == [1.0]
        assert signal.getsignal(signal.SIGINT) is before
    out: list = []
    worker = threading.Thread(target=lambda: out.append(math(right, ["0.5"])))
    worker.start()
    worker.join()
    assert out == [[1.0]]  # no "signal only works in main thread" error


def test_unreadable_reference_answer_names_it():
    with pytest.raises(RlxError, match="cannot read an answer from the reference"):
        math(["42"], ["GSM8K-style, but nothing after the marker ####"])


# -- 3. reward=format and reward=combined ------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>37+58=95</think><answer>95</answer>", 1.0),
        ("<think>\nadd the tens\n</think>\n<answer>\n95\n</answer>\n", 1.0),
        ("<think>37+58=95</think>", 0.0),  # no answer block
        ("<answer>95</answer>", 0.0),  # no reasoning block
        ("95 <think>x</think><answer>95</answer>", 0.0),  # text before the template
        ("<think>x</think><answer>95</answer> and more", 0.0),  # text after it
        ("<think><think>x</think><answer>95</answer>", 0.0),  # nested think
        ("<think>x</think><answer>&</think><answer>72</answer>", 0.0),  # a tag inside a block
    ],
)
def test_format_reward_r1_template(completion, expected):
    reward = REWARDS.resolve("format", where="reward")
    assert reward(["q"], [completion]) == [expected]


def test_format_reward_custom_pattern_and_bad_regex():
    reward = REWARDS.resolve({"name": "format", "pattern": r"^.*#### \d+$"}, where="reward")
    assert reward(["q", "q"], ["so #### 12", "so 12"]) == [1.0, 0.0]
    with pytest.raises(RlxError, match="not a regular expression"):
        REWARDS.get("format").meta["check"]({"pattern": "(unclosed"})
    # conf/reward/format.yaml's default is the code's R1 template
    assert compose_cfg(["reward=format"]).reward.pattern == R1_TEMPLATE


def _combined(weights=None, components=("math", "format")):
    cfg = compose_cfg(["reward=combined", f"reward/components=[{','.join(components)}]"])
    node = dict(cfg.reward)
    node = {k: (dict(v) if hasattr(v, "keys") else v) for k, v in node.items()}
    node["components"] = {k: dict(v) for k, v in node["components"].items()}
    if weights:
        node["weights"] = {**node["weights"], **weights}
    return REWARDS.resolve(node, where="reward")


def test_combined_reward_weights_and_per_component_metrics():
    reward = _combined({"format": 0.5})
    completions = [
        "<think>37+58=95</think><answer>95</answer>",  # math 1, format 1
        "<think>37+58=94</think><answer>94</answer>",  # math 0, format 1
        "95",  # math 1, format 0
        "no idea",  # 0, 0
    ]
    mask = torch.ones(4, 3)
    metrics: dict[str, float] = {}
    total = score_completions(
        reward,
        ["q"] * 4,
        completions,
        {"answer": ["#### 95"] * 4, "completion_text": completions},
        mask,
        metrics,
    )
    assert total.tolist() == [1.5, 0.5, 1.0, 0.0]
    assert metrics == {"reward/math": 0.5, "reward/format": 0.5}
    assert verified_correct(reward, ["q"] * 4, completions, {"answer": ["#### 95"] * 4}) == [
        True,
        False,
        True,
        False,
    ]


def test_combined_reward_refuses_bad_weights_and_a_process_outcome_mix():
    with pytest.raises(RlxError, match=r"reward\.weights names formt, not among the components"):
        check_combined(dict(_combined({"formt": 1.0}).kwargs))
    reward = _combined(components=("math", "sort_tokens"))
    with pytest.raises(RlxError, match=r"mixes a process reward \(sort_tokens\) with outcome rewards"):
        check_combined(dict(reward.kwargs))


def test_combined_composes_from_the_command_line():
    cfg = compose_cfg(
        ["reward=combined", "reward.weights.format=0.25", "reward.components.math.column=solution"]
    )
    assert cfg.reward.components.math.column == "solution" and cfg.reward.weights.format == 0.25
    assert set(cfg.reward.components) == {"math", "format"}


# -- missing ground-truth column: refused at start-up ---------------------------------------------------


def test_missing_answer_column_is_refused_at_start_up(tmp_path):
    data = _jsonl(
        tmp_path / "q.jsonl", [{"prompt": f"What is {i} + 1?", "solution": str(i + 1)} for i in range(8)]
    )
    base = [*TINY_CHAR, *TINY_ONLINE, "task=text", f"task.path={data}", "task.ground_truth=null"]
    with pytest.raises(
        RlxError, match=r"reward=math verifies against column 'answer', which the data does not"
    ):
        plan(compose_cfg([*base, "reward=math"]))
    with pytest.raises(RlxError, match=r"reward.components.math=math verifies against column 'answer'"):
        plan(compose_cfg([*base, "reward=combined"]))
    plan(compose_cfg([*base, "reward=math", "reward.column=solution"]))  # mapped: fine
    # the task's own ground truth (by default reward=math's column) is checked too
    default_gt = r"task.ground_truth='answer' \(by default reward=math's reward.column\): .* has no such"
    with pytest.raises(RlxError, match=default_gt):
        plan(compose_cfg([*TINY_CHAR, *TINY_ONLINE, "task=text", f"task.path={data}", "reward=math"]))
    res = rlx_refused("train", *base, "reward=math", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("rlx: error: reward=math verifies against column 'answer'")


# -- 4. eval/exact: verified accuracy -------------------------------------------------------------------


def test_text_task_is_correct_verifies_against_its_ground_truth(tmp_path):
    data = _jsonl(tmp_path / "s.jsonl", _sums(6))
    task = TextPromptTask(path=str(data), eval_size=2, ground_truth="answer")
    assert task.has_ground_truth
    prompt, gold = task.eval_batch().prompts[0], task.eval_batch().columns["answer"][0]
    value = gold.rsplit("#### ", 1)[1]
    assert task.is_correct(prompt, f"<think>..</think><answer>{value}</answer>", answer=gold)
    assert not task.is_correct(prompt, "<answer>-1</answer>", answer=gold)
    assert not TextPromptTask(path=str(data), eval_size=2).has_ground_truth


# -- 5. chat prompts -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_model_dir(tmp_path_factory):
    """A 1-layer GPT-2 with rlx's character-level tokenizer and its chat template, saved and reloaded
    through save_pretrained / from_pretrained (no hub)."""
    path = tmp_path_factory.mktemp("char-gpt2")
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_gpt2_config(tok, n_layer=1, n_embd=32, n_head=2, n_positions=256)).save_pretrained(
        path
    )
    tok.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).chat_template  # the template survives the round trip
    return path


def test_chat_message_prompts_and_system_prompt_go_through_the_chat_template(tmp_path, char_model_dir):
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} + 2?"}], "answer": f"#### {i + 2}"}
        for i in range(6)
    ]
    data = _jsonl(tmp_path / "chat.jsonl", rows)
    task = TextPromptTask(path=str(data), eval_size=2, system_prompt="Think, then answer.")
    assert task.chat
    prompt = task.eval_batch().prompts[0]
    assert prompt[0] == {"role": "system", "content": "Think, then answer."} and prompt[1]["role"] == "user"
    policy = build_hf(task, name_or_path=str(char_model_dir))
    rendered = policy.format_prompts([prompt])[0]
    assert rendered == f"<|system|>Think, then answer.<|user|>{prompt[1]['content']}<|assistant|>"
    ids, mask = policy.encode([prompt])
    assert (
        ids[0][mask[0].bool()].tolist() == policy.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    )
    # string prompts with a system prompt become a chat too
    plain = TextPromptTask(
        path=str(_jsonl(tmp_path / "p.jsonl", _sums(6))), eval_size=2, system_prompt="Be brief."
    )
    assert plain.eval_batch().prompts[0][0]["role"] == "system"


def test_chat_prompts_without_a_chat_template_fail_at_start_up(tmp_path, char_model_dir):
    nochat = tmp_path / "nochat"
    tok = AutoTokenizer.from_pretrained(char_model_dir)
    tok.chat_template = None
    tok.save_pretrained(nochat)
    for name in ("config.json", "model.safetensors"):
        (nochat / name).write_bytes((char_model_dir / name).read_bytes())
    task = TextPromptTask(path=str(_jsonl(tmp_path / "p.jsonl", _sums(6))), eval_size=2, system_prompt="Hi")
    with pytest.raises(RlxError, match=r"has chat prompts .* no chat template"):
        build_hf(task, name_or_path=str(nochat))


def test_trl_conversational_files_for_sft_and_preferences(tmp_path, char_model_dir):
    sft = _jsonl(
        tmp_path / "messages.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"What is {i} + 1?"},
                    {"role": "assistant", "content": f"<answer>{i + 1}</answer>"},
                ]
            }
            for i in range(4)
        ],
    )
    rows, _ = read_examples(str(sft), "sft")
    assert rows[0].prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 0 + 1?"},
    ]
    assert rows[0].completion == "<answer>1</answer>"
    pairs = _jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}],
            }
        ],
    )
    prow = read_examples(str(pairs), "pairs")[0][0]
    assert prow.prompt == [{"role": "user", "content": "What is 2 + 2?"}] and (
        prow.chosen,
        prow.rejected,
    ) == ("4", "5")
    # SFT on the messages file through model=hf with the chat template: two optimizer steps
    cfg = compose_cfg(
        [
            "algo=sft",
            "model=hf",
            f"model.name_or_path={char_model_dir}",
            f"data.train={sft}",
            "trainer.steps=2",
            "algo.batch_size=2",
            "logger=none",
            "algo.task_eval=false",
        ]
    )
    train(cfg, run_dir=tmp_path / "sft")
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file()


# -- 6. the arithmetic example and 7. a GSM8K-format file ----------------------------------------------


def test_rlx_data_arithmetic_and_a_two_step_grpo_run(tmp_path):
    res = rlx_in_process(
        "data", "arithmetic", "--out", str(tmp_path / "data"), "--train", "40", "--heldout", "4",
        "--sft", "8", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    row = json.loads((tmp_path / "data" / "train.jsonl").read_text().splitlines()[0])
    terms = [int(x) for x in row["prompt"].removeprefix("What is ").removesuffix("?").split(" + ")]
    assert len(terms) == 3 and all(0 <= t <= 9 for t in terms)  # the defaults: 3 one-digit terms
    expr = " + ".join(map(str, terms))
    assert row["answer"] == f"{expr} = {sum(terms)}\n#### {sum(terms)}"
    sft = json.loads((tmp_path / "data" / "sft.jsonl").read_text().splitlines()[0])
    assert REWARDS.resolve("format", where="reward")(["q"], [sft["completion"]]) == [1.0]
    common = [
        "experiment=arithmetic_r1",
        f"arith.dir={tmp_path}",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        "logger=none",
        "trainer.prompts_per_step=2",
        "trainer.group_size=2",
    ]
    train(
        compose_cfg([*common, "algo=sft", "trainer.steps=2", "algo.batch_size=4"]), run_dir=tmp_path / "sft"
    )
    sft_rows = _metrics(tmp_path / "sft")
    assert "eval/exact" in sft_rows[-1]  # the SFT stage reports verified held-out accuracy too
    train(compose_cfg([*common, "algo=grpo", "trainer.steps=2"]), run_dir=tmp_path / "grpo")
    rows = _metrics(tmp_path / "grpo")
    first = rows[0]
    assert {"reward/math", "reward/format", "reward/mean"} <= set(first)
    assert first["reward/mean"] == pytest.approx(first["reward/math"] + first["reward/format"], abs=1e-5)
    assert first["kl/coef"] == pytest.approx(0.1)  # the recipe's KL anchor to the SFT model
    assert 0.0 <= rows[-1]["eval/exact"] <= 1.0 and "eval/reward_norm" in rows[-1]


def test_arithmetic_data_draws_up_to_90_percent_of_its_problems(tmp_path):
    """3 one-digit terms make 1000 distinct problems: the defaults (200 + 500 held-out + 200) draw 900
    of them, disjoint; asking for more is refused in one line naming the space."""
    from rlx.data.arithmetic import write_arithmetic_data

    paths = write_arithmetic_data(tmp_path / "d")
    prompts = {k: [json.loads(x)["prompt"] for x in p.read_text().splitlines()] for k, p in paths.items()}
    assert [len(prompts[k]) for k in ("train", "heldout", "sft")] == [200, 500, 200]
    assert len(set().union(*prompts.values())) == 900
    with pytest.raises(RlxError, match="only 1000 exist"):
        write_arithmetic_data(tmp_path / "e", heldout=501)
    with pytest.raises(RlxError, match="only 8100 exist"):  # two-digit operands: 90 x 90
        write_arithmetic_data(tmp_path / "f", digits=2, terms=2, train=7000)


def test_gsm8k_format_file_through_reward_math(tmp_path, char_model_dir):
    """The GSM8K code path: `question`/`answer` columns, `#### N` references, task.columns mapping."""
    rows = [
        {
            "question": f"Natalia sold {n} clips in April and half as many in May. How many in all?",
            "answer": f"In May she sold {n}/2 = <<{n}/2={n // 2}>>{n // 2}.\nIn all {n}+{n // 2} = "
            f"<<{n}+{n // 2}={n + n // 2}>>{n + n // 2}.\n#### {n + n // 2}",
        }
        for n in range(10, 30, 2)
    ]
    data = _jsonl(tmp_path / "gsm8k.jsonl", rows)
    cfg = compose_cfg(
        [
            "model=hf",
            f"model.name_or_path={char_model_dir}",
            "logger=none",
            *TINY_ONLINE,
            "task=text",
            f"task.path={data}",
            "task.columns.prompt=question",
            "task.system_prompt=Answer after four hashes",
            "reward=math",
        ]
    )
    p = plan(cfg)
    assert p.task.has_ground_truth and p.task.ground_truth == "answer"
    summary = train(cfg, run_dir=tmp_path / "run")
    assert "eval/exact" in summary
    # verified accuracy on the held-out prompts with hand-written answers: half right
    batch = p.task.eval_batch()
    golds = batch.columns["answer"]
    answers = [f"so #### {g.rsplit('#### ', 1)[1]}" if i % 2 == 0 else "#### -1" for i, g in enumerate(golds)]
    reward = REWARDS.resolve(dict(cfg.reward), where="reward")
    assert verified_correct(reward, batch.prompts, answers, dict(batch.columns)) == [
        i % 2 == 0 for i in range(len(golds))
    ]


def test_evaluate_reports_the_verified_accuracy(tmp_path, char_model_dir):
    """eval/exact from evaluate() is the verifier's share on greedy answers (here: all wrong, since the
    model is untrained, and the reward agrees with it row by row)."""
    data = _jsonl(tmp_path / "s.jsonl", _sums(8))
    task = TextPromptTask(path=str(data), eval_size=3, max_new_tokens=4)
    policy = build_hf(task, name_or_path=str(char_model_dir))
    reward = REWARDS.resolve("math", where="reward")
    metrics, rows = evaluate(policy, task, reward, Sampling(max_new_tokens=4))
    assert len(rows) == 3
    assert metrics["eval/exact"] == sum(r["exact"] for r in rows) / 3
    assert [r["reward"] for r in rows] == [1.0 if r["exact"] else 0.0 for r in rows]
