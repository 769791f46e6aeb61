"""The critic of PPO: V(s_t) for every completion position, in one of two layouts.

- ``head``: a scalar head on the policy's own trunk (its last hidden state), one forward pass for
  both (Ziegler et al. 2019; TRL's ``AutoModelForCausalLMWithValueHead``). Trunk gradients from the
  value loss and the policy loss add up.
- ``separate``: a model of its own with a scalar head (seed 003's ``PPOModel(actor, critic)``;
  Ouyang et al. 2022 initialise it from the reward model). It starts as a copy of the policy, or from
  ``algo.critic_path``: an rlx critic directory (``final/critic/``, or a ``head`` run's ``final/``),
  a reward model (sequence classification, ``num_labels = 1``: its score head becomes the value head),
  or any causal LM with the policy's vocabulary (a fresh head).

The head reads the hidden state at the position that predicts completion token t, i.e. the state
before y_t: the same positions as the policy's logits. It starts at zero (V = 0 everywhere), so the
first advantages are the rewards themselves. On disk the head is ``value_head.safetensors``
(``{"weight": [1, H], "bias": [1]}``) beside the model, so ``final/`` still loads with
``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlx.errors import RlxError
from rlx.models.policy import Policy, completion_forward

VALUE_HEAD = "value_head.safetensors"
CRITIC_DIR = "critic"


class ValueHead(nn.Module):
    """A linear map from the trunk's last hidden state to one scalar, zero-initialised."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def save(self, path: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.linear.state_dict().items()}, path)


def _hidden_size(model: Any, policy: Policy) -> int:
    """Probe the trunk once on a real prompt: its hidden size, or one clear error."""
    ids, mask = policy.encode(policy.task.train_batch(0, 1).prompts)
    one = torch.zeros(1, 1, dtype=ids.dtype, device=ids.device)
    with torch.no_grad():
        try:
            _, hidden = completion_forward(
                model, ids.to(_device(model)), mask.to(_device(model)), one, one, True, logits=False
            )
        except RlxError as exc:
            raise RlxError(
                f"model={policy.name} cannot carry a value head: {exc}; algo=ppo needs a model with a "
                "transformer-style trunk (model=tiny_gpt, tiny_policy or an init_from checkpoint)"
            ) from exc
    assert hidden is not None
    return int(hidden.shape[-1])


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _load_head(head: ValueHead, path: Path, where: str) -> None:
    state = load_file(path)
    want = {k: tuple(v.shape) for k, v in head.linear.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        raise RlxError(
            f"{where}: value head of shape {got} does not fit a trunk of hidden size "
            f"{head.linear.in_features} (expected {want})"
        )
    head.linear.load_state_dict(state)


class Critic(nn.Module):
    """V(s_t) over completion positions: a trunk's last hidden state through a `ValueHead`.

    ``shared`` (the ``head`` layout): the trunk is the policy's model and values come from the hidden
    states of the policy's own forward pass (`values_from_hidden`); otherwise the critic runs its own
    model (`values`).
    """

    def __init__(self, model: Any, trunk: Any, head: ValueHead, *, shared: bool, tokenizer: Any) -> None:
        super().__init__()
        self.model = model  # what is saved (a causal LM or a sequence-classification checkpoint)
        self.trunk = trunk  # what is run
        self.head = head
        self.shared = shared
        self.tokenizer = tokenizer

    def own_parameters(self) -> list[nn.Parameter]:
        """What the critic's optimizer updates (just the head when the trunk is the policy's)."""
        return (
            list(self.head.parameters())
            if self.shared
            else [*self.trunk.parameters(), *self.head.parameters()]
        )

    def values_from_hidden(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)

    def values(
        self, prompt_ids: Tensor, prompt_mask: Tensor, completion: Tensor, comp_mask: Tensor
    ) -> Tensor:
        _, hidden = completion_forward(
            self.trunk, prompt_ids, prompt_mask, completion, comp_mask, True, logits=False
        )
        assert hidden is not None
        return self.head(hidden)

    def save(self, path: str | Path) -> None:
        """``head``: ``value_head.safetensors`` beside the policy; ``separate``: ``critic/`` with the
        critic's own save_pretrained model, tokenizer and value head."""
        path = Path(path)
        if self.shared:
            self.head.save(path / VALUE_HEAD)
            return
        out = path / CRITIC_DIR
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out))
        self.head.save(out / VALUE_HEAD)

    def state_dict_for_resume(self) -> dict[str, Tensor]:
        if self.shared:
            return {f"head.{k}": v for k, v in self.head.state_dict().items()}
        return {
            **{f"trunk.{k}": v for k, v in self.trunk.state_dict().items()},
            **{f"head.{k}": v for k, v in self.head.state_dict().items()},
        }

    def load_state_dict_for_resume(self, state: dict[str, Tensor]) -> None:
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        if not self.shared:
            self.trunk.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("trunk.")})


def build_critic(policy: Policy, layout: str, critic_path: str | None = None) -> Critic:
    """The critic for ``algo.critic`` (``head`` or ``separate``), checked against the policy."""
    if layout == "head":
        head = ValueHead(_hidden_size(policy.model, policy)).to(policy.device)
        return Critic(policy.model, policy.model, head, shared=True, tokenizer=policy.tokenizer)
    if critic_path is None:
        model = copy.deepcopy(policy.model).requires_grad_(True)
        head = ValueHead(_hidden_size(model, policy)).to(policy.device)
        return Critic(model, model, head, shared=False, tokenizer=policy.tokenizer)
    return load_critic(critic_path, policy)


def load_critic(path: str | Path, policy: Policy) -> Critic:
    """A separate critic from a directory, with its shape checked against the policy."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    if (path / CRITIC_DIR / "config.json").is_file():  # a separate-critic run's final/
        path = path / CRITIC_DIR
    where = f"algo.critic_path={path}"
    if not (path / "config.json").is_file():
        raise RlxError(f"{where} is not a save_pretrained model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    archs = getattr(config, "architectures", None) or []
    is_rm = any(a.endswith("ForSequenceClassification") for a in archs)
    if is_rm:
        if getattr(config, "num_labels", None) != 1:
            raise RlxError(f"{where}: a sequence-classification checkpoint needs num_labels=1 to be a critic")
        model = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=False)
        trunk = model.base_model
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False)
        trunk = model
    vocab = int(model.get_input_embeddings().weight.shape[0])
    if vocab != int(policy.model.get_input_embeddings().weight.shape[0]):
        raise RlxError(
            f"{where}: the critic's vocabulary has {vocab} tokens, the policy's "
            f"{policy.model.get_input_embeddings().weight.shape[0]}: it cannot read the policy's tokens"
        )
    model.to(policy.device).eval()
    head = ValueHead(_hidden_size(trunk, policy)).to(policy.device)
    if (path / VALUE_HEAD).is_file():
        _load_head(head, path / VALUE_HEAD, where)
    elif is_rm:  # start the value head from the reward model's score head (Ouyang et al. 2022)
        score = model.score
        with torch.no_grad():
            head.linear.weight.copy_(score.weight)
            if getattr(score, "bias", None) is not None:
                head.linear.bias.copy_(score.bias)
    return Critic(model, trunk, head, shared=False, tokenizer=policy.tokenizer)


class ActorCriticPolicy(Policy):
    """The policy as the loops use it, whose ``save`` also writes the critic (see `Critic.save`)."""

    def __init__(self, policy: Policy, critic: Critic) -> None:
        super().__init__(policy.model, policy.tokenizer, policy.task, policy.name)
        self.critic = critic

    def save(self, path: str | Path) -> None:
        super().save(path)
        self.critic.save(path)
