"""Seed 001's tiny policy ("baby RLHF"): an embedding and a linear head, no transformer.

The next-token distribution depends on the last token only (a learned bigram model):
``logits[:, j] = lm_head(embed(x_j))``. Seed 001's first training snippet samples actions from random
logits that ignore this policy; rlx samples from the policy itself.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class TinyPolicyConfig(PretrainedConfig):
    model_type = "rlx_tiny_policy"

    def __init__(self, vocab_size: int = 10, hidden_size: int = 16, **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class TinyPolicyModel(PreTrainedModel):
    config_class = TinyPolicyConfig
    base_model_prefix = "tiny_policy"
    main_input_name = "input_ids"

    def __init__(self, config: TinyPolicyConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's own defaults, as in seed 001.
        if isinstance(module, (nn.Embedding, nn.Linear)):
            module.reset_parameters()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: Tensor, output_hidden_states: bool = False, **_: Any) -> CausalLMOutput:
        hidden = self.embed(input_ids)  # the whole "trunk": a value head reads this
        return CausalLMOutput(
            logits=self.lm_head(hidden), hidden_states=(hidden,) if output_hidden_states else None
        )


AutoConfig.register(TinyPolicyConfig.model_type, TinyPolicyConfig)
AutoModelForCausalLM.register(TinyPolicyConfig, TinyPolicyModel)
