"""Datasets through `datasets`: JSONL, Parquet, CSV; column conventions; bad input; sort data."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from rlx.data import dolly_prompt, read_examples
from rlx.data.sort import write_sort_data
from rlx.errors import RlxError
from rlx.tasks.sort import SortTask

PAIRS = [
    {"prompt": "3 1", "chosen": "1 3", "rejected": "3 1", "score_chosen": 1.0, "score_rejected": 0.0},
    {"prompt": "2 0", "chosen": "0 2", "rejected": "0 0", "score_chosen": 1.0, "score_rejected": 0.5},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("ext", ["jsonl", "parquet", "csv"])
def test_pairs_load_from_every_file_type(tmp_path, ext):
    path = tmp_path / f"pairs.{ext}"
    if ext == "jsonl":
        write_jsonl(path, PAIRS)
    elif ext == "parquet":
        Dataset.from_list(PAIRS).to_parquet(str(path))
    else:
        Dataset.from_list(PAIRS).to_csv(str(path), index=False)
    rows, report = read_examples(str(path), "scored_pairs")
    assert [(r.prompt, r.chosen, r.rejected, r.score_rejected) for r in rows] == [
        ("3 1", "1 3", "3 1", 0.0),
        ("2 0", "0 2", "0 0", 0.5),
    ]
    assert report.rows == 2


def test_a_save_to_disk_directory_loads(tmp_path):
    Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "ds"))
    rows, _ = read_examples(str(tmp_path / "ds"), "pairs")
    assert rows[1].rejected == "0 0"


def test_column_mapping_is_config(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "3 1", "a": "1 3"}])
    rows, _ = read_examples(str(path), "sft", columns={"prompt": "q", "completion": "a"})
    assert (rows[0].prompt, rows[0].completion) == ("3 1", "1 3")


def test_dolly_columns_get_the_dolly_template(tmp_path):
    path = write_jsonl(
        tmp_path / "dolly.jsonl",
        [
            {"instruction": "Name a colour.", "context": "", "response": "Red.", "category": "open_qa"},
            {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "x"},
        ],
    )
    rows, _ = read_examples(str(path), "sft")  # format=auto recognises Dolly
    assert rows[0].prompt == dolly_prompt("Name a colour.") and rows[0].completion == "Red."
    assert rows[0].prompt.endswith("### Response:\n") and "Input:" not in rows[0].prompt
    assert "Input:\nA long text." in rows[1].prompt


def test_missing_column_names_the_file_and_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1", "chosen": "1"}])
    with pytest.raises(RlxError, match=r"p.jsonl: missing rejected \(column 'rejected'\).*data.columns"):
        read_examples(str(path), "pairs")


def test_empty_dataset(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(RlxError, match="empty"):
        read_examples(str(tmp_path / "e.jsonl"), "pairs")
    Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(RlxError, match="the dataset is empty"):
        read_examples(str(tmp_path / "e.parquet"), "pairs")


def test_malformed_rows_name_the_file_and_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "1", "chosen": \n')
    with pytest.raises(RlxError, match=r"bad.jsonl line 2: not valid JSON"):
        read_examples(str(bad), "pairs")
    null = write_jsonl(tmp_path / "null.jsonl", [PAIRS[0], {**PAIRS[1], "chosen": None}])
    with pytest.raises(RlxError, match=r"null.jsonl row 2: column 'chosen' must be text"):
        read_examples(str(null), "pairs")
    score = write_jsonl(tmp_path / "score.jsonl", [{**PAIRS[0], "score_rejected": "low"}])
    with pytest.raises(RlxError, match=r"row 1: column 'score_rejected' must be a number"):
        read_examples(str(score), "scored_pairs")


def test_identical_pairs_are_counted_skipped_and_warned(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [*PAIRS, {"prompt": "1", "chosen": "1", "rejected": "1"}])
    with pytest.warns(RuntimeWarning, match="skipped 1 pair"):
        rows, report = read_examples(str(path), "pairs")
    assert len(rows) == 2 and report.skipped_identical == 1


def test_missing_file_and_unreachable_hub_dataset(tmp_path, hub_offline):
    with pytest.raises(RlxError, match="no such file"):
        read_examples(str(tmp_path / "nope.jsonl"), "pairs")
    with pytest.raises(RlxError, match="not a local file, and loading it from the hub failed"):
        read_examples("rlx-test/definitely-not-a-cached-dataset", "pairs")


def test_sort_data_uses_the_task_format_and_avoids_its_eval_set(tmp_path):
    paths = write_sort_data(tmp_path, train=300, heldout=50, task_eval_size=100)
    task = SortTask(eval_size=100)
    eval_texts = {task.prompt_text(p) for p in task.eval_batch().prompts}
    sft = [json.loads(x) for x in paths["sft_train"].read_text().splitlines()]
    held = [json.loads(x) for x in paths["sft_heldout"].read_text().splitlines()]
    pairs = [json.loads(x) for x in paths["pairs_train"].read_text().splitlines()]
    assert len(sft) == 300 and len(held) == 50
    for row in sft[:20]:
        prompt = [int(x) for x in row["prompt"].split()]
        assert row["completion"] == task.prompt_text(sorted(prompt))
    train_prompts = {r["prompt"] for r in sft}
    assert not train_prompts & eval_texts and not {r["prompt"] for r in held} & (eval_texts | train_prompts)
    by_prompt: dict[str, list[dict]] = {}
    for pair in pairs:
        by_prompt.setdefault(pair["prompt"], []).append(pair)
    assert set(by_prompt) == train_prompts
    for prompt, rows in by_prompt.items():
        # 4 candidates (sorted + 3 distinct wrong): every pair with different scores, the better one chosen
        assert 3 <= len(rows) <= 6
        target = task.prompt_text(sorted(int(x) for x in prompt.split()))
        answers = {r["chosen"] for r in rows} | {r["rejected"] for r in rows}
        assert target in answers and len(answers) == 4
        assert sum(r["chosen"] == target for r in rows) == 3  # the sorted answer beats every wrong one
        for r in rows:
            assert r["chosen"] != r["rejected"] and 0.0 <= r["score_rejected"] < r["score_chosen"] <= 1.0
            assert (r["score_chosen"] == 1.0) == (r["chosen"] == target)


def test_sort_pairs_with_two_candidates_are_sorted_vs_wrong(tmp_path):
    paths = write_sort_data(tmp_path, train=40, heldout=10, task_eval_size=16, candidates=2)
    pairs = [json.loads(x) for x in paths["pairs_train"].read_text().splitlines()]
    assert len(pairs) == 40 and len({p["prompt"] for p in pairs}) == 40
    assert all(p["score_chosen"] == 1.0 and p["score_rejected"] < 1.0 for p in pairs)
    with pytest.raises(RlxError, match="--candidates must be >= 2"):
        write_sort_data(tmp_path / "x", train=4, heldout=1, task_eval_size=16, candidates=1)


def test_sort_score_is_the_share_of_matching_positions():
    from rlx.data.sort import score

    assert score([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert score([0, 1, 3, 2], [0, 1, 2, 3]) == 0.5
    assert score([0, 1], [0, 1, 2, 3]) == 0.5  # cut short
    assert score([0, 1, 2, 3, 4], [0, 1, 2, 3]) == 0.8  # extra numbers never score 1
    assert score([None, 1, 2, 3], [0, 1, 2, 3]) == 0.75


def test_sort_pairs_can_take_rejections_from_a_models_samples(tmp_path):
    from rlx.models import build_tiny_gpt

    task = SortTask(eval_size=16)
    build_tiny_gpt(task, n_layer=1, n_embd=32, n_head=2).save(tmp_path / "model")
    before = write_sort_data(tmp_path / "a", train=12, heldout=4, task_eval_size=16)
    after = write_sort_data(
        tmp_path / "b",
        train=12,
        heldout=4,
        task_eval_size=16,
        policy=str(tmp_path / "model"),
        policy_share=1.0,
    )
    assert before["sft_train"].read_text() == after["sft_train"].read_text()  # SFT files unchanged
    pairs = [json.loads(x) for x in after["pairs_train"].read_text().splitlines()]
    old = [json.loads(x) for x in before["pairs_train"].read_text().splitlines()]
    assert all(p["rejected"] != p["chosen"] for p in pairs)
    # an untrained model errs: its samples replace corruptions among the rejected answers
    assert {p["rejected"] for p in pairs} != {o["rejected"] for o in old}
    new_wrong = {(p["prompt"], p["rejected"]) for p in pairs} - {(o["prompt"], o["rejected"]) for o in old}
    assert len({prompt for prompt, _ in new_wrong}) >= 6
    assert all(0.0 <= p["score_rejected"] < p["score_chosen"] for p in pairs)
