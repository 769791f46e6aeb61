"""``train(cfg) -> summary``: check the config, build the job, run its loop, evaluate, save.

`plan` does every check that needs no model (the common settings here, the loop's own in the loop
module), so bad input fails in about a second with one line naming the culprit; the CLI runs it for
every job of a sweep before the first one starts. `build` makes the job (`Session`); `train` runs it
and always ends its MLflow run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlx import distributed
from rlx.checkpoint import (
    TRAINER_STATE,
    load_model_weights,
    rng_state,
    save_checkpoint,
    save_model_dir,
    set_rng_state,
)
from rlx.errors import NonFiniteError, RlxError, StopNow, StopRequested, require
from rlx.loops import (
    LOOPS,
    EvalSettings,
    LoopContext,
    NonFiniteGuard,
    Plan,
    RolloutSettings,
    Trainer,
    TrainerSettings,
)
from rlx.loops.optim import make_optimizer
from rlx.models import Policy, build_model
from rlx.registry import instantiate_checked
from rlx.resume import (
    RunStart,
    keep_first_row_at,
    lock_run_dir,
    probe_lock,
    start_run,
    target_run_dir,
    truncate_jsonl,
)
from rlx.rewards import check_reward_columns
from rlx.runinfo import read_sweep, run_name, run_tags
from rlx.runtime import dist_rank, resolve_device, seed_everything
from rlx.settings import read_settings
from rlx.tasks import Task
from rlx.tracking import Tracker, as_text, console, flatten, log, summary_table

MAX_STEPS = 10**9  # iterations: beyond that a run never ends (and the step counters' formats break)
MAX_BATCH = 2**20  # completions per iteration: beyond that the first rollout exhausts any memory


def plan(cfg: DictConfig | dict[str, Any]) -> Plan:
    """Check the whole config and bind the pluggable pieces; no model is built."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(c, dict)
    trainer = read_settings(TrainerSettings, c.get("trainer"), where="trainer")
    rollout = read_settings(RolloutSettings, c.get("rollout"), where="rollout")
    evaluation = read_settings(EvalSettings, c.get("eval"), where="eval")
    t = trainer
    # Upper bounds (beyond the dataclasses' own rules): where a value would exhaust memory or overflow
    # an RNG seed before any work.
    require(0 <= t.seed < 2**32, f"trainer.seed must be in [0, 2**32), got {t.seed}")
    require(t.steps <= MAX_STEPS, f"trainer.steps must be in [0, {MAX_STEPS}], got {t.steps}")
    require(
        t.prompts_per_step * t.group_size <= MAX_BATCH,
        f"trainer.prompts_per_step * trainer.group_size = {t.prompts_per_step * t.group_size} "
        f"completions per iteration; at most {MAX_BATCH}",
    )
    require(math.isfinite(rollout.temperature), f"rollout.temperature must be > 0, got {rollout.temperature}")
    new = rollout.max_new_tokens
    device = resolve_device(trainer.device)
    task: Task = instantiate_checked(c["task"], where="task")
    positions, prompt_len = c["model"].get("n_positions"), getattr(task, "length", None)
    if isinstance(positions, int) and isinstance(prompt_len, int) and not c["model"].get("init_from"):
        answer = new or task.max_new_tokens  # model=tiny_gpt: prompt, separator and EOS, then the answer
        require(
            prompt_len + 2 + answer <= positions,
            f"rollout.max_new_tokens={answer}: {prompt_len + 2} prompt tokens + {answer} new ones do not fit "
            f"model.n_positions={positions}",
        )
    loop = str(c["algo"].get("loop") or "online")
    entry = LOOPS.get(loop)
    p = Plan(c, task, trainer, rollout, evaluation, entry.name, None, device)
    p.settings = entry.meta["plan"](p)
    _check_world(p)
    if "reward" in c and (loop != "offline" or getattr(task, "has_ground_truth", True)):  # h15
        check_reward_columns(c["reward"], task)  # the reward's columns exist in the task's data
    return p


def _check_world(p: Plan) -> None:
    """h11: under torchrun (trainer.parallel=ddp) the ranks split each global batch evenly: whole
    prompt groups online, rows of algo.batch_size offline; under fsdp2 a fused optimizer step must have
    a kernel for sharded parameters."""
    mode = distributed.resolve_parallel(p.trainer.parallel)
    if mode == "none":
        return
    _, world_size, _ = distributed.env_world()
    if mode == "fsdp2":
        distributed.check_fused_on_shards(p.cfg.get("optimizer") or {})
    if p.loop == "offline":
        distributed.check_divides(world_size, int(p.settings.algo.batch_size), "algo.batch_size")
    else:
        distributed.check_divides(world_size, p.trainer.prompts_per_step, "trainer.prompts_per_step")


def _shard_fsdp2(p: Plan, trainer: Trainer) -> None:
    """h11f: trainer.parallel=fsdp2: shard the built policy and point its optimizer at the shards (the
    reference copy, made by the loop, stays whole: `rlx.distributed`'s fsdp2 notes)."""
    if distributed.resolve_parallel(p.trainer.parallel) != "fsdp2":
        return
    optimizer = trainer.optimizer
    distributed.shard_policy(trainer.policy, p.device, [optimizer] if optimizer is not None else [])


# h12: trainer.threads ---------------------------------------------------------------------------
def _parallel_launcher() -> bool:
    """True under torchrun with several local ranks, or inside a Hydra sweep whose launcher runs jobs
    side by side (joblib, submitit's local executor, ray, ...): every job should then take one thread."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) > 1:
        return True
    try:
        from hydra.core.hydra_config import HydraConfig

        target = str(HydraConfig.get().launcher.get("_target_", ""))
    except (ValueError, ImportError):
        return False
    # h13b: a SLURM job (hydra/launcher=slurm) runs on its own allocation, not beside its sweep's others
    return not target.endswith(("BasicLauncher", "SlurmLauncher")) and target != ""


def resolve_threads(setting: int | str) -> int | None:
    """The thread count ``trainer.threads`` asks for; None = leave torch's default alone.

    ``auto`` (or 0) picks 1 under a parallel launcher or on a machine already busy (1-minute load
    average >= half its cores: measured here, 20 iterations of the sort task took 43-54 s with torch's
    default threads on a loaded 2-core machine against 8.7 s with one); otherwise torch's default
    (one per physical core, or OMP_NUM_THREADS when the caller set it, which is then respected).
    """
    if setting not in ("auto", 0):
        return int(setting)
    if _parallel_launcher():
        return 1
    if "OMP_NUM_THREADS" in os.environ:
        return None
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= max(cores / 2, 1)
    except OSError:  # no load average on this platform
        busy = False
    return 1 if busy else None


def apply_threads(setting: int | str) -> int:
    """Set torch's intra-op threads (and inter-op ones, which torch allows only before its first
    parallel work) from ``trainer.threads``; returns the intra-op count now in force."""
    import torch

    n = resolve_threads(setting)
    if n is not None:
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # already set, or inter-op work already ran in this process (tests)
            pass
    return torch.get_num_threads()


def _hydra_job() -> tuple[Path, Path, list[str], Path | None]:
    """(this job's output directory, the directory rlx was launched from, the job's overrides, the
    sweep directory of a multirun job or None)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
        return Path(hc.runtime.output_dir), Path(hc.runtime.cwd), list(hc.overrides.task), sweep_dir
    except ValueError:  # not under @hydra.main (tests call train() directly)
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        return Path("outputs") / stamp, Path.cwd(), [], None


def _build_policy(p: Plan) -> Policy:
    import torch

    quiet = not log.isEnabledFor(logging.INFO)  # rlx train -q
    spinner = console.status(f"building model {p.cfg['model'].get('name', '')}", spinner="dots")
    with contextlib.nullcontext() if quiet else spinner:
        policy = build_model(p.cfg["model"], p.task)
        policy.model.to(p.device)
        policy.autocast_dtype = p.trainer.autocast_dtype  # trainer.precision
        if policy.autocast_dtype is torch.bfloat16 and p.device.type == "cuda":
            if not torch.cuda.is_bf16_supported():
                raise RlxError(f"trainer.precision=bf16: {torch.cuda.get_device_name(p.device)} has no bf16")
        policy.model.eval()  # no dropout in RL; gradients still flow
        distributed.broadcast_module(policy.model)  # h11: rank 0's initial weights on every rank
    return policy


def _save(
    p: Plan, run_dir: Path, config_yaml: str, tracker: Tracker, trainer: Trainer, gather: bool = True
) -> Path:
    """Every rank calls this; rank 0 writes the checkpoint with every rank's RNG state (h11:
    ``rng_ranks``, gathered when ``gather``), the other ranks write nothing."""
    rank, world_size = distributed.world()
    rngs = distributed.gather_objects(rng_state()) if gather else None
    policy, optimizer_state = _savable(trainer)
    if rank != 0:
        return run_dir / "checkpoints" / f"step_{trainer.step:06d}"
    return save_checkpoint(
        run_dir / "checkpoints",
        trainer.step,
        policy,
        config_yaml=config_yaml,
        trainer_state={  # a loop without an optimizer (algo=trpo) stores None
            "optimizer": optimizer_state,
            "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
            "loop": trainer.state_dict(),
            "mlflow_run_id": tracker.run_id,
            "world_size": world_size,
            "rng_ranks": rngs,
        },
        keep=int(p.cfg["trainer"]["keep_checkpoints"]),
    )


def _savable(trainer: Trainer) -> tuple[Any, dict[str, Any] | None]:
    """What a checkpoint writes: the policy and its optimizer's state dict. h11f: under fsdp2 both are
    gathered whole first (a collective: every rank calls this), so rank 0 writes what one process would."""
    model = getattr(trainer.policy, "model", None)
    if distributed.fsdp_modules(model):
        assert model is not None
        weights, optimizer_state = distributed.full_state_dicts(model, trainer.optimizer)
        return distributed.FullWeights(trainer.policy, weights), optimizer_state
    return trainer.policy, trainer.optimizer.state_dict() if trainer.optimizer is not None else None


class RunFinished(Exception):
    """The job's run directory holds this very run, finished: nothing to do."""

    def __init__(self, start: RunStart) -> None:
        super().__init__(str(start.run_dir))
        self.start = start


class StopSignals:
    """SIGINT / SIGTERM during training: the first one lets the current step finish, then the loop
    saves a checkpoint and stops (`LoopContext.step_done`); a second SIGINT exits at once. After the
    last step (``at_once``: the final evaluation and model, nothing left to lose) the first signal
    stops at once (`StopNow`); under torchrun it is kept for the ranks' next agreement instead
    (`rlx.distributed.signal_everywhere`: before the evaluation's gather and after it), so that a signal
    reaching one rank stops every rank with the same line rather than leaving the others in a
    collective it never joins."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at_once = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        distributed.PENDING_SIGNAL.clear()  # a run in this process starts with no signal kept for it
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
        if self.at_once and distributed.active():
            distributed.PENDING_SIGNAL.append(signum)
            console.print(f"[yellow]{signal.Signals(signum).name}: stopping with the other ranks[/yellow]")
            return
        if self.at_once:
            raise StopNow(signum)
        console.print(  # not through logging: a signal handler must not wait on logging's locks
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
    lock: Any = None  # the run directory's FileLock, held until the run ends

    def save(self) -> Path:
        return _save(self.plan, self.run_dir, self.config_yaml, self.tracker, self.trainer)

    def checkpoint_now(self, gather: bool = True) -> Path:
        """The checkpoint of the current step: the one on disk, or a new one (every rank calls it
        with ``gather``; rank 0 decides whether it exists)."""
        path = self.run_dir / "checkpoints" / f"step_{self.trainer.step:06d}"
        exists = (path / TRAINER_STATE).is_file()
        if gather:
            exists = distributed.broadcast_object(exists)
        if exists:
            return path
        return _save(self.plan, self.run_dir, self.config_yaml, self.tracker, self.trainer, gather=gather)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


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
        model = getattr(policy, "model", None)
        if trainer.optimizer is not None and distributed.fsdp_modules(model):  # h11f: a full state dict
            assert model is not None
            distributed.load_full_state_dicts(model, None, trainer.optimizer, state["optimizer"])
        elif trainer.optimizer is not None:  # algo=trpo has none
            trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.scheduler is not None:
            trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.load_state_dict(state["loop"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise RlxError(f"checkpoint {checkpoint} does not fit this run's trainer ({exc})") from exc
    rank, _ = distributed.world()
    rngs = state.get("rng_ranks")  # h11: each rank's own RNG state (None: written after the last step)
    set_rng_state(rngs[rank] if rngs and rngs[rank] is not None else state["rng"])


def check_start(cfg: DictConfig | dict[str, Any], run_dir: Path) -> RunStart:
    """Read-only: how a job would start in ``run_dir`` (`rlx.resume.start_run`), and whether another
    process holds it. The CLI runs it before Hydra writes anything into the directory."""
    p = plan(cfg)
    target = target_run_dir(p.cfg["trainer"].get("resume"), run_dir)
    if dist_rank()[0] == 0:  # h11: under torchrun rank 0 alone holds the lock; the others may see it held
        probe_lock(target)
    return start_run(p.cfg, target)


def finished_message(start: RunStart) -> str:
    metrics = {k: v for k, v in (start.finished or {}).items() if k.startswith("eval/")}
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    step = (start.finished or {}).get("step", "?")
    return (
        f"rlx: {start.run_dir} already finished (final/ at step {step}{'; ' + shown if shown else ''}); "
        "nothing to do. To train longer, rerun with a larger trainer.steps (exact with "
        "trainer.lr_schedule=constant) or start a new run elsewhere (hydra.run.dir=...)"
    )


def build(cfg: DictConfig | dict[str, Any], run_dir: Path | None = None) -> Session:
    """Check the config, lock the run directory, decide how the job starts (resume, refuse, or
    nothing to do: `RunFinished`), then build the tracker and the loop."""
    p = plan(cfg)
    apply_threads(p.trainer.threads)  # h12: before any model is built
    p.device = distributed.setup(p.trainer.parallel, p.device)  # h11: the process group, this rank's device
    c = p.cfg
    t = c["trainer"]
    rank, _ = dist_rank()
    default_dir, launch_dir, overrides, sweep_dir = _hydra_job()
    # h11: rank 0's run directory for every rank (Hydra resolves ${now:} in each process)
    run_dir = Path(distributed.broadcast_object(str(run_dir or default_dir)))
    run_dir = target_run_dir(t.get("resume"), run_dir)
    lock = lock_run_dir(run_dir) if rank == 0 else None
    try:
        return _build_locked(p, run_dir, launch_dir, overrides, sweep_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _check_same_start(start: RunStart) -> None:
    """h11: every rank read the run directory before any rank writes to it, and decided the same."""
    if not distributed.active():
        return
    mine = (str(start.run_dir), str(start.checkpoint), start.finished is not None)
    theirs = distributed.broadcast_object(mine)
    distributed.barrier()
    if mine != theirs:
        raise RlxError(
            f"the ranks see different run directories or checkpoints ({mine} vs {theirs}): is "
            "the run directory on a filesystem every node shares?"
        )


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _build_locked(
    p: Plan, run_dir: Path, launch_dir: Path, overrides: str, sweep_dir: Path | None, lock: Any
) -> Session:
    c, t = p.cfg, p.cfg["trainer"]
    rank, _ = dist_rank()
    start = start_run(c, run_dir)  # reads and checks everything before anything is written
    _check_same_start(start)
    if start.finished is not None:
        raise RunFinished(start)
    run_dir, checkpoint, state = start.run_dir, start.checkpoint, start.state
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(c))  # the composed config, interpolations resolved
    if rank == 0:
        _prepare_run_dir(run_dir, config_yaml)
    if state is not None and rank == 0:
        for name in ("metrics.jsonl", "samples.jsonl"):  # rows written after the checkpoint
            truncate_jsonl(run_dir / name, int(state["step"]))
        keep_first_row_at(run_dir / "metrics.jsonl", int(state["step"]))  # a final evaluation comes again
    sweep = read_sweep(sweep_dir) if sweep_dir is not None else {}
    # the tags go to MLflow only; resolving them imports mlflow (3 s), so not for logger=none
    tracked = (c.get("logger") or {}).get("name") != "none"
    tags = run_tags(c, run_dir=run_dir, overrides=overrides, launch_dir=launch_dir) if tracked else {}
    log.debug(f"torch threads: {_torch_threads()} (trainer.threads={p.trainer.threads})")
    # The tracker (and so the MLflow run) is made before the training seed is set, and rlx names the
    # run itself: MLflow draws its random run names from Python's `random`.
    tracker = Tracker(
        run_dir,
        c["logger"],
        params={**flatten(c), "runtime.threads": _torch_threads()},
        tags=tags,
        launch_dir=launch_dir,
        resume_run_id=state.get("mlflow_run_id") if state else start.mlflow_run_id,
        fresh=state is None,
        run_name=run_name(c, overrides, list(sweep.get("swept") or [])),
        parent=sweep,
    )
    seed_everything(int(t["seed"]) + rank)
    log.debug(
        f"run {tracker.run_name} in {run_dir}; MLflow run {tracker.run_id}; "
        f"resuming from {checkpoint}; loop {p.loop}; device {p.device}; seed {int(t['seed']) + rank}"
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
        _shard_fsdp2(p, trainer)  # h11f: trainer.parallel=fsdp2
        if checkpoint is not None and state is not None:
            _restore(trainer, checkpoint, state)
            log.info(f"resumed from {checkpoint} at step {trainer.step}")
    except BaseException:
        tracker.close("FAILED")
        raise
    return Session(p, run_dir, config_yaml, tracker, trainer, signals, checkpoint, lock)


def train(cfg: DictConfig | dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """Train one job and return its summary (final held-out metrics, paths, MLflow run id).

    The MLflow run is always ended: FINISHED, FAILED (any error) or KILLED (SIGINT/SIGTERM, after a
    checkpoint of the last finished step). A NaN or inf loss or gradient stops the run
    (``trainer.on_nonfinite=stop``); the state it reached is saved for inspection under
    ``checkpoints/nonfinite_step_*`` (not resumed from: it may hold part of an iteration's updates).
    """
    started = time.perf_counter()
    try:
        session = build(cfg, run_dir)
    except RunFinished as done:  # rerunning a finished run's command: say so, log nothing twice
        console.print(finished_message(done.start), highlight=False, soft_wrap=True)
        return {**(done.start.finished or {}), "run_dir": str(done.start.run_dir), "already_finished": True}
    c, trainer, tracker = session.plan.cfg, session.trainer, session.tracker
    rank, _ = dist_rank()
    status = "FAILED"
    try:
        with session.signals:
            trainer.run()
            if int(c["trainer"]["save_every"] or 0):  # h11: every rank (rank 0 writes, with all RNGs)
                session.checkpoint_now()  # the last step: a rerun after a kill, or an extension, starts here
            session.signals.at_once = True  # from here a signal stops at once: nothing is left to lose
            if session.signals.signum is not None:  # one that came after the last step's own check
                distributed.PENDING_SIGNAL.append(session.signals.signum)
            _stop_if_signalled()
            final = trainer.evaluate()
            _stop_if_signalled()  # under torchrun: one that reached a rank in the evaluation's gather
            tracker.log_metrics(final, step=trainer.step)
            saved, _ = _savable(trainer)  # h11f: fsdp2 gathers the whole weights on every rank
            if rank == 0:
                _finish(session, saved)
        status = "FINISHED"
    except NonFiniteError as exc:
        path = _save_for_inspection(session)
        distributed.barrier()  # h11: every rank raised it (agreed); the others wait for rank 0's write
        raise NonFiniteError(f"{exc}; stopped; the state it reached is in {path}") from exc
    except StopNow as exc:  # during the final evaluation: the rerun resumes at the last step
        status = "KILLED"
        # h11: every rank raised it together (`_stop_if_signalled` agreed), so the checkpoint's
        # collectives (fsdp2's gathered weights) are joined by all
        raise StopRequested(exc.signum, trainer.step, str(session.checkpoint_now())) from None
    except (StopRequested, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        tracker.close(status)
        session.release()
    summary = {
        **final,
        "steps": trainer.step,
        "time/total_s": time.perf_counter() - started,
        "run_dir": str(session.run_dir),
        "mlflow_run_id": tracker.run_id,
    }
    if rank == 0:
        title = f"rlx train: algo={c['algo'].get('name')} reward={c['reward'].get('name')}"
        log.info(as_text(summary_table(title, summary)))
    return summary


def _stop_if_signalled() -> None:
    """After the last step: `StopNow` on every rank when a signal reached any of them (one process: when
    one arrived; under torchrun one all-reduce, the same point on every rank)."""
    signum = distributed.signal_everywhere()
    if signum is not None:
        raise StopNow(signum)


def _save_for_inspection(session: Session) -> Path:
    path = session.run_dir / "checkpoints" / f"nonfinite_step_{session.trainer.step:06d}"
    saved, _ = _savable(session.trainer)  # h11f: fsdp2 gathers the whole weights on every rank
    if distributed.world()[0] == 0:  # h11: every rank stopped at the same update; rank 0 writes
        save_model_dir(path, saved, session.config_yaml)
    return path


def _finish(session: Session, saved: Any) -> None:
    """Final model, reward curve (when there are iterations to draw: h12, a run with trainer.steps=0
    does not pay for importing matplotlib) and artifacts."""
    c, run_dir, tracker = session.plan.cfg, session.run_dir, session.tracker
    final_dir = run_dir / "final"
    save_model_dir(final_dir, saved, session.config_yaml)
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl"):
        tracker.log_artifact(run_dir / name)
    if session.trainer.step > 0:
        from rlx.plots import reward_curve

        algo, model, reward = (c[k].get("name") for k in ("algo", "model", "reward"))
        title = f"algo={algo} model={model} reward={reward}"
        tracker.log_artifact(reward_curve(tracker.history, run_dir / "reward_curve.png", title))
    tracker.log_model(final_dir, c["logger"].get("log_model", "auto"))
