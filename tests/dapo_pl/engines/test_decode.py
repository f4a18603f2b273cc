"""The lean decoding step (:mod:`dapo_pl.engines.decode`) against transformers' own forward, on tiny random Qwen2
and Llama models with the quickstart's character tokenizer.

What must hold: in float64 the sampling loop gives the same tokens and log-probs (1e-12) with the lean step as with
the model's forward, for grouped and plain heads, biases, tied and untied heads, a scaled rope, and responses that
end early (rows leave the batch); the lean step is really taken (counted); and only the models it reproduces
qualify (a peft adapter, a hook, sliding-window layers, other architectures fall back).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dapo_pl.engines import decode, hf
from dapo_pl.engines.base import SamplingConfig
from dapo_pl.engines.hf import TransformersEngine


def _qwen2(tokenizer: Any, kv_heads: int = 1, tied: bool = False, **extra: Any) -> torch.nn.Module:
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )  # fmt: skip
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa")


def _llama(tokenizer: Any) -> torch.nn.Module:
    """Biases on attention and MLP, 4 heads over 2 key/value heads, a llama3-scaled rope, a GELU MLP."""
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attention_bias=True, mlp_bias=True, hidden_act="gelu",
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")


def _with_eos_bias(model: torch.nn.Module, tokenizer: Any, bias: float = 0.3) -> torch.nn.Module:
    """Random weights (seeded; biases too, which start at 0), an EOS logit raised so that rows end early."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
        model.lm_head.weight[tokenizer.eos_token_id] = bias * model.model.norm.weight
    return model.to(torch.float64).eval()


MODELS = {  # a model and the EOS bias at which some of its 12 rows end early and some run to the cap
    "qwen2-grouped-untied": (lambda tok: _qwen2(tok, kv_heads=1), 1.0),
    "qwen2-plain-tied": (lambda tok: _qwen2(tok, kv_heads=2, tied=True), 1.0),
    "llama-biases-scaled-rope-gelu": (_llama, 0.5),
}


@pytest.mark.parametrize(("make", "eos_bias"), MODELS.values(), ids=MODELS.keys())
def test_lean_decoding_samples_exactly_as_the_models_forward(
    char_tokenizer: Any, make: Any, eos_bias: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _with_eos_bias(make(char_tokenizer), char_tokenizer, eos_bias)
    prompts = [char_tokenizer.encode(p) for p in ("12+7=", "3+45=", "100+1=")]  # left padding
    params = SamplingConfig(n=4, max_new_tokens=12, temperature=0.8)
    steps: list[int] = []
    lean_step = decode.decode_step
    monkeypatch.setattr(decode, "decode_step", lambda *a: steps.append(1) or lean_step(*a))

    def run(lean: bool) -> list[Any]:
        engine = TransformersEngine(char_tokenizer, lean_decode=lean)
        engine.sync_weights(model)
        return [c for group in engine.generate(prompts, params, seed=5) for c in group]

    ours = run(True)
    assert len(steps) >= 11  # every step after the first token took the lean path
    assert any(len(c.token_ids) < 12 for c in ours) and any(c.truncated for c in ours)  # rows left the batch
    steps.clear()
    theirs = run(False)
    assert not steps
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-12)


def test_one_lean_step_equals_the_forward_in_float32(char_tokenizer: Any) -> None:
    """Float32 (the training dtype of the benchmarks): one step over a left-padded cache, logits within 1e-5."""
    model = _with_eos_bias(_qwen2(char_tokenizer), char_tokenizer).float()
    ids, mask = hf._left_pad([char_tokenizer.encode(p) for p in ("12+7=", "100+1=")], char_tokenizer.pad_token_id,
                             torch.device("cpu"))  # fmt: skip
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    last = torch.tensor([5, 9])
    with torch.no_grad():
        caches = [model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
                  for _ in range(2)]  # fmt: skip
        full_mask, position = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1), positions[:, -1:] + 1
        theirs = model(input_ids=last[:, None], attention_mask=full_mask, position_ids=position,
                       past_key_values=caches[0], use_cache=True).logits[:, -1]  # fmt: skip
        step = decode.lean_decoder(model)
        assert step is not None
        ours = step(last, full_mask, position, caches[1])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert caches[1].get_seq_length() == caches[0].get_seq_length() == ids.shape[1] + 1


def test_only_the_models_it_reproduces_qualify(char_tokenizer: Any) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    assert decode.lean_decoder(_qwen2(char_tokenizer)) is not None
    assert decode.lean_decoder(_llama(char_tokenizer)) is not None
    sliding = _qwen2(char_tokenizer, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "sliding_attention" in sliding.config.layer_types and decode.lean_decoder(sliding) is None
    hooked = _qwen2(char_tokenizer)
    hooked.gradient_checkpointing_enable()  # its hook on the embeddings only marks outputs as requiring grad
    assert hooked.model.embed_tokens._forward_hooks and decode.lean_decoder(hooked) is not None
    hooked.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert decode.lean_decoder(hooked) is None
    lora = get_peft_model(_qwen2(char_tokenizer), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert decode.lean_decoder(lora) is None and decode.lean_decoder(lora.get_base_model()) is None
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    assert decode.lean_decoder(qwen3) is None
