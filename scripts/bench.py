"""rlx against TRL's GRPOTrainer, side by side, on identical work (issue 12). `make bench` runs it.

    python scripts/bench.py [--rows toy,real_vocab] [--reps 3] [--reps-real N] [--out outputs/bench]

Rows (the same model config, prompts, sampling settings and batch for both; beta 0, one optimizer
step per batch, AdamW with torch's fused kernel (both defaults: rlx's conf/train.yaml, transformers'
``adamw_torch_fused``), logging, evaluation and saving off inside the timed window):

- ``toy``: the sort task, GPT-2 2 layers x 64, 32 prompts x 8 completions, 4 new tokens.
- ``real_vocab``: a Qwen2 architecture built from a config (vocab 151936, hidden 128, 2 layers, tied
  embeddings), 8 prompts x 4, 32-token prompts, 64 new tokens, a cheap length reward.
- ``real_vocab_x4`` (scaling; not in the default set): 16 prompts x 4, 128 new tokens.

Each measurement is one fresh process (``rlx train`` through its console script; TRL's GRPOTrainer
in a small driver), run one at a time, the frameworks interleaved (rlx, TRL, rlx, TRL, ...) and
repeated ``--reps`` times. Seconds per step are steady state: the first ``warmup`` steps of each
process are dropped (rlx: ``time/rollout_s + time/update_s`` of metrics.jsonl; TRL: the time between
``on_step_end`` callbacks). Peak memory is the process's peak resident set size (``wait4``'s
rusage). Both run with the same thread count (``--threads``, default 1: this machine is shared).
Results: ``OUT/results.json`` (medians) and ``OUT/results.md``.

Models and tokenizers are built locally (no hub): the toy row saves rlx's GPT-2 and number tokenizer
with ``save_pretrained``; the real-vocabulary row saves a random-init Qwen2 and a word-level
``tokenizers`` tokenizer with 151936 entries, and both frameworks load that directory.
"""

# ruff: noqa: E402 (the script's own folder leaves sys.path before anything else is imported)
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == HERE:
    sys.path.pop(0)  # scripts/ holds a numbers.py that would shadow the standard library's
sys.path.insert(0, os.path.join(HERE, "bench_rewards"))

import argparse
import itertools
import json
import random
import statistics
import subprocess
import time
from pathlib import Path

from bench_rewards import length_reward, sort_reward_text

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151936

ROWS = {
    "toy": {"prompts": 32, "group": 8, "new_tokens": 4, "steps": 12, "warmup": 2},
    "real_vocab": {"prompts": 8, "group": 4, "new_tokens": 64, "prompt_len": 32, "steps": 4, "warmup": 1},
    "real_vocab_x4": {
        "prompts": 16,
        "group": 4,
        "new_tokens": 128,
        "prompt_len": 32,
        "steps": 3,
        "warmup": 1,
    },
}


# --------------------------------------------------------------------------------------------------
# building the shared models and data
# --------------------------------------------------------------------------------------------------
def build_toy(root: Path) -> dict:
    import torch

    from rlx.models import build_tiny_gpt
    from rlx.tasks.sort import SortTask

    d = root / "toy"
    if (d / "ready").exists():
        return json.loads((d / "ready").read_text())
    torch.manual_seed(0)
    task = SortTask(length=4, vocab=10, eval_size=32)
    policy = build_tiny_gpt(task, n_layer=2, n_embd=64, n_head=2)
    policy.save(d / "model")
    rows = []
    for step in range(64):
        batch = task.train_batch(step, 32)
        for p, gt in zip(batch.prompts, batch.columns["ground_truth"]):
            rows.append({"prompt": f"<bos> {task.prompt_text(p)} <sep>", "ground_truth": list(gt)})
    with (d / "prompts.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    info = {"model": str(d / "model")}
    (d / "ready").write_text(json.dumps(info))
    return info


def build_real_vocab(root: Path, prompt_len: int) -> dict:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    d = root / "real_vocab"
    if (d / "ready").exists():
        return json.loads((d / "ready").read_text())
    # A byte-level BPE with VOCAB entries (what AutoTokenizer loads as Qwen2's tokenizer): the two
    # specials, the 256 byte symbols, then filler tokens; no merges, so a prompt of 32 letters is 32
    # tokens for both frameworks.
    vocab = {"<pad>": 0, "<eos>": 1}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    i = 0
    while len(vocab) < VOCAB:
        vocab[f"\u0120t{i}"] = len(vocab)
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(str(d / "model"))
    tokenizer.save_pretrained(str(d / "model"))
    rng = random.Random(0)
    with (d / "prompts.jsonl").open("w") as f:
        for _ in range(512):
            letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(prompt_len))
            f.write(json.dumps({"prompt": letters}) + "\n")
    info = {"model": str(d / "model")}
    (d / "ready").write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------------------------------
# one process each
# --------------------------------------------------------------------------------------------------
def rlx_command(row: str, spec: dict, root: Path, run_dir: Path, threads: int) -> list[str]:
    common = [
        "algo=grpo",
        "kl=none",
        "algo.entropy_coef=0",  # TRL's GRPO has no entropy bonus (rlx still logs the entropy, as TRL does)
        "logger=none",
        f"trainer.steps={spec['steps']}",
        f"trainer.prompts_per_step={spec['prompts']}",
        f"trainer.group_size={spec['group']}",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.samples_every=0",
        "trainer.lr=1e-4",
        "trainer.lr_schedule=constant",
        f"trainer.threads={threads}",
        "trainer.device=cpu",
        "rollout.temperature=1.0",
        f"rollout.max_new_tokens={spec['new_tokens']}",
        f"hydra.run.dir={run_dir}",
    ]
    if row == "toy":
        model = [
            "model=tiny_gpt",
            "model.n_layer=2",
            "model.n_embd=64",
            "model.n_head=2",
            f"model.init_from={root / 'toy' / 'model'}",
            "task=sort",
            "task.eval_size=32",
            "reward=sort",
        ]
    else:
        d = root / "real_vocab"
        model = [
            "model=hf",
            f"model.name_or_path={d / 'model'}",
            "model.chat_template=false",
            "task=text",
            f"task.path={d / 'prompts.jsonl'}",
            "task.eval_size=8",
            f"task.max_new_tokens={spec['new_tokens']}",
            "reward=custom",
            "reward.fn=bench_rewards:length_reward",
        ]
    rlx = str(Path(sys.executable).parent / "rlx")
    return [rlx, "train", *model, *common]


def trl_main(argv: list[str]) -> None:
    """The TRL side, run as ``bench.py trl ROW ROOT OUT_JSON THREADS``."""
    row, root, out, threads = argv[0], Path(argv[1]), Path(argv[2]), int(argv[3])
    import torch

    torch.set_num_threads(threads)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    spec = ROWS[row]
    d = root / ("toy" if row == "toy" else "real_vocab")
    model = AutoModelForCausalLM.from_pretrained(str(d / "model"))
    tokenizer = AutoTokenizer.from_pretrained(str(d / "model"))
    tokenizer.padding_side = "left"
    data = load_dataset("json", data_files=str(d / "prompts.jsonl"), split="train")
    n = spec["prompts"] * spec["group"]
    cfg = GRPOConfig(
        output_dir=str(out.parent / f"trl_{row}"),
        per_device_train_batch_size=n,
        num_generations=spec["group"],
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=spec["new_tokens"],
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_steps=spec["steps"],
        logging_steps=10_000,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        shuffle_dataset=False,
        disable_dropout=True,
        loss_type="grpo",  # rlx grpo: the mean over tokens of each sequence, then over sequences
    )
    reward = sort_reward_text if row == "toy" else length_reward
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not times:
                times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=cfg,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    steps = [b - a for a, b in itertools.pairwise(times)]
    out.write_text(json.dumps({"step_s": steps}))


def run_one(cmd: list[str], env: dict, log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS in MB) of one process."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024.0


def measure(framework: str, row: str, root: Path, out: Path, rep: int, threads: int) -> dict:
    spec = ROWS[row]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            p for p in (os.path.join(HERE, "bench_rewards"), os.environ.get("PYTHONPATH")) if p
        ),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    tag = f"{framework}_{row}_{rep}"
    log = out / "logs" / f"{tag}.log"
    if framework == "rlx":
        run_dir = out / "runs" / tag
        cmd = rlx_command(row, spec, root, run_dir, threads)
        code, wall, rss = run_one(cmd, env, log)
        steps = []
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                m = json.loads(line)
                if "time/rollout_s" in m:
                    steps.append(m["time/rollout_s"] + m["time/update_s"])
        update = [
            json.loads(line)["time/update_s"]
            for line in (metrics.read_text().splitlines() if metrics.exists() else [])
            if "time/update_s" in json.loads(line)
        ]
    else:
        result = out / "runs" / f"{tag}.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "trl",
            row,
            str(root),
            str(result),
            str(threads),
        ]
        code, wall, rss = run_one(cmd, env, log)
        steps = json.loads(result.read_text())["step_s"] if result.exists() else []
        update = []
    steady = steps[spec["warmup"] :]
    print(
        f"  {tag}: exit {code}, wall {wall:.1f} s, peak RSS {rss:.0f} MB, "
        f"steady s/step {[round(s, 3) for s in steady]}",
        flush=True,
    )
    return {
        "ok": code == 0 and bool(steady),
        "steps": steady,
        "peak_mb": rss,
        "update_s": update[spec["warmup"] :],
    }


def matmul_gflops(threads: int) -> float:
    """The machine's fp32 matmul throughput on ``threads`` threads (best of a few 512^3 products)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    best = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 512**3 / best / 1e9


def update_flops(row: str) -> float:
    """Forward + backward of the update as rlx computes it: 6 x params x tokens, each prompt's tokens
    once for its group (`rlx.models.logprobs.shared_prompt_forward`), the LM head over completion
    positions only. Not the FLOPs of a pass over every row's prompt: those would credit rlx with
    work it skips."""
    spec = ROWS[row]
    n = spec["prompts"] * spec["group"]
    if row == "toy":  # GPT-2: q, k, v, o and a 4h MLP of two matrices
        h, layers, vocab, p = 64, 2, 14, 6
        body = layers * (4 * h * h + 2 * h * 4 * h)
    else:  # Qwen2: q and o h x h, k and v h x h/2 (2 of 4 heads), a 4h gated MLP of three matrices
        h, layers, vocab, p = 128, 2, VOCAB, spec["prompt_len"]
        body = layers * (2 * h * h + 2 * h * (h // 2) + 3 * h * 4 * h)
    t = spec["new_tokens"]
    return 6.0 * (body * (spec["prompts"] * p + n * t) + n * vocab * h * (t + 1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "trl":
        trl_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        rows, root, threads = sys.argv[2].split(","), Path(sys.argv[3]), int(sys.argv[4])
        if "toy" in rows:
            build_toy(root)
        if any(r.startswith("real_vocab") for r in rows):
            build_real_vocab(root, ROWS["real_vocab"]["prompt_len"])
        print(matmul_gflops(threads))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="toy,real_vocab")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reps-real", type=int, default=None, help="repetitions of the real_vocab rows (--reps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--frameworks", default="rlx,trl")
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    root = out / "models"
    rows = args.rows.split(",")
    frameworks = args.frameworks.split(",")
    for row in rows:
        if row not in ROWS:
            raise SystemExit(f"bench: unknown row {row!r}; choose from {', '.join(ROWS)}")
    # The models, data and the matmul peak come from a child process: this one stays free of torch, so
    # the children's peak RSS (which Linux carries over from the parent at fork) is their own.
    prep = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "prepare", ",".join(rows), str(root), str(args.threads)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    peak = float(prep.stdout.strip().splitlines()[-1])
    print(f"fp32 matmul peak here: {peak:.1f} GFLOP/s on {args.threads} thread(s)", flush=True)
    raw: dict[str, dict[str, list[dict]]] = {r: {f: [] for f in frameworks} for r in rows}
    for rep in range(args.reps):  # interleaved: every row and framework once per repetition
        for row in rows:
            if row.startswith("real_vocab") and args.reps_real is not None and rep >= args.reps_real:
                continue
            for fw in frameworks:
                raw[row][fw].append(measure(fw, row, root, out, rep, args.threads))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads}
    results["load_avg"] = list(os.getloadavg())
    results["matmul_gflops"] = peak
    results["rows"] = []
    for row in rows:
        entry: dict = {"name": row, **{k: v for k, v in ROWS[row].items() if k not in ("warmup",)}}
        for fw in frameworks:
            good = [m for m in raw[row][fw] if m["ok"]]
            per_run = [statistics.median(m["steps"]) for m in good]
            entry[f"{fw}_runs"] = len(good)
            entry[f"{fw}_s_per_step"] = statistics.median(per_run) if per_run else None
            entry[f"{fw}_s_per_step_min"] = min(min(m["steps"]) for m in good) if good else None
            entry[f"{fw}_peak_mb"] = statistics.median(m["peak_mb"] for m in good) if good else None
        if entry.get("rlx_s_per_step") and entry.get("trl_s_per_step"):
            entry["speedup_vs_trl"] = entry["trl_s_per_step"] / entry["rlx_s_per_step"]
            entry["memory_ratio_vs_trl"] = entry["rlx_peak_mb"] / entry["trl_peak_mb"]
        updates = [u for m in raw[row].get("rlx", []) if m["ok"] for u in m["update_s"]]
        if updates:
            gflops = update_flops(row) / statistics.median(updates) / 1e9
            entry["rlx_update_gflops"] = gflops
            entry["rlx_update_share_of_matmul_peak"] = gflops / peak
        results["rows"].append(entry)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        f"rlx vs TRL GRPOTrainer ({results['date']}, {args.threads} thread(s), "
        f"load {results['load_avg'][0]:.1f}, {args.reps} rep(s), medians)",
        "",
        "| row | rlx s/step (min) | TRL s/step (min) | rlx / TRL steps/s | rlx peak MB | TRL peak MB "
        "| rlx / TRL memory | rlx update / matmul peak |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt=".3f"):
        return "n/a" if x is None else format(x, fmt)

    for e in results["rows"]:
        lines.append(
            f"| {e['name']} | {f(e.get('rlx_s_per_step'))} ({f(e.get('rlx_s_per_step_min'))}) "
            f"| {f(e.get('trl_s_per_step'))} ({f(e.get('trl_s_per_step_min'))}) "
            f"| {f(e.get('speedup_vs_trl'), '.2f')}x | {f(e.get('rlx_peak_mb'), '.0f')} "
            f"| {f(e.get('trl_peak_mb'), '.0f')} | {f(e.get('memory_ratio_vs_trl'), '.2f')} "
            f"| {f(e.get('rlx_update_share_of_matmul_peak'), '.0%')} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
