"""Speed and memory (issue 12): torch's thread count, start-up imports, and sampling that keeps no
full-vocabulary logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlx.losses.entropy import token_entropy
from rlx.models import Policy, Sampling, token_logp
from rlx.models.tokenizer import build_number_tokenizer
from rlx.tasks.sort import SortTask
from tests.conftest import TINY, run_rlx


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
    out = run_rlx("train", *TINY, "trainer.threads=-1", "logger=none", cwd=tmp_path)
    assert out.returncode == 2
    assert "trainer.threads must be auto" in out.stderr


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
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
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
    import rlx.models.policy

    monkeypatch.setattr(rlx.models.policy, "CHUNK_ELEMENTS", 400)  # 2-3 rows of [3, 50] per chunk
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
