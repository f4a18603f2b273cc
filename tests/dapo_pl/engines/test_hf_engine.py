"""The transformers rollout engine's own sampling loop (:func:`dapo_pl.engines.hf.sample`), run for real on a tiny
random Qwen2 with the quickstart's character tokenizer.

What must hold: the Completion contract (EOS kept, truncation flags, stop strings); same seed, same samples, and
the training RNG untouched; log-probs equal the trainer's for the same tokens (float64: 1e-10) at any temperature,
with top-k/top-p filtering the samples but not the log-probs; greedy (top_k=1) equals ``transformers``'
``generate``; the loop stops when every row has ended; and no ``[P*n, T, V]`` tensor is ever built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dapo_pl.batch import RolloutBatch
from dapo_pl.engines import hf
from dapo_pl.engines.base import Completion, SamplingConfig
from dapo_pl.engines.hf import TransformersEngine, filtered_probs
from dapo_pl.update import cut_batch, score_old


@pytest.fixture(scope="module")
def tokenizer(char_tokenizer: Any) -> Any:
    return char_tokenizer


def _model(
    tokenizer: Any,
    dtype: torch.dtype = torch.float64,
    eos_bias: float = 0.0,
    kv_heads: int = 2,
    attn: str = "sdpa",
) -> torch.nn.Module:
    """2 layers, hidden 32, 2 heads (of 16: head dim 16), ``kv_heads`` key/value heads (1: grouped-query attention),
    untied head, attention ``attn``; ``eos_bias`` raises the EOS logit so that responses end early."""
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn).to(dtype)
    if eos_bias:
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] = eos_bias * model.model.norm.weight
    return model


def _engine(tokenizer: Any, model: torch.nn.Module, **kwargs: Any) -> TransformersEngine:
    engine = TransformersEngine(tokenizer, **kwargs)
    engine.sync_weights(model)
    return engine


def _prompts(tokenizer: Any) -> list[list[int]]:
    return [tokenizer.encode(p) for p in ("12+7=", "3+45=", "100+1=")]  # different lengths: left padding


def _flat(groups: list[list[Completion]]) -> list[Completion]:
    return [c for g in groups for c in g]


def test_completions_keep_eos_and_flag_truncation(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    engine = _engine(tokenizer, _model(tokenizer, eos_bias=0.3))
    groups = engine.generate(_prompts(tokenizer), SamplingConfig(n=4, max_new_tokens=12), seed=0)
    assert [len(g) for g in groups] == [4, 4, 4]
    completions = _flat(groups)
    assert any(c.truncated for c in completions) and any(not c.truncated for c in completions)
    for c in completions:
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
        if c.truncated:
            assert len(c.token_ids) == 12 and eos not in c.token_ids
        else:
            assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]


def test_same_seed_same_samples_and_the_training_rng_is_untouched(tokenizer: Any) -> None:
    engine = _engine(tokenizer, _model(tokenizer))
    params = SamplingConfig(n=3, max_new_tokens=8)
    torch.manual_seed(123)
    first = engine.generate(_prompts(tokenizer), params, seed=7)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # generate drew nothing from the training stream
    again = engine.generate(_prompts(tokenizer), params, seed=7)
    other = engine.generate(_prompts(tokenizer), params, seed=8)
    ids = lambda gs: [c.token_ids for c in _flat(gs)]  # noqa: E731
    assert ids(first) == ids(again) and ids(first) != ids(other)


def _trainer_logprobs(model: torch.nn.Module, prompts: list[list[int]], groups: list[list[Completion]],
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The trainer's log-probs of the engine's tokens (score_old), and the engine's own, at response positions."""
    seqs, plens, lps = [], [], []
    for prompt, group in zip(prompts, groups, strict=True):
        for c in group:
            seqs.append(torch.tensor(prompt + c.token_ids))
            plens.append(len(prompt))
            lps.append(torch.tensor(c.logprobs, dtype=torch.float64))
    batch = RolloutBatch(seqs, plens, torch.zeros(len(seqs)), torch.zeros(len(seqs), dtype=torch.bool), lps,
                         temperature)  # fmt: skip
    ((mb,),) = cut_batch(
        batch, mini_batch_size=len(seqs), max_tokens=100_000, pad_id=0, overlong_filtering=False
    )
    mb.rollout_logprobs = torch.zeros(mb.response_mask.shape, dtype=torch.float64)
    for row, (plen, lp) in enumerate(zip(plens, lps, strict=True)):
        mb.rollout_logprobs[row, plen - 1 : plen - 1 + len(lp)] = lp
    score_old(model, [mb], temperature)
    assert mb.old_logprobs is not None
    mask = mb.response_mask.bool()
    return mb.old_logprobs[mask], mb.rollout_logprobs[mask]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_logprobs_equal_the_trainers_for_the_same_tokens(
    tokenizer: Any, temperature: float, top_k: int, top_p: float
) -> None:
    """Float64 model: the KV-cache loop and the trainer's full forward agree to rounding. Filtering changes
    which tokens are sampled, never their log-prob (that of the tempered, unfiltered distribution)."""
    model = _model(tokenizer)
    prompts = _prompts(tokenizer)
    params = SamplingConfig(n=4, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=10)
    groups = _engine(tokenizer, model).generate(prompts, params, seed=1)
    trainer, engine = _trainer_logprobs(model, prompts, groups, temperature)
    assert trainer.numel() == sum(len(c.token_ids) for c in _flat(groups))
    torch.testing.assert_close(engine, trainer, rtol=0, atol=1e-10)


def test_grouped_heads_logprobs_equal_transformers_sdpa_trainers(tokenizer: Any) -> None:
    """Grouped-query attention through ``dapo_sdpa`` (no K/V head copies) in the sampling loop (left-padded
    prompts, one query over the preallocated cache) equals the trainer's pass with transformers' own ``sdpa``
    (K/V heads repeated). Float64 (transformers' ``eager`` takes its softmax in float32, so it is no reference)."""
    from dapo_pl.attention import register

    model = _model(tokenizer, kv_heads=1, attn=register(), eos_bias=0.3)
    prompts = _prompts(tokenizer)
    groups = _engine(tokenizer, model).generate(prompts, SamplingConfig(n=4, max_new_tokens=10), seed=3)
    reference = _model(tokenizer, kv_heads=1, attn="sdpa", eos_bias=0.3)
    trainer, engine = _trainer_logprobs(reference, prompts, groups, 1.0)
    torch.testing.assert_close(engine, trainer, rtol=0, atol=1e-10)


def test_the_preallocated_cache_samples_exactly_as_transformers_own(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float64, responses that end early (rows leave the cache) and a first capacity of 2 positions (the buffers
    double three times): the same tokens and log-probs as with transformers' ``DynamicCache``."""
    model = _model(tokenizer, eos_bias=0.3)
    prompts, params = _prompts(tokenizer), SamplingConfig(n=4, max_new_tokens=12)
    monkeypatch.setattr(hf, "FIRST_CAPACITY", 2)
    writes: list[int] = []
    update = hf.PreallocatedLayer.update
    monkeypatch.setattr(
        hf.PreallocatedLayer, "update", lambda self, k, v, *a: writes.append(1) or update(self, k, v)
    )
    ours = _flat(_engine(tokenizer, model).generate(prompts, params, seed=0))
    assert writes and any(len(c.token_ids) < 12 for c in ours) and any(c.truncated for c in ours)

    def transformers_cache(cache: Any, repeats: int, capacity: int) -> Any:
        cache.batch_repeat_interleave(repeats)
        return cache

    monkeypatch.setattr(hf, "preallocate", transformers_cache)
    theirs = _flat(_engine(tokenizer, model).generate(prompts, params, seed=0))
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-12)


def test_preallocated_layer_hand_worked() -> None:
    """Keys ``[B=2, H=1, L, D=1]``: the views hold exactly what ``torch.cat`` would, through a doubling, a row
    selection and a repeat."""
    keys = torch.tensor([[[[1.0], [2.0]]], [[[3.0], [4.0]]]])  # [2, 1, 2, 1]
    layer = hf.PreallocatedLayer(keys, -keys, capacity=3)
    assert layer.get_seq_length() == 2 and layer._keys.shape[-2] == 3
    k, v = layer.update(torch.tensor([[[[5.0]]], [[[6.0]]]]), torch.tensor([[[[-5.0]]], [[[-6.0]]]]))
    assert k[:, 0, :, 0].tolist() == [[1, 2, 5], [3, 4, 6]] and torch.equal(v, -k)
    layer.update(
        torch.tensor([[[[7.0]]], [[[8.0]]]]), torch.tensor([[[[-7.0]]], [[[-8.0]]]])
    )  # past capacity 3
    assert layer._keys.shape[-2] == 6 and layer.keys[:, 0, :, 0].tolist() == [[1, 2, 5, 7], [3, 4, 6, 8]]
    layer.batch_select_indices(torch.tensor([1]))
    layer.batch_repeat_interleave(2)
    assert layer.keys[:, 0, :, 0].tolist() == [[3, 4, 6, 8], [3, 4, 6, 8]] and torch.equal(
        layer.values, -layer.keys
    )
    assert layer.get_seq_length() == 4


def test_top_k_and_top_p_restrict_the_sampled_tokens(tokenizer: Any) -> None:
    """Every sampled token is among the top_k most likely and inside the nucleus at its step (the trainer's
    logits of the same prefix decide)."""
    model = _model(tokenizer)
    prompts = _prompts(tokenizer)
    params = SamplingConfig(n=6, temperature=1.5, top_k=4, top_p=0.6, max_new_tokens=8)
    groups = _engine(tokenizer, model).generate(prompts, params, seed=2)
    for prompt, group in zip(prompts, groups, strict=True):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                z = model(ids).logits[0, len(prompt) - 1 : -1] / 1.5  # [T, V]
            probs = torch.softmax(z, dim=-1)
            for t, token in enumerate(c.token_ids):
                rank = int((z[t] > z[t, token]).sum())
                assert rank < 4
                assert float(probs[t][z[t] > z[t, token]].sum()) < 0.6


def test_greedy_equals_transformers_generate(tokenizer: Any) -> None:
    model = _model(tokenizer, dtype=torch.float32)
    prompt = _prompts(tokenizer)[0]
    (group,) = _engine(tokenizer, model).generate(
        [prompt], SamplingConfig(n=2, top_k=1, max_new_tokens=10), seed=0
    )
    reference = model.generate(
        input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )[0, len(prompt) :].tolist()  # fmt: skip
    eos = tokenizer.eos_token_id
    expected = reference[: reference.index(eos) + 1] if eos in reference else reference
    assert group[0].token_ids == group[1].token_ids == expected


def test_a_stop_string_ends_the_response_without_truncation(tokenizer: Any) -> None:
    """Greedy decoding gives a fixed text; a stop string taken from its middle ends the response right there."""
    engine = _engine(tokenizer, _model(tokenizer))
    prompt = _prompts(tokenizer)[1]
    greedy = SamplingConfig(n=1, top_k=1, max_new_tokens=12)
    ((full,),) = engine.generate([prompt], greedy, seed=0)
    assert full.truncated and len(full.text) == 12
    stop = full.text[4:6]
    first = full.text.index(stop)
    ((cut,),) = engine.generate(
        [prompt], SamplingConfig(n=1, top_k=1, max_new_tokens=12, stop=(stop,)), seed=0
    )
    assert not cut.truncated and cut.text == full.text[: first + len(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.logprobs or []) == len(
        cut.token_ids
    )


def test_the_loop_stops_when_every_row_has_ended(tokenizer: Any) -> None:
    """One prefill, then one forward per step until the longest response ends: far fewer than max_new_tokens."""
    model = _model(tokenizer, eos_bias=1.0)
    calls: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    groups = _engine(tokenizer, model).generate(
        _prompts(tokenizer), SamplingConfig(n=4, max_new_tokens=64), seed=0
    )
    longest = max(len(c.token_ids) for c in _flat(groups))
    assert all(not c.truncated for c in _flat(groups)) and longest < 32
    assert len(calls) == longest  # prefill + (longest - 1) steps
    assert calls[0] == 3  # prefill: each prompt once, not n times
    assert calls[1] <= 12 and calls == [calls[0], *sorted(calls[1:], reverse=True)]  # ended rows leave


def test_no_logits_of_every_step_are_kept(tokenizer: Any, largest_vocab_rows: Any) -> None:
    """At most one step's logits ``[P*n, V]`` exist at a time, never ``[P*n, T, V]``."""
    model = _model(tokenizer, dtype=torch.float32)
    vocab, hidden = len(tokenizer), 32
    with largest_vocab_rows(vocab, ((vocab, hidden), (hidden, vocab))) as seen:
        groups = _engine(tokenizer, model).generate(_prompts(tokenizer), SamplingConfig(n=4, max_new_tokens=16),
                                                    seed=0)  # fmt: skip
    assert max(len(c.token_ids) for c in _flat(groups)) == 16
    assert seen.rows == 3 * 4  # one step of the 12 sequences


def test_filtered_probs_hand_worked() -> None:
    """p = [0.5, 0.3, 0.2]: top_p 0.5 keeps the first token only; top_p 0.8 keeps two, renormalised to
    [0.625, 0.375, 0]; top_k 2 keeps the two largest."""
    z = torch.tensor([[0.5, 0.3, 0.2]]).log()
    torch.testing.assert_close(filtered_probs(z, top_p=0.5), torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(filtered_probs(z, top_p=0.8), torch.tensor([[0.625, 0.375, 0.0]]))
    torch.testing.assert_close(filtered_probs(z, top_k=2), torch.tensor([[0.625, 0.375, 0.0]]))
    torch.testing.assert_close(filtered_probs(z), torch.tensor([[0.5, 0.3, 0.2]]))
    torch.testing.assert_close(filtered_probs(z, top_k=1, top_p=0.1), torch.tensor([[1.0, 0.0, 0.0]]))


def test_draw_follows_the_probabilities_and_never_picks_a_zero() -> None:
    """200,000 draws from [0.5, 0.3, 0, 0.2, 0]: frequencies within 0.005 (about 4 standard errors), zero-probability
    tokens never; the same seed gives the same draws."""
    from dapo_pl.engines.hf import draw

    probs = torch.tensor([[0.5, 0.3, 0.0, 0.2, 0.0]]).expand(200_000, 5)
    torch.manual_seed(0)
    tokens = draw(probs)
    freq = torch.bincount(tokens, minlength=5).double() / tokens.numel()
    torch.testing.assert_close(
        freq, torch.tensor([0.5, 0.3, 0.0, 0.2, 0.0], dtype=torch.float64), rtol=0, atol=5e-3
    )
    assert freq[2] == 0 and freq[4] == 0
    torch.manual_seed(0)
    assert torch.equal(draw(probs), tokens)


def _synced_worker(rank: int, port: int, out: str) -> None:
    """One of 2 gloo ranks: an FSDP2-sharded model (every forward gathers weights from both ranks) generating
    responses that end at different steps on the two ranks."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoTokenizer

    from dapo_pl.distributed import mark_synced_generation

    tokenizer = AutoTokenizer.from_pretrained(f"{out}/tokenizer")
    model = _model(
        tokenizer, dtype=torch.float32, eos_bias=2.0
    )  # the same weights on both ranks, as FSDP needs
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    fully_shard(model)
    mark_synced_generation(model)
    engine = _engine(tokenizer, model)
    if rank == 1:  # rank 1's responses end only at <unk> instead, so (almost surely) some run to the cap
        engine.eos_ids = [tokenizer.unk_token_id]
    prompts = _prompts(tokenizer)[rank:]
    groups = engine.generate(prompts, SamplingConfig(n=2, max_new_tokens=24), seed=rank)
    lengths = [len(c.token_ids) for c in _flat(groups)]
    record = {"lengths": lengths, "truncated": [c.truncated for c in _flat(groups)], "forwards": len(calls)}
    torch.save(record, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_generation_runs_in_lock_step_over_ranks(tokenizer: Any, tmp_path: Path) -> None:
    """Rank 0's responses end early, rank 1's run to the cap: rank 0 keeps stepping (every forward is a
    collective under FSDP2) until rank 1 is done, and both return valid completions instead of hanging."""
    import multiprocessing

    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    tokenizer.save_pretrained(tmp_path / "tokenizer")
    port = find_free_network_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_synced_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]
    early, late = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert max(early["lengths"]) < 24 and not any(early["truncated"])
    assert max(late["lengths"]) == 24
    assert early["forwards"] == late["forwards"] == 24  # prefill + 23 steps on both ranks
