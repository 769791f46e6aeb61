"""Shared helpers: compose rlx's real configs, tiny overrides that keep runs to seconds on a CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process (this one and the rlx it starts)

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

torch.set_num_threads(1)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
RLX = shutil.which("rlx", path=str(Path(sys.executable).parent)) or "rlx"

# A tiny but real configuration: a 1-layer GPT-2, 4 prompts x 4 completions, 2 iterations.
TINY_GPT = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2"]
TINY_RUN = [
    "trainer.prompts_per_step=4",
    "trainer.group_size=4",
    "trainer.steps=2",
    "trainer.eval_every=0",
    "trainer.samples_every=1",
    "task.eval_size=16",
]
TINY = [*TINY_GPT, *TINY_RUN]


def compose_cfg(overrides: list[str] | tuple[str, ...] = ()):
    """rlx's composed training config with ``overrides``, exactly as `rlx train` builds it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="rlx.conf", version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline as a process started with HF_HUB_OFFLINE=1 is: huggingface_hub and datasets read the
    variable at import, so setting only the variable in a test would take the online path (retries
    against a hub this machine cannot reach)."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded MLflow store for the session (creating its tables takes seconds)."""
    return tmp_path_factory.mktemp("mlflow-store")


def run_rlx(*args: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None):
    """The installed console script, run as a user would, from ``cwd``."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [RLX, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


# Files whose module-scoped fixture is itself a long job (torchrun's 2-rank updates, an mlflow server with
# a sweep): their tests stay on one pytest-xdist worker (`--dist loadgroup`), so the fixture runs once.
# Every other test is handed to whichever worker is free, one test at a time.
ONE_WORKER_FILES = ("test_distributed.py", "test_mlflow_ui.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in ONE_WORKER_FILES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


def pytest_collection_finish(session: pytest.Session) -> None:
    """pytest-xdist 3.8 groups tests by renaming ``item._nodeid``, which pytest 9.2 no longer reads
    (pyproject.toml pins pytest below 9.2): fail the session (xdist shows it as an INTERNALERROR) instead
    of silently building each module fixture once per worker (an 80 s torchrun job run twice)."""
    if not getattr(session.config.option, "loadgroup", False):  # not a `--dist loadgroup` worker
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            raise pytest.UsageError(
                f"pytest-xdist's --dist loadgroup did not take effect on {item.nodeid} (pytest "
                f"{pytest.__version__}); install the pytest version pyproject.toml names"
            )


def rlx_refused(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``rlx <args>`` run in this process, for a command that must be refused before any work: the same
    ``rlx.cli.main`` the console script calls, its stdout, stderr and exit status, without paying a new
    interpreter's ~8 s of torch and transformers imports per case. An ``rlx train`` that passes the
    pre-flight check fails the test here instead of training in-process; ``rlx eval``/``sample`` that
    are not refused run in full (one hostile-directory case expects that). A handful of tests keep the
    refusal of the installed script in a real process (tests/test_cli.py, tests/test_settings.py)."""
    import contextlib
    import io

    from rlx import cli

    def _passed_the_check() -> None:
        raise AssertionError(f"rlx {' '.join(args)} passed the pre-flight check; expected a refusal")

    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_env, saved_argv, saved_cwd = dict(os.environ), list(sys.argv), os.getcwd()
    saved_main = cli._hydra_main
    os.environ.update({"HYDRA_FULL_ERROR": "0", **(env or {})})
    cli._hydra_main = lambda: _passed_the_check  # Hydra's decorated main: a refusal never reaches it
    cli._COMPOSED.clear()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(list(args))
            except SystemExit as exc:
                code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        cli._hydra_main = saved_main
        cli._COMPOSED.clear()
        sys.argv[:] = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["rlx", *args], code, out.getvalue(), err.getvalue())
