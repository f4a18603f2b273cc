"""The update path through a real (tiny, float64) transformer: partition invariance and overlong filtering.

The gradient of one optimizer step must not depend on how its mini-batch is cut into micro-batches (token budget)
or spread over ranks: the bug class that hit verl, TRL and ms-swift. Float64 makes the comparison tight (1e-10).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dapo_pl.batch import MicroBatch, RolloutBatch
from dapo_pl.module import AlgorithmConfig
from dapo_pl.objective import token_mean_denominator
from dapo_pl.update import accumulate_gradients, cut_batch, score_old

VOCAB = 24


def _policy() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).double()


def _batch(num: int = 8) -> RolloutBatch:
    g = torch.Generator().manual_seed(1)
    sequences, prompt_lengths = [], []
    for _ in range(num):
        lp = int(torch.randint(1, 5, (1,), generator=g))
        lr = int(torch.randint(1, 9, (1,), generator=g))
        sequences.append(torch.randint(1, VOCAB, (lp + lr,), generator=g))
        prompt_lengths.append(lp)
    return RolloutBatch(
        sequences=sequences,
        prompt_lengths=prompt_lengths,
        advantages=torch.randn(num, generator=g),
        truncated=torch.tensor([i % 3 == 0 for i in range(num)]),
        rollout_logprobs=[None] * num,
        temperature=0.9,
    )


def _perturb(model: torch.nn.Module) -> None:
    """Move the policy away from the one that scored old log-probs, so ratios leave [1-eps_low, 1+eps_high]."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _cast(mbs: list[MicroBatch]) -> list[MicroBatch]:
    for mb in mbs:
        mb.loss_mask, mb.response_mask = mb.loss_mask.double(), mb.response_mask.double()
        mb.advantages, mb.rollout_logprobs = mb.advantages.double(), mb.rollout_logprobs.double()
    return mbs


def _gradient(batch: RolloutBatch, algo: AlgorithmConfig, *, shared_denominator: bool = True) -> torch.Tensor:
    """Flat gradient of one optimizer step over the whole batch, cut with ``algo.micro_batch_max_tokens``."""
    base = _policy()
    (mbs,) = cut_batch(batch, mini_batch_size=len(batch), max_tokens=algo.micro_batch_max_tokens, pad_id=0,
                       overlong_filtering=algo.overlong_filtering)  # fmt: skip
    mbs = _cast(mbs)
    score_old(base, mbs, batch.temperature)
    policy = copy.deepcopy(base)
    _perturb(policy)
    if algo.loss_agg != "token-mean":
        num_tokens = None
    elif shared_denominator:
        num_tokens = token_mean_denominator([mb.loss_mask for mb in mbs])
    else:  # the bug: each micro-batch divides by its own token count
        for mb in mbs:
            accumulate_gradients(policy, [mb], temperature=batch.temperature, algo=algo,
                                 num_tokens=token_mean_denominator(mb.loss_mask), backward=torch.Tensor.backward)  # fmt: skip
        return torch.cat([p.grad.flatten() for p in policy.parameters()])
    stats = accumulate_gradients(policy, mbs, temperature=batch.temperature, algo=algo, num_tokens=num_tokens,
                                 backward=torch.Tensor.backward)  # fmt: skip
    assert stats["clipfrac_high"] + stats["clipfrac_low"] > 0  # clipping is exercised
    return torch.cat([p.grad.flatten() for p in policy.parameters()])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("budget", [24, 40])
def test_micro_batch_partition_does_not_change_the_gradient(agg: str, budget: int) -> None:
    batch = _batch()
    whole = _gradient(batch, AlgorithmConfig(loss_agg=agg, micro_batch_max_tokens=10_000))
    (parts,) = cut_batch(batch, mini_batch_size=8, max_tokens=budget, pad_id=0, overlong_filtering=False)
    assert len(parts) >= 3  # really split
    split = _gradient(batch, AlgorithmConfig(loss_agg=agg, micro_batch_max_tokens=budget))
    assert whole.abs().max() > 1e-3
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-10)


def test_per_micro_batch_denominators_would_change_the_gradient() -> None:
    """The negative control: the test above can fail, since per-micro-batch token means differ."""
    batch = _batch()
    whole = _gradient(batch, AlgorithmConfig(micro_batch_max_tokens=10_000))
    wrong = _gradient(batch, AlgorithmConfig(micro_batch_max_tokens=24), shared_denominator=False)
    assert (wrong - whole).abs().max() > 1e-4


def test_two_ranks_average_to_the_one_rank_gradient() -> None:
    """Two ranks hold half the responses each; the all-reduced count over world size 2, then DDP's average."""
    batch = _batch()
    algo = AlgorithmConfig(micro_batch_max_tokens=10_000)
    whole = _gradient(batch, algo)
    halves = [list(range(0, 3)), list(range(3, 8))]  # uneven token counts on purpose
    counts, cut = [], []
    for idx in halves:
        sub = RolloutBatch([batch.sequences[i] for i in idx], [batch.prompt_lengths[i] for i in idx],
                           batch.advantages[idx], batch.truncated[idx], [None] * len(idx), batch.temperature)  # fmt: skip
        (mbs,) = cut_batch(
            sub, mini_batch_size=len(idx), max_tokens=10_000, pad_id=0, overlong_filtering=False
        )
        cut.append(_cast(mbs))
        counts.append(token_mean_denominator([mb.loss_mask for mb in mbs]))
    total = sum(counts)
    grads = []
    for mbs in cut:
        base = _policy()
        score_old(base, mbs, batch.temperature)
        policy = copy.deepcopy(base)
        _perturb(policy)
        denom = token_mean_denominator(
            [mb.loss_mask for mb in mbs], all_reduce=lambda t: total, grad_average_world_size=2
        )
        accumulate_gradients(policy, mbs, temperature=batch.temperature, algo=algo, num_tokens=denom,
                             backward=torch.Tensor.backward)  # fmt: skip
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    torch.testing.assert_close((grads[0] + grads[1]) / 2, whole, rtol=0, atol=1e-10)


def test_overlong_filtering_equals_dropping_truncated_responses() -> None:
    """Masking truncated responses removes them from the loss and from the denominator: same gradient as a
    batch without them (advantages unchanged)."""
    batch = _batch()
    filtered = _gradient(batch, AlgorithmConfig(overlong_filtering=True, micro_batch_max_tokens=30))
    keep = [i for i in range(len(batch)) if not batch.truncated[i]]
    dropped = RolloutBatch([batch.sequences[i] for i in keep], [batch.prompt_lengths[i] for i in keep],
                           batch.advantages[keep], batch.truncated[keep], [None] * len(keep), batch.temperature)  # fmt: skip
    torch.testing.assert_close(
        filtered, _gradient(dropped, AlgorithmConfig(micro_batch_max_tokens=10_000)), rtol=0, atol=1e-10
    )
    unfiltered = _gradient(batch, AlgorithmConfig(micro_batch_max_tokens=30))
    assert (unfiltered - filtered).abs().max() > 1e-4


def test_algorithm_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"algorithm.eps_high must be >= 0, got -0.1"):
        AlgorithmConfig(eps_high=-0.1)
    with pytest.raises(ValueError, match=r"algorithm.eps_low must be >= 0"):
        AlgorithmConfig(eps_low=-0.2)
    with pytest.raises(ValueError, match=r"loss_agg"):
        replace(AlgorithmConfig(), loss_agg="sum")
    with pytest.raises(ValueError, match=r"clip_ratio_c"):
        AlgorithmConfig(clip_ratio_c=0.5)
