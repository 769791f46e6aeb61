"""How well a reward model ranks a policy's own samples on the sort task (the README's RLHF figures).

Samples ``--n`` completions per held-out prompt from the policy at temperature 1, scores them with the
reward model (``reward=model``'s own scoring) and reports: the share of samples that are right, the
best-of-n accuracy when the reward model picks, and within each prompt's samples the share of pairs
with different true scores (the share of matching positions) that the reward model orders the same
way ("within-prompt agreement"). Greedy accuracy of the policy is printed beside them.

    python scripts/rm_agreement.py outputs/rlhf_sort/sft/final outputs/rlhf_sort/rm/final
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from rlx.data.sort import score
from rlx.models import Sampling, load_pretrained
from rlx.rewards.model import reward_model_score
from rlx.tasks.sort import SortTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy", help="a policy directory (e.g. an SFT run's final/)")
    parser.add_argument("reward_model", help="a reward model directory (an rm run's final/)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompts", type=int, default=300, help="held-out prompts used")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()

    task = SortTask(length=4, vocab=10, eval_size=500, seed=1234)  # task=sort's held-out set
    prompts = [list(p) for p in task.eval_batch().prompts][: ns.prompts]
    policy = load_pretrained(ns.policy, task, "policy")
    policy.model.eval()
    torch.manual_seed(ns.seed)
    rep = [p for p in prompts for _ in range(ns.n)]
    with torch.no_grad():
        tokens, mask, _ = policy.generate(*policy.encode(rep), Sampling(max_new_tokens=task.length))
        g_tokens, g_mask, _ = policy.generate(
            *policy.encode(prompts), Sampling(max_new_tokens=task.length), greedy=True
        )
    answers, texts = policy.decode(tokens, mask), policy.decode_text(tokens, mask)
    rm = np.array(
        reward_model_score(
            rep,
            answers,
            prompt_text=[task.prompt_text(p) for p in rep],
            completion_text=texts,
            path=ns.reward_model,
        )
    ).reshape(-1, ns.n)
    right = np.array([list(a) == sorted(p) for a, p in zip(answers, rep)]).reshape(-1, ns.n)
    # the true score of the text the reward model read (as `rlx data sort` scores its pairs)
    true = np.array([score(task.parse_completion(t.split()), sorted(p)) for t, p in zip(texts, rep)])
    true = true.reshape(-1, ns.n)
    agree = total = 0
    for s_row, t_row in zip(rm, true):
        for a in range(ns.n):
            for b in range(ns.n):
                if t_row[a] > t_row[b]:
                    total += 1
                    agree += int(s_row[a] > s_row[b])
    greedy = np.mean([list(a) == sorted(p) for a, p in zip(policy.decode(g_tokens, g_mask), prompts)])
    print(f"greedy exact                      {greedy:.3f}")
    print(f"sampled exact (T=1)               {right.mean():.3f}")
    print(f"best-of-{ns.n} exact, RM picks        {right[np.arange(len(rm)), rm.argmax(1)].mean():.3f}")
    print(f"within-prompt agreement with true {agree / max(total, 1):.3f} over {total} pairs")


if __name__ == "__main__":
    main()
