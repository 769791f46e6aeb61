"""Settings written once: every default in code equals the YAML's (or there is none in code), every
settings dataclass reads exactly its YAML section, and renamed keys fail with one line naming the new.
"""

from __future__ import annotations

import dataclasses
import inspect
from importlib import resources

import pytest
import yaml
from hydra.utils import get_method
from omegaconf import OmegaConf

from rlx.advantages import ADVANTAGES
from rlx.cli import config_groups
from rlx.errors import RlxError
from rlx.kl import KL_ESTIMATORS
from rlx.loops import EvalSettings, RolloutSettings, TrainerSettings
from rlx.loops.online_settings import KLSettings, OnlineAlgoSettings
from rlx.loops.trpo import TRPOSettings
from rlx.losses.policy import POLICY_LOSSES
from rlx.rewards import REWARDS
from rlx.settings import read_settings
from rlx.train import plan
from tests.conftest import TINY, compose_cfg

REGISTRIES = {"reward": REWARDS, "adv_norm": ADVANTAGES, "loss": POLICY_LOSSES, "kl": KL_ESTIMATORS}
NEEDS = {("adv_norm", "gae"): ["algo=ppo"]}  # gae interpolates the loop's algo.gamma and algo.lam


def composed(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_cfg(overrides), resolve=True)


@pytest.mark.parametrize("group", sorted(REGISTRIES))
def test_registered_functions_defaults_equal_their_yaml(group):
    registry = REGISTRIES[group]
    for option in config_groups()[group]:
        if option == "none" and group == "kl":
            continue
        node = composed([f"{group}={option}", *NEEDS.get((group, option), [])])[group]
        defaults = registry.get(option).hyperparameters()
        for key, value in node.items():
            if isinstance(value, dict) and defaults.get(key) is None:
                continue  # a nested block (reward=combined's components): None in code stands for "not given"
            if key in defaults and value != "???":  # ??? = must be given (reward.fn, reward.path)
                assert defaults[key] == value, (
                    f"conf/{group}/{option}.yaml {key}: {value} vs code {defaults[key]}"
                )


@pytest.mark.parametrize("group", ["model", "task"])
def test_builders_defaults_equal_their_yaml(group):
    for option in config_groups()[group]:
        node = yaml.safe_load((resources.files("rlx.conf") / group / f"{option}.yaml").read_text())
        params = inspect.signature(get_method(node["_target_"])).parameters
        for key, value in node.items():
            p = params.get(key)
            if p is None or p.default is inspect.Parameter.empty or value == "???":
                continue
            if isinstance(value, str) and value.startswith("${") and p.default is None:
                continue  # an interpolation of another key (task.ground_truth follows reward.column)
            if isinstance(value, dict) and p.default is None:
                continue  # a nested block (model.lora, task.columns): None in code stands for "not given"
            assert p.default == value, f"conf/{group}/{option}.yaml {key}: {value} vs code {p.default}"


# each settings dataclass, the section it reads and a config that uses it
DATACLASSES = [
    (TrainerSettings, "trainer", []),
    (RolloutSettings, "rollout", []),
    (EvalSettings, "eval", []),
    (OnlineAlgoSettings, "algo", ["algo=ppo"]),
    (KLSettings, "kl", ["algo=ppo"]),
    (TRPOSettings, "algo", ["algo=trpo"]),
]


@pytest.mark.parametrize(
    ("cls", "section", "overrides"), DATACLASSES, ids=lambda x: getattr(x, "__name__", "")
)
def test_settings_dataclass_defaults_equal_the_yaml(cls, section, overrides):
    node = composed(overrides)[section]
    for f in dataclasses.fields(cls):
        assert f.name in node, f"{cls.__name__}.{f.name} is not a key of {section}"
        if f.default is not dataclasses.MISSING:
            assert f.default == node[f.name], f"{section}.{f.name}: code {f.default} vs YAML {node[f.name]}"


def test_read_settings_checks_types_unknown_keys_and_ranges():
    node = composed([])["trainer"]
    with pytest.raises(RlxError, match=r"trainer\.lr must be float, got 'fast'"):
        read_settings(TrainerSettings, {**node, "lr": "fast"}, where="trainer")
    with pytest.raises(RlxError, match=r"trainer: unknown key foo; valid keys: device, eval_every"):
        read_settings(TrainerSettings, {**node, "foo": 1}, where="trainer")
    with pytest.raises(RlxError, match=r"trainer\.eval_every must be >= 0, got -1"):
        read_settings(TrainerSettings, {**node, "eval_every": -1}, where="trainer")
    assert read_settings(TrainerSettings, {**node, "lr": 1}, where="trainer").lr == 1.0  # YAML's 1 is a float


RENAMES = [
    ("algo.kl_target=6", "kl.adaptive_target (with kl.adaptive_horizon)"),
    ("algo.kl_horizon=100", "kl.adaptive_horizon"),
    ("algo.target_kl=0.05", "algo.early_stop_kl"),
]


@pytest.mark.parametrize(("old", "new"), RENAMES)
def test_renamed_keys_fail_naming_the_new_ones(old, new):
    from rlx.cli import precheck

    with pytest.raises(RlxError) as err:  # on the command line
        precheck(["algo=ppo", old], multirun=False)
    assert str(err.value) == f"{old.split('=')[0]} was renamed: use {new}"
    cfg = composed(["algo=ppo", *TINY])  # in a config read from disk (an old run's rlx_config.yaml)
    cfg["algo"][old.split("=")[0].split(".")[1]] = 1.0
    with pytest.raises(RlxError, match=f"was renamed: use {new.split()[0]}"):
        plan(cfg)


def test_a_renamed_key_is_one_line_from_the_installed_cli(tmp_path):
    from tests.conftest import run_rlx

    res = run_rlx("train", "algo=ppo", "algo.target_kl=0.05", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "rlx: error: algo.target_kl was renamed: use algo.early_stop_kl"
    ]
