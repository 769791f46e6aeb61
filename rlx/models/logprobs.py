"""Per-token log-probs (and entropies) of given completions, without ``[N, T, V]`` logits.

The update, the reference model and the offline losses need ``log pi(y_t)`` of every completion
token, with gradient; the entropy bonus needs ``H_t`` too. Computing them from the model's logits
costs a ``[N, T, V]`` tensor in the forward (1.2 GB in float32 at N = 32, T = 64, V = 151936) and
another of the same size for its gradient. Here the LM head is applied inside one autograd function,
a chunk of rows at a time: the forward keeps only ``logsumexp`` per row, the backward recomputes
each chunk's logits from the saved hidden states (the head's matmul, again) and turns them straight
into the gradients of the hidden states and of the head. That is the "fused linear cross-entropy"
of Liger-Kernel (Hsu et al., 2024) and of Apple's Cut Cross-Entropy (Wijmans et al., 2024), written
in plain torch for the log-prob of the *sampled* token (what RL needs) plus the entropy. Rows after a
completion's EOS are never scored: their log-prob is 0, as the rollout's old log-probs are.

When the loss is token-local (`FusedLoss`), the update goes one step further, as Liger-Kernel's fused
linear GRPO loss does: the loss's gradient in each chunk's log-probs is taken while that chunk's logits
are in memory and turned into the gradients of the hidden states and the head there
(`linear_loss_grads`), so nothing is recomputed in the backward: three matmuls of the head per chunk
instead of four.

Whether a model's logits really are ``hidden @ W^T + b`` (no soft-capping, no logit scale) is checked
once per model by comparing the two on a three-token input; models that fail the check, or have no
linear output embedding, go through their logits in chunks (`token_logp`).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlx.distributed import sharded_root
from rlx.errors import RlxError
from rlx.losses.entropy import token_entropy

# Logits per chunk inside the fused function: 2**25 float32 values (128 MB) are ~220 rows at
# V = 151936, enough rows for the head's matmul to run at full speed, small next to [N, T, V].
FUSED_CHUNK_ELEMENTS = 1 << 25


# Elements of logits handled at once by `token_logp` / `token_entropy` (whole rows of [T, V]): one
# float32 copy of a chunk of at most 64 MB (at V = 151936 and T = 64, one row is 39 MB) instead of one of
# the whole [N, T, V] tensor; small vocabularies go in one piece (many tiny ops cost more than they save).
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(logits: Tensor) -> int:
    """Rows of ``logits`` ``[N, ..., V]`` per chunk: as many as fit in `CHUNK_ELEMENTS`, at least one."""
    per_row = max(logits[0].numel(), 1) if len(logits) else 1
    return max(CHUNK_ELEMENTS // per_row, 1)


def token_logp(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log pi(y_t) under the temperature-scaled policy: ``[..., V], [...] -> [...]`` (float32).

    ``logit[y] / tau - logsumexp(logits / tau)``, a few rows at a time: the log-prob of the chosen token
    only, never a full ``log_softmax`` copy of the logits (TRL's ``selective_log_softmax``). Gradients
    flow through it (the update calls it on the training forward's logits).
    """
    rows = chunk_rows(logits)
    if logits.dim() == tokens.dim() + 1 and logits.dim() >= 3 and logits.shape[0] > rows:
        # split, not slicing: the backward of `split` is one concatenation, while each slice's backward
        # would allocate a zero tensor the size of all of `logits` (quadratic in the number of chunks)
        return torch.cat(
            [token_logp(lg, tk, temperature) for lg, tk in zip(logits.split(rows), tokens.split(rows))]
        )
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    chosen = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(scaled, dim=-1)


class PromptGroups(NamedTuple):
    """Rows that read the same prompt: ``first`` ``[U]`` one row of each distinct prompt (in order of
    first appearance), ``inverse`` ``[N]`` which of them each row reads, and ``repeats`` = G when the
    rows are U consecutive runs of G copies (`sample_groups`' layout), else None."""

    first: Tensor
    inverse: Tensor
    repeats: int | None

    def expand(self, x: Tensor) -> Tensor:
        """``x`` ``[U, ...]`` (one row per distinct prompt) to ``[N, ...]``, differentiably; a plain
        ``repeat_interleave`` in the grouped layout, whose backward is a sum rather than a scatter."""
        if self.repeats is not None:
            return x.repeat_interleave(self.repeats, dim=0)
        return x.index_select(0, self.inverse)

    def expand_cache(self, cache: Any) -> None:
        """A KV cache filled for the U distinct prompts, expanded in place to the N rows."""
        if self.repeats is not None:
            cache.batch_repeat_interleave(self.repeats)
        else:
            cache.batch_select_indices(self.inverse)


def prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor) -> PromptGroups | None:
    """The distinct prompts among ``[N, P]`` left-padded rows (ids and mask both compared), or None
    when no prompt repeats."""
    n = prompt_ids.shape[0]
    if n < 2 or prompt_ids.shape[1] == 0:
        return None
    key = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    g = _run_length(key)
    if g is not None:  # sample_groups' layout, found in 100 us; `unique` takes 570 (256 x 12 rows, here)
        return PromptGroups(torch.arange(0, n, g, device=key.device), _runs(n // g, g, key.device), g)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    u = distinct.shape[0]
    if u == n:
        return None
    rows = torch.arange(n, device=key.device)
    first = torch.full((u,), n, dtype=torch.long, device=key.device).scatter_reduce(0, inverse, rows, "amin")
    order = first.argsort()  # unique's sorted order -> order of first appearance
    rank = torch.empty_like(order)
    rank[order] = torch.arange(u, device=key.device)
    inverse = rank[inverse]
    return PromptGroups(first[order], inverse, None)


def _run_length(key: Tensor) -> int | None:
    """G > 1 when the rows of ``key`` are consecutive runs of G equal rows, each run unlike the next."""
    n = key.shape[0]
    same_as_next = (key[1:] == key[:-1]).all(dim=1)
    g = n if bool(same_as_next.all()) else int(same_as_next.long().argmin()) + 1
    if g < 2 or n % g:
        return None
    expected = torch.ones(n - 1, dtype=torch.bool, device=key.device)
    expected[g - 1 :: g] = False
    return g if torch.equal(same_as_next, expected) else None


def _runs(u: int, g: int, device: torch.device) -> Tensor:
    return torch.arange(u, device=device).repeat_interleave(g)


def shares_prompts(model: Any) -> bool:
    """Whether ``model`` can read a prompt once for every row that shares it: a transformers causal
    LM that takes a KV cache and ``logits_to_keep``, whose cache layers are all plain full-attention
    ``DynamicLayer``s (sliding-window, linear-attention and quantized layers are left out), without
    gradient checkpointing in training (which turns the cache off)."""
    known = _SHARES.get(model)
    if known is None:
        known = _SHARES[model] = _cache_is_plain(model)
    return known and not (
        model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    )


def _cache_is_plain(model: Any) -> bool:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = getattr(model, "config", None)
    if config is None or cache_keyword(model) is None or not _accepts(model, "logits_to_keep"):
        return False
    if not bool(getattr(model, "can_generate", lambda: False)()):
        return False
    try:
        cache = DynamicCache(config=config)
    except (TypeError, ValueError, AttributeError):
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)  # none yet: filled lazily with them


_SHARES: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def completion_forward(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion: Tensor,
    comp_mask: Tensor,
    hidden: bool = False,
    logits: bool = True,
    share_prompts: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """One teacher-forced pass of ``model`` over prompt + completion: the outputs at the positions that
    predict each completion token (logits ``[N, T, V]`` unless ``logits=False``, and with ``hidden``
    the last hidden state ``[N, T, H]``). Left padding: positions count real tokens only, as generate()
    does. Without ``logits`` the model's own head runs over one position per row (``logits_to_keep=1``).

    When rows share prompts (a GRPO group: G completions of one prompt) and the model allows it
    (`shares_prompts`), each distinct prompt is read once and its KV cache expanded to its rows
    (`shared_prompt_forward`); ``share_prompts=False`` forces the one pass over every row. Not under
    fsdp2: there every forward of the root gathers the weights, a collective, so every rank must run
    the same number of forwards, and whether a rank's rows share prompts is its own."""
    attn = torch.cat([prompt_mask, comp_mask.to(prompt_mask.dtype)], dim=1)
    position_ids = (attn.long().cumsum(-1) - 1).clamp(min=0)
    if share_prompts and completion.shape[1] > 0 and shares_prompts(model) and not sharded_root(model):
        groups = prompt_groups(prompt_ids, prompt_mask)
        if groups is not None:
            return shared_prompt_forward(
                model, groups, prompt_ids, completion, attn, position_ids, hidden, logits
            )
    ids = torch.cat([prompt_ids, completion], dim=1)
    p, t = prompt_ids.shape[1], completion.shape[1]
    extra: dict[str, Any] = {"output_hidden_states": True} if hidden else {}
    keep = _accepts(model, "logits_to_keep")
    if keep:  # the LM head over the last t + 1 positions only, not the prompt's (h12)
        extra["logits_to_keep"] = t + 1 if logits else 1
    out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, **extra)
    scores = getattr(out, "logits", None) if logits else None
    if scores is not None:
        scores = scores[:, :t] if keep else scores[:, p - 1 : p - 1 + t]
    if not hidden:
        return scores, None
    states = getattr(out, "hidden_states", None)
    if not states:
        raise RlxError(
            f"{type(model).__name__} returns no hidden states (output_hidden_states), so it cannot carry "
            "a value head"
        )
    return scores, states[-1][:, p - 1 : p - 1 + t]


def shared_prompt_forward(
    model: Any,
    groups: PromptGroups,
    prompt_ids: Tensor,
    completion: Tensor,
    attn: Tensor,
    position_ids: Tensor,
    hidden: bool = False,
    logits: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """`completion_forward` with each distinct prompt read once (it takes that pass's mask and positions
    over prompt + completion, ``attn`` and ``position_ids`` ``[N, P + T]``): a forward over the U
    distinct prompts fills a KV cache (with gradient), the cache is expanded to the N rows, and a second
    forward runs the N completions against it. The same function of the parameters as the one pass over
    all N rows (a causal model's prompt states do not depend on what follows; the expansion's backward
    sums the rows' gradients into their prompt), equal to float rounding, at (U P + N T) / (N (P + T))
    of the transformer's token work: 47% at the bench's toy row (32 prompts x 8, 6 + 4 tokens).

    The shared-prefix forward of "Prefix Grouper" (Liu et al., 2025), which does it inside attention;
    here through the model's own KV cache, so any transformers causal LM with a plain cache takes it."""
    from transformers import DynamicCache

    p, t = prompt_ids.shape[1], completion.shape[1]
    first = groups.first
    cache = DynamicCache(config=model.config)
    extra: dict[str, Any] = {"output_hidden_states": True} if hidden else {}
    extra[cache_keyword(model) or "past_key_values"] = cache
    out = model(
        input_ids=prompt_ids[first],
        attention_mask=attn[first, :p],
        position_ids=position_ids[first, :p],  # a prompt's positions depend on the prompt alone
        use_cache=True,
        logits_to_keep=1,  # the last prompt position predicts the first completion token
        **extra,
    )
    groups.expand_cache(cache)
    rest = model(
        input_ids=completion,
        attention_mask=attn,
        position_ids=position_ids[:, p:],
        use_cache=True,
        logits_to_keep=t if logits else 1,  # an int counts from the end: the last one goes unused
        **extra,
    )
    scores = None
    if logits:
        scores = torch.cat([groups.expand(out.logits[:, -1:]), rest.logits[:, : t - 1]], dim=1)
    if not hidden:
        return scores, None
    last = groups.expand(out.hidden_states[-1][:, -1:])
    return scores, torch.cat([last, rest.hidden_states[-1][:, : t - 1]], dim=1)


def _accepts(model: Any, name: str) -> bool:
    """Whether ``model.forward`` takes keyword ``name`` (cached per class). A peft model (LoRA) takes
    ``**kwargs`` and hands them to the transformers model it wraps (``get_base_model()``), so that
    model's signature decides."""
    get_base = getattr(model, "get_base_model", None)
    target = get_base() if callable(get_base) else model
    key = (type(model), type(target), name)
    known = _ACCEPTS.get(key)
    if known is None:
        own = _parameters(model)
        if target is model:
            known = name in own
        else:  # the wrapper's own keyword, or one its **kwargs pass on to the wrapped model
            passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values())
            known = name in own or (passes_on and name in _parameters(target))
        _ACCEPTS[key] = known
    return known


def cache_keyword(model: Any) -> str | None:
    """The keyword ``model.forward`` takes its KV cache by: ``cache`` from transformers 5.24 on
    (``past_key_values`` is deprecated there, and gone in 5.40), ``past_key_values`` before; None for a
    model that takes no cache."""
    return next((name for name in ("cache", "past_key_values") if _accepts(model, name)), None)


def _parameters(model: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


_ACCEPTS: dict[tuple[type, type, str], bool] = {}


class CompletionScores(NamedTuple):
    """What one teacher-forced pass gives: ``logp`` ``[N, T]`` (0 after EOS), ``entropy`` ``[N, T]``
    when asked for, and ``hidden`` ``[N, T, H]`` (the state before each completion token) when asked for."""

    logp: Tensor
    entropy: Tensor | None
    hidden: Tensor | None
    head_grad: Tensor | None = None  # with a `FusedLoss`: a zero carrying its gradient through the head


class FusedLoss(NamedTuple):
    """A loss of the log-probs and entropies ``[N, T]`` whose gradient `score_completions` forms
    inside the fused head's chunk loop (`linear_loss_grads`).

    ``fn(logp, entropy) -> scalar`` must be a sum over tokens of a function of that token's own
    log-prob and entropy, with weights that do not depend on them (per-token losses declared
    ``token_local`` in their registries, aggregated by a ``linear`` aggregation): its gradient in one
    chunk's log-probs is then the same whatever the other tokens' values, so it is taken with them
    held at ``stand_in`` ``[N, T]`` (finite values: pi_old's log-probs).
    ``entropy_grad``: whether ``fn`` depends on the entropy (the entropy bonus)."""

    fn: Callable[[Tensor, Tensor | None], Tensor]
    stand_in: Tensor
    entropy_grad: bool = False


class _LinearLogpEntropy(torch.autograd.Function):
    """``logp = z[y] - logsumexp(z)`` and ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` for
    ``z = (h W^T + b) / tau``, chunked over rows; see the module docstring.

    Every chunk's logits go into one reused buffer and are transformed in place: a fresh
    chunk-sized allocation per step costs page faults that took as long as the exp itself here."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        tokens: Tensor,
        temperature: float,
        with_entropy: bool,
        chunk: int,
    ) -> tuple[Tensor, Tensor]:
        m, acc = hidden.shape[0], _accumulation_dtype(hidden)
        logp = hidden.new_empty(m, dtype=acc)
        lse = hidden.new_empty(m, dtype=acc)
        entropy = hidden.new_empty(m if with_entropy else 0, dtype=acc)
        buf = hidden.new_empty(min(chunk, m), weight.shape[0], dtype=acc)
        spare = torch.empty_like(buf) if with_entropy else None
        for i in range(0, m, chunk):
            rows = slice(i, i + chunk)
            z = _logits_into(buf, hidden[rows], weight, bias, temperature)
            chosen = z.gather(-1, tokens[rows, None]).squeeze(-1)
            top = z.amax(-1, keepdim=True)
            z.sub_(top)  # z - max: exp cannot overflow
            if with_entropy:
                assert spare is not None
                e = torch.exp(z, out=spare[: len(z)])
                total = e.sum(-1)
                # sum_v p_v z_v = max + sum_v e_v (z_v - max) / sum_v e_v: the products written over z
                # (not needed after this) and summed, 23 ms for [220, 151936] against 43 for a batched
                # dot product (bmm) or 98 for a fresh product tensor
                ez = z.mul_(e).sum(-1) / total
                entropy[rows] = total.log() - ez
            else:
                total = z.exp_().sum(-1)
            lse[rows] = top.squeeze(-1) + total.log()
            logp[rows] = chosen - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, g_logp: Tensor | None, g_entropy: Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, bias, tokens, lse, entropy = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk
        if not ctx.with_entropy:
            g_entropy = None
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None, None, None
        acc = _accumulation_dtype(hidden)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        g_hidden = torch.empty_like(hidden) if want_h else None
        g_weight = torch.zeros_like(weight, dtype=acc) if want_w else None
        g_bias = torch.zeros_like(bias, dtype=acc) if want_b else None
        m = hidden.shape[0]
        buf = hidden.new_empty(min(chunk, m), weight.shape[0], dtype=acc)
        spare = torch.empty_like(buf) if g_entropy is not None else None
        for i in range(0, m, chunk):
            rows = slice(i, i + chunk)
            log_p = _logits_into(buf, hidden[rows], weight, bias, tau).sub_(lse[rows, None])
            if g_entropy is not None:
                assert spare is not None
                p = torch.exp(log_p, out=spare[: len(log_p)])
            else:
                p = log_p.exp_()
            g_z = _logits_grad(
                p, log_p, entropy[rows], _part(g_logp, rows), _part(g_entropy, rows), tokens[rows]
            )
            _add_head_grads(g_z, hidden, weight, rows, tau, g_hidden, g_weight, g_bias)
        g_weight = g_weight.to(weight.dtype) if g_weight is not None else None
        g_bias = g_bias.to(bias.dtype) if g_bias is not None else None
        return g_hidden, g_weight, g_bias, None, None, None, None


def _accumulation_dtype(hidden: Tensor) -> torch.dtype:
    """float32 for float32/bf16/fp16 hidden states (the log-probs are float32 everywhere), float64 for
    float64 (so ``torch.autograd.gradcheck`` can check the function exactly)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _logits_into(buf: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """``(h W^T + b) / tau`` written into the first ``len(h)`` rows of ``buf``, which are returned."""
    z = buf[: len(h)]
    if h.dtype == weight.dtype == z.dtype:
        torch.mm(h, weight.t(), out=z)
        if bias is not None:
            z.add_(bias)
    else:  # bf16 / fp16 weights: the matmul in their dtype, the softmax arithmetic in float32
        z.copy_(F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype)))
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _part(g: Tensor | None, rows: slice) -> Tensor | None:
    return None if g is None else g[rows]


def _logits_grad(
    p: Tensor, log_p: Tensor, entropy: Tensor, g_logp: Tensor | None, g_entropy: Tensor | None, tokens: Tensor
) -> Tensor:
    """``dL/dz`` of one chunk from ``dL/dlogp_y`` and ``dL/dH`` per row, written over the buffers ``p``
    (the softmax) and, with ``g_entropy``, ``log_p``: ``d logp_y / dz = onehot(y) - p`` and
    ``dH / dz = -p (log p + H)``."""
    if g_entropy is not None:
        g_z = log_p.add_(entropy[:, None]).mul_(p).mul_(-g_entropy[:, None])
        if g_logp is not None:
            g_z.addcmul_(p, g_logp[:, None], value=-1.0)
    else:
        assert g_logp is not None
        g_z = p.mul_(-g_logp[:, None])
    if g_logp is not None:
        g_z.scatter_add_(-1, tokens[:, None], g_logp[:, None])
    return g_z


def _add_head_grads(
    g_z: Tensor,
    hidden: Tensor,
    weight: Tensor,
    rows: slice,
    tau: float,
    g_hidden: Tensor | None,
    g_weight: Tensor | None,
    g_bias: Tensor | None,
) -> None:
    """The chain rule through ``z = (h W^T + b) / tau`` for one chunk: ``g_h[rows] = g_z W / tau``,
    ``g_W += g_z^T h / tau``, ``g_b += sum g_z / tau`` (float32 accumulation, ``g_z`` scaled in place)."""
    if tau != 1.0:
        g_z.div_(tau)
    if g_hidden is not None:
        g_hidden[rows] = (g_z @ weight.to(g_z.dtype)).to(g_hidden.dtype)
    if g_weight is not None:
        g_weight.addmm_(g_z.t(), hidden[rows].to(g_z.dtype))
    if g_bias is not None:
        g_bias += g_z.sum(0)


ChunkGrads = Callable[[slice, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


class _HeadGrad(torch.autograd.Function):
    """A zero whose gradient with respect to (hidden, W, b) was formed beforehand (`linear_loss_grads`);
    the backward hands it on, scaled by the gradient that reaches the zero."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    ) -> Tensor:
        ctx.grads = grads
        return hidden.new_zeros((), dtype=_accumulation_dtype(hidden))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        scaled = tuple(None if x is None else x.mul_(g.to(x.dtype)) for x in ctx.grads)
        ctx.grads = None
        return (*scaled, None)


@torch.no_grad()
def linear_loss_grads(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    tokens: Tensor,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
    chunk_grads: ChunkGrads,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """`linear_logp_entropy` for a loss whose gradient in each row's ``logp`` (and ``H``) is known as
    soon as that row's log-prob is: ``chunk_grads(rows, logp[rows], H[rows]) -> (dL/dlogp, dL/dH)``.

    Each chunk's logits are turned into the gradients of the hidden states and of the head while they
    are in memory, so the backward does not recompute them: three matmuls of the head per chunk
    instead of four, one ``exp`` pass instead of two (Liger-Kernel's fused linear GRPO loss, Hsu et al.
    2024, in plain torch). Returns ``logp`` ``[M]`` and ``H`` ``[M]`` (no gradient, the same values as
    `linear_logp_entropy`'s) and a scalar zero whose backward is ``dL`` through the head. ``H`` is
    computed with ``with_entropy`` or ``entropy_grad`` (the loss depends on it: its gradient needs
    the chunk's log-softmax kept, a third buffer)."""
    m, acc = hidden.shape[0], _accumulation_dtype(hidden)
    with_entropy = with_entropy or entropy_grad
    chunk = max(FUSED_CHUNK_ELEMENTS // max(weight.shape[0], 1), 1)
    h_all, w = hidden.detach(), weight.detach()
    b = None if bias is None else bias.detach()
    logp = hidden.new_empty(m, dtype=acc)
    entropy = hidden.new_empty(m if with_entropy else 0, dtype=acc)
    g_hidden = torch.empty_like(h_all) if hidden.requires_grad else None
    g_weight = torch.zeros_like(w, dtype=acc) if weight.requires_grad else None
    g_bias = torch.zeros_like(bias.detach(), dtype=acc) if bias is not None and bias.requires_grad else None
    buf = hidden.new_empty(min(chunk, m), w.shape[0], dtype=acc)
    spare = torch.empty_like(buf)
    third = torch.empty_like(buf) if entropy_grad else None
    no_autocast = torch.autocast(hidden.device.type, enabled=False)  # the backward's arithmetic: float32
    for i in range(0, m, chunk):
        rows = slice(i, i + chunk)
        z = _logits_into(buf, h_all[rows], w, b, temperature)  # as linear_logp_entropy's forward
        chosen = z.gather(-1, tokens[rows, None]).squeeze(-1)
        top = z.amax(-1, keepdim=True)
        z.sub_(top)
        e = torch.exp(z, out=spare[: len(z)])
        total = e.sum(-1)
        log_total = total.log()
        logp[rows] = chosen - (top.squeeze(-1) + log_total)
        ent_rows = None
        if with_entropy:
            if third is not None:  # z - max is kept for the entropy's gradient
                ez = torch.mul(z, e, out=third[: len(z)]).sum(-1) / total
            else:
                ez = z.mul_(e).sum(-1) / total
            entropy[rows] = ent_rows = log_total - ez
        g_logp, g_ent = chunk_grads(rows, logp[rows], ent_rows)
        with no_autocast:
            if g_ent is not None and entropy_grad:
                p = e.div_(total[:, None])
                log_p = z.sub_(log_total[:, None])
                assert ent_rows is not None
                g_z = _logits_grad(p, log_p, ent_rows, g_logp, g_ent, tokens[rows])
            else:  # p * -dL/dlogp in one pass over the chunk, the normalisation folded in
                g_z = e.mul_((-g_logp / total)[:, None]).scatter_add_(-1, tokens[rows, None], g_logp[:, None])
            _add_head_grads(g_z, h_all, w, rows, temperature, g_hidden, g_weight, g_bias)
    grads = (
        g_hidden,
        None if g_weight is None else g_weight.to(weight.dtype),
        None if g_bias is None or bias is None else g_bias.to(bias.dtype),
    )
    with torch.enable_grad():
        carrier = _HeadGrad.apply(hidden, weight, bias, grads)
    return logp, (entropy if with_entropy else None), carrier


def linear_logp_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    tokens: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``log pi(y)`` ``[M]`` (and ``H`` ``[M]``) for hidden states ``[M, H]`` through the head
    ``(W [V, H], b)``, at temperature ``tau``; float32, differentiable in ``hidden``, ``W`` and ``b``."""
    chunk = max(FUSED_CHUNK_ELEMENTS // max(weight.shape[0], 1), 1)
    logp, entropy = _LinearLogpEntropy.apply(hidden, weight, bias, tokens, temperature, with_entropy, chunk)
    return logp, (entropy if with_entropy else None)


# --------------------------------------------------------------------------------------------------
# which models can use it
# --------------------------------------------------------------------------------------------------
# config keys of transformers models that change the logits after the LM head (Gemma 2/3, Cohere,
# Granite); a model with one of them set keeps the logits path even before the numeric check.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
_HEADS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def linear_head(model: Any) -> nn.Linear | None:
    """The model's output layer when its logits are exactly ``head(last hidden state)``, else None.

    Checked once per model instance on a three-token input, in eval mode (so dropout does not differ),
    against the model's own logits: a model with logit soft-capping (Gemma 2) or a logit scale
    (Cohere, Granite) fails it and keeps the logits path."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear) or type(head) is not nn.Linear:
        return None
    config = getattr(model, "config", None)
    for key, identity in _LOGIT_TRANSFORMS.items():  # known transforms of the logits after the head
        if getattr(config, key, None) not in (None, identity):
            return None
    known = _HEADS.get(model)
    if known is None:
        known = _HEADS[model] = _head_matches_logits(model, head)
    return head if known else None


@torch.no_grad()
def _head_matches_logits(model: Any, head: nn.Linear) -> bool:
    was_training = model.training
    model.eval()
    try:
        # a few ordinary tokens (id 0 is often the padding row: an all-zero embedding proves nothing)
        ids = torch.arange(1, 4, device=head.weight.device)[None] % head.out_features
        out = model(input_ids=ids, output_hidden_states=True)
        logits, states = getattr(out, "logits", None), getattr(out, "hidden_states", None)
        if logits is None or not states:
            return False
        mine, theirs = head(states[-1]).float(), logits.float()
        # the same linear map on the same states: equal to rounding. Strict and relative, because a
        # random-init model's logits are small, where a soft cap (tanh) is nearly the identity.
        scale = float(theirs.abs().max()) or 1.0
        return bool(torch.allclose(mine, theirs, rtol=1e-5, atol=1e-7 * scale))
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)


def decode_head(model: Any) -> nn.Linear | None:
    """The model's output layer when a decode step can skip the model's own LM head: `linear_head`
    accepts the model, and a forward with ``logits_to_keep`` an empty index tensor (transformers'
    ``slice_logits_to_keep``: keep no position) returns no logits and the hidden states. Then sampling
    writes each step's ``[N, V]`` logits into one buffer (`head_logits_into`) instead of the fresh
    tensor the model's head allocates every step: above glibc's 32 MB mmap threshold (N >= 56 at
    V = 151936) every such allocation is a fresh mapping whose page faults cost as much as the matmul
    (`rlx.models.policy.FRESH_MAPPING_BYTES`).
    Checked once per model instance on a two-token input; a model that takes only an int fails it."""
    head = linear_head(model)
    if head is None or not _accepts(model, "logits_to_keep"):
        return None
    known = _DECODE_HEADS.get(model)
    if known is None:
        known = _DECODE_HEADS[model] = _skips_logits(model)
    return head if known else None


_DECODE_HEADS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def keep_no_logits(device: torch.device) -> dict[str, Any]:
    """The forward's keywords for a step whose logits `head_logits_into` computes (`decode_head`)."""
    return {"logits_to_keep": torch.empty(0, dtype=torch.long, device=device), "output_hidden_states": True}


@torch.no_grad()
def _skips_logits(model: Any) -> bool:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(input_ids=torch.ones(1, 2, dtype=torch.long, device=device), **keep_no_logits(device))
        logits, states = getattr(out, "logits", None), getattr(out, "hidden_states", None)
        return logits is not None and logits.shape[1] == 0 and bool(states) and states[-1].shape[1] == 2
    except (TypeError, ValueError, RuntimeError, IndexError):
        return False
    finally:
        model.train(was_training)


def head_logits_into(buf: Tensor | None, out: Any, head: nn.Linear) -> Tensor:
    """The last position's logits ``[N, V]`` (float32) of a forward run with `keep_no_logits`, written
    into ``buf`` (allocated when None or of another size; reuse the returned tensor)."""
    h = out.hidden_states[-1][:, -1]
    if buf is None or buf.shape[0] != h.shape[0]:
        buf = h.new_empty(h.shape[0], head.weight.shape[0], dtype=torch.float32)
    return _logits_into(buf, h.detach(), head.weight.detach(), _detached(head.bias), 1.0)


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


# --------------------------------------------------------------------------------------------------
# the teacher-forced pass
# --------------------------------------------------------------------------------------------------
def score_completions(
    model: Any,
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
    """One teacher-forced pass of ``model`` over prompt + completion: ``log pi(y_t)`` of every real
    completion token (0 after EOS), with gradient; the entropy of each position with ``entropy``; the
    last hidden state at the positions that predict each completion token with ``hidden``.

    Left padding: positions count real tokens only, as generate() does. The fused head (module
    docstring) when `linear_head` accepts the model; otherwise the model's own logits, chunked.

    With ``fused_loss``, on the fused head and with gradients on, the loss's gradient through the head
    is formed in the forward (`linear_loss_grads`): ``logp`` and ``entropy`` come without gradient and
    ``head_grad`` is a zero whose backward is that gradient. Without the fused head, ``head_grad`` is
    None and ``logp`` carries the gradient as usual."""

    head = linear_head(model)
    if head is None:
        logits, states = completion_forward(model, prompt_ids, prompt_mask, completion, comp_mask, hidden)
        assert logits is not None
        logp = token_logp(logits, completion, temperature) * comp_mask
        ent = None
        if entropy:
            ent = token_entropy(logits, temperature)
        return CompletionScores(logp, ent, states)
    _, h = completion_forward(model, prompt_ids, prompt_mask, completion, comp_mask, True, logits=False)
    assert h is not None
    return head_scores(head, h, completion, comp_mask.bool(), temperature, entropy, fused_loss, hidden)


def head_scores(
    head: nn.Linear,
    h: Tensor,
    tokens: Tensor,
    real: Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
    fused_loss: FusedLoss | None = None,
    hidden: bool = False,
) -> CompletionScores:
    """The fused head over the hidden states ``h`` ``[N, T, H]`` that predict ``tokens`` ``[N, T]``,
    at the positions ``real`` (bool ``[N, T]``; 0 elsewhere): `score_completions`' second half."""
    head_grad = None
    if fused_loss is not None and torch.is_grad_enabled():
        chunk_grads = _chunk_grads(fused_loss, real)
        logp_real, ent_real, head_grad = linear_loss_grads(
            h[real],
            head.weight,
            head.bias,
            tokens[real],
            temperature,
            entropy,
            fused_loss.entropy_grad,
            chunk_grads,
        )
    else:
        logp_real, ent_real = linear_logp_entropy(
            h[real], head.weight, head.bias, tokens[real], temperature, with_entropy=entropy
        )
    logp = logp_real.new_zeros(real.shape).masked_scatter(real, logp_real)
    ent = None
    if ent_real is not None:
        ent = ent_real.new_zeros(real.shape).masked_scatter(real, ent_real)
    return CompletionScores(logp, ent, h if hidden else None, head_grad)


def _chunk_grads(loss: FusedLoss, real: Tensor) -> ChunkGrads:
    """`linear_loss_grads`' callback for ``loss``: the gradient of ``loss.fn`` in the log-probs (and
    entropies) of rows ``rows`` of the real tokens ``[M]`` (``real`` ``[N, T]``, row-major), every
    other token at ``loss.stand_in`` (entropy 0): a token-local loss's gradient in a token does not
    depend on the others' values."""
    logp_rest = loss.stand_in[real].detach().float()
    ent_rest = torch.zeros_like(logp_rest)
    zeros = logp_rest.new_zeros(real.shape)

    def grads(rows: slice, logp: Tensor, ent: Tensor | None) -> tuple[Tensor, Tensor | None]:
        with torch.enable_grad(), torch.autocast(real.device.type, enabled=False):
            own = [logp.detach().requires_grad_()]
            if ent is not None and loss.entropy_grad:
                own.append(ent.detach().requires_grad_())
            logp_full = zeros.masked_scatter(real, _spliced(logp_rest, rows, own[0]))
            ent_full = None
            if ent is not None:
                ent_part = own[1] if len(own) == 2 else ent
                ent_full = zeros.masked_scatter(real, _spliced(ent_rest, rows, ent_part))
            value = loss.fn(logp_full, ent_full)
            found: tuple[Tensor | None, ...] = (None,) * len(own)
            if value.requires_grad:
                found = torch.autograd.grad(value, own, allow_unused=True)
        g_logp = found[0] if found[0] is not None else torch.zeros_like(logp)
        return g_logp, (found[1] if len(found) == 2 else None)

    return grads


def _spliced(rest: Tensor, rows: slice, part: Tensor) -> Tensor:
    """``rest`` with ``rest[rows]`` replaced by ``part``, differentiable in ``part``."""
    return torch.cat([rest[: rows.start], part, rest[rows.stop :]])


def score_packed(
    model: Any,
    ids: Tensor,
    attn: Tensor,
    positions: Tensor,
    labels: Tensor,
    fused_loss: FusedLoss | None = None,
) -> CompletionScores:
    """``log pi`` of every next token of packed rows ``ids`` ``[n, w]`` (position ids restarting per
    example, `rlx.data.encode.pack_rows`) where ``labels`` ``[n, w]`` marks a completion token:
    ``[n, w - 1]``, 0 at unlabelled positions. The fused head when `linear_head` accepts the model
    (with ``fused_loss`` as in `score_completions`), else the model's logits, chunked."""
    real = labels[:, 1:].bool()
    head = linear_head(model)
    if head is None:
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits
        return CompletionScores(token_logp(logits[:, :-1], ids[:, 1:]) * real, None, None)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=positions, output_hidden_states=True, **extra
    )
    return head_scores(head, out.hidden_states[-1][:, :-1], ids[:, 1:], real, fused_loss=fused_loss)
