"""Datasets for the offline loop, read through 🤗 ``datasets``.

``data.train`` (and ``data.eval``) is a local ``.jsonl`` / ``.json``, ``.parquet`` or ``.csv`` file, a
directory written by ``Dataset.save_to_disk``, or a hub dataset name (``databricks/databricks-dolly-15k``,
read with ``load_dataset(name, split=data.split)``). Column names follow TRL's conventions:

===============  ==========================================================================
kind             columns (rlx name = default column name; ``data.columns.<name>=...`` remaps)
===============  ==========================================================================
``sft``          ``prompt``, ``completion``; Dolly files (``instruction``, ``context``,
                 ``response``) are recognised (``data.format=dolly``, or ``auto`` when the file has
                 ``instruction`` and ``response`` but no ``prompt``) and given Dolly's prompt template
``pairs``        ``prompt``, ``chosen``, ``rejected`` (DPO, IPO, reward models)
``scored_pairs`` ``prompt``, ``chosen``, ``rejected``, ``score_chosen``, ``score_rejected`` (SPO;
                 the names of UltraFeedback-binarized, so one pair file serves every algorithm)
===============  ==========================================================================

TRL's conversational format is read too: a ``prompt`` that is a list of messages (``{"role",
"content"}``) stays a message list (the policy renders it with the tokenizer's chat template), a
``completion`` / ``chosen`` / ``rejected`` that is a list of messages becomes the text of its
assistant turns, and a ``messages`` column (SFT, no ``prompt``) splits into the conversation before
the last assistant turn (the prompt) and that turn (the completion).

Bad input fails with one line that names the file (and the row where there is one): a missing
column, an empty dataset, a malformed JSON line, a null or non-text value. A pair whose chosen and
rejected are identical carries no preference: it is counted, skipped, and reported with a warning.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlx.errors import RlxError

KINDS: dict[str, tuple[str, ...]] = {
    "prompts": ("prompt",),
    "sft": ("prompt", "completion"),
    "pairs": ("prompt", "chosen", "rejected"),
    "scored_pairs": ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
}
DOLLY_COLUMNS = {"prompt": "instruction", "context": "context", "completion": "response"}
LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DataSettings:
    """``data.*``: the offline loop's dataset (defaults in conf/loop/offline.yaml)."""

    train: str | None  # ??? until set: the offline loop's plan asks for it, naming the rows it needs
    eval: str | None
    split: str
    eval_split: str
    format: str
    columns: dict[str, Any]
    limit: int | None
    eval_limit: int | None

    def check(self) -> None:
        if self.format not in ("auto", "trl", "dolly"):
            raise RlxError(f"data.format={self.format!r}; one of auto, trl, dolly")
        if not isinstance(self.columns, Mapping):
            raise RlxError(f"data.columns must be a mapping of rlx name -> column, got {self.columns!r}")
        for key in ("limit", "eval_limit"):
            n = getattr(self, key)
            if n is not None and n < 1:
                raise RlxError(f"data.{key} must be >= 1 or null, got {n}")
        for key in ("train", "eval"):
            source = getattr(self, key)
            if source not in (None, "", "???") and _local_missing(str(source)):
                raise RlxError(f"data.{key}={source}: no such file")

    @property
    def has_train(self) -> bool:
        return self.train not in (None, "", "???")


def _local_missing(source: str) -> bool:
    p = Path(source).expanduser()
    local = p.suffix.lower() in (".jsonl", ".json", ".parquet", ".csv") or source.startswith((".", "/", "~"))
    return local and not p.exists()


def dolly_prompt(instruction: str, context: str | None = None) -> str:
    """Dolly-15k's instruction template (as used to train dolly-v2), with the context when present."""
    head = (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n"
    )
    body = f"### Instruction:\n{instruction.strip()}\n\n"
    if context and context.strip():
        body += f"Input:\n{context.strip()}\n\n"
    return head + body + "### Response:\n"


Message = dict[str, str]


@dataclass
class Example:
    """One row: a prompt and a completion (SFT) or a chosen/rejected pair (with scores for SPO).

    ``prompt`` is text, or a list of chat messages (TRL's conversational format). ``columns`` holds
    the row's raw values, every column of the file (``read_examples(..., keep_columns=True)``).
    """

    prompt: str | list[Message]
    completion: str = ""
    chosen: str = ""
    rejected: str = ""
    score_chosen: float = 0.0
    score_rejected: float = 0.0
    columns: dict[str, Any] = field(default_factory=dict)


def as_messages(value: Any) -> list[Message] | None:
    """``value`` as a list of ``{"role", "content"}`` messages, or None when it is not one."""
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value):
        return None
    return [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in value]


def _split_conversation(messages: list[Message]) -> tuple[list[Message], str] | None:
    """TRL's ``messages`` row as (the conversation before the last assistant turn, that turn)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        return None
    return messages[:last], messages[last]["content"]


@dataclass
class DataReport:
    """What reading a dataset changed: rows skipped (identical pairs) and where they came from."""

    source: str
    rows: int = 0
    skipped_identical: int = 0
    notes: list[str] = field(default_factory=list)


def _looks_local(source: str) -> bool:
    return (
        Path(source).suffix.lower() in LOADERS or source.startswith((".", "/", "~")) or Path(source).exists()
    )


def _check_json_lines(path: Path) -> None:
    """datasets' JSON reader reports a bad line without its number: find it, and name file and line."""
    with path.open("rb") as f:  # bytes: binary garbage is a bad line, not a UnicodeDecodeError
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RlxError(
                    f"{path} line {lineno}: not valid JSON (not UTF-8 text: {exc.reason})"
                ) from exc
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RlxError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise RlxError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")


def load_table(
    source: str, *, split: str = "train", where: str = "data.train", subset: str | None = None
) -> Any:
    """A ``datasets.Dataset`` from a local file, a ``save_to_disk`` directory or a hub name (with its
    ``subset``, the hub's configuration name: ``openai/gsm8k`` has ``main`` and ``socratic``)."""
    import datasets

    datasets.disable_progress_bars()
    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise RlxError(f"{where}={source}: no such file")
        if path.is_dir():
            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as exc:
                raise RlxError(f"{where}={source}: not a dataset directory ({exc})") from exc
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        kind = LOADERS.get(path.suffix.lower())
        if kind is None:
            raise RlxError(f"{where}={source}: unknown file type; use .jsonl, .json, .parquet or .csv")
        if path.suffix.lower() == ".jsonl":
            _check_json_lines(path)
        if path.stat().st_size == 0:
            raise RlxError(f"{where}={source}: the file is empty")
        try:
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "corresponds to no data" in reason:  # a file with a schema but no rows
                raise RlxError(f"{where}={source}: the dataset is empty") from exc
            raise RlxError(f"{where}={source}: cannot be read as {kind}: {reason}") from exc
    try:
        return datasets.load_dataset(source, subset, split=split)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RlxError(
            f"{where}={source}: not a local file, and loading it from the hub failed (offline, or no "
            f"such dataset?): {reason}"
        ) from exc


def column_map(kind: str, fmt: str, names: list[str], overrides: Mapping[str, Any] | None) -> dict[str, str]:
    """rlx's column names -> the file's, from the kind's conventions, the format and the overrides."""
    if kind not in KINDS:
        raise RlxError(f"data kind {kind!r}; one of {', '.join(KINDS)}")
    if fmt not in ("auto", "trl", "dolly"):
        raise RlxError(f"data.format={fmt!r}; one of auto, trl, dolly")
    if fmt == "dolly" and kind not in ("sft", "prompts"):
        raise RlxError("data.format=dolly is a demonstration format (algo=sft or task=text)")
    dolly = fmt == "dolly" or (
        fmt == "auto"
        and kind in ("sft", "prompts")
        and "prompt" not in names
        and {"instruction", "response"} <= set(names)
    )
    conversation = fmt in ("auto", "trl") and kind in ("sft", "prompts")
    conversation = conversation and "prompt" not in names and "messages" in names
    mapping = dict(DOLLY_COLUMNS) if dolly else {k: k for k in KINDS[kind]}
    if conversation and not (overrides or {}).get("prompt"):  # TRL's conversational language modeling
        mapping = {"prompt": "messages", "_template": "messages"}
        if kind == "sft":
            mapping["completion"] = "messages"
    if kind == "prompts" and "_template" not in mapping:  # a reference answer is optional
        if not dolly and "completion" in names:
            mapping["completion"] = "completion"
        if mapping.get("completion") not in names:
            mapping.pop("completion", None)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in mapping and key != "context":
            valid = ", ".join(sorted({*KINDS[kind], "context"}))
            raise RlxError(f"data.columns.{key}: unknown column role; valid: {valid}")
        mapping[key] = str(value)
    if dolly:
        mapping["_template"] = "dolly"
    return mapping


def read_examples(
    source: str,
    kind: str,
    *,
    fmt: str = "auto",
    columns: Mapping[str, Any] | None = None,
    split: str = "train",
    limit: int | None = None,
    where: str = "data.train",
    keep_columns: bool = False,
    subset: str | None = None,
) -> tuple[list[Example], DataReport]:
    """Rows of ``source`` as `Example`s, checked; identical pairs are counted and skipped.

    ``keep_columns`` keeps every column of each row in ``Example.columns`` (what `task=text` hands
    to rewards as keyword arguments)."""
    table = load_table(source, split=split, where=where, subset=subset)
    names = list(table.column_names)
    mapping = column_map(kind, fmt, names, columns)
    template = mapping.pop("_template", None)
    context_col = mapping.pop("context", None)
    missing = [f"{role} (column {col!r})" for role, col in mapping.items() if col not in names]
    if missing:
        raise RlxError(
            f"{where}={source}: missing {', '.join(missing)}; the file has columns {names}; map them with "
            f"data.columns.<role>=<column>"
        )
    if len(table) == 0:
        raise RlxError(f"{where}={source}: the dataset is empty")
    report = DataReport(source=source)
    out: list[Example] = []
    for i, row in enumerate(table):
        if limit is not None and len(out) >= limit:
            break
        values: dict[str, Any] = {}
        if template == "messages":
            msgs = as_messages(row["messages"])
            split_ = _split_conversation(msgs) if msgs else None
            if split_ is None and (kind == "sft" or msgs is None):
                raise RlxError(
                    f"{source} row {i + 1}: column 'messages' must be a list of {{role, content}} messages"
                    + (" with an assistant turn after the first message" if kind == "sft" else "")
                )
            if split_ is not None and (kind == "sft" or msgs[-1]["role"] == "assistant"):
                values["prompt"], values["completion"] = split_
            else:  # a prompt file whose conversation waits for the assistant
                values["prompt"] = msgs
        for role, col in mapping.items():
            if template == "messages":
                break
            v = row[col]
            if role.startswith("score_"):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise RlxError(f"{source} row {i + 1}: column {col!r} must be a number, got {v!r}")
                values[role] = float(v)
            elif (msgs := as_messages(v)) is not None:  # TRL's conversational format
                if role == "prompt":
                    values[role] = msgs
                else:  # a completion / chosen / rejected: the text of its assistant turns
                    values[role] = "".join(m["content"] for m in msgs if m["role"] == "assistant")
            else:
                if not isinstance(v, str):
                    raise RlxError(
                        f"{source} row {i + 1}: column {col!r} must be text or a list of chat messages, "
                        f"got {v!r}"
                    )
                values[role] = v
        prompt_value = values["prompt"]
        if isinstance(prompt_value, str) and not prompt_value.strip() and template is None:
            raise RlxError(f"{source} row {i + 1}: column {mapping['prompt']!r} is empty")
        if keep_columns:
            values["columns"] = dict(row)
        if not isinstance(prompt_value, str):
            pass  # chat messages: the template does the rest
        elif template == "dolly":
            ctx = row.get(context_col) if context_col and context_col in names else None
            values["prompt"] = dolly_prompt(values["prompt"], ctx if isinstance(ctx, str) else None)
        elif context_col and context_col in names and isinstance(row.get(context_col), str):
            if row[context_col].strip():
                values["prompt"] = f"{values['prompt']}\n\n{row[context_col].strip()}"
        if kind in ("pairs", "scored_pairs") and values["chosen"] == values["rejected"]:
            report.skipped_identical += 1
            continue
        out.append(Example(**values))
    report.rows = len(out)
    if report.skipped_identical:
        warnings.warn(
            f"{source}: skipped {report.skipped_identical} pair(s) whose chosen and rejected are identical",
            RuntimeWarning,
            stacklevel=2,
        )
    if not out:
        raise RlxError(f"{where}={source}: no usable rows (every pair had identical chosen and rejected)")
    return out, report
