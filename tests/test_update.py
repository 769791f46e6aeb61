"""The update as a function: a hand-built batch in, parameters and metrics out (no loop, no sampling)."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from rlx.advantages import ADVANTAGES
from rlx.loops import NonFiniteGuard
from rlx.loops.online_settings import OnlineAlgoSettings
from rlx.loops.update import Batch, Learner, Pieces, sgd_update
from rlx.losses.aggregation import AGGREGATIONS
from rlx.losses.policy import POLICY_LOSSES
from rlx.models import build_tiny_gpt, token_logp
from rlx.registry import Entry, Resolved
from rlx.rewards import REWARDS
from rlx.rollout import Rollout
from rlx.settings import read_settings
from rlx.tasks.sort import SortTask
from tests.conftest import compose_cfg

TOKENS = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6], [5, 3, 5, 8], [9, 7, 9, 3]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
ADV = torch.tensor([1.0, -0.5, 0.25, -1.0])[:, None] * MASK


def algo_settings(**changes) -> OnlineAlgoSettings:
    node = OmegaConf.to_container(compose_cfg(["algo=grpo"]), resolve=True)["algo"]
    return read_settings(OnlineAlgoSettings, {**node, "entropy_coef": 0.0, **changes}, where="algo")


def fixed_batch(policy) -> Batch:
    task = policy.task
    prompts = task.train_batch(0, 4)
    ids, pmask = policy.encode(prompts.prompts)
    with torch.no_grad():
        old = token_logp(policy.completion_logits(ids, pmask, TOKENS, MASK), TOKENS) * MASK
    ro = Rollout(prompts, ids, pmask, TOKENS, MASK, old, [None] * 4, 1, [""] * 4, [""] * 4)
    return Batch(ro, rewards=torch.zeros(4), advantages=ADV.clone())


def learner_for(policy, loss: Resolved, *, aggregation="token_mean", lr=0.1, micro=None, **algo) -> Learner:
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    pieces = Pieces(
        reward=REWARDS.resolve({"name": "sort"}, where="reward"),
        advantage=ADVANTAGES.resolve({"name": "none"}, where="adv_norm"),
        policy_loss=loss,
        aggregation=AGGREGATIONS.resolve(aggregation, where="algo.aggregation"),
        kl=None,
    )
    return Learner(
        policy=policy,
        critic=None,
        optimizers=[(optimizer, None)],
        pieces=pieces,
        algo=algo_settings(aggregation=aggregation, **algo),
        update_settings=None,
        guard=NonFiniteGuard("stop", 3),
        micro_batch_size=micro,
        grad_clip=None,
        temperature=1.0,
        max_len=4,
    )


@pytest.fixture
def policy():
    torch.manual_seed(0)
    return build_tiny_gpt(SortTask(eval_size=4), n_layer=1, n_embd=32, n_head=2)


def test_one_sgd_step_is_theta_minus_lr_times_the_gradient_of_the_aggregated_loss(policy):
    batch = fixed_batch(policy)
    expected = copy.deepcopy(policy)
    ro = batch.rollout
    logp = token_logp(expected.completion_logits(ro.prompt_ids, ro.prompt_mask, TOKENS, MASK), TOKENS)
    loss = -(ADV * logp * MASK).sum() / MASK.sum()  # pg loss, token_mean, by hand
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(list(expected.parameters()), float("inf")).item()
    metrics = sgd_update(
        learner_for(policy, POLICY_LOSSES.resolve({"name": "pg"}, where="loss")), batch, step=0, kl_coef=0.0
    )
    for (name, p), q in zip(policy.model.named_parameters(), expected.parameters()):
        assert torch.allclose(p, q - 0.1 * q.grad, atol=1e-6), name
    assert metrics["loss/policy"] == pytest.approx(loss.item(), rel=1e-6)
    assert metrics["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    assert metrics["early_stop"] == 1.0 and metrics["lr"] == 0.1


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_give_the_unsplit_update(policy, aggregation):
    clipped = POLICY_LOSSES.resolve({"name": "clipped"}, where="loss")
    whole, split = policy, copy.deepcopy(policy)
    sgd_update(learner_for(whole, clipped, aggregation=aggregation), fixed_batch(whole), step=0, kl_coef=0.0)
    sgd_update(
        learner_for(split, clipped, aggregation=aggregation, micro=1), fixed_batch(split), step=0, kl_coef=0.0
    )
    for p, q in zip(whole.parameters(), split.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_the_early_stop_is_the_updates_own_not_the_losss(policy):
    """A loss that reports no metrics at all still gets the KL early stop."""

    def silent_pg(logp, old_logp, advantages, mask):
        return -advantages * logp, {}

    loss = Resolved(Entry("silent_pg", silent_pg), {}, {})
    learner = learner_for(policy, loss, epochs=3, minibatches=2, early_stop_kl=1e-9)
    metrics = sgd_update(learner, fixed_batch(policy), step=0, kl_coef=0.0)
    # minibatch 1 sees pi = pi_old and steps; minibatch 2 measures KL > 1.5e-9 and stops the batch
    assert metrics["early_stop"] == 0.5
    before = copy.deepcopy(policy)
    learner = learner_for(before, loss, epochs=3, minibatches=2, early_stop_kl=None)
    assert sgd_update(learner, fixed_batch(before), step=0, kl_coef=0.0)["early_stop"] == 3.0


@pytest.mark.parametrize(
    ("loss", "aggregation", "extra"),
    [
        ({"name": "clipped", "eps_high": 0.28}, "token_mean", {"kl": "k3", "entropy_coef": 0.01, "tau": 0.7}),
        ({"name": "pg"}, "seq_mean_token_mean", {"micro": 1}),
        ({"name": "clipped", "dual_clip": 3.0}, "seq_mean_token_sum_norm", {"kl": "k2", "micro": 3}),
    ],
)
def test_the_fused_head_loss_gives_the_ordinary_paths_update(
    policy, monkeypatch, fused_head_calls, loss, aggregation, extra
):
    """The loss's gradient formed in the fused head's forward (`FusedLoss`) against the ordinary path
    (log-probs with gradient, backward through the head), on pi_old != pi so that clipping acts: the
    same metrics and the same SGD step, with the KL and the entropy bonus in the loss, a temperature,
    micro-batches, and 2-row chunks of the head."""
    import rlx.kl
    import rlx.models.logprobs as logprobs
    from rlx.loops import update

    monkeypatch.setattr(logprobs, "FUSED_CHUNK_ELEMENTS", 2 * policy.vocab_size)
    torch.manual_seed(5)
    noise = 0.5 * torch.randn(MASK.shape)
    copies = [policy, copy.deepcopy(policy)]
    results = []
    for model, fused in zip(copies, (True, False)):
        monkeypatch.setattr(update.Learner, "fuses_loss", property(lambda self, fused=fused: fused))
        learner = learner_for(
            model,
            POLICY_LOSSES.resolve(loss, where="loss"),
            aggregation=aggregation,
            micro=extra.get("micro"),
            entropy_coef=extra.get("entropy_coef", 0.0),
        )
        learner.temperature = extra.get("tau", 1.0)
        batch = fixed_batch(model)
        ro = batch.rollout
        ro.old_logp = (ro.old_logp + noise) * MASK
        if "kl" in extra:
            learner.pieces.kl = rlx.kl.KL_ESTIMATORS.resolve(extra["kl"], where="kl")
            learner.kl_in_loss = True
            batch.ref_logp = (ro.old_logp - noise.flip(0)) * MASK
        calls = len(fused_head_calls)
        results.append(sgd_update(learner, batch, step=0, kl_coef=0.1))
        assert (len(fused_head_calls) > calls) == fused  # the path under test is the one taken
    mine, ordinary = results
    assert mine.keys() == ordinary.keys()
    for key in ordinary:
        assert mine[key] == pytest.approx(ordinary[key], rel=1e-5, abs=1e-7), key
    assert ordinary.get("clip_frac", 0.0) > 0 or loss["name"] == "pg"
    for p, q in zip(*(m.parameters() for m in copies)):
        assert torch.allclose(p, q, atol=1e-6)


def test_only_declared_pieces_take_the_fused_head(policy):
    """GSPO's sequence-level ratio is not token-local, and neither is a loss registered without the
    declaration: both keep the ordinary path."""
    learner = learner_for(policy, POLICY_LOSSES.resolve({"name": "clipped"}, where="loss"))
    assert learner.fuses_loss
    assert not learner_for(policy, POLICY_LOSSES.resolve({"name": "gspo"}, where="loss")).fuses_loss

    def my_pg(logp, old_logp, advantages, mask):
        return -advantages * logp, {}

    assert not learner_for(policy, Resolved(Entry("my_pg", my_pg), {}, {})).fuses_loss


@pytest.mark.parametrize("loss", ["clipped", "pg"])
def test_the_update_reads_its_figures_from_the_device_once_per_minibatch(policy, loss):
    """h12: a micro-batch's figures (losses, entropy, clip_frac, kl/old, the early stop's KL) leave the
    device in one transfer, not one `.item()` each (on a GPU every `.item()` is a host sync). Counted:
    the scalar reads (`aten._local_scalar_dense`, what `.item()` and `float()` of a tensor run) made by
    the update's own code, the same for one micro-batch as for four: the minibatch's token count only."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    class ScalarReads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                ours = [f.filename for f in traceback.extract_stack() if "/rlx/" in f.filename]
                self.count += ours[-1].endswith("rlx/loops/update.py")  # the innermost rlx code
            return func(*args, **(kwargs or {}))

    counts = []
    for micro in (None, 1):
        learner = learner_for(
            copy.deepcopy(policy),
            POLICY_LOSSES.resolve({"name": loss}, where="loss"),
            micro=micro,
            entropy_coef=0.01,
            early_stop_kl=10.0,
        )
        with ScalarReads() as reads:
            metrics = sgd_update(learner, fixed_batch(learner.policy), step=0, kl_coef=0.0)
        assert {"loss/total", "entropy", "kl/old"} <= metrics.keys()
        counts.append(reads.count)
    assert counts == [1, 1], counts
