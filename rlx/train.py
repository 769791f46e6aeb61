"""``train(cfg) -> summary``: resolve the config, build the pieces, run the loop, evaluate, save.

`plan` does every check that needs no model, so bad input fails in well under a second with one
line naming the culprit (the CLI runs it for every job of a sweep before the first one starts).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import SchedulerType, get_scheduler

from rlx.advantages import ADVANTAGES
from rlx.checkpoint import save_checkpoint, save_model_dir
from rlx.errors import NonFiniteError, RlxError
from rlx.evaluate import evaluate
from rlx.kl import KL_ESTIMATORS
from rlx.loops.online import OnlineSettings, OnlineTrainer, Pieces
from rlx.losses.aggregation import AGGREGATIONS
from rlx.losses.policy import POLICY_LOSSES
from rlx.models import Policy, Sampling, build_model
from rlx.registry import Resolved, check_type, instantiate_checked
from rlx.rewards import REWARDS, load_callable
from rlx.tasks import Task
from rlx.tracking import Tracker, console, dist_rank, flatten, summary_table

KL_LOOP_KEYS = {"coef": 0.0, "placement": "loss", "ref_refresh": 0}


@dataclass
class Plan:
    """A checked config: the task, the bound math, the loop settings and the device."""

    cfg: dict[str, Any]
    task: Task
    pieces: Pieces
    settings: OnlineSettings
    device: torch.device


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RlxError(message)


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise RlxError(
                f"trainer.device={name} but no CUDA device is available (torch {torch.__version__}, "
                f"{build}); use trainer.device=cpu or auto"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RlxError(f"trainer.device={name} but only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise RlxError(f"trainer.device={name!r} is not one of auto, cpu, cuda, cuda:N")


# The types of the loop's own settings (the pluggable pieces are checked against their signatures).
SETTING_TYPES: dict[str, dict[str, Any]] = {
    "trainer": {
        "device": str,
        "seed": int,
        "steps": int,
        "prompts_per_step": int,
        "group_size": int,
        "lr": float,
        "lr_schedule": str,
        "warmup_ratio": float,
        "grad_clip": float | None,
        "micro_batch_size": int | None,
        "eval_every": int,
        "save_every": int,
        "keep_checkpoints": int,
        "samples_every": int,
    },
    "rollout": {"temperature": float, "top_k": int, "top_p": float, "max_new_tokens": int | None},
    "eval": {"greedy": bool, "batch_size": int},
    "algo": {
        "name": str,
        "aggregation": str,
        "max_len": int | None,
        "entropy_coef": float,
        "epochs": int,
        "minibatches": int,
        "dynamic_sampling": bool,
        "max_resample_rounds": int,
    },
}


def plan(cfg: DictConfig | dict[str, Any]) -> Plan:
    """Check the whole config and bind the pluggable pieces; no model is built."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(c, dict)
    for section, types_ in SETTING_TYPES.items():
        for key, kind in types_.items():
            if key in c[section]:
                check_type(f"{section}.{key}", c[section][key], kind)
    t, a, r = c["trainer"], c["algo"], c["rollout"]
    device = resolve_device(t["device"])
    _require(t["steps"] >= 0, f"trainer.steps must be >= 0, got {t['steps']}")
    _require(
        t["prompts_per_step"] >= 1, f"trainer.prompts_per_step must be >= 1, got {t['prompts_per_step']}"
    )
    _require(t["group_size"] >= 1, f"trainer.group_size must be >= 1, got {t['group_size']}")
    _require(t["lr"] > 0, f"trainer.lr must be positive, got {t['lr']}")
    _require(0 <= t["warmup_ratio"] < 1, f"trainer.warmup_ratio must be in [0, 1), got {t['warmup_ratio']}")
    _require(0 <= t["min_lr_ratio"] <= 1, f"trainer.min_lr_ratio must be in [0, 1], got {t['min_lr_ratio']}")
    schedules = [s.value for s in SchedulerType]
    _require(t["lr_schedule"] in schedules, f"trainer.lr_schedule={t['lr_schedule']!r}; one of {schedules}")
    _require(t["grad_clip"] is None or t["grad_clip"] > 0, "trainer.grad_clip must be positive or null")
    _require(a["epochs"] >= 1, f"algo.epochs must be >= 1, got {a['epochs']}")
    _require(a["minibatches"] >= 1, f"algo.minibatches must be >= 1, got {a['minibatches']}")
    n = t["prompts_per_step"] * t["group_size"]
    _require(
        n % a["minibatches"] == 0,
        f"{n} completions per step (trainer.prompts_per_step x trainer.group_size) do not split into "
        f"algo.minibatches={a['minibatches']}",
    )
    mbs = t["micro_batch_size"]
    _require(mbs is None or mbs >= 1, f"trainer.micro_batch_size must be >= 1 or null, got {mbs}")
    _require(r["temperature"] > 0, f"rollout.temperature must be > 0, got {r['temperature']}")
    _require(r["top_k"] >= 0, f"rollout.top_k must be >= 0 (0 = off), got {r['top_k']}")
    _require(0 < r["top_p"] <= 1, f"rollout.top_p must be in (0, 1], got {r['top_p']}")
    _require(a["entropy_coef"] >= 0, f"algo.entropy_coef must be >= 0, got {a['entropy_coef']}")

    task: Task = instantiate_checked(c["task"], where="task")
    max_new = r["max_new_tokens"] or task.max_new_tokens
    _require(max_new >= 1, f"rollout.max_new_tokens must be >= 1, got {max_new}")

    reward = REWARDS.resolve(c["reward"], where="reward")
    if reward.name == "custom":
        fn = reward.kwargs.get("fn")
        _require(fn not in (None, "", "???"), "reward=custom needs reward.fn=my_module:my_reward")
        load_callable(str(fn), where="reward.fn")
    advantage = ADVANTAGES.resolve(c["adv_norm"], where="adv_norm")
    min_group = advantage.entry.meta.get("min_group_size", 1)
    _require(
        t["group_size"] >= min_group,
        f"adv_norm={advantage.name} needs trainer.group_size >= {min_group}, got {t['group_size']} "
        "(a group of one has no spread to normalise by)",
    )
    if a["dynamic_sampling"]:
        _require(t["group_size"] >= 2, "algo.dynamic_sampling needs trainer.group_size >= 2")
    policy_loss = POLICY_LOSSES.resolve(c["loss"], where="loss")
    _probe_loss(policy_loss)
    aggregation = AGGREGATIONS.resolve(str(a["aggregation"]), where="algo.aggregation")
    kl = _resolve_kl(c["kl"])

    settings = OnlineSettings(
        steps=int(t["steps"]),
        prompts_per_step=int(t["prompts_per_step"]),
        group_size=int(t["group_size"]),
        epochs=int(a["epochs"]),
        minibatches=int(a["minibatches"]),
        micro_batch_size=mbs,
        grad_clip=t["grad_clip"],
        entropy_coef=float(a["entropy_coef"]),
        max_len=a.get("max_len"),
        dynamic_sampling=bool(a["dynamic_sampling"]),
        max_resample_rounds=int(a.get("max_resample_rounds") or 0),
        kl_coef=float(kl.extra["coef"]) if kl else 0.0,
        kl_placement=str(kl.extra["placement"]) if kl else "loss",
        ref_refresh=int(kl.extra["ref_refresh"] or 0) if kl else 0,
        eval_every=int(t["eval_every"] or 0),
        save_every=int(t["save_every"] or 0),
        samples_every=int(t["samples_every"] or 0),
        eval_greedy=bool(c["eval"]["greedy"]),
        eval_batch_size=int(c["eval"]["batch_size"]),
        sampling=Sampling(
            temperature=float(r["temperature"]),
            top_k=int(r["top_k"]),
            top_p=float(r["top_p"]),
            max_new_tokens=int(max_new),
        ),
    )
    pieces = Pieces(
        reward=reward, advantage=advantage, policy_loss=policy_loss, aggregation=aggregation, kl=kl
    )
    return Plan(cfg=c, task=task, pieces=pieces, settings=settings, device=device)


def _resolve_kl(node: dict[str, Any]) -> Resolved | None:
    if node.get("name") in (None, "none"):
        return None
    kl = KL_ESTIMATORS.resolve(node, where="kl", reserved=KL_LOOP_KEYS)
    _require(
        kl.extra["placement"] in ("loss", "reward"),
        f"kl.placement must be loss or reward, got {kl.extra['placement']!r}",
    )
    _require(float(kl.extra["coef"]) >= 0, f"kl.coef must be >= 0, got {kl.extra['coef']}")
    _require(int(kl.extra["ref_refresh"] or 0) >= 0, "kl.ref_refresh must be >= 0")
    return kl


def _probe_loss(loss: Resolved) -> None:
    """Call the loss once on a tiny batch so that bad hyperparameter values fail at start-up."""
    x = torch.zeros(1, 2)
    loss(x, x, torch.ones(1, 2), torch.ones(1, 2))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _hydra_job() -> tuple[Path, Path, str]:
    """(this job's output directory, the directory rlx was launched from, the job's overrides)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return Path(hc.runtime.output_dir), Path(hc.runtime.cwd), " ".join(hc.overrides.task)
    except ValueError:  # not under @hydra.main (tests call train() directly)
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        return Path("outputs") / stamp, Path.cwd(), ""


@dataclass
class Session:
    """A built job: everything `train` runs, reachable for tests and for resuming."""

    plan: Plan
    run_dir: Path
    config_yaml: str
    policy: Policy
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tracker: Tracker
    trainer: OnlineTrainer

    def evaluate(self) -> dict[str, float]:
        return self.trainer.evaluate()

    def save(self, step: int) -> Path:
        return self.trainer.save_checkpoint(step)


def _evaluate(p: Plan, policy: Policy) -> dict[str, float]:
    s = p.settings
    metrics, _ = evaluate(
        policy, p.task, p.pieces.reward, s.sampling, greedy=s.eval_greedy, batch_size=s.eval_batch_size
    )
    return metrics


def _save(
    p: Plan,
    run_dir: Path,
    config_yaml: str,
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
) -> Path:
    return save_checkpoint(
        run_dir / "checkpoints",
        step,
        policy,
        config_yaml=config_yaml,
        trainer_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        keep=int(p.cfg["trainer"]["keep_checkpoints"]),
    )


def build(cfg: DictConfig | dict[str, Any], run_dir: Path | None = None) -> Session:
    """Check the config, then build the model, optimizer, scheduler, tracker and loop."""
    p = plan(cfg)
    c, s = p.cfg, p.settings
    rank, _ = dist_rank()
    default_dir, launch_dir, overrides = _hydra_job()
    run_dir = Path(run_dir or default_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(c))  # the composed config, interpolations resolved
    (run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")

    seed_everything(int(c["trainer"]["seed"]) + rank)
    with console.status(f"building model {c['model'].get('name', '')}", spinner="dots"):
        policy = build_model(c["model"], p.task)
        policy.model.to(p.device)
        policy.model.eval()  # no dropout in RL; gradients still flow
    optimizer = instantiate_checked(
        c["optimizer"], where="optimizer", params=list(policy.parameters()), lr=float(c["trainer"]["lr"])
    )
    total_updates = max(s.steps * s.epochs * s.minibatches, 1)
    schedule, extra = str(c["trainer"]["lr_schedule"]), {}
    if schedule == "cosine" and c["trainer"]["min_lr_ratio"] > 0:  # cosine decay to a floor
        schedule, extra = "cosine_with_min_lr", {"min_lr_rate": float(c["trainer"]["min_lr_ratio"])}
    scheduler = get_scheduler(
        schedule,
        optimizer,
        num_warmup_steps=int(c["trainer"]["warmup_ratio"] * total_updates),
        num_training_steps=total_updates,
        scheduler_specific_kwargs=extra,
    )
    tags = {
        "algo": str(c["algo"].get("name")),
        "model": str(c["model"].get("name")),
        "task": str(c["task"].get("name")),
        "reward": str(c["reward"].get("name")),
        "run_dir": str(run_dir.resolve()),
        "overrides": overrides[:5000],
    }
    tracker = Tracker(run_dir, c["logger"], params=flatten(c), tags=tags, launch_dir=launch_dir)
    trainer = OnlineTrainer(
        settings=s,
        pieces=p.pieces,
        task=p.task,
        policy=policy,
        optimizer=optimizer,
        scheduler=scheduler,
        tracker=tracker,
        run_dir=run_dir,
        save_checkpoint=partial(_save, p, run_dir, config_yaml, policy, optimizer, scheduler),
        evaluate=partial(_evaluate, p, policy),
    )
    session = Session(p, run_dir, config_yaml, policy, optimizer, scheduler, tracker, trainer)
    return session


def train(cfg: DictConfig | dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """Train one job and return its summary (final held-out metrics, paths, MLflow run id).

    The MLflow run is always ended: FINISHED, FAILED (any error) or KILLED (Ctrl-C). A NaN or inf
    loss or gradient stops the run after saving the last finite state as a checkpoint.
    """
    started = time.perf_counter()
    session = build(cfg, run_dir)
    c, trainer, tracker = session.plan.cfg, session.trainer, session.tracker
    rank, _ = dist_rank()
    status = "FAILED"
    try:
        trainer.run()
        final = session.evaluate()
        tracker.log_metrics(final, step=trainer.step)
        if rank == 0:
            _finish(session.run_dir, session.policy, session.config_yaml, tracker, c)
        status = "FINISHED"
    except NonFiniteError as exc:
        path = session.save(trainer.step)
        raise NonFiniteError(f"{exc}; stopped, last finite state saved to {path}") from exc
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close(status)
    summary = {
        **final,
        "steps": trainer.step,
        "time/total_s": time.perf_counter() - started,
        "run_dir": str(session.run_dir),
        "mlflow_run_id": tracker.run_id,
    }
    if rank == 0:
        title = f"rlx train: algo={c['algo'].get('name')} reward={c['reward'].get('name')}"
        console.print(summary_table(title, summary))
    return summary


def _finish(run_dir: Path, policy: Any, config_yaml: str, tracker: Tracker, c: dict[str, Any]) -> None:
    """Final model, reward curve and artifacts."""
    from rlx.plots import reward_curve

    final_dir = run_dir / "final"
    save_model_dir(final_dir, policy, config_yaml)
    title = f"algo={c['algo'].get('name')} model={c['model'].get('name')} reward={c['reward'].get('name')}"
    png = reward_curve(tracker.history, run_dir / "reward_curve.png", title)
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_artifact(run_dir / "metrics.jsonl")
    tracker.log_artifact(run_dir / "samples.jsonl")
    tracker.log_artifact(png)
    if c["logger"].get("log_model", True):
        tracker.log_artifact(final_dir, "model")
