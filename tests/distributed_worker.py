"""One process of tests/test_distributed.py's equality check: run under torchrun (2 ranks, gloo) or as
a plain process (world size 1), it builds each variant's real trainer with `rlx.train.build`, makes one
fixed global batch (the same in every process), gives each rank its share and runs the update functions
on it; rank 0 saves the parameters and metrics after the updates to ``OUT/<variant>.pt``.

    python tests/distributed_worker.py OUT DATA_DIR [VARIANT ...]
    torchrun --nproc_per_node=2 tests/distributed_worker.py OUT DATA_DIR [VARIANT ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

TINY_GPT = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2"]
BASE = [
    *TINY_GPT,
    "task.eval_size=16",
    "logger=none",
    "trainer.steps=2",
    "trainer.eval_every=0",
    "trainer.samples_every=0",
    "trainer.save_every=0",
    "trainer.lr=0.05",
    "trainer.lr_schedule=constant",
    # plain SGD: Adam's first step is lr * g / (|g| + eps), which turns the rounding of near-zero
    # gradient entries (a sum over ranks in another order) into differences of order lr
    "optimizer._target_=torch.optim.SGD",
    "~optimizer.betas",
    "~optimizer.eps",
    "optimizer.fused=false",  # torch has no fused SGD step for fsdp2's sharded parameters
]
ONLINE = [*BASE, "trainer.prompts_per_step=4", "trainer.group_size=4"]
LORA = ["model=hf", "model.lora.r=4", "model.lora.target_modules=[c_attn]", "model.lora.dropout=0"]
# name -> overrides. Every advantage estimator, every aggregation, both critic layouts, TRPO, a KL in
# the loss with the adaptive controller, whitening, micro-batches that split ranks' rows unevenly.
VARIANTS: dict[str, list[str]] = {
    **{
        f"adv_{adv}": [*ONLINE, "algo=grpo", f"adv_norm={adv}", "trainer.micro_batch_size=3"]
        for adv in ("none", "center", "group_std", "batch_std", "rloo", "max", "reinforce_pp")
    },
    **{
        f"agg_{agg}": [*ONLINE, "algo=grpo", f"algo.aggregation={agg}"]
        for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
    },
    "kl_adaptive_whiten": [
        *ONLINE,
        "algo=grpo",
        "kl=k3",
        "kl.adaptive_target=0.01",
        "algo.whiten_advantages=true",
        "algo.entropy_coef=0.05",
    ],
    "ppo_head": [*ONLINE, "algo=ppo", "algo.minibatches=1", "algo.epochs=2", "trainer.micro_batch_size=5"],
    "ppo_separate": [*ONLINE, "algo=ppo", "algo.critic=separate", "algo.minibatches=1", "algo.epochs=2"],
    "trpo": [*ONLINE, "algo=trpo", "trainer.micro_batch_size=4"],
    # PPO's KL early stop (algo.early_stop_kl): decided on the all-reduced KL, so every rank stops after
    # the same minibatch (4 epochs x 2 minibatches planned; it stops within the first epoch or two)
    "ppo_early_stop": [
        *ONLINE,
        "algo=ppo",
        "algo.minibatches=2",
        "algo.epochs=4",
        "algo.early_stop_kl=1e-5",
        "trainer.micro_batch_size=5",
    ],
    "sft": [*BASE, "algo=sft", "algo.batch_size=8", "trainer.micro_batch_size=3"],
    "dpo": [*BASE, "algo=dpo", "algo.batch_size=8", "trainer.micro_batch_size=3"],
    # h11g: an epoch's last, smaller batch: 9 rows in batches of 8, so the second step has 1 row (rank 0's;
    # rank 1 has none); the reward model on 13 rows, its second batch of 5 split 3 + 2 (micro-batches of
    # 2: two passes on rank 0, one on rank 1); SFT with packed rows
    "sft_last": [*BASE, "algo=sft", "algo.batch_size=8", "trainer.micro_batch_size=3", "data.limit=9"],
    "rm_last": [*BASE, "algo=rm", "algo.batch_size=8", "trainer.micro_batch_size=2", "data.limit=13"],
    "sft_packing": [
        *BASE,
        "algo=sft",
        "algo.packing=true",
        "algo.batch_size=4",
        "trainer.micro_batch_size=1",
    ],
    # h11g: LoRA (peft) on model=hf, a tiny GPT-2 written by `write_tiny_hf` (adapters on c_attn only:
    # frozen and trainable parameters in one FSDP2 unit)
    "sft_lora": [*BASE[3:], *LORA, "algo=sft", "algo.batch_size=8", "trainer.micro_batch_size=3"],
}
# The same updates with trainer.parallel=fsdp2 (h11f; under torchrun only): compared with the single
# process's results of the variant named after the prefix. ``fsdp2_uneven_*`` (h11g): the global batch
# split 3 groups + 1 group (rank 0 runs more micro-batches than rank 1, which pads with zero-weight passes).
FSDP2: dict[str, list[str]] = {
    f"fsdp2_{name}": [*VARIANTS[name.removeprefix("uneven_")], "trainer.parallel=fsdp2"]
    for name in (
        "adv_group_std",
        "agg_token_mean",
        "kl_adaptive_whiten",
        "ppo_separate",
        "ppo_head",
        "trpo",
        "ppo_early_stop",
        "sft",
        "dpo",
        "sft_last",
        "rm_last",
        "sft_packing",
        "sft_lora",
        "uneven_adv_group_std",
        "uneven_ppo_head",
    )
}
# DAPO's dynamic sampling, real rollouts (h11g; under torchrun only): a reward that zeroes the groups of
# prompts with an odd first number, so each rank keeps its own number of groups and resamples; fsdp2 is
# compared with ddp on the same 2 ranks (the same samples: the same weights and seeds).
DAPO = [
    *ONLINE,
    "algo=dapo",
    "trainer.micro_batch_size=2",
    "algo.max_resample_rounds=2",
    "kl=k3",  # a KL in the loss to a reference refreshed from the (sharded) policy every iteration
    "kl.ref_refresh=1",
    "reward=custom",
    "reward.fn=tests.rewards_for_tests:even_first_only",
]
ROLLOUTS: dict[str, list[str]] = {
    "ddp_dapo": [*DAPO, "trainer.parallel=ddp"],
    "fsdp2_dapo": [*DAPO, "trainer.parallel=fsdp2"],
}

# Held-out evaluation, sharded over the ranks (h11f): 15 prompts (8 + 7 on 2 ranks) in generate calls of
# at most 4; offline, the held-out data's loss too (16 rows, micro-batches of 3).
EVAL = [
    "task.eval_size=15",
    "eval.batch_size=4",
    "reward=custom",
    "reward.fn=tests.rewards_for_tests:prompt_mean_plus_length",
]
EVALS: dict[str, list[str]] = {
    "eval_grpo": [*ONLINE, *EVAL, "algo=grpo"],
    "eval_sft": [*BASE, *EVAL, "algo=sft", "algo.batch_size=8", "trainer.micro_batch_size=3"],
    "eval_dpo": [*BASE, *EVAL, "algo=dpo", "algo.batch_size=8", "trainer.micro_batch_size=3"],
}
# fsdp2 (under torchrun only): shares whose numbers of generate calls differ (8 prompts in calls of 7:
# [7, 1]; 7 prompts: [7]), so a per-call gather of the parameters would leave one rank waiting;
# `rlx.evaluate` gathers them once for the whole evaluation. Compared with one process's eval_grpo.
EVALS_FSDP2: dict[str, list[str]] = {
    "fsdp2_eval_grpo": [*EVALS["eval_grpo"], "eval.batch_size=7", "trainer.parallel=fsdp2"],
}


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="rlx.conf", version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def write_tiny_hf(path: Path) -> None:
    """A 1-layer GPT-2 and a word-level tokenizer for the sort task's text, saved for model=hf (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<unk>", *map(str, range(10))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = GPT2Config(  # no dropout: SFT trains in train mode, and each rank draws its own masks
        vocab_size=len(words),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        eos_token_id=0,
        bos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)


def global_batch(trainer, rank: int, world_size: int, uneven: bool = False):
    """The same 16 sampled completions in every process (same weights, same seed), unequal lengths;
    this rank's whole groups, cut to this rank's own longest completion. ``uneven`` (2 ranks): rank 0
    takes the first 3 groups, rank 1 the last."""
    from rlx.loops.update import Batch
    from rlx.rollout import sample_groups

    t = trainer.plan.trainer
    prompts = trainer.task.train_batch(0, t.prompts_per_step)
    torch.manual_seed(1234)
    ro = sample_groups(trainer.policy, prompts, t.group_size, trainer.sampling)
    g = torch.Generator().manual_seed(7)
    rewards = torch.randint(0, 4, (len(ro.tokens),), generator=g).float()
    # unequal completion lengths (as if EOS came early): 1..T real tokens per row, the rest padding
    width = ro.tokens.shape[1]
    cut = torch.randint(1, width + 1, (len(ro.tokens),), generator=g)
    cut[-1] = min(cut[-1].item(), width - 1)  # the last rank's rows never reach the full width
    keep = (torch.arange(width)[None, :] < cut[:, None]).float()
    ro.mask = ro.mask * keep
    ro.old_logp = ro.old_logp * ro.mask
    ro.tokens = torch.where(ro.mask.bool(), ro.tokens, torch.zeros_like(ro.tokens))
    per_rank = ro.num_groups // world_size
    groups = list(range(rank * per_rank, (rank + 1) * per_rank))
    if uneven and world_size == 2:
        groups = list(range(ro.num_groups - 1)) if rank == 0 else [ro.num_groups - 1]
    mine = ro.select_groups(groups)
    width = int(mine.mask.sum(-1).max().item())
    mine.tokens, mine.mask, mine.old_logp = (x[:, :width] for x in (mine.tokens, mine.mask, mine.old_logp))
    rows = [gr * t.group_size + i for gr in groups for i in range(t.group_size)]
    lengths = ro.mask.sum(-1).tolist()
    return Batch(mine, rewards[rows]), lengths


def flat_params(trainer) -> torch.Tensor:
    """Every trained parameter, whole (fsdp2's shards gathered: every rank calls it)."""
    params = list(trainer.policy.parameters())
    if getattr(trainer, "critic", None) is not None:
        params += [p for p in trainer.critic.own_parameters() if all(p is not q for q in params)]
    whole = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]
    return torch.cat([p.detach().reshape(-1).float() for p in whole])


def count_passes(trainer) -> list[int]:
    """[forward passes with gradient, zero-weight ones among them] on this rank, counted by wrappers
    that call through: the learner's forward (online) or the feed's micro-batch loss (offline), and the
    loop's `zero_weight_pass` (fsdp2's padding: a rank with fewer micro-batches than another)."""
    import rlx.loops.offline_feeds as offline
    import rlx.loops.update as online

    counts = [0, 0]
    owner, attr = (trainer.feed, "micro_loss") if hasattr(trainer, "feed") else (trainer.learner, "forward")
    module = offline if hasattr(trainer, "feed") else online
    inner, pad = getattr(owner, attr), module.zero_weight_pass

    def counting(*args, **kwargs):
        counts[0] += 1
        return inner(*args, **kwargs)

    def counting_pad(*args, **kwargs):
        counts[1] += 1
        return pad(*args, **kwargs)

    setattr(owner, attr, counting)
    module.zero_weight_pass = counting_pad
    return counts


def run(name: str, out: Path, data: Path) -> None:
    from rlx import distributed
    from rlx.train import build

    overrides = list(FSDP2[name] if name in FSDP2 else VARIANTS[name])
    base = name.removeprefix("fsdp2_").removeprefix("uneven_")
    offline = base.startswith(("sft", "dpo", "rm"))
    if offline:
        kind = "sft" if base.startswith("sft") else "pairs"
        overrides.append(f"data.train={data / f'{kind}_train.jsonl'}")
    if "lora" in base:
        overrides.append(f"model.name_or_path={data / 'tiny_hf'}")
    session = build(compose_cfg(overrides), run_dir=out / "runs" / name)
    trainer = session.trainer
    rank, world_size = distributed.world()
    result: dict[str, object] = {"world_size": world_size}
    passes = count_passes(trainer)
    if offline:
        metrics = [trainer.train_step(trainer.next_batch()) for _ in range(2)]
    else:
        batch, lengths = global_batch(trainer, rank, world_size, uneven="uneven_" in name)
        result["lengths"] = lengths
        metrics = []
        for step in range(2):  # the second update sees a moved policy (a KL to the reference, ratios != 1)
            trainer.step = step
            fresh = type(batch)(batch.rollout, batch.rewards)
            metrics.append(
                {k: v for k, v in trainer.learn(fresh).items() if not k.startswith(("time/", "thr"))}
            )
        result["kl_coef"] = trainer.kl_ctl.coef
    result["params"] = flat_params(trainer)
    result["metrics"] = metrics
    result["passes"] = distributed.gather_objects(passes)
    if "lora" in base:  # final/'s weights: the adapters merged (fsdp2: gathered, then merged on rank 0)
        from rlx.train import _savable

        saved, _ = _savable(trainer)
        if rank == 0:
            saved.save(out / f"{name}_final")
    session.tracker.close("FINISHED")
    session.release()
    if rank == 0:
        torch.save(result, out / f"{name}.pt")


def run_rollouts(name: str, out: Path, data: Path) -> None:
    """Two whole iterations (rollouts, DAPO's rounds, the update) of the loop; each rank's rows per
    iteration and the rounds run are recorded."""
    from rlx import distributed
    from rlx.train import build

    session = build(compose_cfg(ROLLOUTS[name]), run_dir=out / "runs" / name)
    trainer = session.trainer
    rows: list[int] = []
    learn = trainer.learn

    def counting_learn(batch, *args, **kwargs):
        rows.append(len(batch.rollout.tokens))
        return learn(batch, *args, **kwargs)

    trainer.learn = counting_learn
    metrics = []
    for _ in range(2):
        metrics.append({k: v for k, v in trainer.iteration().items() if not k.startswith(("time/", "thr"))})
        trainer.step += 1
    result = {
        "world_size": distributed.world()[1],
        "params": flat_params(trainer),
        "metrics": metrics,
        "rows": distributed.gather_objects(rows),
    }
    session.tracker.close("FINISHED")
    session.release()
    if distributed.world()[0] == 0:
        torch.save(result, out / f"{name}.pt")


def run_eval(name: str, out: Path, data: Path) -> None:
    """The loop's own ``evaluate()`` after building; each rank counts the held-out prompts it generated
    for and the held-out rows it scored (a wrapper that counts and calls through)."""
    from rlx import distributed
    from rlx.train import build

    overrides = list(EVALS[name] if name in EVALS else EVALS_FSDP2[name])
    if name.removeprefix("fsdp2_") != "eval_grpo":
        kind = "sft" if name == "eval_sft" else "pairs"
        overrides += [
            f"data.train={data / f'{kind}_train.jsonl'}",
            f"data.eval={data / f'{kind}_heldout.jsonl'}",
        ]
    session = build(compose_cfg(overrides), run_dir=out / "runs" / name)
    trainer = session.trainer
    generated: list[int] = []
    scored: list[int] = []
    generate = trainer.policy.generate

    def counting_generate(ids, mask, *args, **kwargs):
        generated.append(int(ids.shape[0]))
        return generate(ids, mask, *args, **kwargs)

    trainer.policy.generate = counting_generate
    feed = getattr(trainer, "feed", None)
    if feed is not None:
        micro_loss = feed.micro_loss

        def counting_micro_loss(data, rows, *args, **kwargs):
            scored.append(len(rows))
            return micro_loss(data, rows, *args, **kwargs)

        feed.micro_loss = counting_micro_loss
    metrics = trainer.evaluate()
    result = {
        "world_size": distributed.world()[1],
        "metrics": metrics,
        "generated": distributed.gather_objects(generated),
        "scored": distributed.gather_objects(scored),
    }
    session.tracker.close("FINISHED")
    session.release()
    if distributed.world()[0] == 0:
        torch.save(result, out / f"{name}.pt")


def main() -> None:
    out, data = Path(sys.argv[1]), Path(sys.argv[2])
    names = sys.argv[3:] or [*VARIANTS, *EVALS, *FSDP2, *EVALS_FSDP2, *ROLLOUTS]
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        torchrun_only = name in FSDP2 or name in EVALS_FSDP2 or name in ROLLOUTS
        if torchrun_only and "WORLD_SIZE" not in os.environ:
            continue
        evals = name in EVALS or name in EVALS_FSDP2
        (run_eval if evals else run_rollouts if name in ROLLOUTS else run)(name, out, data)
    from rlx.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    main()
