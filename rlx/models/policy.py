"""`Policy`: a causal LM plus its tokenizer, seen through what the RL loops need.

Every rlx model follows the causal-LM convention: ``model(input_ids).logits[:, j]`` is the
distribution of token ``j + 1``. The loops only ever ask a policy to

- encode task prompts into left-padded ids,
- sample completions (``generate``), returning the log-prob of each sampled token as it is drawn, so
  the old log-probs cost no second forward pass and no ``[N, T, V]`` logits are ever kept,
- score given completions (``completion_logits``), with gradient,
- decode completions back into task objects, and save itself as a ``save_pretrained`` directory.

The policy pi_theta is the temperature-scaled distribution: log-probs everywhere are
``logit[y] / temperature - logsumexp(logits / temperature)`` (`token_logp`, in chunks). Top-k / top-p
only filter what is sampled (as in TRL and verl); they do not enter the log-probs, so ratio = 1 on a
batch's first update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, LogitsProcessorList, PreTrainedModel
from transformers.generation import TopKLogitsWarper, TopPLogitsWarper

from rlx.errors import RlxError
from rlx.models.logprobs import (
    CompletionScores,
    FusedLoss,
    _accepts,
    cache_keyword,
    decode_head,
    head_logits_into,
    keep_no_logits,
    prompt_groups,
    score_completions,
    shares_prompts,
)
from rlx.models.logprobs import completion_forward as completion_forward
from rlx.models.logprobs import token_logp as token_logp
from rlx.tasks import Task


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn. ``top_k = 0`` and ``top_p = 1`` switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int | None = None


# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): a larger allocation is always a
# fresh mapping, paid for in page faults on first touch; below it freed blocks are reused. Under it the
# model's own head is as fast as `head_logits_into` (and the extra hidden-state output costs ~0.1 ms a
# step: 3% of the toy row's rollout), so sampling writes its logits into a buffer only above it.
FRESH_MAPPING_BYTES = 32 * 1024 * 1024


def sample_categorical(probs: Tensor, block: int = 1024) -> Tensor:
    """One draw per row of ``probs`` ``[N, V]`` (unnormalised is fine) by inverse CDF, in two levels.

    ``torch.multinomial`` draws V exponential variates per row (its race-of-exponentials method): at
    V = 151936 that was 120 ms of each 210 ms sampling step here. Inverse CDF needs one uniform per row;
    a float64 running sum over the whole vocabulary is itself slow, so the vocabulary is cut into blocks
    of ``block`` tokens: one uniform picks a block by the running sum of block masses, then a token by
    the running sum inside that block only. Each block's mass is summed in float32 (the probabilities'
    own precision; a float64 reduction of [64, 151936] took 60 ms against 2.4 here) and the running sums
    are float64. Exact up to that rounding; tokens of probability 0 are never drawn (``right=True`` skips
    flat steps of a running sum, and the position inside the chosen block is kept strictly below its
    mass)."""
    n, v = probs.shape
    if v <= block:
        cdf = probs.cumsum(-1, dtype=torch.float64)
        u = torch.rand(n, 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=v - 1)
    full = v - v % block
    mass = probs[:, :full].unflatten(-1, (-1, block)).sum(-1).double()  # [N, B] (a view, summed)
    if full < v:  # the last, shorter block
        mass = torch.cat([mass, probs[:, full:].sum(-1, keepdim=True).double()], dim=1)
    cdf = mass.cumsum(-1)
    u = torch.rand(n, 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    b = torch.searchsorted(cdf, u, right=True).clamp_(max=mass.shape[1] - 1)  # [N, 1]
    before = cdf.gather(1, b) - mass.gather(1, b)
    # where u falls inside block b, as a fraction of the block's mass, kept < 1 (rounding)
    frac = ((u - before) / mass.gather(1, b)).clamp_(0.0, 1.0 - 2.0**-40)
    cols = b * block + torch.arange(block, device=probs.device)  # [N, block]
    inner = (
        probs.gather(1, cols.clamp(max=v - 1)).masked_fill_(cols >= v, 0.0).cumsum(-1, dtype=torch.float64)
    )
    j = torch.searchsorted(inner, frac * inner[:, -1:], right=True).clamp_(max=block - 1)
    return (b * block + j).squeeze(1)


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
        # trainer.precision=bf16: every forward of this policy (sampling, scoring, the update's) runs
        # under torch.autocast in this dtype; the weights, their gradients and the optimizer's state
        # stay float32 (mixed precision with fp32 master weights). None: plain float32.
        self.autocast_dtype: torch.dtype | None = None

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` in ``autocast_dtype`` on the policy's device type, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

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
        with self.autocast():
            logits = completion_forward(self.model, prompt_ids, prompt_mask, completion, comp_mask)[0]
        assert logits is not None
        return logits

    def hidden_states(
        self, prompt_ids: Tensor, prompt_mask: Tensor, completion: Tensor, comp_mask: Tensor
    ) -> Tensor:
        """The last hidden state ``[N, T, H]`` at the positions that predict each completion token (what
        a value head reads), without the LM head's logits."""
        with self.autocast():
            _, hidden = completion_forward(
                self.model, prompt_ids, prompt_mask, completion, comp_mask, True, logits=False
            )
        assert hidden is not None
        return hidden

    def score(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion: Tensor,
        comp_mask: Tensor,
        temperature: float = 1.0,
        *,
        entropy: bool = False,
        hidden: bool = False,
        fused_loss: FusedLoss | None = None,
    ) -> CompletionScores:
        """``log pi(y_t)`` ``[N, T]`` of the given completion tokens (0 after EOS), with gradient, and on
        request the entropy and the last hidden state at each completion position, without ``[N, T, V]``
        logits where the model allows it (`rlx.models.logprobs.score_completions`, which also says what
        ``fused_loss`` does)."""
        with self.autocast():
            return score_completions(
                self.model,
                prompt_ids,
                prompt_mask,
                completion,
                comp_mask,
                temperature,
                entropy=entropy,
                hidden=hidden,
                fused_loss=fused_loss,
            )

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: Sampling, *, greedy: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample one completion per row: ids ``[N, T]``, mask ``[N, T]``, and ``log pi(y_t)`` ``[N, T]``
        (temperature-scaled full distribution, float32, 0 on padding), recorded as each token is drawn.

        T is ``sampling.max_new_tokens`` (or the task's), rows that stop early are padded. Only one
        step's ``[N, V]`` logits exist at a time.
        """
        max_new = sampling.max_new_tokens or self.task.max_new_tokens
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                tokens, logp = self._sample(prompt_ids, prompt_mask, sampling, max_new, greedy)
        finally:
            self.model.train(was_training)
        if tokens.shape[1] < max_new:  # every row hit EOS early
            pad = max_new - tokens.shape[1]
            tokens = torch.nn.functional.pad(tokens, (0, pad), value=self.pad_id)
            logp = torch.nn.functional.pad(logp, (0, pad))
        mask = completion_mask(tokens, self.eos_id).to(tokens.device)
        return tokens, mask, logp * mask

    def _filters(self, sampling: Sampling, greedy: bool) -> LogitsProcessorList | None:
        """transformers' own top-k / top-p warpers (they only choose what is drawn; the temperature is
        applied before them, as generate() orders its warpers), or None when neither is on."""
        warpers = LogitsProcessorList()
        if not greedy:
            if sampling.top_k > 0:
                warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        return warpers or None

    def _sample(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: Sampling, max_new: int, greedy: bool
    ) -> tuple[Tensor, Tensor]:
        """rlx's sampling loop (in place of ``model.generate``): one ``[N, V]`` step at a time, the
        sampled token's log-prob taken from it before it is dropped.

        transformers models decode with a ``DynamicCache`` and generate()'s left-padding-aware
        position ids (the count of real tokens before each one); the prefill computes the logits of the
        last prompt position only (``logits_to_keep=1``). Rows past their EOS get the pad token, as in
        generate(); the loop ends when every row has finished. The toy models (no KV cache) re-read the
        whole sequence each step: their sequences are a handful of tokens. Written by hand because
        generate() can only hand back every step's full logits (``output_logits``), ``[N, T, V]``, and
        pays a per-step overhead that dominates for small models.
        """
        filters = self._filters(sampling, greedy)
        temperature = sampling.temperature
        cached = self.uses_hf_generate
        n, device = prompt_ids.shape[0], prompt_ids.device
        unfinished = torch.ones(n, dtype=torch.bool, device=device)
        ids = prompt_ids
        step_tokens: list[Tensor] = []
        step_logp: list[Tensor] = []
        weights: Tensor | None = None
        buf: Tensor | None = None  # the decode steps' logits when `decode_head` allows it
        if cached:
            cache = DynamicCache(config=self.model.config)
            with_cache = {cache_keyword(self.model) or "past_key_values": cache}
            attn = prompt_mask.long()
            position_ids = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 1)
            step_ids = prompt_ids
            keep = {"logits_to_keep": 1} if _accepts(self.model, "logits_to_keep") else {}
            # a group's G rows read one prompt: it is prefilled once and its cache expanded (h12)
            groups = prompt_groups(prompt_ids, prompt_mask) if shares_prompts(self.model) else None
            # the decode steps' logits into one reused buffer, not the model head's fresh [N, V] each
            # step (`decode_head`), where that allocation is a fresh mapping (a CPU, over glibc's mmap
            # threshold); under autocast the model's own head keeps its bf16 matmul
            vocab = int(getattr(self.model.config, "vocab_size", 0) or 0)
            big = device.type == "cpu" and n * vocab * 4 > FRESH_MAPPING_BYTES
            head = decode_head(self.model) if big and self.autocast_dtype is None else None
            no_logits = keep_no_logits(device) if head is not None else {}
        for step in range(max_new):
            if cached:
                shared = step == 0 and groups is not None  # the prefill: the distinct prompts only
                rows = groups.first if shared else slice(None)
                own_head = head is not None and not shared
                out = self.model(
                    input_ids=step_ids[rows],
                    attention_mask=attn[rows],
                    position_ids=position_ids[rows],
                    use_cache=True,
                    **with_cache,
                    **(no_logits if own_head else keep),
                )
                if own_head:
                    assert head is not None
                    logits = buf = head_logits_into(buf, out, head)
                else:
                    logits = out.logits[:, -1].float()
                if shared:
                    groups.expand_cache(cache)
                    logits = groups.expand(logits)
            else:
                logits = self.model(input_ids=ids).logits[:, -1].float()
            if temperature == 1.0:
                z = logits
            elif logits is buf:  # our own buffer: scaled in place (argmax and the draw do not mind)
                z = logits.div_(temperature)
            else:
                z = logits / temperature
            if filters:
                lse = torch.logsumexp(z, dim=-1)
                nxt = sample_categorical(torch.softmax(filters(ids, z.clone()), dim=-1))
            else:
                # one exp over the step's [N, V], written into a buffer reused every step: its row sums
                # give logsumexp and it is sample_categorical's (unnormalised) input. logsumexp and then
                # exp(z - lse) into a fresh tensor were two exps and a new 39 MB allocation per step
                # (page faults): at N = 64, V = 151936 on one thread, 106 ms against 20 here.
                if weights is None:
                    weights = torch.empty_like(z)
                top = z.amax(dim=-1, keepdim=True)
                torch.sub(z, top, out=weights).exp_()
                lse = top.squeeze(-1) + weights.sum(dim=-1).log()
                nxt = logits.argmax(-1) if greedy else sample_categorical(weights)
            if self.eos_id is not None:
                nxt = torch.where(unfinished, nxt, torch.full_like(nxt, self.pad_id))
            step_tokens.append(nxt)
            step_logp.append(z.gather(-1, nxt[:, None]).squeeze(-1) - lse)  # token_logp, lse reused
            if self.eos_id is not None:
                unfinished &= nxt != self.eos_id
                if not bool(unfinished.any()):
                    break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if cached:
                step_ids = nxt[:, None]
                attn = torch.cat([attn, attn.new_ones(n, 1)], dim=1)
                position_ids = position_ids[:, -1:] + 1
        return torch.stack(step_tokens, dim=1), torch.stack(step_logp, dim=1)

    def frozen_copy(self, dtype: torch.dtype | None = None) -> Policy:
        """A frozen reference policy: this policy's weights copied (in ``dtype`` when given, e.g.
        bfloat16 to halve its memory: ``trainer.reference_dtype``), no gradients, eval mode, sharing the
        tokenizer and task. Its forwards run in its own dtype (no autocast)."""
        import copy

        ref = copy.copy(self)
        ref.model = copy.deepcopy(self.model).requires_grad_(False).eval()
        if dtype is not None:
            ref.model.to(dtype)
        ref.autocast_dtype = None
        return ref

    # -- saving --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """A ``save_pretrained`` directory: safetensors weights, config and tokenizer."""
        self.model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))

    def write_generation_config(self, path: str | Path, max_new_tokens: int | None = None) -> None:
        """``generation_config.json`` beside saved weights, so ``transformers``' ``generate`` and
        ``pipeline("text-generation")`` answer as ``rlx sample`` does: greedy, at most the task's
        answer length (or ``rollout.max_new_tokens``), stopping at EOS, padding with the pad token."""
        from transformers import GenerationConfig

        path = Path(path)
        try:
            config = GenerationConfig.from_pretrained(str(path))
        except OSError:  # none saved with the model
            config = GenerationConfig.from_model_config(self.model.config)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        config.update(
            max_new_tokens=int(max_new_tokens or self.task.max_new_tokens),
            do_sample=False,
            eos_token_id=self.eos_id,
            pad_token_id=pad,
        )
        config.save_pretrained(str(path))
