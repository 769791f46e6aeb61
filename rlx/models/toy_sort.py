"""The lecture's toy sorting model: per-position linear encode/decode, not autoregressive.

Each prompt position has its own d x d encoding matrix; the encoded prompt is one vector, and each
response position has its own d x d decoding matrix; logits come from the (shared) embedding matrix.
Every response position is decoded independently of the others. Sampling it token by token, as rlx
does, draws from exactly the same distribution as the lecture's one-shot per-position sampling.

It is a causal LM only in its interface: ``logits[:, P - 1 + t]`` is the distribution of response
token t (P = prompt length) whatever the earlier response tokens are; other positions are 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from rlx.errors import RlxError


class ToySortConfig(PretrainedConfig):
    model_type = "rlx_toy_sort"

    def __init__(
        self,
        vocab_size: int = 10,
        embedding_dim: int = 10,
        prompt_length: int = 3,
        response_length: int = 3,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.prompt_length = prompt_length
        self.response_length = response_length
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class ToySortModel(PreTrainedModel):
    config_class = ToySortConfig
    base_model_prefix = "toy_sort"
    main_input_name = "input_ids"

    def __init__(self, config: ToySortConfig) -> None:
        super().__init__(config)
        d = config.embedding_dim
        self.embedding = nn.Embedding(config.vocab_size, d)
        self.encode_weights = nn.Parameter(torch.empty(config.prompt_length, d, d))
        self.decode_weights = nn.Parameter(torch.empty(config.response_length, d, d))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The lecture's initialisation: N(0, 1) embeddings, N(0, 1/d) per-position matrices.
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)
        elif isinstance(module, ToySortModel):
            std = 1.0 / math.sqrt(module.config.embedding_dim)
            nn.init.normal_(module.encode_weights, std=std)
            nn.init.normal_(module.decode_weights, std=std)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def response_logits(self, prompt_ids: Tensor) -> Tensor:
        """``[B, P] -> [B, R, V]``: the lecture's forward pass."""
        emb = self.embedding(prompt_ids)  # [batch pos dim1]
        encoded = torch.einsum("bpi,pij->bj", emb, self.encode_weights)  # [batch dim2]
        decoded = torch.einsum("bj,rji->bri", encoded, self.decode_weights)  # [batch pos dim1]
        return decoded @ self.embedding.weight.T  # [batch pos vocab], shared embeddings

    def forward(self, input_ids: Tensor, **_: Any) -> CausalLMOutput:
        p, r = self.config.prompt_length, self.config.response_length
        b, length = input_ids.shape
        if length < p:
            raise RlxError(f"toy_sort needs prompts of exactly {p} tokens, got {length}")
        resp = self.response_logits(input_ids[:, :p])
        n = min(r, length - p + 1)
        v = resp.shape[-1]
        before = resp.new_zeros(b, p - 1, v)
        after = resp.new_zeros(b, length - (p - 1) - n, v)
        return CausalLMOutput(logits=torch.cat([before, resp[:, :n], after], dim=1))


AutoConfig.register(ToySortConfig.model_type, ToySortConfig)
AutoModelForCausalLM.register(ToySortConfig, ToySortModel)
