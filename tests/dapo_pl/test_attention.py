"""``dapo_sdpa`` (:mod:`dapo_pl.attention`): transformers' ``sdpa`` attention without copying grouped K/V heads.

What must hold: on a grouped-query model in float64, logits and every parameter gradient of a padded batch (right
padding as in training, left padding as in generation) equal transformers' own ``sdpa`` (which repeats the K/V
heads) at 1e-10; no K/V head is ever repeated on this path (transformers' ``repeat_kv`` is made to raise, and a
negative control shows plain ``sdpa`` calling it); the policy is loaded with it by default for grouped models only,
and an explicit choice wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.integrations import sdpa_attention

from dapo_pl.attention import NAME, choose_implementation, register
from dapo_pl.module import DAPOModule


def _config(kv_heads: int = 2) -> Qwen2Config:
    """2 layers, hidden 32, 4 heads of 8, ``kv_heads`` key/value heads."""
    return Qwen2Config(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip


def _model(attn: str, kv_heads: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return Qwen2ForCausalLM._from_config(_config(kv_heads), attn_implementation=attn).to(torch.float64)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 7, 4 (right-padded) and 5 (left-padded) tokens. Shapes: ``[3, 7]`` each."""
    ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 5])
    return ids, mask


def _logits_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids, mask = _batch()
    logits = model(input_ids=ids, attention_mask=mask).logits  # [3, 7, V]
    (logits * mask[..., None]).square().sum().backward()  # real positions only: padded queries are arbitrary
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return (logits * mask[..., None]).detach(), grads


def test_logits_and_gradients_equal_transformers_sdpa_in_float64() -> None:
    ours, ours_grads = _logits_and_grads(_model(register()))
    theirs, their_grads = _logits_and_grads(_model("sdpa"))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    assert ours_grads.keys() == their_grads.keys() and len(ours_grads) > 10
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=0, atol=1e-10, msg=name)


def test_no_key_value_head_is_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError("repeat_kv called: K/V heads copied")

    monkeypatch.setattr(sdpa_attention, "repeat_kv", refuse)
    ids, mask = _batch()
    _model(register())(input_ids=ids, attention_mask=mask)  # padded batch, grouped heads: no copy
    with pytest.raises(AssertionError, match="repeat_kv called"):  # the negative control
        _model("sdpa")(input_ids=ids, attention_mask=mask)


def test_the_implementation_chosen() -> None:
    assert choose_implementation(None, _config(kv_heads=2)) == NAME  # grouped: 4 query heads share 2
    assert choose_implementation(None, _config(kv_heads=4)) is None  # one K/V head per query head
    assert choose_implementation("eager", _config(kv_heads=2)) == "eager"  # an explicit choice wins
    assert choose_implementation(NAME, _config(kv_heads=4)) == NAME
    assert choose_implementation(None, object()) is None  # a config without head counts


def test_the_policy_is_loaded_with_it(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    _model("sdpa").save_pretrained(model_dir)
    module = DAPOModule(str(model_dir))
    module.configure_model()
    assert module.policy is not None and module.policy.config._attn_implementation == NAME
    explicit = DAPOModule(str(model_dir), attn_implementation="eager")
    explicit.configure_model()
    assert explicit.policy is not None and explicit.policy.config._attn_implementation == "eager"
