"""Registries: names, keys, and that every shipped YAML matches a registered function."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from rlx.advantages import ADVANTAGES
from rlx.errors import RlxError
from rlx.kl import KL_ESTIMATORS
from rlx.losses.aggregation import AGGREGATIONS
from rlx.losses.policy import POLICY_LOSSES
from rlx.registry import Registry, instantiate_checked
from rlx.rewards import REWARDS


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(RlxError) as err:
        ADVANTAGES.resolve({"name": "grpo_std"}, where="adv_norm")
    assert "unknown advantage estimator 'grpo_std'" in str(err.value)
    for name in ("none", "center", "group_std", "batch_std", "rloo", "max"):
        assert name in str(err.value)


def test_misspelled_key_lists_the_valid_keys():
    with pytest.raises(RlxError) as err:
        POLICY_LOSSES.resolve({"name": "clipped", "eps_hihg": 0.3}, where="loss")
    msg = str(err.value)
    assert "loss: unknown key eps_hihg" in msg
    assert "valid keys: dual_clip, eps_high, eps_low" in msg


def test_data_arguments_are_not_yaml_keys():
    # ground_truth is a task column (keyword-only, no default), not a hyperparameter
    with pytest.raises(RlxError, match="valid keys: normalize"):
        REWARDS.resolve({"name": "sort", "ground_truth": [1]}, where="reward")


def test_reserved_keys_are_passed_to_the_loop():
    kl = KL_ESTIMATORS.resolve(
        {"name": "k3", "coef": 0.1}, where="kl", reserved={"coef": 0.0, "placement": "loss"}
    )
    assert kl.extra == {"coef": 0.1, "placement": "loss"}
    assert kl.kwargs == {}


def test_a_new_function_registers_with_one_decorator(tmp_path, monkeypatch):
    pkg = tmp_path / "myrewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "length.py").write_text(
        "from mypkg_registry import R\n"
        "@R.register('length')\n"
        "def length_reward(prompts, completions, *, scale: float = 1.0):\n"
        "    return [scale * len(c) for c in completions]\n"
    )
    (tmp_path / "mypkg_registry.py").write_text(
        "from rlx.registry import Registry\nR = Registry('reward', ['myrewards'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from mypkg_registry import R  # type: ignore[import-not-found]

    fn = R.resolve({"name": "length", "scale": 2.0}, where="reward")  # found without an import list
    assert fn(["p"], [[1, 2, 3]]) == [6.0]


def test_duplicate_registration_is_refused():
    reg = Registry("thing", [])
    reg.register("a")(lambda: None)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(lambda: None)


def _group_yaml(group: str) -> dict[str, dict]:
    root = resources.files("rlx.conf") / group
    return {f.name[:-5]: yaml.safe_load(f.read_text()) for f in root.iterdir() if f.name.endswith(".yaml")}


@pytest.mark.parametrize(
    ("group", "registry", "loop_keys"),
    [
        ("reward", REWARDS, set()),
        ("adv_norm", ADVANTAGES, set()),
        ("loss", POLICY_LOSSES, set()),
        ("kl", KL_ESTIMATORS, {"coef", "placement", "ref_refresh", "adaptive_target", "adaptive_horizon"}),
    ],
)
def test_every_yaml_names_a_registered_function_and_vice_versa(group, registry, loop_keys):
    configs = _group_yaml(group)
    for option, node in configs.items():
        assert node["name"] == option, f"conf/{group}/{option}.yaml must say name: {option}"
        if option == "none" and group == "kl":
            continue
        entry = registry.get(option)
        keys = set(node) - {"name", "defaults"} - loop_keys  # defaults: Hydra composition (reward=combined)
        assert keys <= set(entry.hyperparameters()), f"conf/{group}/{option}.yaml: {keys}"
    assert set(registry.names()) <= set(configs), f"{group}: registered but no YAML"


def test_every_aggregation_is_documented_in_the_online_loops_config():
    text = (resources.files("rlx.conf") / "loop" / "online.yaml").read_text()
    for name in AGGREGATIONS.names():
        assert name in text


def test_instantiate_checked_lists_valid_keys():
    node = {"_target_": "rlx.tasks.sort.SortTask", "lenght": 3}
    with pytest.raises(
        RlxError, match="task: unknown key lenght; valid keys: length, vocab, eval_size, seed, prompts"
    ):
        instantiate_checked(node, where="task")
