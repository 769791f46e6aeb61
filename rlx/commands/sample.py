"""``rlx sample``: a trained model's answers to given prompts, beside its base model's.

The base model is the one the run started from: ``model.init_from`` or ``model=hf``'s
``name_or_path`` as recorded in the checkpoint's config, or ``--base DIR``. A run that started from a
fresh initialisation is compared with that same initialisation, rebuilt from the config and seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rlx.errors import RlxError
from rlx.models import Policy, Sampling


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="rlx sample",
        description="A checkpoint's answers to given prompts, side by side with its base model's "
        "(the model the run started from: model.init_from / model.name_or_path, or --base).",
    )
    parser.add_argument("path", help="a run directory (its final/ model) or a checkpoint directory")
    parser.add_argument("-p", "--prompt", action="append", default=[], help="a prompt text (repeatable)")
    parser.add_argument("--file", help="a text file with one prompt per line")
    parser.add_argument("--base", help="the model to compare with (default: the run's starting model)")
    parser.add_argument("--no-base", action="store_true", help="show the checkpoint's answers only")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON line per prompt")
    ns = parser.parse_args(argv)
    run_sample(ns)


def as_prompt_text(prompt: str, task: Any) -> str:
    """A prompt as the task writes it: ``[8, 2, 7, 0]`` (how `rlx eval` and samples.jsonl print a
    token prompt) becomes the task's text, ``8 2 7 0``; text is kept as given."""
    text = prompt.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = json.loads(text)
        except ValueError:
            return prompt
        if isinstance(parsed, list):
            return str(task.prompt_text(parsed))
    return prompt


def _answers(policy: Policy, prompts: list[str], sampling: Sampling, greedy: bool) -> list[str]:
    try:
        ids, mask = policy.encode_texts(prompts)
    except RlxError:
        raise
    except Exception as exc:  # a word the model's tokenizer has no token for (a fixed vocabulary)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        example = policy.task.prompt_text(policy.task.eval_batch().prompts[0])
        raise RlxError(
            f"the prompts {prompts} cannot be encoded by model {policy.name} ({reason}); "
            f"its prompts look like {example!r}"
        ) from exc
    tokens, comp_mask, _ = policy.generate(ids, mask, sampling, greedy=greedy)
    return policy.decode_text(tokens, comp_mask)


def _load(path: Path, task: Any, model_cfg: dict[str, Any]) -> Policy:
    from transformers import AutoConfig

    from rlx.models import load_pretrained

    try:  # trust_remote_code=False: a directory's auto_map code is never run
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise RlxError(f"{path}: cannot read its model config: {str(exc).strip().splitlines()[0]}") from exc
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        raise RlxError(f"{path} is a reward model (algo=rm); rlx sample shows a policy's answers")
    policy = load_pretrained(path, task, str(model_cfg.get("name", "model")))
    policy.chat_template = bool(
        model_cfg.get("chat_template") and getattr(policy.tokenizer, "chat_template", None)
    )
    return policy


def run_sample(ns: argparse.Namespace) -> list[dict[str, str]]:
    from rich.table import Table

    from rlx.checkpoint import CONFIG_NAME, read_dir_config, resolve_model_dir
    from rlx.models import build_model
    from rlx.registry import instantiate_checked
    from rlx.runtime import resolve_device, seed_everything
    from rlx.tracking import console

    prompts = list(ns.prompt)
    if ns.file:
        path = Path(ns.file)
        if not path.is_file():
            raise RlxError(f"--file {path}: no such file")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise RlxError("give prompts with -p TEXT (repeatable) or --file FILE")
    model_dir = resolve_model_dir(Path(ns.path))
    cfg = read_dir_config(model_dir, use_reward=False)  # builds only rlx's own task and model
    task = instantiate_checked(cfg["task"], where="task")
    prompts = [as_prompt_text(p, task) for p in prompts]
    device = resolve_device(ns.device)
    r = cfg["rollout"]
    sampling = Sampling(
        temperature=float(r["temperature"]),
        top_k=int(r["top_k"]),
        top_p=float(r["top_p"]),
        max_new_tokens=ns.max_new_tokens or r["max_new_tokens"] or task.max_new_tokens,
    )
    policy = _load(model_dir, task, cfg["model"])
    policy.model.to(device).eval()
    trained = _answers(policy, prompts, sampling, not ns.sample)
    base_answers: list[str] | None = None
    base_name = ""
    if not ns.no_base:
        base_src = ns.base or cfg["model"].get("init_from") or cfg["model"].get("name_or_path")
        if base_src:
            base_dir = (
                resolve_model_dir(Path(base_src)) if Path(base_src, CONFIG_NAME).exists() else Path(base_src)
            )
            if (base_dir / "final" / CONFIG_NAME).exists():
                base_dir = base_dir / "final"
            base = (
                _load(base_dir, task, cfg["model"]) if base_dir.is_dir() else build_model(cfg["model"], task)
            )
            base_name = str(base_src)
        else:  # a fresh initialisation: rebuild it exactly as the run did (same seed, same builder)
            seed_everything(int(cfg["trainer"]["seed"]))
            base = build_model(cfg["model"], task)
            base_name = f"{cfg['model'].get('name')} initialisation (seed {cfg['trainer']['seed']})"
        base.model.to(device).eval()
        base_answers = _answers(base, prompts, sampling, not ns.sample)
    rows = [
        {"prompt": p, "model": t, **({"base": b} if base_answers else {})}
        for p, t, b in zip(prompts, trained, base_answers or [""] * len(prompts))
    ]
    if ns.json:
        for row in rows:
            print(json.dumps(row))
        return rows
    table = Table(title=f"rlx sample {model_dir}", show_lines=True)
    table.add_column("prompt")
    if base_answers:
        table.add_column(f"base: {base_name}")
    table.add_column("this model")
    for row in rows:
        table.add_row(row["prompt"], *([row["base"]] if base_answers else []), row["model"])
    console.print(table)
    return rows
