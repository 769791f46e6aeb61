"""``rlx``: the command line. Thin: ``train`` hands its arguments to Hydra, the rest to small handlers.

rlx train [overrides]        train one job (Hydra: --help, --cfg job, -m for a sweep)
rlx eval RUN_DIR|CHECKPOINT ...  held-out reward and exact accuracy of runs' final models
rlx runs [DIR|SWEEP_DIR ...]  a table of runs (final metrics, status, wall time); --plot out.png
rlx data sort --out DIR      write sort-task SFT demonstrations and preference pairs (JSONL)
rlx sample RUN_DIR -p TEXT   a checkpoint's answers to prompts, side by side with its base model's
rlx sync RUN_DIR             upload a run's metrics and artifacts to MLflow (after a lost server)
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from rlx.errors import RlxError, StopRequested

CONF_PACKAGE = "rlx.conf"
HYDRA_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--info",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}


def fail(message: str, code: int = 2, prefix: str = "error: ") -> None:
    """One clear line on stderr and a non-zero exit."""
    print(f"rlx: {prefix}{message}", file=sys.stderr)
    raise SystemExit(code)


# --------------------------------------------------------------------------------------------------
# rlx train
# --------------------------------------------------------------------------------------------------
def _hydra_main() -> Any:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path=f"pkg://{CONF_PACKAGE}", config_name="train")
    def _train(cfg: DictConfig) -> float | None:
        from rlx.sweeps import objective_of, objective_value
        from rlx.train import train

        try:
            summary = train(cfg)
        except RlxError as exc:
            fail(str(exc))
        except StopRequested as exc:  # SIGINT/SIGTERM: checkpoint saved, MLflow run KILLED
            fail(str(exc), code=128 + exc.signum, prefix="")
        except KeyboardInterrupt:  # a second Ctrl-C: out at once
            fail("interrupted", code=130, prefix="")
        except RuntimeError as exc:  # h11: a collective whose peer died (its own error is in its log)
            from rlx.distributed import peer_failure

            reason = peer_failure(exc)
            if reason is None:
                raise
            fail(reason, code=1)
        # The objective a search sweeper (Optuna) optimises: hparams_search.objective, a final metric.
        value = objective_value(cfg, summary)
        if value is None and _searching():
            fail(f"hparams_search.objective={objective_of(cfg)[0]!r} is not a metric this run logged")
        return value

    return _train


def _searching() -> bool:
    """True in a job of a sweep whose sweeper is not Hydra's basic one (it needs a return value)."""
    from hydra.core.hydra_config import HydraConfig

    return not str(HydraConfig.get().sweeper.get("_target_", "")).endswith("BasicSweeper")


def config_groups() -> dict[str, list[str]]:
    """Every config group shipped with rlx and its options (from the packaged YAML files)."""
    root = resources.files(CONF_PACKAGE)
    groups: dict[str, list[str]] = {}
    for entry in root.iterdir():
        # `loop` is chosen by the algo presets (online or offline defaults), not on its own
        if entry.is_dir() and entry.name not in ("hydra", "loop", "__pycache__"):
            groups[entry.name] = sorted(f.name[:-5] for f in entry.iterdir() if f.name.endswith(".yaml"))
    return groups


def _split_args(args: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, multirun?, skip the pre-check?) from ``rlx train`` arguments."""
    overrides: list[str] = []
    multirun = skip = False
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in ("--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc", "--resolve"):
            skip = True
        elif a in HYDRA_FLAGS_WITH_VALUE:
            skip = skip or a in (
                "--cfg",
                "-c",
                "--info",
                "--config-path",
                "-cp",
                "--config-name",
                "-cn",
                "--config-dir",
                "-cd",
                "--experimental-rerun",
            )
            i += 1
        elif a.startswith("-"):
            skip = True
        else:
            overrides.append(a)
        i += 1
    return overrides, multirun, skip


# Hydra plugins rlx's presets build on (conf/hydra/launcher/, conf/hparams_search/) and their extras.
PLUGIN_EXTRAS = {
    "hydra/launcher/submitit_": "submitit",
    "hydra/launcher/joblib": "joblib",
    "hydra/sweeper/optuna": "optuna",
}


def _explain_hydra_error(exc: Exception, overrides: list[str]) -> str:
    """Turn a Hydra composition error into one line that names the culprit and the choices."""
    from rlx.settings import renamed_key_message

    text = str(exc)
    groups = config_groups()
    for ov in overrides:
        renamed = renamed_key_message(ov.partition("=")[0])
        if renamed:
            return renamed
    for ov in overrides:
        key, _, value = ov.lstrip("+~").partition("=")
        if key in groups and value and value not in groups[key] and "," not in value:
            return f"unknown {key} {value!r}; choose from: {', '.join(groups[key])}"
    if "not in struct" in text or "Could not override" in text or "Could not append" in text:
        key = text.split("'")[1] if "'" in text else "?"
        parent, _, _leaf = key.rpartition(".")
        valid = _keys_of(parent)
        hint = f"; keys of {parent or 'the config'}: {', '.join(valid)}" if valid else ""
        return f"unknown key {key!r}{hint}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    for plugin, extra in PLUGIN_EXTRAS.items():  # a preset whose Hydra plugin is not installed
        if f"Could not find '{plugin}" in text or f"Could not load '{plugin}" in text:
            return f"{first} (Hydra's plugin is not installed: pip install 'rlx[{extra}]')"
    if "Ambiguous value" in text:  # Hydra's hints (a forgotten -m: "add --multirun"), kept on one line
        import re

        hints = [re.sub(r"^\d+\.\s*", "", line.strip()) for line in text.strip().splitlines()[1:]]
        return "; ".join([first, *(h for h in hints if h)])
    if "does not support sweep type" in text:  # interval(...) etc. need a search sweeper
        first += " (a search needs a search sweeper: hparams_search=<preset> or hydra/sweeper=optuna)"
    return first


def _keys_of(path: str) -> list[str]:
    try:
        from omegaconf import DictConfig, OmegaConf

        cfg = _compose([])
        node = OmegaConf.select(cfg, path) if path else cfg
        return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    except Exception:
        return []


_COMPOSED: dict[tuple[str, ...], Any] = {}  # the pre-flight check composes a job once (start-up time)


def _compose(overrides: list[str]) -> Any:
    """The job's config (no ``hydra`` node) as Hydra composes it; a fresh copy each call."""
    from omegaconf import OmegaConf

    key = tuple(overrides)
    if key not in _COMPOSED:
        from hydra import compose, initialize_config_module
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        try:
            with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3"):
                cfg = compose(config_name="train", overrides=overrides)
                _COMPOSED[key] = OmegaConf.to_container(cfg, resolve=False)
        finally:
            GlobalHydra.instance().clear()
    return OmegaConf.create(_COMPOSED[key])


def _sweep_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of every job a (basic) sweep would run; one job when not sweeping.

    Another sweeper (Optuna: ``interval(...)``, ``tag(log, ...)``, its ``params``) picks its jobs as it
    goes: then one job, with one value of each swept key, stands for them all (`_one_job`)."""
    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(job_overrides)
    sweeper, params, mode = _sweeper_of(overrides, parsed)
    if not sweeper.endswith("BasicSweeper"):
        return [_one_job(parsed, params)]
    if not (multirun or mode == "MULTIRUN"):  # a sweep without -m fails in Hydra's words (add --multirun)
        return [job_overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def _one_value(override: Any) -> str:
    """``key=<one value>`` of a sweep override: the first of a list or range, an interval's start."""
    from hydra.core.override_parser.types import IntervalSweep

    value = override.value()
    if isinstance(value, IntervalSweep):
        return f"{override.get_key_element()}={value.start}"
    return f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"


def _one_job(parsed: list[Any], params: dict[str, str]) -> list[str]:
    """One job of a non-basic sweep: fixed overrides as given, one value of each swept key (the
    command line's and the sweeper's ``params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = {o.key_or_group for o in parsed}
    extra = OverridesParser.create().parse_overrides(
        [f"{k}={v}" for k, v in params.items() if k not in given]
    )
    return [_one_value(o) if o.is_sweep_override() else o.input_line for o in [*parsed, *extra]]


def _sweeper_of(overrides: list[str], parsed: list[Any]) -> tuple[str, dict[str, str], str]:
    """(the configured sweeper's class path, its ``params``, ``hydra.mode``) from the config these
    overrides make."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    fixed += [o for o in overrides if o.lstrip("+~").startswith("hydra") and "," not in o]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3"):
            cfg = compose(config_name="train", overrides=fixed, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    if not any(o.is_sweep_override() for o in parsed):
        # One job: the pre-flight check composes this same config next (`_compose`), so keep it
        # (one Hydra compose fewer per start-up; the hydra node holds nothing of the job's).
        whole = OmegaConf.to_container(cfg, resolve=False)
        assert isinstance(whole, dict)
        job = tuple(o.input_line for o in parsed)
        _COMPOSED.setdefault(job, {k: v for k, v in whole.items() if k != "hydra"})
    node = cfg.hydra.sweeper.get("params")
    params = OmegaConf.to_container(node, resolve=False) if node is not None else {}
    assert isinstance(params, dict)
    mode = str(getattr(cfg.hydra.mode, "name", cfg.hydra.mode))
    return str(cfg.hydra.sweeper._target_), {str(k): str(v) for k, v in params.items()}, mode


# Sections rlx reads key by key: a key added to one with `+` would be ignored, so it is refused. (Other
# sections pass added keys on: `+optimizer.amsgrad=true` to the optimizer, `+reward.x=1` to a reward,
# whose own check names its valid keys.)
FIXED_SECTIONS = ("trainer", "rollout", "eval", "logger", "hparams_search")


def _refuse_added_key(override: str) -> None:
    """``+trainer.foo=1``: one line naming the key and the keys its section has."""
    if not override.startswith("+") or override.startswith("++"):
        return
    key = override[1:].partition("=")[0]
    parent, _, leaf = key.rpartition(".")
    if parent.split(".")[0] not in FIXED_SECTIONS:
        return
    valid = _keys_of(parent)
    if valid and leaf not in valid:
        raise RlxError(f"unknown key {key!r} (rlx would ignore it); keys of {parent}: {', '.join(valid)}")


def check_launcher(overrides: list[str]) -> None:
    """A SLURM launcher (``hydra/launcher=slurm`` or ``submitit_slurm``) where SLURM's ``sbatch`` and
    ``srun`` are missing: one line naming the local stand-in, before Hydra writes the sweep directory
    (submitit itself stops with a traceback once the sweep has begun)."""
    chosen = [o for o in overrides if o.startswith("hydra/launcher=")]
    if not chosen or (shutil.which("sbatch") and shutil.which("srun")):
        return
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3"):
            cfg = compose(config_name="train", overrides=chosen, return_hydra_config=True)
        target = str(cfg.hydra.launcher.get("_target_", ""))
    except Exception:  # e.g. the plugin is missing: said in one line with the jobs' plan
        return
    finally:
        GlobalHydra.instance().clear()
    if target.endswith("SlurmLauncher"):
        raise RlxError(
            f"{chosen[-1]} submits the jobs to SLURM, but sbatch/srun are not on this machine's PATH; "
            "run them here as separate processes with hydra/launcher=slurm_local"
        )


def check_writable(path: Path, what: str) -> None:
    """Hydra creates the job's directory before rlx runs: check the place first, in one line."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RlxError(f"{what}={path} cannot be created: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RlxError(f"{what}={path} is not writable ({probe} denies writing)")


def precheck(overrides: list[str], multirun: bool) -> str | None:
    """Compose and plan every job before any work starts; raise RlxError with one line on bad input.

    With an explicit ``hydra.run.dir`` the run directory is checked too (locked by another process, a
    refused resume, a run that must not be overwritten) before Hydra writes its ``.hydra/`` there;
    returns the message of a run that already finished (nothing to do)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parser = OverridesParser.create()
    for ov in overrides:  # Hydra's own keys too: a typo there should also fail in one line
        try:
            parser.parse_overrides([ov])
        except HydraException as exc:
            reason = str(exc).strip().splitlines()[0]
            raise RlxError(f"cannot parse override {ov!r}: {reason} (quote values that hold = or ,)") from exc
        _refuse_added_key(ov)
        key, _, value = ov.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and "$" not in value:
            check_writable(Path(value), key)
    check_launcher(overrides)  # with -m, or a search preset's hydra.mode=MULTIRUN
    if not any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in overrides):
        check_writable(Path("outputs" if not multirun else "multirun"), "the output directory")
    try:
        jobs = _sweep_jobs(overrides, multirun)
    except (HydraException, OmegaConfBaseException) as exc:
        raise RlxError(_explain_hydra_error(exc, overrides)) from exc
    except Exception:  # a sweeper syntax the basic sweeper cannot expand: leave it to Hydra
        return
    configs = []
    for job in jobs[:256]:  # composed first: a typo in an option or key is refused before torch's import
        try:
            configs.append(_compose(job))
        except (HydraException, OmegaConfBaseException) as exc:
            raise RlxError(_explain_hydra_error(exc, job)) from exc
    from rlx.train import plan

    for job, cfg in zip(jobs, configs):
        try:
            plan(cfg)
        except RlxError as exc:
            prefix = f"job {' '.join(job)}: " if multirun and len(jobs) > 1 else ""
            raise RlxError(f"{prefix}{exc}") from exc
        except (OmegaConfBaseException, KeyError, TypeError) as exc:
            raise RlxError(f"bad config: {str(exc).splitlines()[0]}") from exc
    run_dir = next((o.partition("=")[2] for o in overrides if o.startswith("hydra.run.dir=")), None)
    if not multirun and run_dir and "$" not in run_dir:  # h14: the run directory, before Hydra touches it
        from rlx.train import check_start, finished_message

        start = check_start(_compose(jobs[0]), Path(run_dir))
        return finished_message(start) if start.finished is not None else None
    return None


# rlx train's own flags, turned into Hydra overrides of rlx's job logging (conf/hydra/job_logging/rlx.yaml)
VERBOSITY = {
    "-q": "hydra.job_logging.root.level=WARNING",  # warnings and errors only: no bar, no summary
    "--quiet": "hydra.job_logging.root.level=WARNING",
    "-v": "hydra.verbose=rlx",  # Hydra's own switch: DEBUG for rlx's loggers
    "--verbose": "hydra.verbose=rlx",
}


def cmd_train(args: list[str]) -> None:
    args = [VERBOSITY.get(a, a) for a in args]
    overrides, multirun, skip = _split_args(args)
    if not skip:
        try:
            done = precheck(overrides, multirun)
        except RlxError as exc:
            fail(str(exc))
        if done:  # the run in hydra.run.dir already finished with this config: nothing to do
            print(done, file=sys.stderr)
            raise SystemExit(0)
    if any(a in ("-sc", "--shell-completion") for a in args):
        shell_completion(args)
        return
    if not multirun and not skip:
        try:
            args = [*args, *_torchrun_overrides(overrides)]
        except RlxError as exc:
            fail(str(exc))
    sys.argv = [f"{Path(sys.argv[0]).name} train", *args]
    try:
        _hydra_main()()
    finally:
        from rlx.distributed import shutdown

        shutdown()


def _torchrun_overrides(overrides: list[str]) -> list[str]:
    """h11: under torchrun (trainer.parallel=ddp), join the process group before Hydra starts and give
    every rank rank 0's run directory (Hydra resolves ``${now:}`` in each process, a second apart at
    times); ranks other than 0 write no ``.hydra/`` and log to ``train_rank<r>.log``."""
    from rlx import distributed

    if not distributed.under_torchrun():
        return []
    from rlx.train import plan

    cfg = _compose(overrides)
    p = plan(cfg)
    if distributed.resolve_parallel(p.trainer.parallel) == "none":  # ddp and fsdp2
        return []
    distributed.setup(p.trainer.parallel, p.device)
    rank, _ = distributed.world()
    run_dir = next((o.partition("=")[2] for o in overrides if o.startswith("hydra.run.dir=")), None)
    extra: list[str] = []
    if run_dir is None:
        run_dir = distributed.broadcast_object(_hydra_run_dir(overrides) if rank == 0 else None)
        extra.append(f"hydra.run.dir={run_dir}")
    if rank != 0:
        extra += [
            "hydra.output_subdir=null",
            f"hydra.job_logging.handlers.file.filename={run_dir}/train_rank{rank}.log",
        ]
    return extra


def _hydra_run_dir(overrides: list[str]) -> str:
    """``hydra.run.dir`` as Hydra resolves it for this job now (its ``${now:...}`` included)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    previous = HydraConfig.instance().cfg  # put back: a later train() in this process reads it
    try:
        with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            return str(cfg.hydra.run.dir)
    finally:
        HydraConfig.instance().cfg = previous
        GlobalHydra.instance().clear()


def shell_completion(args: list[str]) -> None:
    """Hydra's own shell completion (``-sc install=bash|zsh|fish``, ``-sc query=...``) for ``rlx train``.

    Hydra's script registers the program name it is given and, on Tab, runs ``<first word of the
    line> -sc query=<shell>``, which is ``rlx -sc ...``: `main` routes that here. Hydra strips only the
    first word of the line it completes, so the ``train`` after ``rlx`` is removed first; the command
    word itself completes to rlx's commands, and other commands' arguments to file names."""
    if any(a.startswith("query=") for a in args):
        line = os.environ.get("COMP_LINE", "")
        words = line.split()
        if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
            print(" ".join(COMMANDS))  # completing the command word
            return
        if words[1] != "train":
            print("")  # another command: the shell's file-name completion (-o default)
            return
        os.environ["COMP_LINE"] = line.replace(" train", "", 1)
    sys.argv = ["rlx", *args]  # the script is installed for `rlx`
    _hydra_main()()


# Every command but train lives in rlx.commands.<name> (imported only when it runs).
COMMANDS = ("train", "eval", "runs", "data", "sample", "sync")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nRun `rlx train --help` for the training options.")
        raise SystemExit(0 if argv else 2)
    if argv[0] in ("--version", "-V"):
        from importlib.metadata import version

        print(f"rlx {version('rlx')}")
        raise SystemExit(0)
    if argv[0] in ("-sc", "--shell-completion"):  # Hydra's completion script calls `rlx -sc query=...`
        argv = ["train", *argv]
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        fail(f"unknown command {cmd!r}; choose from: {', '.join(COMMANDS)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if cmd == "train":
            cmd_train(rest)
        else:
            importlib.import_module(f"rlx.commands.{cmd}").main(rest)
    except RlxError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", code=130, prefix="")


if __name__ == "__main__":
    main()
