"""The online loop's settings and its plan: every ``algo.*`` / ``kl.*`` key it reads, checked, and
the pluggable pieces bound, before any model is built (`rlx.train.plan` runs this for every job of a
sweep before the first one starts).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import yaml

from rlx.advantages import ADVANTAGES
from rlx.errors import require
from rlx.kl import KL_ESTIMATORS
from rlx.loops import Plan
from rlx.loops.update import UPDATES, Pieces
from rlx.losses.aggregation import AGGREGATIONS
from rlx.losses.policy import POLICY_LOSSES
from rlx.rewards import REWARDS, load_callable
from rlx.settings import read_settings

OFFLINE_ALGO_KEYS = (
    *yaml.safe_load((resources.files("rlx.conf") / "loop" / "offline.yaml").read_text())["algo"],
    "loss",
)


@dataclass
class OnlineAlgoSettings:
    """``algo.*`` of the online loop (defaults: conf/loop/online.yaml; presets: conf/algo/*.yaml)."""

    name: str
    loop: str
    update: str
    aggregation: str
    max_len: int | None
    entropy_coef: float
    epochs: int
    minibatches: int
    dynamic_sampling: bool
    max_resample_rounds: int
    whiten_advantages: bool
    gamma: float  # read by the estimators that discount (conf/adv_norm/gae.yaml interpolates it)
    lam: float
    early_stop_kl: float | None
    critic: str
    critic_path: str | None
    critic_lr: float | None
    vf_coef: float
    cliprange_value: float | None

    def check(self) -> None:
        require(self.epochs >= 1, f"algo.epochs must be >= 1, got {self.epochs}")
        require(self.minibatches >= 1, f"algo.minibatches must be >= 1, got {self.minibatches}")
        require(self.entropy_coef >= 0, f"algo.entropy_coef must be >= 0, got {self.entropy_coef}")
        require(self.max_resample_rounds >= 0, "algo.max_resample_rounds must be >= 0")
        require(
            self.critic in ("none", "head", "separate"),
            f"algo.critic must be none, head or separate, got {self.critic!r}",
        )
        require(
            self.critic_path is None or self.critic == "separate",
            "algo.critic_path needs algo.critic=separate",
        )
        require(
            self.critic_lr is None or self.critic == "separate",
            "algo.critic_lr needs algo.critic=separate (the head layout has one optimizer)",
        )
        require(
            self.critic_lr is None or self.critic_lr > 0,
            f"algo.critic_lr must be positive or null, got {self.critic_lr}",
        )
        require(self.vf_coef >= 0, f"algo.vf_coef must be >= 0, got {self.vf_coef}")
        cr = self.cliprange_value
        require(cr is None or cr > 0, f"algo.cliprange_value must be > 0 or null, got {cr}")
        es = self.early_stop_kl
        require(es is None or es > 0, f"algo.early_stop_kl must be > 0 or null (no early stop), got {es}")


@dataclass
class KLSettings:
    """The loop's keys of the ``kl`` group (the estimator's own are its function's parameters)."""

    coef: float
    placement: str
    ref_refresh: int
    adaptive_target: float | None
    adaptive_horizon: float

    def check(self) -> None:
        require(
            self.placement in ("loss", "reward"),
            f"kl.placement must be loss or reward, got {self.placement!r}",
        )
        require(self.coef >= 0, f"kl.coef must be >= 0, got {self.coef}")
        require(self.ref_refresh >= 0, "kl.ref_refresh must be >= 0")
        t = self.adaptive_target
        require(t is None or t > 0, f"kl.adaptive_target must be > 0 or null (a fixed coefficient), got {t}")
        require(self.adaptive_horizon > 0, f"kl.adaptive_horizon must be > 0, got {self.adaptive_horizon}")


@dataclass
class OnlinePlan:
    algo: OnlineAlgoSettings
    update_settings: Any
    kl: KLSettings
    pieces: Pieces


def plan_online(p: Plan) -> OnlinePlan:
    """Check the online loop's settings and bind its pieces (reward, advantages, loss, KL, update)."""
    c, t = p.cfg, p.trainer
    keys_of = {name: _fields(UPDATES.get(name).meta.get("settings")) for name in UPDATES.names()}
    every_update_key = tuple(k for keys in keys_of.values() for k in keys)
    # An experiment that spans both loops (rlhf_sort, arithmetic_r1) may set the offline loop's algo
    # keys for its offline stages: the online stages leave them to it (conf/loop/offline.yaml lists them).
    ignore = (*every_update_key, *OFFLINE_ALGO_KEYS)
    algo = read_settings(OnlineAlgoSettings, c["algo"], where="algo", ignore=ignore)
    update = UPDATES.get(algo.update)
    stray = sorted(k for k in c["algo"] if k in every_update_key and k not in keys_of[update.name])
    require(
        not stray, f"algo: {', '.join(stray)} belong to another update rule than algo.update={algo.update}"
    )
    update_cls = update.meta.get("settings")
    update_settings = (
        read_settings(
            update_cls, {k: c["algo"][k] for k in keys_of[update.name] if k in c["algo"]}, where="algo"
        )
        if update_cls
        else None
    )
    n = t.prompts_per_step * t.group_size
    require(
        n % algo.minibatches == 0,
        f"{n} completions per step (trainer.prompts_per_step x trainer.group_size) do not split into "
        f"algo.minibatches={algo.minibatches}",
    )
    reward = REWARDS.resolve(c["reward"], where="reward")
    if reward.name == "custom":
        fn = reward.kwargs.get("fn")
        require(fn not in (None, "", "???"), "reward=custom needs reward.fn=my_module:my_reward")
        load_callable(str(fn), where="reward.fn")
    check = reward.entry.meta.get("check")  # a reward's own start-up check (reward=model loads its model)
    if check is not None:
        check(dict(reward.kwargs))
    advantage = ADVANTAGES.resolve(c["adv_norm"], where="adv_norm")
    min_group = advantage.entry.meta.get("min_group_size", 1)
    require(
        t.group_size >= min_group,
        f"adv_norm={advantage.name} needs trainer.group_size >= {min_group}, got {t.group_size} "
        "(a group of one has no spread to normalise by)",
    )
    needs_values = "values" in advantage.entry.meta.get("needs", ())
    require(
        needs_values or algo.critic == "none",
        f"algo.critic={algo.critic} trains a critic whose values only an estimator that uses them reads "
        f"(adv_norm=gae); got adv_norm={advantage.name}",
    )
    require(
        not needs_values or algo.critic != "none",
        f"adv_norm={advantage.name} needs the critic's values: set algo.critic=head or separate",
    )
    if algo.dynamic_sampling:
        require(t.group_size >= 2, "algo.dynamic_sampling needs trainer.group_size >= 2")
        require(
            algo.critic == "none",
            "algo.dynamic_sampling drops whole groups; it is for group advantages, not a critic",
        )
    policy_loss = POLICY_LOSSES.resolve(c["loss"], where="loss")
    x = torch.zeros(1, 2)  # one call on a tiny batch: bad hyperparameter values fail here
    policy_loss(x, x, torch.ones(1, 2), torch.ones(1, 2))
    advantage(
        torch.zeros(2, 2), 2, torch.ones(2, 2), **({"values": torch.zeros(2, 2)} if needs_values else {})
    )
    aggregation = AGGREGATIONS.resolve(algo.aggregation, where="algo.aggregation")
    kl_node = dict(c["kl"])
    kl_keys = {k: kl_node.pop(k) for k in list(kl_node) if k in KLSettings.__dataclass_fields__}
    kl_settings = read_settings(KLSettings, kl_keys, where="kl")
    kl = None if kl_node.get("name") in (None, "none") else KL_ESTIMATORS.resolve(kl_node, where="kl")
    if kl is not None and needs_values:
        require(
            kl_settings.placement == "reward",
            f"adv_norm={advantage.name} takes the KL penalty in the reward (kl.placement=reward), "
            f"got {kl_settings.placement}",
        )
    from rlx.rollout.engines import check_engine

    check_engine(p.rollout.engine, p.device)  # h11v: vllm installed, and a CUDA GPU for it
    check_update = update.meta.get("check")
    if check_update is not None:
        check_update(algo, kl_settings, kl)
    pieces = Pieces(
        reward=reward, advantage=advantage, policy_loss=policy_loss, aggregation=aggregation, kl=kl
    )
    return OnlinePlan(algo, update_settings, kl_settings, pieces)


def _fields(cls: Any) -> tuple[str, ...]:
    return tuple(cls.__dataclass_fields__) if cls is not None else ()
