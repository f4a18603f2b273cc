"""Evaluation statistics (``dapo_pl.evaluation``) against hand-computed values and against their combinatorial
definitions (every k-subset of the n samples enumerated), on small cases."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from dapo_pl.evaluation import (
    NO_VOTE,
    RIGHT,
    EvalStatsConfig,
    bootstrap_interval,
    evaluation_metrics,
    maj_at_k,
    pass_at_k,
    summary_line,
    vote_labels,
    vote_matrix,
)


def pass_at_k_by_enumeration(correct: list[bool], k: int) -> float:
    """The share of k-subsets of the samples holding at least one right sample."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def maj_at_k_by_enumeration(labels: list[int], k: int) -> float:
    """The share of k-subsets whose majority vote is the right class: count the votes of the subset (non-voters
    excluded), take the most frequent class, ties to the class whose first sample comes first among all n."""
    first = {}
    for i, label in enumerate(labels):
        if label != NO_VOTE:
            first.setdefault(label, i)
    wins = 0
    subsets = list(itertools.combinations(range(len(labels)), k))
    for subset in subsets:
        votes: dict[int, int] = {}
        for i in subset:
            if labels[i] != NO_VOTE:
                votes[labels[i]] = votes.get(labels[i], 0) + 1
        if votes:
            winner = min(votes, key=lambda c: (-votes[c], first[c]))
            wins += winner == RIGHT
    return wins / len(subsets)


def test_pass_at_k_hand_worked() -> None:
    """n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5. n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9.
    No right sample: 0; fewer than k wrong ones: 1; k=1 is c/n."""
    assert pass_at_k(4, 1, 2) == 0.5
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9, abs=1e-15)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0
    assert pass_at_k(8, 3, 1) == 3 / 8
    with pytest.raises(ValueError, match="1 <= k <= n, got n=4, c=1, k=5"):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_pass_at_k_equals_the_subset_enumeration(n: int) -> None:
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_by_enumeration(correct, k), abs=1e-12)


def test_vote_labels() -> None:
    """Right samples vote 0 whatever their text; wrong answers get 1, 2, ... by first appearance, whitespace
    normalised; no answer: no vote."""
    assert vote_labels([False, True, False, False], ["7", "8", None, " 7"]) == [1, 0, -1, 1]
    assert vote_labels([True, True, False, False], ["8", "8.0", "9", "1 0"]) == [0, 0, 1, 2]
    assert vote_labels([False, False], ["  ", "1  0"]) == [NO_VOTE, 1]


def test_maj_at_k_hand_worked() -> None:
    """Labels [0, 1, 1, -1], k=2 (docstring of maj_at_k): pairs {0,1} and {0,2} tie 1-1, right first -> right;
    {0,3} right alone; {1,2} wrong; {1,3}, {2,3} wrong: 3/6. k=4: 1 vs 2 -> wrong (0). k=1: only sample 0 of 4
    (sample 3 without an answer never wins): 1/4. If the wrong answer comes first ([1, 0, 1, -1], k=2), the tie
    {0,1} goes to the wrong answer: right wins only {1,3}: 1/6."""
    assert maj_at_k([0, 1, 1, -1], 2) == 0.5
    assert maj_at_k([0, 1, 1, -1], 4) == 0.0
    assert maj_at_k([0, 1, 1, -1], 1) == 0.25
    assert maj_at_k([1, 0, 1, -1], 2) == pytest.approx(1 / 6, abs=1e-15)
    assert maj_at_k([0, 0, 0], 3) == 1.0 and maj_at_k([-1, -1], 2) == 0.0 and maj_at_k([1, 2], 1) == 0.0


def test_maj_at_k_equals_the_subset_enumeration() -> None:
    rng = random.Random(0)
    cases = [[0, 1, 2, 0, 1, 2], [2, 0, 0, 1, 1, 1, -1], [-1, 0, -1, 1, 0, 2, 2, 3]]
    for _ in range(40):
        n = rng.randint(1, 9)
        cases.append([rng.choice([RIGHT, NO_VOTE, 1, 2, 3]) for _ in range(n)])
    for labels in cases:
        for k in range(1, len(labels) + 1):
            want = maj_at_k_by_enumeration(labels, k)
            assert maj_at_k(labels, k) == pytest.approx(want, abs=1e-12), (labels, k)


def test_bootstrap_interval_hand_worked_and_seeded() -> None:
    """Two prompts with values 0 and 1: a resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    2.5% and 97.5% quantiles of many resamples are 0 and 1. Constant values give a zero-width interval. The same
    seed gives the same interval; another seed (on a larger case) another one."""
    low, high = bootstrap_interval(torch.tensor([[0.0], [1.0]], dtype=torch.float64), resamples=4000)
    assert (low.item(), high.item()) == (0.0, 1.0)
    low, high = bootstrap_interval(torch.full((5, 2), 0.25, dtype=torch.float64), resamples=100)
    assert low.tolist() == high.tolist() == [0.25, 0.25]
    values = (torch.rand(200, 1, generator=torch.Generator().manual_seed(1)) < 0.3).double()
    first = bootstrap_interval(values, resamples=500, seed=3)
    assert torch.equal(first[0], bootstrap_interval(values, resamples=500, seed=3)[0])
    assert not torch.equal(first[0], bootstrap_interval(values, resamples=500, seed=4)[0])


def test_bootstrap_interval_matches_the_normal_approximation() -> None:
    """For a mean of P = 2000 Bernoulli(p) values the 95% interval is about mean +- 1.96 sqrt(p(1-p)/P)
    (half-width 0.0201 at p = 0.3); each side of the bootstrap interval must agree within 10%."""
    values = (torch.rand(2000, 1, generator=torch.Generator().manual_seed(0)) < 0.3).double()
    low, high = bootstrap_interval(values, resamples=2000, seed=0)
    p = values.mean().item()
    half = 1.96 * math.sqrt(p * (1 - p) / 2000)
    assert p - low.item() == pytest.approx(half, rel=0.1)
    assert high.item() - p == pytest.approx(half, rel=0.1)


def test_evaluation_metrics_hand_worked() -> None:
    """Two prompts, n = 4:
    prompt 0: right, "5", "5", no answer -> labels [0, 1, 1, -1]; c = 1.
    prompt 1: right, right, "3", right -> labels [0, 0, 1, 0]; c = 3.
    avg@4 = (1/4 + 3/4) / 2 = 0.5. pass@1 = avg = 0.5; pass@2 = (0.5 + 1) / 2 = 0.75; pass@4 = 1.
    maj@1 = (1/4 + 3/4) / 2 = 0.5; maj@2: prompt 0 -> 0.5 (hand-worked in test_maj_at_k_hand_worked); prompt 1:
    pairs {2, x} tie 1-1 and right comes first -> every pair right: 1 -> 0.75; maj@4: prompt 0 loses 1-2, prompt 1
    wins 3-1 -> 0.5."""
    correct = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    extracted = [["7", "5", "5", None], ["7", "7", "3", "7"]]
    votes = vote_matrix(correct, extracted)
    assert votes.tolist() == [[0, 1, 1, -1], [0, 0, 1, 0]]
    metrics = evaluation_metrics(votes, EvalStatsConfig(k=(1, 2), bootstrap=0))
    assert metrics == {
        "val/acc_avg_at_4": 0.5, "val/pass_at_1": 0.5, "val/pass_at_2": 0.75, "val/pass_at_4": 1.0,
        "val/maj_at_1": 0.5, "val/maj_at_2": 0.75, "val/maj_at_4": 0.5,
    }  # fmt: skip
    with_ci = evaluation_metrics(votes, EvalStatsConfig(k=(2,), bootstrap=200))
    for name in ("acc_avg_at_4", "pass_at_2", "pass_at_4", "maj_at_2", "maj_at_4"):
        assert with_ci[f"val/{name}_ci_low"] <= with_ci[f"val/{name}"] <= with_ci[f"val/{name}_ci_high"]
    assert with_ci["val/pass_at_4_ci_low"] == with_ci["val/pass_at_4_ci_high"] == 1.0  # both prompts pass
    line = summary_line(with_ci)
    assert line.startswith("avg@4 0.500 [") and "pass@2 0.750 [" in line and "maj@4 0.500 [" in line


def test_k_above_n_and_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match=r"data.val_stats.k has \[8\], more than the 4 samples per prompt"):
        EvalStatsConfig(k=(1, 8)).ks(4)
    with pytest.raises(ValueError, match="data.val_stats.k values must be >= 1"):
        EvalStatsConfig(k=(0,))
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        EvalStatsConfig(confidence=1.0)
    assert EvalStatsConfig(k=(4, 1, 1)).ks(4) == [1, 4]
