"""``train(cfg) -> summary``: check the config, build the job, run its loop, evaluate, save.

`plan` does every check that needs no model (the common settings here, the loop's own in the loop
module), so bad input fails in about a second with one line naming the culprit; the CLI runs it for
every job of a sweep before the first one starts. `build` makes the job (`Session`); `train` runs it
and always ends its MLflow run.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import SchedulerType, get_scheduler

from rlx.checkpoint import load_model_weights, save_checkpoint, save_model_dir, set_rng_state
from rlx.errors import NonFiniteError, RlxError, StopRequested, require
from rlx.loops import LOOPS, LoopContext, NonFiniteGuard, Plan, Trainer
from rlx.models import Policy, build_model
from rlx.registry import check_type, instantiate_checked
from rlx.resume import find_checkpoint, load_for_resume, run_dir_of, truncate_jsonl
from rlx.rewards import check_reward_columns
from rlx.runtime import dist_rank, resolve_device, seed_everything
from rlx.tasks import Task
from rlx.tracking import Tracker, console, flatten, summary_table

# Types of the settings every loop shares; each loop checks its own (`algo.*` and the pieces).
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
        "min_lr_ratio": float,
        "grad_clip": float | None,
        "micro_batch_size": int | None,
        "eval_every": int,
        "save_every": int,
        "keep_checkpoints": int,
        "samples_every": int,
        "resume": str | None,
        "on_nonfinite": str,
        "max_nonfinite": int,
    },
    "rollout": {"temperature": float, "top_k": int, "top_p": float, "max_new_tokens": int | None},
    "eval": {"greedy": bool, "batch_size": int},
}


def plan(cfg: DictConfig | dict[str, Any]) -> Plan:
    """Check the whole config and bind the pluggable pieces; no model is built."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(c, dict)
    for section, types_ in SETTING_TYPES.items():
        for key, kind in types_.items():
            if key in c.get(section, {}):
                check_type(f"{section}.{key}", c[section][key], kind)
    t = c["trainer"]
    device = resolve_device(t["device"])
    require(t["steps"] >= 0, f"trainer.steps must be >= 0, got {t['steps']}")
    require(t["lr"] > 0, f"trainer.lr must be positive, got {t['lr']}")
    require(0 <= t["warmup_ratio"] < 1, f"trainer.warmup_ratio must be in [0, 1), got {t['warmup_ratio']}")
    require(0 <= t["min_lr_ratio"] <= 1, f"trainer.min_lr_ratio must be in [0, 1], got {t['min_lr_ratio']}")
    schedules = [s.value for s in SchedulerType]
    require(t["lr_schedule"] in schedules, f"trainer.lr_schedule={t['lr_schedule']!r}; one of {schedules}")
    require(t["grad_clip"] is None or t["grad_clip"] > 0, "trainer.grad_clip must be positive or null")
    require(t["keep_checkpoints"] >= 0, "trainer.keep_checkpoints must be >= 0")
    require(t["save_every"] >= 0, f"trainer.save_every must be >= 0, got {t['save_every']}")
    NonFiniteGuard(str(t["on_nonfinite"]), int(t["max_nonfinite"]))  # checks both values
    task: Task = instantiate_checked(c["task"], where="task")
    loop = str(c["algo"].get("loop") or "online")
    entry = LOOPS.get(loop)
    settings = entry.meta["plan"](c, task)
    if "reward" in c and (loop != "offline" or getattr(task, "has_ground_truth", True)):  # h15
        check_reward_columns(c["reward"], task)  # the reward's columns exist in the task's data
    return Plan(cfg=c, task=task, loop=entry.name, settings=settings, device=device)


def _hydra_job() -> tuple[Path, Path, str]:
    """(this job's output directory, the directory rlx was launched from, the job's overrides)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return Path(hc.runtime.output_dir), Path(hc.runtime.cwd), " ".join(hc.overrides.task)
    except ValueError:  # not under @hydra.main (tests call train() directly)
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        return Path("outputs") / stamp, Path.cwd(), ""


def _build_policy(p: Plan) -> Policy:
    with console.status(f"building model {p.cfg['model'].get('name', '')}", spinner="dots"):
        policy = build_model(p.cfg["model"], p.task)
        policy.model.to(p.device)
        policy.model.eval()  # no dropout in RL; gradients still flow
    return policy


def make_optimizer(
    c: dict[str, Any], params: Any, total_updates: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The configured optimizer (``optimizer._target_``) and transformers' LR schedule."""
    t = c["trainer"]
    optimizer = instantiate_checked(c["optimizer"], where="optimizer", params=list(params), lr=float(t["lr"]))
    total_updates = max(int(total_updates), 1)
    schedule, extra = str(t["lr_schedule"]), {}
    if schedule == "cosine" and t["min_lr_ratio"] > 0:  # cosine decay to a floor
        schedule, extra = "cosine_with_min_lr", {"min_lr_rate": float(t["min_lr_ratio"])}
    scheduler = get_scheduler(
        schedule,
        optimizer,
        num_warmup_steps=int(t["warmup_ratio"] * total_updates),
        num_training_steps=total_updates,
        scheduler_specific_kwargs=extra,
    )
    return optimizer, scheduler


def _save(p: Plan, run_dir: Path, config_yaml: str, tracker: Tracker, trainer: Trainer) -> Path:
    return save_checkpoint(
        run_dir / "checkpoints",
        trainer.step,
        trainer.policy,
        config_yaml=config_yaml,
        trainer_state={  # a loop without an optimizer (algo=trpo) stores None
            "optimizer": trainer.optimizer.state_dict() if trainer.optimizer is not None else None,
            "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
            "loop": trainer.state_dict(),
            "mlflow_run_id": tracker.run_id,
        },
        keep=int(p.cfg["trainer"]["keep_checkpoints"]),
    )


class StopSignals:
    """SIGINT / SIGTERM during training: the first one lets the current step finish, then the loop
    saves a checkpoint and stops (`LoopContext.step_done`); a second SIGINT exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:  # the second signal: no more waiting
            raise KeyboardInterrupt
        self.signum = signum
        console.print(
            f"[yellow]{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            "(Ctrl-C again to exit at once)[/yellow]"
        )

    def pending(self) -> int | None:
        return self.signum


@dataclass
class Session:
    """A built job: what `train` runs, reachable for tests and for resuming."""

    plan: Plan
    run_dir: Path
    config_yaml: str
    tracker: Tracker
    trainer: Trainer
    signals: StopSignals
    resumed_from: Path | None = None

    def save(self) -> Path:
        return _save(self.plan, self.run_dir, self.config_yaml, self.tracker, self.trainer)


def _prepare_run_dir(run_dir: Path, config_yaml: str) -> None:
    """Create the run directory and write its config; an unwritable place is one clear error."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    except OSError as exc:
        raise RlxError(f"output directory {run_dir} is not writable ({exc.strerror or exc})") from exc


def _restore(trainer: Trainer, checkpoint: Path, state: dict[str, Any]) -> None:
    """Put a built trainer back exactly where ``checkpoint`` left it (RNGs last)."""
    policy = trainer.policy
    if hasattr(policy, "load_weights"):
        policy.load_weights(checkpoint)
    else:
        load_model_weights(policy.model, checkpoint)  # type: ignore[attr-defined]
    try:
        if trainer.optimizer is not None:  # algo=trpo has none
            trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.scheduler is not None:
            trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.load_state_dict(state["loop"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise RlxError(f"checkpoint {checkpoint} does not fit this run's trainer ({exc})") from exc
    set_rng_state(state["rng"])


def build(cfg: DictConfig | dict[str, Any], run_dir: Path | None = None) -> Session:
    """Check the config, find the checkpoint to resume from, then build the tracker and the loop."""
    p = plan(cfg)
    c = p.cfg
    t = c["trainer"]
    rank, _ = dist_rank()
    default_dir, launch_dir, overrides = _hydra_job()
    run_dir = Path(run_dir or default_dir)
    checkpoint = find_checkpoint(t.get("resume"), run_dir)
    state: dict[str, Any] | None = None
    if checkpoint is not None:
        state = load_for_resume(checkpoint, c)  # readable, and from this config: before any building
        run_dir = run_dir_of(checkpoint)
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(c))  # the composed config, interpolations resolved
    _prepare_run_dir(run_dir, config_yaml)
    if state is not None and rank == 0:
        for name in ("metrics.jsonl", "samples.jsonl"):  # rows written after the checkpoint
            truncate_jsonl(run_dir / name, int(state["step"]))
    tags = {
        "algo": str(c["algo"].get("name")),
        "model": str(c["model"].get("name")),
        "task": str(c["task"].get("name")),
        "reward": str(c["reward"].get("name")),
        "run_dir": str(run_dir.resolve()),
        "overrides": overrides[:5000],
    }
    seed_everything(int(t["seed"]) + rank)
    tracker = Tracker(
        run_dir,
        c["logger"],
        params=flatten(c),
        tags=tags,
        launch_dir=launch_dir,
        resume_run_id=state.get("mlflow_run_id") if state else None,
        fresh=state is None,
    )
    signals = StopSignals()
    try:
        ctx = LoopContext(
            plan=p,
            tracker=tracker,
            run_dir=run_dir,
            config_yaml=config_yaml,
            build_policy=partial(_build_policy, p),
            make_optimizer=partial(make_optimizer, c),
            save_checkpoint=partial(_save, p, run_dir, config_yaml, tracker),
            nonfinite=NonFiniteGuard(str(t["on_nonfinite"]), int(t["max_nonfinite"])),
            save_every=int(t["save_every"] or 0),
            stop_signal=signals.pending,
        )
        trainer = LOOPS.get(p.loop).fn(ctx)
        if checkpoint is not None and state is not None:
            _restore(trainer, checkpoint, state)
            console.print(f"resumed from {checkpoint} at step {trainer.step}")
    except BaseException:
        tracker.close("FAILED")
        raise
    return Session(p, run_dir, config_yaml, tracker, trainer, signals, checkpoint)


def train(cfg: DictConfig | dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """Train one job and return its summary (final held-out metrics, paths, MLflow run id).

    The MLflow run is always ended: FINISHED, FAILED (any error) or KILLED (SIGINT/SIGTERM, after a
    checkpoint of the last finished step). A NaN or inf loss or gradient stops the run
    (``trainer.on_nonfinite=stop``); the state it reached is saved for inspection under
    ``checkpoints/nonfinite_step_*`` (not resumed from: it may hold part of an iteration's updates).
    """
    started = time.perf_counter()
    session = build(cfg, run_dir)
    c, trainer, tracker = session.plan.cfg, session.trainer, session.tracker
    rank, _ = dist_rank()
    status = "FAILED"
    try:
        with session.signals:
            trainer.run()
            final = trainer.evaluate()
        tracker.log_metrics(final, step=trainer.step)
        if rank == 0:
            _finish(session)
        status = "FINISHED"
    except NonFiniteError as exc:
        path = _save_for_inspection(session)
        raise NonFiniteError(f"{exc}; stopped; the state it reached is in {path}") from exc
    except (StopRequested, KeyboardInterrupt):
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


def _save_for_inspection(session: Session) -> Path:
    path = session.run_dir / "checkpoints" / f"nonfinite_step_{session.trainer.step:06d}"
    save_model_dir(path, session.trainer.policy, session.config_yaml)
    return path


def _finish(session: Session) -> None:
    """Final model, reward curve and artifacts."""
    from rlx.plots import reward_curve

    c, run_dir, tracker = session.plan.cfg, session.run_dir, session.tracker
    final_dir = run_dir / "final"
    save_model_dir(final_dir, session.trainer.policy, session.config_yaml)
    title = f"algo={c['algo'].get('name')} model={c['model'].get('name')} reward={c['reward'].get('name')}"
    png = reward_curve(tracker.history, run_dir / "reward_curve.png", title)
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl"):
        tracker.log_artifact(run_dir / name)
    tracker.log_artifact(png)
    if c["logger"].get("log_model", True):
        tracker.log_artifact(final_dir, "model")
