"""Tests of dapo_pl.objective against a float64 reference written with plain loops from the DAPO paper.

The reference (``ref_*`` below) uses Python floats and ``math.exp`` only, straight from the formulas:
the clipped token objective ``min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` (Clip-Higher, Sec. 3.1),
the token-level loss ``1 / sum_i |o_i| * sum_i sum_t`` (Sec. 3.3) and the overlong penalty (Eq. 13).
Its gradients are derived by hand: d(r A)/d log pi = A r where the unclipped branch is active, else 0.
Tolerances are 1e-10 in float64 and are never loosened to make a test pass.
"""

from __future__ import annotations

import math

import pytest
import torch

from dapo_pl.objective import (
    aggregate,
    clip_fractions,
    group_advantages,
    kl_penalty,
    logprobs_from_logits,
    overlong_penalty,
    policy_loss,
    token_entropy,
    token_mean_denominator,
)

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


# ---------------------------------------------------------------------------------------------------------
# The loop reference.
# ---------------------------------------------------------------------------------------------------------


def ref_token(logp: float, old: float, a: float, eps_low: float, eps_high: float, clip_c: float | None):
    """One token's loss (minus DAPO's objective term) and its derivative w.r.t. ``logp``."""
    r = math.exp(logp - old)
    clipped_r = min(max(r, 1.0 - eps_low), 1.0 + eps_high)
    objective = min(r * a, clipped_r * a)
    # The unclipped branch r*A is the active one: for A > 0 until r exceeds 1 + eps_high, for A < 0
    # as long as r stays above 1 - eps_low. For A = 0 the derivative A r is 0 anyway.
    active = (a > 0 and r <= 1.0 + eps_high) or (a < 0 and r >= 1.0 - eps_low)
    if clip_c is not None and a < 0:
        objective = max(objective, clip_c * a)  # dual clip: the loss -objective is capped at -c A
        active = active and r <= clip_c
    return -objective, (-a * r if active else 0.0)


def ref_weights(mask: list[list[bool]], agg: str, num_tokens: float | None = None) -> list[list[float]]:
    """The weight of each token in the aggregated loss (so loss = sum w * l and grad = w * dl)."""
    lengths = [sum(1 for m in row if m) for row in mask]
    non_empty = sum(1 for n in lengths if n > 0)
    weights = []
    for row, n in zip(mask, lengths, strict=True):
        if agg == "token-mean":  # 1 / sum_i |o_i|, over every token of every response
            w = 1.0 / (num_tokens if num_tokens is not None else max(sum(lengths), 1))
        elif agg == "seq-mean-token-mean":  # 1/G sum_i 1/|o_i| sum_t (GRPO)
            w = 1.0 / (non_empty * n) if n else 0.0
        else:  # seq-mean-token-sum: 1/G sum_i sum_t
            w = 1.0 / non_empty if n else 0.0
        weights.append([w if m else 0.0 for m in row])
    return weights


def ref_policy_loss(logprobs, old, adv, mask, *, eps_low, eps_high, clip_c=None, agg="token-mean"):
    """Loss and d loss / d logprobs, both from loops over Python floats."""
    weights = ref_weights(mask, agg)
    loss, grad = 0.0, []
    for i, row in enumerate(mask):
        grad_row = []
        for t, m in enumerate(row):
            a = adv[i][t] if isinstance(adv[i], list) else adv[i]
            if not m:
                grad_row.append(0.0)
                continue
            value, dvalue = ref_token(logprobs[i][t], old[i][t], a, eps_low, eps_high, clip_c)
            loss += weights[i][t] * value
            grad_row.append(weights[i][t] * dvalue)
        grad.append(grad_row)
    return loss, grad


def ref_overlong(length: int, max_len: int, cache_len: int, factor: float) -> float:
    """DAPO Eq. 13, written as in the paper."""
    if length <= max_len - cache_len:
        return 0.0
    if length <= max_len:
        return factor * ((max_len - cache_len) - length) / cache_len
    return -factor


def make_case(seed: int, *, per_token_adv: bool, batch: int = 8, length: int = 16):
    """Random float64 inputs: ratios in [0.25, 4] (both sides of both clip bounds, and past c = 3),
    advantages positive, negative and exactly 0, a mask with an empty row and a right-padded row."""
    g = torch.Generator().manual_seed(seed)
    old = -3.0 * torch.rand(batch, length, generator=g, dtype=F64)  # [B, T]
    logprobs = old + 1.4 * (2.0 * torch.rand(batch, length, generator=g, dtype=F64) - 1.0)  # [B, T]
    if per_token_adv:
        adv = torch.randn(batch, length, generator=g, dtype=F64)  # [B, T]
        adv[torch.rand(batch, length, generator=g) < 0.15] = 0.0
    else:
        adv = torch.randn(batch, generator=g, dtype=F64)  # [B]
        adv[0] = 0.0
    mask = torch.rand(batch, length, generator=g) < 0.75  # [B, T]
    mask[1] = False
    mask[2, length // 2 :] = False
    return logprobs, old, adv, mask


def assert_covers_all_regions(logprobs, old, adv, mask, clip_c=3.0):
    """The random case really exercises every branch (so a wrong branch cannot hide)."""
    r = torch.exp(logprobs - old)  # [B, T]
    a = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand_as(r)  # [B, T]
    regions = {
        "A>0, r>1+eps_high": (a > 0) & (r > 1.28),
        "A>0, r<1-eps_low": (a > 0) & (r < 0.8),
        "A>0, inside": (a > 0) & (r > 0.8) & (r < 1.28),
        "A<0, r<1-eps_low": (a < 0) & (r < 0.8),
        "A<0, 1+eps_high<r<c": (a < 0) & (r > 1.28) & (r < clip_c),
        "A<0, r>c": (a < 0) & (r > clip_c),
        "A=0": a == 0,
    }
    for name, hit in regions.items():
        assert (hit & mask).any(), f"random case does not cover {name}"


def run_policy_loss(logprobs, old, adv, mask, **kwargs):
    leaf = logprobs.clone().requires_grad_(True)
    loss = policy_loss(leaf, old, adv, mask, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


# ---------------------------------------------------------------------------------------------------------
# policy_loss against the reference.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_c", [None, 3.0])
def test_policy_loss_matches_loop_reference(seed, per_token_adv, agg, clip_c):
    logprobs, old, adv, mask = make_case(seed, per_token_adv=per_token_adv)
    assert_covers_all_regions(logprobs, old, adv, mask)
    loss, grad = run_policy_loss(
        logprobs, old, adv, mask, eps_low=0.2, eps_high=0.28, clip_ratio_c=clip_c, agg=agg
    )
    ref_loss, ref_grad = ref_policy_loss(
        logprobs.tolist(),
        old.tolist(),
        adv.tolist(),
        mask.tolist(),
        eps_low=0.2,
        eps_high=0.28,
        clip_c=clip_c,
        agg=agg,
    )
    torch.testing.assert_close(loss, torch.tensor(ref_loss, dtype=F64), **TOL)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=F64), **TOL)


def test_policy_loss_symmetric_clip_and_float_mask_match_reference():
    """eps_low == eps_high (PPO/GRPO) and a 0/1 float mask take the same path as the default case."""
    logprobs, old, adv, mask = make_case(7, per_token_adv=False)
    loss, grad = run_policy_loss(logprobs, old, adv, mask.to(F64), eps_low=0.1, eps_high=0.1)
    ref_loss, ref_grad = ref_policy_loss(
        logprobs.tolist(), old.tolist(), adv.tolist(), mask.tolist(), eps_low=0.1, eps_high=0.1
    )
    torch.testing.assert_close(loss, torch.tensor(ref_loss, dtype=F64), **TOL)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=F64), **TOL)


def test_hand_worked_clip_cases():
    """Four tokens of one response, ``old_logprobs = 0``, ``eps_low = 0.2``, ``eps_high = 0.28``, token-mean:

    ====  ===  ======================================================  =========  ==========
    r     A    max(-A r, -A clip(r, 0.8, 1.28))                        loss term  d/d logp
    ====  ===  ======================================================  =========  ==========
    1.5   +1   max(-1.5, -1.28) = -1.28 (upper clip, Clip-Higher)      -1.28      0
    0.5   +1   max(-0.5, -0.8) = -0.5 (unclipped: raise a good token)  -0.5       -A r = -0.5
    0.5   -1   max(0.5, 0.8) = 0.8 (lower clip)                        0.8        0
    1.1   -2   max(2.2, 2.2) = 2.2 (inside the range)                  2.2        -A r = 2.2
    ====  ===  ======================================================  =========  ==========

    token-mean over 4 tokens: loss = (-1.28 - 0.5 + 0.8 + 2.2) / 4 = 1.22 / 4 = 0.305;
    gradient = [0, -0.5, 0, 2.2] / 4 = [0, -0.125, 0, 0.55].
    The clip fractions: high 1/4 (first token), low 1/4 (third token).
    """
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.1]], dtype=F64))  # [1, 4]
    old = torch.zeros(1, 4, dtype=F64)  # [1, 4]
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]], dtype=F64)  # [1, 4]
    mask = torch.ones(1, 4, dtype=torch.bool)  # [1, 4]
    loss, grad = run_policy_loss(logprobs, old, adv, mask)
    torch.testing.assert_close(loss, torch.tensor(0.305, dtype=F64), **TOL)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.125, 0.0, 0.55]], dtype=F64), **TOL)
    high, low = clip_fractions(logprobs, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert (high.item(), low.item()) == (0.25, 0.25)


def test_hand_worked_aggregations():
    """Two responses at ``r = 1``: response 0 has 1 token with A = +1 (loss -1), response 1 has 3 tokens
    with A = -1 (loss +1 each); a third row is empty (filtered out) and must not count.

    - token-mean: (-1 + 3) / 4 = 0.5; d/d logp = -A r / 4 -> -0.25 and +0.25 on each token of row 1.
    - seq-mean-token-mean: (-1 / 1 + 3 / 3) / 2 = 0; grads -1/2 = -0.5 and 1/(2*3) = 1/6.
      The long response's tokens weigh 3x less: the length bias DAPO's token-level loss removes.
    - seq-mean-token-sum: (-1 + 3) / 2 = 1; grads -0.5 and +0.5.
    """
    logprobs = torch.full((3, 3), -1.0, dtype=F64)  # [3, 3]
    adv = torch.tensor([1.0, -1.0, 5.0], dtype=F64)  # [3]
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)  # [3, 3]
    expected = {
        "token-mean": (0.5, -0.25, 0.25),
        "seq-mean-token-mean": (0.0, -0.5, 1 / 6),
        "seq-mean-token-sum": (1.0, -0.5, 0.5),
    }
    for agg, (value, g0, g1) in expected.items():
        loss, grad = run_policy_loss(logprobs, logprobs, adv, mask, agg=agg)
        torch.testing.assert_close(loss, torch.tensor(value, dtype=F64), **TOL)
        want = torch.tensor([[g0, 0, 0], [g1, g1, g1], [0, 0, 0]], dtype=F64)
        torch.testing.assert_close(grad, want, **TOL)


def test_hand_worked_dual_clip():
    """A = -1, r = 4, eps_high = 0.28: max(-A r, -A * 1.28) = max(4, 1.28) = 4, gradient -A r = 4
    (the ratio is past the upper bound but for A < 0 the unclipped branch stays active).
    With clip_ratio_c = 3 the loss is capped: min(4, -A * 3) = 3, gradient 0. A positive advantage
    is never capped: A = +1, r = 4 stays at the Clip-Higher value -1.28.
    """
    logprobs = torch.log(torch.tensor([[4.0]], dtype=F64))  # [1, 1]
    old = torch.zeros(1, 1, dtype=F64)
    mask = torch.ones(1, 1)
    neg, pos = torch.tensor([-1.0], dtype=F64), torch.tensor([1.0], dtype=F64)
    loss, grad = run_policy_loss(logprobs, old, neg, mask)
    assert (loss.item(), grad.item()) == pytest.approx((4.0, 4.0), abs=1e-12)
    loss, grad = run_policy_loss(logprobs, old, neg, mask, clip_ratio_c=3.0)
    assert (loss.item(), grad.item()) == pytest.approx((3.0, 0.0), abs=1e-12)
    loss, grad = run_policy_loss(logprobs, old, pos, mask, clip_ratio_c=3.0)
    assert (loss.item(), grad.item()) == pytest.approx((-1.28, 0.0), abs=1e-12)


def test_policy_loss_ignores_garbage_in_masked_tokens():
    """Padding may hold any log-prob (-inf, 1e4): neither the value nor the gradient may see it."""
    logprobs, old, adv, mask = make_case(3, per_token_adv=False)
    dirty = logprobs.clone()
    dirty[~mask] = torch.tensor([float("-inf"), 1e4, float("nan")], dtype=F64).repeat(64)[: (~mask).sum()]
    clean_loss, clean_grad = run_policy_loss(logprobs, old, adv, mask)
    dirty_loss, dirty_grad = run_policy_loss(dirty, old, adv, mask)
    torch.testing.assert_close(dirty_loss, clean_loss, rtol=0, atol=0)
    torch.testing.assert_close(dirty_grad, clean_grad, rtol=0, atol=0)


def test_empty_mask_gives_zero_loss_for_every_aggregation():
    logprobs, old, adv, _ = make_case(0, per_token_adv=False)
    mask = torch.zeros_like(logprobs, dtype=torch.bool)
    for agg in AGGS:
        loss, grad = run_policy_loss(logprobs, old, adv, mask, agg=agg)
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))
    num_tokens = token_mean_denominator(mask)
    assert num_tokens.item() == 1.0  # clamped: 0 tokens gives a loss of 0, not 0 / 0
    assert policy_loss(logprobs, old, adv, mask, num_tokens=num_tokens).item() == 0.0


def test_num_tokens_python_number_or_tensor_and_dtype():
    logprobs, old, adv, mask = make_case(4, per_token_adv=True)
    as_number = policy_loss(logprobs, old, adv, mask, num_tokens=50)
    as_tensor = policy_loss(logprobs, old, adv, mask, num_tokens=torch.tensor(50.0, dtype=F64))
    masked_sum = policy_loss(logprobs, old, adv, mask, num_tokens=1)
    torch.testing.assert_close(as_number, as_tensor, rtol=0, atol=0)
    torch.testing.assert_close(as_number, masked_sum / 50, **TOL)
    # A float64 denominator must not promote a float32 loss.
    loss32 = policy_loss(
        logprobs.float(), old.float(), adv.float(), mask, num_tokens=token_mean_denominator(mask)
    )
    assert loss32.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps_low": -0.1}, r"eps_low must be >= 0, got -0\.1"),
        ({"eps_high": -0.5}, r"eps_high must be >= 0, got -0\.5"),
        ({"eps_low": 1.0}, r"eps_low must be < 1"),
        ({"clip_ratio_c": 1.0}, r"clip_ratio_c must be > 1 \(dual clip\), got 1\.0"),
        ({"clip_ratio_c": 0.5}, r"clip_ratio_c"),
        ({"agg": "mean"}, r"agg must be one of 'token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum'"),
        ({"agg": "seq-mean-token-sum", "num_tokens": 10}, r"num_tokens only applies"),
        ({"num_tokens": 0}, r"num_tokens must be > 0"),
    ],
)
def test_policy_loss_rejects_bad_arguments(kwargs, match):
    logprobs, old, adv, mask = make_case(0, per_token_adv=False)
    with pytest.raises(ValueError, match=match):
        policy_loss(logprobs, old, adv, mask, **kwargs)


def test_policy_loss_rejects_bad_shapes():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"logprobs.*\(2, 3\).*old_logprobs.*\(2, 4\)"):
        policy_loss(x, torch.zeros(2, 4), torch.zeros(2), x)
    with pytest.raises(ValueError, match=r"mask \(3, 2\)"):
        policy_loss(x, x, torch.zeros(2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, T\] = \(2, 3\), got \(3,\)"):
        policy_loss(x, x, torch.zeros(3), x)
    with pytest.raises(ValueError, match=r"per_token and mask"):
        aggregate(x, torch.ones(3, 2), "token-mean")
    with pytest.raises(ValueError, match=r"agg must be one of"):
        aggregate(x, x, "sum")


# ---------------------------------------------------------------------------------------------------------
# One denominator: partition invariance over micro-batches and ranks.
# ---------------------------------------------------------------------------------------------------------


def tiny_policy(seed: int = 11, batch: int = 7, length: int = 6, dim: int = 4, vocab: int = 5):
    """A one-matrix 'language model' so gradients land on a shared parameter, as in real training."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, vocab, generator=g, dtype=F64)  # [D, V]
    features = torch.randn(batch, length, dim, generator=g, dtype=F64)  # [B, T, D]
    tokens = torch.randint(0, vocab, (batch, length), generator=g)  # [B, T]
    old = logprobs_from_logits(features @ weight, tokens) + 0.3 * torch.randn(
        batch, length, generator=g, dtype=F64
    )
    adv = torch.randn(batch, generator=g, dtype=F64)  # [B]
    mask = torch.rand(batch, length, generator=g) < 0.7  # [B, T]
    mask[3] = False  # an empty response
    mask[0, 2:] = False  # a short one
    return weight, features, tokens, old, adv, mask


def loss_and_weight_grad(weight, features, tokens, old, adv, mask, rows, **kwargs):
    """The loss of the rows ``rows`` and its gradient on a fresh copy of the weight."""
    w = weight.clone().requires_grad_(True)
    logprobs = logprobs_from_logits(features[rows] @ w, tokens[rows])  # [b, T]
    loss = policy_loss(logprobs, old[rows], adv[rows], mask[rows], **kwargs)
    loss.backward()
    return loss.detach(), w.grad


SPLITS = {
    "k=2 uneven": [slice(0, 3), slice(3, 7)],
    "k=3 uneven": [slice(0, 1), slice(1, 5), slice(5, 7)],
    "k=3": [slice(0, 2), slice(2, 4), slice(4, 7)],
}


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
def test_micro_batches_with_one_denominator_equal_the_full_batch(split):
    weight, features, tokens, old, adv, mask = model = tiny_policy()
    full_loss, full_grad = loss_and_weight_grad(*model, slice(None), num_tokens=token_mean_denominator(mask))
    full_loss_default, _ = loss_and_weight_grad(*model, slice(None))  # without num_tokens: its own count
    torch.testing.assert_close(full_loss, full_loss_default, rtol=0, atol=1e-15)

    num_tokens = token_mean_denominator([mask[rows] for rows in split])
    parts = [loss_and_weight_grad(*model, rows, num_tokens=num_tokens) for rows in split]
    torch.testing.assert_close(sum(loss for loss, _ in parts), full_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(sum(grad for _, grad in parts), full_grad, rtol=0, atol=1e-12)

    # The bug class: each micro-batch divides by its own token count and the framework averages the
    # micro-batches (accumulate_grad_batches). The result differs, so this test can catch it.
    naive = [loss_and_weight_grad(*model, rows) for rows in split]
    naive_loss = sum(loss for loss, _ in naive) / len(split)
    naive_grad = sum(grad for _, grad in naive) / len(split)
    assert abs(naive_loss - full_loss) > 1e-3
    assert (naive_grad - full_grad).abs().max() > 1e-3


def test_two_ranks_with_ddp_averaging_equal_one_rank():
    """Rank 0 holds rows 0-2, rank 1 rows 3-6. DDP averages gradients, so each rank divides its local
    masked sum by global_tokens / 2; the average of the two gradients is then the 1-rank gradient."""
    weight, features, tokens, old, adv, mask = model = tiny_policy()
    _, one_rank_grad = loss_and_weight_grad(*model, slice(None))
    ranks = [slice(0, 3), slice(3, 7)]
    local_counts = [mask[rows].sum() for rows in ranks]
    assert local_counts[0] != local_counts[1]  # uneven, so a per-rank mean would be wrong

    def fake_all_reduce(count: torch.Tensor) -> torch.Tensor:
        assert count.dtype == torch.int64 and count.item() in [c.item() for c in local_counts]
        return sum(local_counts)

    grads = []
    for rows in ranks:
        den = token_mean_denominator(mask[rows], all_reduce=fake_all_reduce, grad_average_world_size=2)
        grads.append(loss_and_weight_grad(*model, rows, num_tokens=den)[1])
    ddp_grad = (grads[0] + grads[1]) / 2  # what DDP's all-reduce(mean) does
    torch.testing.assert_close(ddp_grad, one_rank_grad, rtol=0, atol=1e-12)

    # Forgetting the world size halves the gradient; per-rank means give another wrong answer.
    wrong = []
    for rows in ranks:
        den = token_mean_denominator(mask[rows], all_reduce=fake_all_reduce)
        wrong.append(loss_and_weight_grad(*model, rows, num_tokens=den)[1])
    torch.testing.assert_close((wrong[0] + wrong[1]) / 2, one_rank_grad / 2, rtol=0, atol=1e-12)
    per_rank_mean = [loss_and_weight_grad(*model, rows)[1] for rows in ranks]
    assert ((per_rank_mean[0] + per_rank_mean[1]) / 2 - one_rank_grad).abs().max() > 1e-3


def test_token_mean_denominator_counts_and_hand_worked_example():
    """The docstring's example: rank 0 has 3 tokens, rank 1 has 1; 2 ranks -> denominator 4 / 2 = 2."""
    rank0, rank1 = torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[0.0, 1.0]])
    total = rank0.sum() + rank1.sum()
    den0 = token_mean_denominator(rank0, all_reduce=lambda t: total, grad_average_world_size=2)
    assert den0.dtype == F64 and den0.item() == 2.0
    # Micro-batches of different lengths, bool and float masks, counted exactly.
    masks = [torch.ones(2, 5, dtype=torch.bool), torch.tensor([[1.0, 0.0, 1.0]]), torch.zeros(4, 1)]
    assert token_mean_denominator(masks).item() == 12.0
    assert token_mean_denominator(torch.zeros(3, 3), grad_average_world_size=4).item() == 0.25
    with pytest.raises(ValueError, match="grad_average_world_size must be >= 1, got 0"):
        token_mean_denominator(rank0, grad_average_world_size=0)
    with pytest.raises(ValueError, match="mask must be a tensor or a non-empty sequence"):
        token_mean_denominator([])


# ---------------------------------------------------------------------------------------------------------
# Clip fractions.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.2, 0.28), (0.1, 0.4), (0.35, 0.05)])
def test_clip_fractions_match_loop_reference(per_token_adv, eps_low, eps_high):
    logprobs, old, adv, mask = make_case(5, per_token_adv=per_token_adv)
    high = low = count = 0
    for i, row in enumerate(mask.tolist()):
        for t, m in enumerate(row):
            if not m:
                continue
            a = adv[i, t].item() if per_token_adv else adv[i].item()
            r = math.exp(logprobs[i, t].item() - old[i, t].item())
            count += 1
            high += a > 0 and r > 1 + eps_high
            low += a < 0 and r < 1 - eps_low
    got_high, got_low = clip_fractions(logprobs, old, adv, mask, eps_low=eps_low, eps_high=eps_high)
    assert 0 < high < count and 0 < low < count
    assert (got_high.item(), got_low.item()) == pytest.approx((high / count, low / count), abs=1e-15)
    assert not got_high.requires_grad
    none = clip_fractions(logprobs, old, adv, torch.zeros_like(mask), eps_low=0.2, eps_high=0.28)
    assert [x.item() for x in none] == [0.0, 0.0]
    with pytest.raises(ValueError, match="eps_high must be >= 0"):
        clip_fractions(logprobs, old, adv, mask, eps_low=0.2, eps_high=-1.0)


# ---------------------------------------------------------------------------------------------------------
# Group advantages.
# ---------------------------------------------------------------------------------------------------------


def ref_group_advantages(rewards: list[list[float]], eps: float, scale_by_std: bool) -> list[list[float]]:
    out = []
    for group in rewards:
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1)) if len(group) > 1 else 0.0
        out.append([(r - mean) / (std + eps) if scale_by_std else r - mean for r in group])
    return out


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_match_loop_reference(scale_by_std):
    rewards = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), dtype=F64)  # [5, 8]
    got = group_advantages(rewards, eps=1e-6, scale_by_std=scale_by_std)
    want = ref_group_advantages(rewards.tolist(), 1e-6, scale_by_std)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), **TOL)


def test_group_advantages_hand_worked_and_ties():
    """Rewards [+1, -1, -1, -1]: mean -0.5, centred [1.5, -0.5, -0.5, -0.5], unbiased variance
    (2.25 + 3 * 0.25) / 3 = 1, so the advantages are [1.5, -0.5, -0.5, -0.5] / (1 + eps).
    A group whose rewards are all equal (what dynamic sampling filters) gets exact zeros, not nan."""
    rewards = torch.tensor(
        [[1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]], dtype=F64
    )
    got = group_advantages(rewards, eps=1e-6)
    want = torch.tensor([[1.5, -0.5, -0.5, -0.5], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=F64)
    want[0] /= 1 + 1e-6
    torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(got[1:], torch.zeros(2, 4, dtype=F64))


def test_group_advantages_group_of_one():
    rewards = torch.tensor([[1.0], [-1.0]])
    with pytest.raises(ValueError, match=r"group size G .* must be >= 2 when scale_by_std=True, got G=1"):
        group_advantages(rewards)
    assert torch.equal(group_advantages(rewards, scale_by_std=False), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"rewards must have shape \[num_groups, G\]"):
        group_advantages(torch.zeros(4))


# ---------------------------------------------------------------------------------------------------------
# Overlong reward shaping (Eq. 13).
# ---------------------------------------------------------------------------------------------------------


def test_overlong_penalty_hand_worked_paper_setting():
    """max_len = 20480, cache_len = 4096 (16k + 4k): the soft zone starts after 16384 tokens.
    18432 is half-way: (16384 - 18432) / 4096 = -0.5; 20480 is the end: -4096 / 4096 = -1."""
    lengths = torch.tensor([0, 16384, 16385, 18432, 20480, 20481])
    got = overlong_penalty(lengths, max_len=20480, cache_len=4096)
    want = torch.tensor([0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0], dtype=F64)
    assert got.dtype == F64 and got.shape == lengths.shape  # integer lengths: float64, like every reward
    torch.testing.assert_close(got, want, **TOL)


def test_overlong_penalty_of_integer_lengths_is_float64_exact():
    """The issue's case: len 16602, L 20480, C 7018. (20480 - 7018 - 16602) / 7018 = -3140 / 7018, which float32
    missed by 7e-9; integer lengths must give the float64 value of the formula."""
    got = overlong_penalty(torch.tensor([16602]), max_len=20480, cache_len=7018)
    assert got.dtype == F64
    assert got.item() == ref_overlong(16602, 20480, 7018, 1.0) == -3140 / 7018
    assert overlong_penalty(torch.tensor([3.0], dtype=torch.float32), 10, 4).dtype == torch.float32


@pytest.mark.parametrize(
    ("max_len", "cache_len", "factor"), [(10, 4, 1.0), (10, 4, 0.5), (10, 10, 2.0), (7, 1, 1.0)]
)
def test_overlong_penalty_matches_loop_reference(max_len, cache_len, factor):
    lengths = torch.arange(0, 2 * max_len + 2).reshape(2, -1)  # [2, max_len + 1], every boundary
    got = overlong_penalty(lengths.to(F64), max_len=max_len, cache_len=cache_len, factor=factor)
    want = [[ref_overlong(n, max_len, cache_len, factor) for n in row] for row in lengths.tolist()]
    assert got.dtype == F64
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), **TOL)
    assert got[0, max_len - cache_len].item() == 0.0  # exactly at the start of the soft zone
    assert got.flatten()[max_len].item() == pytest.approx(-factor if cache_len else 0.0, abs=1e-12)
    assert got.flatten()[max_len + 1].item() == -factor


def test_overlong_penalty_without_soft_zone():
    got = overlong_penalty(torch.tensor([5, 10, 11]), max_len=10, cache_len=0, factor=0.5)
    assert got.tolist() == [0.0, 0.0, -0.5]


@pytest.mark.parametrize(
    ("max_len", "cache_len", "factor", "match"),
    [
        (10, 11, 1.0, r"cache_len \(11\) must not exceed max_len \(10\)"),
        (10, -1, 1.0, r"cache_len must be >= 0, got -1"),
        (0, 0, 1.0, r"max_len must be > 0, got 0"),
        (10, 2, -1.0, r"factor must be >= 0"),
    ],
)
def test_overlong_penalty_rejects_bad_arguments(max_len, cache_len, factor, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalty(torch.tensor([1]), max_len=max_len, cache_len=cache_len, factor=factor)


# ---------------------------------------------------------------------------------------------------------
# KL, entropy and log-probs.
# ---------------------------------------------------------------------------------------------------------


def test_kl_penalty_matches_loop_reference():
    g = torch.Generator().manual_seed(2)
    logprobs = -3 * torch.rand(4, 6, generator=g, dtype=F64)  # [4, 6]
    ref = logprobs + torch.randn(4, 6, generator=g, dtype=F64)  # [4, 6]
    k1 = [
        [p - q for p, q in zip(rp, rq, strict=True)]
        for rp, rq in zip(logprobs.tolist(), ref.tolist(), strict=True)
    ]
    k3 = [
        [math.exp(q - p) - (q - p) - 1 for p, q in zip(rp, rq, strict=True)]
        for rp, rq in zip(logprobs.tolist(), ref.tolist(), strict=True)
    ]
    torch.testing.assert_close(kl_penalty(logprobs, ref, kind="k1"), torch.tensor(k1, dtype=F64), **TOL)
    got_k3 = kl_penalty(logprobs, ref)
    torch.testing.assert_close(got_k3, torch.tensor(k3, dtype=F64), **TOL)
    assert (got_k3 >= 0).all()
    assert torch.equal(kl_penalty(logprobs, logprobs), torch.zeros_like(logprobs))
    with pytest.raises(ValueError, match=r"kind must be one of 'k1', 'k3'; got 'k2'"):
        kl_penalty(logprobs, ref, kind="k2")
    with pytest.raises(ValueError, match=r"logprobs and ref_logprobs must have equal shapes"):
        kl_penalty(logprobs, ref[:, :3])


def ref_log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_z = top + math.log(sum(math.exp(z - top) for z in row))
    return [z - log_z for z in row]


def test_token_entropy_matches_loop_reference():
    logits = 4 * torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(3), dtype=F64)  # [3, 5, 7]
    want = [
        [-sum(math.exp(lp) * lp for lp in ref_log_softmax(position)) for position in row]
        for row in logits.tolist()
    ]
    torch.testing.assert_close(token_entropy(logits), torch.tensor(want, dtype=F64), **TOL)
    uniform = token_entropy(torch.zeros(1, 1, 8, dtype=F64))
    assert uniform.item() == pytest.approx(math.log(8), abs=1e-12)  # hand-worked: log V
    huge = token_entropy(torch.tensor([[[1e4, 0.0]]], dtype=F64))  # no overflow, almost certain
    assert 0.0 <= huge.item() < 1e-12


def test_token_entropy_with_minus_inf_logits_has_no_nan():
    """A masked vocabulary entry (-inf) has p = 0 and adds nothing: entropy of [a, b, -inf] = of [a, b]."""
    logits = torch.tensor([[[0.3, -1.2, float("-inf")], [2.0, float("-inf"), float("-inf")]]], dtype=F64)
    leaf = logits.clone().requires_grad_(True)
    entropy = token_entropy(leaf)  # [1, 2]
    entropy.sum().backward()
    expected_first = token_entropy(torch.tensor([[[0.3, -1.2]]], dtype=F64))
    torch.testing.assert_close(entropy[0, 0].detach(), expected_first[0, 0], **TOL)
    assert entropy[0, 1].item() == 0.0
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_logprobs_from_logits_matches_loop_reference(temperature):
    g = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(2, 4, 9, generator=g, dtype=F64)  # [2, 4, 9]
    tokens = torch.randint(0, 9, (2, 4), generator=g)  # [2, 4]
    want = [
        [
            ref_log_softmax([z / temperature for z in position])[tok]
            for position, tok in zip(row, trow, strict=True)
        ]
        for row, trow in zip(logits.tolist(), tokens.tolist(), strict=True)
    ]
    got = logprobs_from_logits(logits, tokens, temperature=temperature)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), **TOL)


def test_logprobs_from_logits_rejects_bad_arguments():
    logits, tokens = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"temperature must be > 0"):
            logprobs_from_logits(logits, tokens, temperature=bad)
    with pytest.raises(
        ValueError, match=r"tokens must have shape logits.shape\[:-1\] = \(2, 3\), got \(3, 2\)"
    ):
        logprobs_from_logits(logits, tokens.T)
