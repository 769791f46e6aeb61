"""`Policy`: a causal LM plus its tokenizer, seen through what the RL loops need.

Every rlx model follows the causal-LM convention: ``model(input_ids).logits[:, j]`` is the
distribution of token ``j + 1``. The loops only ever ask a policy to

- encode task prompts into left-padded ids,
- sample completions (``generate``), returning the raw logits of every sampled step, so the old
  log-probs are recorded at sampling time with no second forward pass,
- score given completions (``completion_logits``), with gradient,
- decode completions back into task objects, and save itself as a ``save_pretrained`` directory.

The policy pi_theta is the temperature-scaled distribution: log-probs everywhere are
``log_softmax(logits / temperature)``. Top-k / top-p only filter what is sampled (as in TRL and
verl); they do not enter the log-probs, so ratio = 1 on a batch's first update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from rlx.errors import RlxError
from rlx.tasks import Task


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn. ``top_k = 0`` and ``top_p = 1`` switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int | None = None


def token_logp(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log pi(y_t) under the temperature-scaled policy: ``[N, T, V], [N, T] -> [N, T]`` (float32)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def completion_mask(tokens: Tensor, eos_id: int | None) -> Tensor:
    """1.0 for every token up to and including the first EOS, 0.0 after it."""
    if eos_id is None:
        return torch.ones_like(tokens, dtype=torch.float32)
    is_eos = (tokens == eos_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).float()


class Policy:
    """A causal LM (a ``transformers`` PreTrainedModel) with its tokenizer and task codec."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, task: Task, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.name = name
        self.eos_id: int | None = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.chat_template = False  # model=hf turns it on when the tokenizer has one
        self._token_text: dict[int, str] = {}

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    @property
    def uses_hf_generate(self) -> bool:
        return bool(getattr(self.model, "can_generate", lambda: False)())

    # -- text <-> ids --------------------------------------------------------------------------
    def format_prompts(self, texts: list[Any]) -> list[str]:
        """Prompt texts as the model reads them: through the tokenizer's chat template when the
        policy was built with ``chat_template`` (model=hf), else unchanged. A prompt that is a list
        of chat messages (TRL's conversational format, ``task.system_prompt``) always goes through
        the template, with the generation prompt added."""
        out: list[str] = []
        for t in texts:
            if isinstance(t, str) and not self.chat_template:
                out.append(t)
                continue
            messages = [{"role": "user", "content": t}] if isinstance(t, str) else list(t)
            if not getattr(self.tokenizer, "chat_template", None):
                raise RlxError(
                    f"prompts are chat messages but model {self.name}'s tokenizer has no chat template; "
                    "use a model with one (model=hf), or text prompts without task.system_prompt"
                )
            out.append(
                self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
        return out

    def prompt_token_ids(self, texts: list[Any]) -> list[list[int]]:
        """Unpadded prompt ids, exactly as `encode` builds them (template and special tokens)."""
        templated = self.chat_template or any(not isinstance(t, str) for t in texts)
        enc = self.tokenizer(self.format_prompts(texts), add_special_tokens=not templated)
        return [list(ids) for ids in enc["input_ids"]]

    def completion_token_ids(self, texts: list[str]) -> list[list[int]]:
        """Unpadded completion ids, no special tokens (the caller appends EOS where it wants one)."""
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def encode(self, prompts: list[Any]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and attention mask ``[N, P]`` on the policy's device."""
        return self.encode_texts([self.task.prompt_text(p) for p in prompts])

    def encode_texts(self, texts: list[Any]) -> tuple[Tensor, Tensor]:
        """`encode` for prompt texts or chat messages (``rlx sample`` and text tasks)."""
        templated = self.chat_template or any(not isinstance(t, str) for t in texts)
        texts = self.format_prompts(texts)
        can_pad = self.tokenizer.pad_token is not None
        try:
            enc = self.tokenizer(
                texts, padding=can_pad, return_tensors="pt", add_special_tokens=not templated
            )
        except ValueError as exc:  # unequal lengths and nothing to pad with (the toy models)
            raise RlxError(
                f"model {self.name} has no pad token, so its prompts must be equally long"
            ) from exc
        mask = enc.get("attention_mask", torch.ones_like(enc["input_ids"]))
        return enc["input_ids"].to(self.device), mask.to(self.device)

    def decode(self, tokens: Tensor, mask: Tensor) -> list[Any]:
        """Task completions from sampled ids, reading only the real (masked-in) tokens."""
        out = []
        for row, m in zip(tokens.tolist(), mask.bool().tolist()):
            pieces = [self._text(t) for t, keep in zip(row, m) if keep]
            out.append(self.task.parse_completion(pieces))
        return out

    def decode_text(self, tokens: Tensor, mask: Tensor) -> list[str]:
        """The real completion tokens as text, special tokens skipped (what a reward model reads)."""
        rows = [
            [t for t, keep in zip(row, m) if keep] for row, m in zip(tokens.tolist(), mask.bool().tolist())
        ]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def _text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    # -- scoring -------------------------------------------------------------------------------
    def completion_logits(
        self, prompt_ids: Tensor, prompt_mask: Tensor, completion: Tensor, comp_mask: Tensor
    ) -> Tensor:
        """Logits for every completion position, ``[N, T, V]``, with gradient (teacher forcing)."""
        return completion_forward(self.model, prompt_ids, prompt_mask, completion, comp_mask)[0]

    def completion_logits_and_hidden(
        self, prompt_ids: Tensor, prompt_mask: Tensor, completion: Tensor, comp_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Logits ``[N, T, V]`` and the last hidden state ``[N, T, H]`` at the same positions (the
        state before each completion token: what a value head reads), from one forward pass."""
        logits, hidden = completion_forward(self.model, prompt_ids, prompt_mask, completion, comp_mask, True)
        assert hidden is not None
        return logits, hidden

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: Sampling, *, greedy: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample one completion per row: ids ``[N, T]``, mask ``[N, T]``, raw logits ``[N, T, V]``.

        T is ``sampling.max_new_tokens`` (or the task's), rows that stop early are padded.
        """
        max_new = sampling.max_new_tokens or self.task.max_new_tokens
        was_training = self.model.training
        self.model.eval()
        try:
            if self.uses_hf_generate:
                tokens, logits = self._generate_hf(prompt_ids, prompt_mask, sampling, max_new, greedy)
            else:
                tokens, logits = self._generate_loop(prompt_ids, sampling, max_new, greedy)
        finally:
            self.model.train(was_training)
        if tokens.shape[1] < max_new:  # every row hit EOS early
            pad = max_new - tokens.shape[1]
            tokens = torch.nn.functional.pad(tokens, (0, pad), value=self.pad_id)
            logits = torch.nn.functional.pad(logits, (0, 0, 0, pad))
        return tokens, completion_mask(tokens, self.eos_id).to(tokens.device), logits

    def _generate_hf(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: Sampling, max_new: int, greedy: bool
    ) -> tuple[Tensor, Tensor]:
        # Every knob is set explicitly and the model's own generation_config is swapped out for the
        # call: transformers otherwise applies top_k=50 by default and inherits settings such as
        # repetition_penalty from generation_config.json, and the sampled distribution would no
        # longer be the one the old log-probs describe.
        knobs: dict[str, Any] = {"do_sample": False}
        if not greedy:
            knobs = {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_k": sampling.top_k,
                "top_p": sampling.top_p,
            }
        cfg = GenerationConfig(
            **knobs,
            repetition_penalty=1.0,
            max_new_tokens=max_new,
            min_new_tokens=0,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        with _blank_generation_config(self.model):
            out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=cfg)
        tokens = out.sequences[:, prompt_ids.shape[1] :]
        return tokens, torch.stack(out.logits, dim=1)

    def _generate_loop(
        self, prompt_ids: Tensor, sampling: Sampling, max_new: int, greedy: bool
    ) -> tuple[Tensor, Tensor]:
        # The toy models are not transformers architectures and cannot use generate(); their
        # sequences are a handful of tokens, so a plain loop without a KV cache is the simple way.
        # Filtering reuses transformers' own logits warpers.
        warpers = LogitsProcessorList()
        if not greedy:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        ids = prompt_ids
        steps: list[Tensor] = []
        for _ in range(max_new):
            logits = self.model(input_ids=ids).logits[:, -1].float()
            steps.append(logits)
            if greedy:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(warpers(ids, logits.clone()), dim=-1)
                nxt = torch.multinomial(probs, 1).squeeze(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return ids[:, prompt_ids.shape[1] :], torch.stack(steps, dim=1)

    # -- saving --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """A ``save_pretrained`` directory: safetensors weights, config and tokenizer."""
        self.model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))


def completion_forward(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion: Tensor,
    comp_mask: Tensor,
    hidden: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One teacher-forced pass of ``model`` over prompt + completion: the outputs at the positions that
    predict each completion token (logits ``[N, T, V]``, and with ``hidden`` the last hidden state
    ``[N, T, H]``). Left padding: positions count real tokens only, as generate() does."""
    ids = torch.cat([prompt_ids, completion], dim=1)
    attn = torch.cat([prompt_mask, comp_mask.to(prompt_mask.dtype)], dim=1)
    position_ids = (attn.long().cumsum(-1) - 1).clamp(min=0)
    extra = {"output_hidden_states": True} if hidden else {}
    out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, **extra)
    p, t = prompt_ids.shape[1], completion.shape[1]
    logits = out.logits[:, p - 1 : p - 1 + t] if getattr(out, "logits", None) is not None else None
    if not hidden:
        return logits, None
    states = getattr(out, "hidden_states", None)
    if not states:
        raise RlxError(
            f"{type(model).__name__} returns no hidden states (output_hidden_states), so it cannot carry "
            "a value head"
        )
    return logits, states[-1][:, p - 1 : p - 1 + t]


@contextlib.contextmanager
def _blank_generation_config(model: PreTrainedModel) -> Iterator[None]:
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved
