"""The chunked LM head (:mod:`dapo_pl.head`) and the model plumbing around it (:func:`dapo_pl.update.score_tokens`).

Values and gradients (hidden states, head weight, head bias; every model parameter) must equal the unchunked
computation at 1e-10 in float64, for any chunk size (dividing the token count or not), any temperature, tied or
untied embeddings, gradient checkpointing, and rows with no response token. The reference values are written
with plain loops from the formulas; the reference gradients come from autograd through the full-logits path.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dapo_pl.batch import MicroBatch, RolloutBatch, collate, padding_micro_batch
from dapo_pl.head import chunked_logprobs
from dapo_pl.objective import logprobs_from_logits, token_entropy
from dapo_pl.update import forward_logits, linear_head, score_tokens

N, H, V = 10, 6, 13


def _loop_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float,
) -> tuple[list[float], list[float]]:
    """Plain loops: z_v = (sum_k h_k W_vk + b_v) / T, lp = z_y - log sum_v exp z_v, H = -sum_v p_v log p_v."""
    logprobs, entropies = [], []
    for n in range(hidden.shape[0]):
        z = []
        for v in range(weight.shape[0]):
            dot = sum(float(hidden[n, k]) * float(weight[v, k]) for k in range(weight.shape[1]))
            z.append((dot + (float(bias[v]) if bias is not None else 0.0)) / temperature)
        top = max(z)
        lse = top + math.log(sum(math.exp(x - top) for x in z))
        logprobs.append(z[int(tokens[n])] - lse)
        entropies.append(-sum(math.exp(x - lse) * (x - lse) for x in z))
    return logprobs, entropies


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach() if t is not None else None


def _inputs(with_bias: bool = True, n: int = N) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    tokens = torch.randint(0, V, (n,), generator=g)
    return hidden, weight, bias, tokens


def _upstream(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random upstream gradients for log-probs and entropies, so every term of the backward is exercised."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def test_hand_worked_two_token_vocabulary() -> None:
    """h = [1, 0], W = [[ln 2, 0], [0, 0]]: z = [ln 2, 0], p = [2/3, 1/3], so lp(y=0) = ln(2/3) and
    H = -(2/3 ln 2/3 + 1/3 ln 1/3). At T = 0.5: z = [ln 4, 0], p = [4/5, 1/5], lp(y=1) = ln(1/5)."""
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    weight = torch.tensor([[math.log(2.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    lp, ent = chunked_logprobs(hidden, weight, None, torch.tensor([0, 1]), chunk_tokens=1)
    assert lp.tolist() == pytest.approx([math.log(2 / 3), math.log(1 / 3)], abs=1e-12)
    assert ent.tolist() == pytest.approx(
        [-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))] * 2, abs=1e-12
    )
    lp, ent = chunked_logprobs(hidden, weight, None, torch.tensor([1, 0]), temperature=0.5)
    assert lp.tolist() == pytest.approx([math.log(1 / 5), math.log(4 / 5)], abs=1e-12)
    assert ent[0].item() == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)), abs=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 64])  # 3 and 4 do not divide N = 10
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_equal_the_unchunked_head(
    chunk: int, temperature: float, with_bias: bool
) -> None:
    hidden, weight, bias, tokens = _inputs(with_bias)
    lp, ent = chunked_logprobs(hidden, weight, bias, tokens, temperature=temperature, chunk_tokens=chunk)
    ref_lp, ref_ent = _loop_reference(hidden.detach(), weight.detach(), _detach(bias), tokens, temperature)
    torch.testing.assert_close(lp, torch.tensor(ref_lp, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, torch.tensor(ref_ent, dtype=torch.float64), rtol=0, atol=1e-10)

    g_lp, g_ent = _upstream(N)
    params = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), params)
    logits = (torch.nn.functional.linear(hidden, weight, bias) / temperature).unsqueeze(0)  # [1, N, V]
    full_lp = logprobs_from_logits(logits, tokens.unsqueeze(0))[0]  # [N]
    full_ent = token_entropy(logits)[0]  # [N]
    ref_grads = torch.autograd.grad((full_lp * g_lp).sum() + (full_ent * g_ent).sum(), params)
    for got, want in zip(grads, ref_grads, strict=True):
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("used", ["logprobs", "entropy"])
def test_gradient_of_one_output_alone(used: str) -> None:
    """The loss uses log-probs only (entropy is a metric), or an entropy bonus alone: each backward branch."""
    hidden, weight, bias, tokens = _inputs()
    lp, ent = chunked_logprobs(hidden, weight, bias, tokens, temperature=1.3, chunk_tokens=3)
    logits = (torch.nn.functional.linear(hidden, weight, bias) / 1.3).unsqueeze(0)  # [1, N, V]
    ref = (
        logprobs_from_logits(logits, tokens.unsqueeze(0))[0]
        if used == "logprobs"
        else token_entropy(logits)[0]
    )
    out = lp if used == "logprobs" else ent
    g, _ = _upstream(N)
    grads = torch.autograd.grad((out * g).sum(), [hidden, weight, bias])
    ref_grads = torch.autograd.grad((ref * g).sum(), [hidden, weight, bias])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_no_tokens_gives_empty_results_and_zero_head_gradients() -> None:
    hidden, weight, bias, tokens = _inputs(n=0)
    lp, ent = chunked_logprobs(hidden, weight, bias, tokens)
    assert lp.shape == ent.shape == (0,)
    grads = torch.autograd.grad(lp.sum() + ent.sum(), [hidden, weight, bias])
    assert grads[0].shape == (0, H)
    assert torch.all(grads[1] == 0) and torch.all(grads[2] == 0)


def test_bad_arguments_name_the_problem() -> None:
    hidden, weight, bias, tokens = _inputs()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        chunked_logprobs(hidden, weight, bias, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="logprob_chunk_tokens must be >= 1"):
        chunked_logprobs(hidden, weight, bias, tokens, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"hidden must be \[N, 6\]"):
        chunked_logprobs(hidden[:, :4], weight, bias, tokens)
    with pytest.raises(ValueError, match=r"tokens must have shape \[10\]"):
        chunked_logprobs(hidden, weight, bias, tokens[:3])


# ---- through a real (tiny, float64) transformer --------------------------------------------------------------
MODEL_VOCAB = 24


def _model(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=MODEL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager", tie_word_embeddings=tied,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg).double()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def _micro_batch() -> MicroBatch:
    """Four responses of different lengths, one of them empty (prompt only), right-padded into one micro-batch."""
    g = torch.Generator().manual_seed(3)
    lengths = [(3, 5), (1, 7), (4, 0), (2, 2)]  # (prompt, response)
    sequences = [torch.randint(1, MODEL_VOCAB, (lp + lr,), generator=g) for lp, lr in lengths]
    batch = RolloutBatch(sequences=sequences, prompt_lengths=[lp for lp, _ in lengths],
                         advantages=torch.ones(4), truncated=torch.zeros(4, dtype=torch.bool),
                         rollout_logprobs=[None] * 4, temperature=0.8)  # fmt: skip
    mb = collate(batch, [0, 1, 2, 3], pad_id=0, loss_weight=torch.ones(4))  # cut_batch would leave row 2 out
    assert float(mb.response_mask[2].sum()) == 0  # the empty response
    mb.response_mask = mb.response_mask.double()
    return mb


def _reference(
    model: torch.nn.Module, mb: MicroBatch, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unchunked path: full logits at every position, masked to response positions afterwards."""
    logits = forward_logits(model, mb) / temperature  # [b, L-1, V]
    return logprobs_from_logits(logits, mb.input_ids[:, 1:]) * mb.response_mask, token_entropy(
        logits
    ) * mb.response_mask


def _loss_and_grads(model: torch.nn.Module, lp: torch.Tensor, ent: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    g_lp = torch.randn(lp.shape, generator=g, dtype=torch.float64)
    g_ent = torch.randn(ent.shape, generator=g, dtype=torch.float64)
    named = dict(model.named_parameters())  # tied: the embedding appears once, as model.embed_tokens.weight
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), list(named.values()))
    return dict(zip(named, grads, strict=True))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_scores_and_every_parameter_gradient_equal_the_full_logits_path(
    tied: bool, checkpointing: bool
) -> None:
    """Tied: the head's gradient and the embedding lookup's land in the same parameter, added."""
    model, mb = _model(tied), _micro_batch()
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    lp, ent = score_tokens(
        model, mb, temperature=0.8, chunk_tokens=3
    )  # 14 response tokens: 3 does not divide
    ref_lp, ref_ent = _reference(model, mb, 0.8)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-10)
    assert torch.all(lp[mb.response_mask == 0] == 0)
    got, want = _loss_and_grads(model, lp, ent), _loss_and_grads(model, *_reference(model, mb, 0.8))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-10, msg=name)
    head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert want[head_name].abs().max() > 1e-3


def test_padding_micro_batch_gives_zero_gradients_on_every_parameter() -> None:
    """No response token: the head sees 0 positions, yet every parameter gets a (zero) gradient, as DDP needs."""
    model = _model(tied=False)
    mb = padding_micro_batch(0)
    lp, ent = score_tokens(model, mb, temperature=1.0)
    assert lp.shape == (1, 1) and float(lp.detach().abs().sum()) == 0
    grads = _loss_and_grads(model, lp, ent)
    assert all(g is not None and torch.all(g == 0) for g in grads.values())


def test_no_tensor_larger_than_one_chunk_of_vocabulary_rows_exists(largest_vocab_rows: Any) -> None:
    """Forward and backward: every ``[*, V]`` tensor holds at most ``chunk`` rows (the full-logits path makes
    ``b x (L-1)`` rows). The vocabulary (61) is chosen to equal no other dimension of the model."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, attn_implementation="eager", tie_word_embeddings=False)  # fmt: skip
    model = Qwen2ForCausalLM(cfg).double()
    mb = _micro_batch()
    weight_shapes = ((61, 32), (32, 61))
    with largest_vocab_rows(61, weight_shapes) as seen:
        lp, ent = score_tokens(model, mb, temperature=1.0, chunk_tokens=4)
        (lp.sum() + ent.sum()).backward()
    assert seen.rows == 4  # 14 response tokens, in chunks of 4
    with largest_vocab_rows(61, weight_shapes) as full:
        forward_logits(model, mb)
    assert (
        full.rows == mb.input_ids.shape[0] * mb.input_ids.shape[1]
    )  # the mode does see a full-logits tensor


class _ScaledHead(torch.nn.Module):
    """An output embedding that is not an ``nn.Linear`` (it doubles the logits)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return 2 * self.linear(hidden)


def test_a_head_that_is_not_linear_falls_back_to_full_logits_with_a_warning() -> None:
    model, mb = _model(tied=False), _micro_batch()
    assert linear_head(model) is model.lm_head
    model.lm_head = _ScaledHead(model.lm_head)
    assert linear_head(model) is None
    with pytest.warns(UserWarning, match="not a plain nn.Linear"):
        lp, ent = score_tokens(model, mb, temperature=0.8)
    ref_lp, ref_ent = _reference(model, mb, 0.8)  # the model's own (doubled) logits
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-10)
    soft = _model(tied=False)
    soft.config.final_logit_softcapping = 30.0  # a model whose forward transforms the head's output
    assert linear_head(soft) is None


def test_the_head_forward_is_restored_after_scoring() -> None:
    """The replacement lives for one call: the model's own forward gives full logits again afterwards."""
    model, mb = _model(tied=True), _micro_batch()
    score_tokens(model, mb, temperature=1.0)
    assert "forward" not in model.lm_head.__dict__
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask)
    assert out.logits.shape == (*mb.input_ids.shape, MODEL_VOCAB)
