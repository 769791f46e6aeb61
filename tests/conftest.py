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
from hydra.core.hydra_config import HydraConfig

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


def tiny_qwen2(vocab: int, layers: int = 1, **extra: object):
    """A real Qwen2 architecture built from a config, seeded: 32 wide, grouped-query attention, tied
    embeddings, a vocabulary as large as the test asks (``extra``: more config keys)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        max_position_embeddings=128,
        **extra,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg)


def compose_cfg(overrides: list[str] | tuple[str, ...] = ()):
    """rlx's composed training config with ``overrides``, exactly as `rlx train` builds it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="rlx.conf", version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def fused_head_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per call of `linear_loss_grads` (the fused head with the loss's gradient formed in its
    forward), which still runs: which scoring path a test took."""
    import rlx.models.logprobs as logprobs

    calls: list[int] = []
    real = logprobs.linear_loss_grads
    monkeypatch.setattr(logprobs, "linear_loss_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


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


def rlx_in_process(
    *args: str, cwd: Path, env: dict[str, str] | None = None, refusal: bool = False
) -> subprocess.CompletedProcess:
    """``rlx <args>`` run in this process: the same ``rlx.cli.main`` the console script calls, its
    stdout, stderr and exit status, without paying a new interpreter's torch and transformers imports
    (about 6 s of CPU on this machine, the largest single cost of the suite). For runs whose process
    is not the point: signals, torchrun, launchers, resource limits and the installed script keep real
    processes. What a run changes in this process is put back afterwards: the environment, argv, the
    working directory, Hydra's global state, the loggers' handlers and levels (Hydra's job logging),
    torch's thread count and its global random state.

    With ``refusal=True`` the command must be refused before any work: an ``rlx train`` that passes
    the pre-flight check fails the test instead of training (``rlx eval``/``sample`` that are not
    refused run in full; one hostile-directory case expects that)."""
    import contextlib
    import io
    import logging

    from rlx import cli

    def _passed_the_check() -> None:
        raise AssertionError(f"rlx {' '.join(args)} passed the pre-flight check; expected a refusal")

    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_env, saved_argv, saved_cwd = dict(os.environ), list(sys.argv), os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_loggers = {  # Hydra's verbosity (`rlx train -v`) sets named loggers' levels
        name: (lg.level, lg.disabled)
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    saved_threads, saved_rng = torch.get_num_threads(), torch.random.get_rng_state()
    saved_main = cli._hydra_main
    saved_hydra = HydraConfig.instance().cfg  # Hydra leaves the last job's config in its singleton
    os.environ.update({"HYDRA_FULL_ERROR": "0", **(env or {})})
    if refusal:
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
        HydraConfig.instance().cfg = saved_hydra
        GlobalHydra.instance().clear()
        sys.argv[:] = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for handler in [h for h in root.handlers if h not in saved_handlers]:
            root.removeHandler(handler)
            handler.close()
        for handler in saved_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved_level)
        for name, lg in logging.root.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                lg.setLevel(saved_loggers.get(name, (logging.NOTSET, False))[0])
                lg.disabled = saved_loggers.get(name, (logging.NOTSET, False))[1]
        torch.set_num_threads(saved_threads)
        torch.random.set_rng_state(saved_rng)
    return subprocess.CompletedProcess(["rlx", *args], code, out.getvalue(), err.getvalue())


def rlx_refused(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``rlx <args>``, which must be refused before any work, run in this process (`rlx_in_process`).
    A handful of tests keep the refusal of the installed script in a real process (tests/test_cli.py,
    tests/test_settings.py)."""
    return rlx_in_process(*args, cwd=cwd, env=env, refusal=True)
