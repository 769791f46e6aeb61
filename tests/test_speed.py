"""Speed and memory (issue 12): torch's thread count, start-up imports, and sampling that keeps no
full-vocabulary logits."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rlx.losses.entropy import token_entropy
from rlx.models import Policy, Sampling, token_logp
from rlx.models.tokenizer import build_number_tokenizer
from rlx.tasks.sort import SortTask
from tests.conftest import TINY, rlx_refused, run_rlx, tiny_qwen2


@pytest.mark.parametrize(
    ("threads", "env", "expected"),
    [
        ("2", {"OMP_NUM_THREADS": "1"}, 2),  # an explicit count beats the environment
        ("auto", {"OMP_NUM_THREADS": "2", "LOCAL_WORLD_SIZE": "2"}, 1),  # a parallel launcher: one each
    ],
)
def test_trainer_threads_is_applied_in_a_real_run(threads, env, expected, tmp_path):
    run = tmp_path / "run"
    out = run_rlx(
        "train",
        "-v",  # the thread count is a debug line
        *TINY,
        "trainer.steps=0",
        "logger=none",
        f"trainer.threads={threads}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"torch threads: {expected} (trainer.threads={threads})" in out.stdout + out.stderr


def test_trainer_threads_refuses_a_negative_count(tmp_path):
    out = rlx_refused("train", *TINY, "trainer.threads=-1", "logger=none", cwd=tmp_path)
    assert out.returncode == 2
    assert "trainer.threads must be auto" in out.stderr


def test_the_default_optimizer_is_torchs_fused_adamw_with_the_same_update():
    """conf/train.yaml's optimizer is AdamW with torch's fused kernel (transformers' Trainer default,
    adamw_torch_fused, hence TRL's), and it makes the for-loop AdamW's update to float rounding."""
    from rlx.loops.optim import make_optimizer
    from tests.conftest import compose_cfg

    c = OmegaConf.to_container(compose_cfg([*TINY, "trainer.lr=0.01", "optimizer.weight_decay=0.1"]))
    assert isinstance(c, dict)
    model, twin, start = tiny_qwen2(64), tiny_qwen2(64), tiny_qwen2(64)  # seeded: the same weights
    fused, _ = make_optimizer(c, model.parameters(), 10)
    loop, _ = make_optimizer({**c, "optimizer": {**c["optimizer"], "fused": False}}, twin.parameters(), 10)
    assert type(fused) is torch.optim.AdamW and fused.defaults["fused"] is True
    assert not loop.defaults["fused"]
    ids = torch.randint(0, 64, (4, 12))
    for _ in range(3):  # the same gradients to both (k_proj's bias has a gradient of rounding noise,
        fused.zero_grad()  # which Adam would scale up to a step if each model took its own)
        model(input_ids=ids, labels=ids).loss.backward()
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    moved = 0.0
    for (name, a), b, a0 in zip(model.named_parameters(), twin.parameters(), start.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        moved = max(moved, (a - a0).abs().max().item())
    assert moved > 1e-3  # three steps of lr 0.01 did move the weights


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch op allocates while active (views and parameters excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view allocates nothing (e.g. the tied head's transposed weight)
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def qwen2_policy(vocab: int = 20000) -> Policy:
    """A real Qwen2 architecture from a config, a large vocabulary, tied embeddings."""
    model = tiny_qwen2(vocab).eval()
    tokenizer = build_number_tokenizer(10)
    return Policy(model, tokenizer, SortTask(length=4, vocab=10), "qwen2")


def test_sampling_keeps_no_full_vocabulary_logits_and_records_exact_logp():
    policy = qwen2_policy()
    n, t, v = 6, 8, policy.vocab_size
    ids = torch.randint(5, v, (n, 5))
    mask = torch.ones_like(ids)
    mask[:2, :2] = 0  # two left-padded prompts
    ids[:2, :2] = policy.pad_id
    sampling = Sampling(temperature=0.8, top_k=50, max_new_tokens=t)
    biggest = LargestTensor()
    with biggest:
        tokens, comp_mask, logp = policy.generate(ids, mask, sampling)
    assert tokens.shape == logp.shape == (n, t)
    assert biggest.numel <= n * v  # one [N, V] step at a time, never [N, T, V] (nor the prompt's logits)
    with torch.no_grad():
        logits = policy.completion_logits(ids, mask, tokens, comp_mask)
    assert torch.allclose(token_logp(logits, tokens, 0.8) * comp_mask, logp, atol=1e-5)


def test_chunked_logp_and_entropy_equal_the_full_log_softmax(monkeypatch):
    import rlx.losses.entropy
    import rlx.models.logprobs

    monkeypatch.setattr(rlx.models.logprobs, "CHUNK_ELEMENTS", 400)  # 2-3 rows of [3, 50] per chunk
    monkeypatch.setattr(rlx.losses.entropy, "CHUNK_ELEMENTS", 400)
    torch.manual_seed(0)
    logits = torch.randn(11, 3, 50, requires_grad=True)
    tokens = torch.randint(0, 50, (11, 3))
    full = torch.log_softmax(logits / 0.7, -1)
    assert torch.allclose(
        token_logp(logits, tokens, 0.7), full.gather(-1, tokens[..., None])[..., 0], atol=1e-6
    )
    assert torch.allclose(token_entropy(logits, 0.7), -(full.exp() * full).sum(-1), atol=1e-5)
    g1 = torch.autograd.grad(token_logp(logits, tokens, 0.7).sum(), logits)[0]
    g2 = torch.autograd.grad(full.gather(-1, tokens[..., None]).sum(), logits)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_logp_and_entropy_match_log_softmax_with_gradients(temperature, monkeypatch):
    """The fused, chunked head (`linear_logp_entropy`) against log_softmax of the full logits, in
    float64: values and the gradients of hidden states, weight and bias, for any mix of the two
    outputs, with chunks that do not divide the rows."""
    import rlx.models.logprobs as logprobs

    monkeypatch.setattr(logprobs, "FUSED_CHUNK_ELEMENTS", 7 * 50)  # 7 rows of V = 50 per chunk
    torch.manual_seed(0)
    h = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (23,))
    a, c = torch.randn(23, dtype=torch.float64), torch.randn(23, dtype=torch.float64)
    for with_entropy, wa, wc in [(False, 1.0, 0.0), (True, 1.0, 1.0), (True, 0.0, 1.0)]:
        logp, ent = logprobs.linear_logp_entropy(h, w, b, y, temperature, with_entropy)
        loss = wa * (logp @ a) + (wc * (ent @ c) if ent is not None else 0.0)
        mine = torch.autograd.grad(loss, (h, w, b))
        full = torch.log_softmax((h @ w.T + b) / temperature, -1)
        ref_logp = full.gather(-1, y[:, None])[:, 0]
        ref_ent = -(full.exp() * full).sum(-1)
        assert torch.allclose(logp, ref_logp, atol=1e-12)
        if with_entropy:
            assert torch.allclose(ent, ref_ent, atol=1e-12)
        ref = torch.autograd.grad(wa * (ref_logp @ a) + wc * (ref_ent @ c), (h, w, b))
        for x, r in zip(mine, ref):
            assert torch.allclose(x, r, atol=1e-10)


def test_the_update_scores_completions_without_full_vocabulary_logits():
    """`Policy.score` (the update's and the reference's pass) on a 20k-vocabulary Qwen2: the same
    log-probs and entropies as the model's own logits, 0 after EOS, gradients equal, and no tensor
    of N x T x V elements allocated in the forward or the backward."""
    import rlx.models.logprobs as logprobs

    policy = qwen2_policy()
    n, t, v = 6, 8, policy.vocab_size
    assert logprobs.linear_head(policy.model) is not None  # the fused path is the one under test
    torch.manual_seed(1)
    ids = torch.randint(5, v, (n, 5))
    mask = torch.ones_like(ids)
    mask[:2, :2] = 0
    comp = torch.randint(5, v, (n, t))
    comp_mask = torch.ones(n, t)
    comp_mask[0, 3:] = 0  # one completion ended early
    biggest = LargestTensor()
    with biggest:
        scores = policy.score(ids, mask, comp, comp_mask, 0.8, entropy=True)
        (scores.logp.sum() + scores.entropy.sum()).backward()
    assert biggest.numel < n * t * v
    mine = [p.grad.clone() for p in policy.model.parameters()]
    policy.model.zero_grad()
    logits = policy.completion_logits(ids, mask, comp, comp_mask)
    ref_logp = token_logp(logits, comp, 0.8) * comp_mask
    ref_ent = token_entropy(logits, 0.8) * comp_mask
    assert torch.allclose(scores.logp, ref_logp, atol=1e-5)
    assert (scores.logp[0, 3:] == 0).all()
    assert torch.allclose(scores.entropy * comp_mask, ref_ent, atol=1e-4)
    (ref_logp.sum() + ref_ent.sum()).backward()
    for g, p in zip(mine, policy.model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-4, rtol=1e-3)


def test_a_model_whose_logits_are_not_its_head_keeps_the_logits_path():
    """Gemma 2 soft-caps its logits: the one-time check sees that head(hidden) != logits and the
    model is scored through its own logits, with the same numbers as `token_logp`."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    import rlx.models.logprobs as logprobs

    cfg = Gemma2Config(
        vocab_size=300,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=0.5,  # small enough that capping changes every logit
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    assert logprobs.linear_head(model) is None
    assert not logprobs._head_matches_logits(model, model.lm_head)  # the numeric check sees it too
    ids, comp = torch.randint(0, 300, (2, 4)), torch.randint(0, 300, (2, 3))
    m, cm = torch.ones_like(ids), torch.ones(2, 3)
    scores = logprobs.score_completions(model, ids, m, comp, cm)
    logits = model(input_ids=torch.cat([ids, comp], 1)).logits[:, 3:6]
    assert torch.allclose(scores.logp, token_logp(logits, comp), atol=1e-5)


def test_sampling_draws_each_token_with_its_probability():
    """`sample_categorical` (two-level inverse CDF) against the probabilities it is given, on a
    vocabulary that does not divide into blocks: total variation at the level of sampling noise,
    tokens of probability 0 never drawn."""
    from rlx.models.policy import sample_categorical

    torch.manual_seed(0)
    v = 1000
    logits = torch.randn(v) * 2
    logits[::5] = float("-inf")
    probs = torch.softmax(logits, -1)
    draws = sample_categorical(probs.expand(40000, v).contiguous(), block=64)
    freq = torch.bincount(draws, minlength=v).double() / len(draws)
    assert freq[::5].sum() == 0
    tv = 0.5 * (freq - probs.double()).abs().sum().item()
    ref = torch.bincount(torch.multinomial(probs, 40000, replacement=True), minlength=v).double() / 40000
    tv_ref = 0.5 * (ref - probs.double()).abs().sum().item()
    assert tv < 1.5 * tv_ref + 0.01, (tv, tv_ref)  # as close as torch.multinomial's own draws
    assert draws.max() < v


class HeadMatmuls(TorchDispatchMode):
    """Counts the matmuls (mm / addmm) that have an operand with a dimension of ``vocab``."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.count = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            shapes = [t.shape for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
            self.count += any(self.vocab in s for s in shapes)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_fused_loss_head_gives_log_softmaxs_gradient_in_three_head_matmuls(temperature, monkeypatch):
    """`linear_loss_grads` (the loss's gradient formed in the head's forward) against autograd
    through log_softmax of the full logits, in float64, for a separable loss of the log-probs with
    and without an entropy term, chunks that do not divide the rows, a bias, and a frozen head (LoRA);
    and three matmuls of the head per chunk where `linear_logp_entropy`'s forward and backward take
    four."""
    import rlx.models.logprobs as logprobs

    monkeypatch.setattr(logprobs, "FUSED_CHUNK_ELEMENTS", 7 * 50)  # 7 rows of V = 50 per chunk: 4 chunks
    torch.manual_seed(0)
    h = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (23,))
    old, adv, c = torch.randn(23, dtype=torch.float64) - 4.0, torch.randn(23, dtype=torch.float64), 0.3

    for entropy_grad, frozen in [(False, False), (True, False), (False, True)]:
        w.requires_grad_(not frozen)

        @torch.enable_grad()  # called inside the head's no-grad chunk loop
        def chunk_grads(rows, logp, ent, entropy_grad=entropy_grad):
            lp = logp.detach().requires_grad_()
            e = ent.detach().requires_grad_() if entropy_grad else None
            ratio = torch.exp(lp - old[rows])
            loss = -torch.minimum(ratio * adv[rows], ratio.clamp(0.8, 1.2) * adv[rows])
            loss = loss.sum() - (c * e.sum() if e is not None else 0.0)
            g = torch.autograd.grad(loss, [lp] + ([e] if e is not None else []))
            return g[0], (g[1] if e is not None else None)

        counter = HeadMatmuls(50)
        with counter:
            logp, ent, carrier = logprobs.linear_loss_grads(
                h, w, b, y, temperature, with_entropy=True, entropy_grad=entropy_grad, chunk_grads=chunk_grads
            )
            (2.0 * carrier).backward()  # the incoming gradient scales it
        assert counter.count == (2 if frozen else 3) * 4  # z, g_h and g_W per chunk (no g_W frozen)
        assert carrier.item() == 0.0 and not logp.requires_grad
        inputs = (h, b) if frozen else (h, w, b)
        mine = [x.grad.clone() for x in inputs]
        for x in (h, w, b):
            x.grad = None
        full = torch.log_softmax((h @ w.T + b) / temperature, -1)
        ref_logp = full.gather(-1, y[:, None])[:, 0]
        ref_ent = -(full.exp() * full).sum(-1)
        assert torch.allclose(logp, ref_logp, atol=1e-12) and torch.allclose(ent, ref_ent, atol=1e-12)
        ratio = torch.exp(ref_logp - old)
        ref_loss = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).sum()
        if entropy_grad:
            ref_loss = ref_loss - c * ref_ent.sum()
        ref = torch.autograd.grad(2.0 * ref_loss, inputs)
        for x, r in zip(mine, ref):
            assert torch.allclose(x, r, atol=1e-10)
    w.requires_grad_(True)
    counter = HeadMatmuls(50)
    with counter:  # the ordinary fused head: the backward recomputes each chunk's logits
        logp, _ = logprobs.linear_logp_entropy(h, w, b, y, temperature)
        logp.sum().backward()
    assert counter.count == 4 * 4


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_decode_steps_write_their_logits_into_one_buffer_with_the_same_draws(temperature, monkeypatch):
    """Sampling's decode steps skip the model's own LM head (`decode_head`: ``logits_to_keep`` an empty
    index tensor) and write the logits into one reused buffer: the same tokens and log-probs as with
    the model's head, from the same seed, and the head module is never run on a position (prompts
    that repeat are prefilled once, through the model's own head)."""
    import rlx.models.policy as policy_module

    monkeypatch.setattr(policy_module, "FRESH_MAPPING_BYTES", 0)  # at this size too (8 x 20000 floats)
    policy = qwen2_policy()
    n, v = 8, policy.vocab_size
    assert policy_module.decode_head(policy.model) is policy.model.lm_head
    torch.manual_seed(2)
    ids = torch.randint(5, v, (n // 2, 5)).repeat_interleave(2, dim=0)  # two rows per prompt
    mask = torch.ones_like(ids)
    mask[:2, :2] = 0
    ids[:2, :2] = policy.pad_id
    sampling = Sampling(temperature=temperature, max_new_tokens=6)
    positions = []
    hook = policy.model.lm_head.register_forward_hook(lambda m, i, o: positions.append(o.shape[1]))
    torch.manual_seed(3)
    mine = policy.generate(ids, mask, sampling)
    hook.remove()
    assert positions[0] == 1 and all(p == 0 for p in positions[1:])  # the prefill, then no head runs
    monkeypatch.setattr(policy_module, "decode_head", lambda model: None)
    torch.manual_seed(3)
    theirs = policy.generate(ids, mask, sampling)
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
    assert torch.allclose(mine[2], theirs[2], atol=1e-6)
    ungrouped = torch.randint(5, v, (3, 4))  # no prompt repeats: the prefill skips the head too
    positions.clear()
    policy.model.lm_head.register_forward_hook(lambda m, i, o: positions.append(o.shape[1]))
    monkeypatch.undo()
    monkeypatch.setattr(policy_module, "FRESH_MAPPING_BYTES", 0)
    policy.generate(ungrouped, torch.ones_like(ungrouped), sampling)
    assert positions and all(p == 0 for p in positions)
    monkeypatch.undo()  # 3 x 20000 floats, under glibc's mmap threshold: the model's own head
    positions.clear()
    policy.generate(ungrouped, torch.ones_like(ungrouped), sampling)
    assert positions and all(p == 1 for p in positions)


def test_a_model_whose_head_cannot_be_skipped_decodes_through_its_own_head():
    """A model whose ``logits_to_keep`` takes only an int (the check's forward fails) keeps the
    model's own head in sampling."""
    import rlx.models.logprobs as logprobs

    class IntOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, input_ids=None, logits_to_keep: int = 0, **kw):
            if not isinstance(logits_to_keep, int):
                raise TypeError("logits_to_keep must be an int")
            return self.inner(input_ids=input_ids, logits_to_keep=logits_to_keep, **kw)

    wrapped = IntOnly(tiny_qwen2(300).eval())
    assert logprobs.linear_head(wrapped) is wrapped.inner.lm_head
    assert logprobs.decode_head(wrapped) is None
