"""rlx against TRL's GRPOTrainer, side by side, on identical work (issue 12). `make bench` runs it.

    python scripts/bench.py [--rows toy,real_vocab] [--reps 3] [--reps-real N] [--out outputs/bench]
    python scripts/bench.py --device cuda --rows real_vocab,real_vocab_x4,large --reps 2

Rows (the same model config, prompts, sampling settings and batch for both; beta 0, one optimizer
step per batch, AdamW with torch's fused kernel (both defaults: rlx's conf/train.yaml, transformers'
``adamw_torch_fused``), logging, evaluation and saving off inside the timed window):

- ``toy``: the sort task, GPT-2 2 layers x 64, 32 prompts x 8 completions, 4 new tokens.
- ``real_vocab``: a Qwen2 architecture built from a config (vocab 151936, hidden 128, 2 layers, tied
  embeddings), 8 prompts x 4, 32-token prompts, 64 new tokens, a cheap length reward.
- ``real_vocab_x4`` (scaling; not in the default set): 16 prompts x 4, 128 new tokens.
- ``large`` (``--device cuda`` only): Qwen2.5-0.5B's shape built from a config (494 M parameters, vocab
  151936, 24 layers x 896, tied), 16 prompts x 8, 32-token prompts, 128 new tokens.

``--device cuda`` runs both on the GPU with bf16 autocast over float32 weights (rlx
``trainer.precision=bf16``, TRL ``bf16=True``) and reports, beside seconds per step, completion tokens
per second, the peak of torch's allocator, and MFU against the GPU's data-sheet bf16 peak
(``GPU_BF16_TFLOPS``, or ``--peak-tflops``). rlx's peak is the largest ``memory/cuda_max_allocated_gb``
of its metrics: each step's own peak, the first step's including the model's load, the final evaluation
after the last step not included. TRL's is ``torch.cuda.max_memory_allocated()`` after training: the
whole run's. Written for the issue's GPU check and not yet run on a GPU (none was lent while it was
written).

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

# The Qwen2 shapes the rows build (random init, vocabulary VOCAB, tied embeddings). "large" is
# Qwen2.5-0.5B's shape (494 M parameters): the issue's "few hundred million" model, for a GPU.
QWEN2 = {
    "real_vocab": {"hidden": 128, "inter": 512, "layers": 2, "heads": 4, "kv_heads": 2},
    "large": {"hidden": 896, "inter": 4864, "layers": 24, "heads": 14, "kv_heads": 2},
}

ROWS = {
    "toy": {"prompts": 32, "group": 8, "new_tokens": 4, "steps": 12, "warmup": 2, "model": "toy"},
    "real_vocab": {
        "prompts": 8,
        "group": 4,
        "new_tokens": 64,
        "prompt_len": 32,
        "steps": 4,
        "warmup": 1,
        "model": "real_vocab",
    },
    "real_vocab_x4": {
        "prompts": 16,
        "group": 4,
        "new_tokens": 128,
        "prompt_len": 32,
        "steps": 3,
        "warmup": 1,
        "model": "real_vocab",
    },
    "large": {  # --device cuda only
        "prompts": 16,
        "group": 8,
        "new_tokens": 128,
        "prompt_len": 32,
        "steps": 4,
        "warmup": 1,
        "model": "large",
    },
}

# Dense bf16 tensor-core peaks (TFLOP/s, the vendors' data sheets) for the update's MFU on a GPU;
# --peak-tflops gives any other. The first name that occurs in torch.cuda.get_device_name() wins.
GPU_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


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


def build_qwen2(root: Path, name: str, prompt_len: int) -> dict:
    """A random-init Qwen2 of shape ``QWEN2[name]`` with a VOCAB-entry tokenizer, and its prompts."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    d = root / name
    shape = QWEN2[name]
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
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # the tied head counted once
    expected = qwen2_body_params(name) + VOCAB * shape["hidden"]
    assert matrices == expected, f"update_flops' parameter count {expected} != the model's {matrices}"
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
def rlx_command(row: str, spec: dict, root: Path, run_dir: Path, threads: int, device: str) -> list[str]:
    # On a GPU: bf16 autocast over float32 master weights, as TRL's bf16=True
    precision = ["trainer.precision=bf16"] if device == "cuda" else []
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
        f"trainer.device={device}",
        *precision,
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
        d = root / spec["model"]
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
    """The TRL side, run as ``bench.py trl ROW ROOT OUT_JSON THREADS DEVICE``."""
    row, root, out, threads, device = argv[0], Path(argv[1]), Path(argv[2]), int(argv[3]), argv[4]
    import torch

    torch.set_num_threads(threads)
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    spec = ROWS[row]
    d = root / spec["model"]
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
        use_cpu=device == "cpu",
        bf16=device == "cuda",  # autocast over the float32 weights, as rlx's trainer.precision=bf16
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
    result: dict = {"step_s": steps}
    if device == "cuda":  # the whole run's peak of torch's allocator (rlx: the max of its per-step peaks)
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out.write_text(json.dumps(result))


def run_one(cmd: list[str], env: dict, log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS in MB) of one process."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024.0


def measure(framework: str, row: str, root: Path, out: Path, rep: int, threads: int, device: str) -> dict:
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
        cmd = rlx_command(row, spec, root, run_dir, threads, device)
        code, wall, rss = run_one(cmd, env, log)
        metrics = run_dir / "metrics.jsonl"
        logged = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        iterations = [m for m in logged if "time/rollout_s" in m]
        steps = [m["time/rollout_s"] + m["time/update_s"] for m in iterations]
        update = [m["time/update_s"] for m in iterations]
        gpu = [
            m["memory/cuda_max_allocated_gb"] * 1024 for m in logged if "memory/cuda_max_allocated_gb" in m
        ]
        gpu_mb = max(gpu) if gpu else None
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
            device,
        ]
        code, wall, rss = run_one(cmd, env, log)
        got = json.loads(result.read_text()) if result.exists() else {}
        steps, update, gpu_mb = got.get("step_s", []), [], got.get("cuda_max_allocated_mb")
    steady = steps[spec["warmup"] :]
    gpu_note = f", peak GPU {gpu_mb:.0f} MB" if gpu_mb is not None else ""
    print(
        f"  {tag}: exit {code}, wall {wall:.1f} s, peak RSS {rss:.0f} MB{gpu_note}, "
        f"steady s/step {[round(s, 3) for s in steady]}",
        flush=True,
    )
    return {
        "ok": code == 0 and bool(steady) and (device == "cpu" or gpu_mb is not None),
        "steps": steady,
        # the memory compared: resident memory on a CPU, torch's allocator peak on a GPU
        "peak_mb": rss if device == "cpu" else gpu_mb,
        "peak_rss_mb": rss,
        "update_s": update[spec["warmup"] :],
    }


def matmul_gflops(threads: int, device: str = "cpu") -> float:
    """The machine's measured matmul throughput: fp32 on ``threads`` CPU threads (best of 20 512^3
    products), or bf16 on the GPU (best of 20 8192^3 products, timed with CUDA events)."""
    import torch

    torch.set_num_threads(threads)
    if device == "cuda":
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return 2 * 8192**3 / best / 1e9
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    best = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 512**3 / best / 1e9


def gpu_peak_tflops() -> tuple[str, float | None]:
    """(the GPU's name, its data-sheet dense bf16 TFLOP/s from GPU_BF16_TFLOPS, or None)."""
    import torch

    name = torch.cuda.get_device_name()
    return name, next((v for k, v in GPU_BF16_TFLOPS.items() if k in name), None)


def qwen2_body_params(name: str) -> int:
    """The weights of a Qwen2 shape's layers, the head aside: q and o h x h, k and v h x (kv heads x
    head dim), a gated MLP of three h x inter matrices."""
    a = QWEN2[name]
    h, kv = a["hidden"], a["kv_heads"] * (a["hidden"] // a["heads"])
    return a["layers"] * (2 * h * h + 2 * h * kv + 3 * h * a["inter"])


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
    else:
        h, vocab, p = QWEN2[spec["model"]]["hidden"], VOCAB, spec["prompt_len"]
        body = qwen2_body_params(spec["model"])
    t = spec["new_tokens"]
    return 6.0 * (body * (spec["prompts"] * p + n * t) + n * vocab * h * (t + 1))


def versions() -> dict[str, str]:
    """The installed versions the figures depend on (read from the metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "rlx"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def n_tokens(row: str) -> int:
    """Completion tokens of one step at max length."""
    spec = ROWS[row]
    return spec["prompts"] * spec["group"] * spec["new_tokens"]


def stack(results: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in results["versions"].items())


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def gpu_table(results: dict, reps: int) -> list[str]:
    """results.md on a GPU: speed, completion tokens per second, torch's allocator peak, and MFU (the
    update's model FLOPs, `update_flops`, over the data-sheet bf16 peak): of the update alone (rlx
    times it), and of the whole step (sampling included) for both."""
    lines = [
        f"rlx vs TRL GRPOTrainer on {results['device']}, bf16 autocast over float32 weights "
        f"({results['date']}, {reps} rep(s), medians; MFU against {results['gpu_bf16_tflops']} TFLOP/s; "
        f"{stack(results)})",
        "",
        "| row | rlx s/step (min) | TRL s/step (min) | rlx / TRL steps/s | tokens/s rlx / TRL "
        "| peak GPU MB rlx / TRL | rlx / TRL memory | rlx update MFU | step MFU rlx / TRL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in results["rows"]:
        lines.append(
            f"| {e['name']} | {fmt(e.get('rlx_s_per_step'))} ({fmt(e.get('rlx_s_per_step_min'))}) "
            f"| {fmt(e.get('trl_s_per_step'))} ({fmt(e.get('trl_s_per_step_min'))}) "
            f"| {ratio(e.get('speedup_vs_trl'))} "
            f"| {fmt(e.get('rlx_tokens_per_s'), '.0f')} / {fmt(e.get('trl_tokens_per_s'), '.0f')} "
            f"| {fmt(e.get('rlx_peak_mb'), '.0f')} / {fmt(e.get('trl_peak_mb'), '.0f')} "
            f"| {fmt(e.get('memory_ratio_vs_trl'), '.2f')} | {fmt(e.get('rlx_update_mfu'), '.1%')} "
            f"| {fmt(e.get('rlx_step_mfu'), '.1%')} / {fmt(e.get('trl_step_mfu'), '.1%')} |"
        )
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "trl":
        trl_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":  # bench.py prepare ROWS ROOT THREADS DEVICE
        rows, root, threads, device = sys.argv[2].split(","), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        for row in rows:
            spec = ROWS[row]
            if spec["model"] == "toy":
                build_toy(root)
            else:
                build_qwen2(root, spec["model"], spec["prompt_len"])
        peaks = {"matmul_gflops": matmul_gflops(threads, device)}
        if device == "cuda":
            peaks["gpu"], peaks["gpu_bf16_tflops"] = gpu_peak_tflops()
        print(json.dumps(peaks))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="toy,real_vocab")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--reps-real", type=int, default=None, help="repetitions of the other rows than toy (--reps)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16 on both sides")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
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
        if ROWS[row]["model"] == "large" and args.device != "cuda":
            raise SystemExit(f"bench: row {row!r} (a 494 M parameter model) is for a GPU: add --device cuda")
    # The models, data and the matmul peak come from a child process: this one stays free of torch, so
    # the children's peak RSS (which Linux carries over from the parent at fork) is their own.
    prep = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "prepare",
            ",".join(rows),
            str(root),
            str(args.threads),
            args.device,
        ],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    peaks = json.loads(prep.stdout.strip().splitlines()[-1])
    peak = peaks["matmul_gflops"]
    gpu_peak = args.peak_tflops or peaks.get("gpu_bf16_tflops")  # TFLOP/s, dense bf16
    if args.device == "cuda":
        print(f"{peaks['gpu']}: bf16 matmul measured {peak / 1e3:.0f} TFLOP/s, data sheet {gpu_peak} TFLOP/s")
    else:
        print(f"fp32 matmul peak here: {peak:.1f} GFLOP/s on {args.threads} thread(s)", flush=True)
    raw: dict[str, dict[str, list[dict]]] = {r: {f: [] for f in frameworks} for r in rows}
    for rep in range(args.reps):  # interleaved: every row and framework once per repetition
        for row in rows:
            if row != "toy" and args.reps_real is not None and rep >= args.reps_real:
                continue
            for fw in frameworks:
                raw[row][fw].append(measure(fw, row, root, out, rep, args.threads, args.device))
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads}
    results["device"] = peaks.get("gpu", "cpu")
    results["versions"] = versions()
    results["load_avg"] = list(os.getloadavg())
    results["matmul_gflops"] = peak
    results["gpu_bf16_tflops"] = gpu_peak
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
            entry[f"{fw}_peak_rss_mb"] = statistics.median(m["peak_rss_mb"] for m in good) if good else None
            if args.device == "cuda" and per_run:
                # completion tokens at max length: the random-init models almost never sample EOS early
                entry[f"{fw}_tokens_per_s"] = n_tokens(row) / entry[f"{fw}_s_per_step"]
                if gpu_peak:  # the update's model FLOPs over the whole step's wall time
                    entry[f"{fw}_step_mfu"] = (
                        update_flops(row) / entry[f"{fw}_s_per_step"] / (gpu_peak * 1e12)
                    )
        if entry.get("rlx_s_per_step") and entry.get("trl_s_per_step"):
            entry["speedup_vs_trl"] = entry["trl_s_per_step"] / entry["rlx_s_per_step"]
            entry["memory_ratio_vs_trl"] = entry["rlx_peak_mb"] / entry["trl_peak_mb"]
        updates = [u for m in raw[row].get("rlx", []) if m["ok"] for u in m["update_s"]]
        if updates:
            gflops = update_flops(row) / statistics.median(updates) / 1e9
            entry["rlx_update_gflops"] = gflops
            entry["rlx_update_share_of_matmul_peak"] = gflops / peak
            if args.device == "cuda" and gpu_peak:
                entry["rlx_update_mfu"] = gflops / (gpu_peak * 1e3)
        results["rows"].append(entry)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.device == "cuda":
        lines = gpu_table(results, args.reps)
        (out / "results.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    lines = [
        f"rlx vs TRL GRPOTrainer ({results['date']}, {args.threads} thread(s), "
        f"load {results['load_avg'][0]:.1f}, {args.reps} rep(s), medians; {stack(results)})",
        "",
        "| row | rlx s/step (min) | TRL s/step (min) | rlx / TRL steps/s | rlx peak MB | TRL peak MB "
        "| rlx / TRL memory | rlx update / matmul peak |",
        "|---|---|---|---|---|---|---|---|",
    ]

    f = fmt
    for e in results["rows"]:
        lines.append(
            f"| {e['name']} | {f(e.get('rlx_s_per_step'))} ({f(e.get('rlx_s_per_step_min'))}) "
            f"| {f(e.get('trl_s_per_step'))} ({f(e.get('trl_s_per_step_min'))}) "
            f"| {ratio(e.get('speedup_vs_trl'))} | {f(e.get('rlx_peak_mb'), '.0f')} "
            f"| {f(e.get('trl_peak_mb'), '.0f')} | {f(e.get('memory_ratio_vs_trl'), '.2f')} "
            f"| {f(e.get('rlx_update_share_of_matmul_peak'), '.0%')} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
