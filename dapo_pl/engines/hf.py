"""The ``transformers`` rollout engine: batched ``model.generate`` with a KV cache on the trainer's own module.

It shares the trainer's module, so weight sync is free and exact: rollouts of step k always use the weights after
step k-1's updates. Left-padded prompt batches, sampling seeded per call under ``torch.random.fork_rng`` so the
training RNG stream is untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dapo_pl.engines.base import Completion, SamplingConfig
from dapo_pl.objective import logprobs_from_logits


class TransformersEngine:
    """Generates with ``transformers`` ``generate`` on the module given to :meth:`sync_weights`.

    Args:
        tokenizer: the policy's tokenizer (pad and EOS tokens are taken from it).
        max_batch_sequences: at most this many sequences (prompts x n) per ``generate`` call.
        return_logprobs: also return the engine's per-token log-probs (for ``rollout/logprob_abs_diff_mean``).
    """

    def __init__(self, tokenizer: Any, max_batch_sequences: int = 256, return_logprobs: bool = True) -> None:
        if max_batch_sequences < 1:
            raise ValueError(f"max_batch_sequences must be >= 1, got {max_batch_sequences}")
        self.tokenizer = tokenizer
        self.max_batch_sequences = max_batch_sequences
        self.return_logprobs = return_logprobs
        self.model: nn.Module | None = None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(tokenizer)

    def sync_weights(self, model: nn.Module) -> None:
        self.model = model  # the same module object: nothing to copy

    def close(self) -> None:
        self.model = None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingConfig, seed: int) -> list[list[Completion]]:
        if self.model is None:
            raise RuntimeError("TransformersEngine.generate called before sync_weights(model)")
        per_call = max(1, self.max_batch_sequences // params.n)
        out: list[list[Completion]] = []
        was_training = self.model.training
        self.model.train(False)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for start in range(0, len(prompts), per_call):
                    out.extend(self._generate_chunk(prompts[start : start + per_call], params))
        finally:
            self.model.train(was_training)
        return out

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingConfig) -> list[list[Completion]]:
        assert self.model is not None
        device = next(self.model.parameters()).device
        input_ids, attention_mask = _left_pad(prompts, self.pad_id, device)  # [P, Lp]
        result = self.model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or None,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            return_dict_in_generate=True,
            output_logits=self.return_logprobs,
            **({"stop_strings": list(params.stop), "tokenizer": self.tokenizer} if params.stop else {}),
        )
        new_tokens = result.sequences[:, input_ids.shape[1] :]  # [P*n, Tn]
        logprobs = None
        if self.return_logprobs:
            logits = torch.stack(result.logits, dim=1).float()  # [P*n, Tn, V]
            logprobs = logprobs_from_logits(logits, new_tokens, params.temperature)  # [P*n, Tn]
        completions = [
            self._completion(new_tokens[i], logprobs, i, params) for i in range(new_tokens.shape[0])
        ]
        return [completions[p * params.n : (p + 1) * params.n] for p in range(len(prompts))]

    def _completion(
        self, tokens: Tensor, logprobs: Tensor | None, i: int, params: SamplingConfig
    ) -> Completion:
        ids = tokens.tolist()
        end = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
        if params.stop:  # a stop string before any EOS ends the response there (pads follow it)
            stop_end = self._stop_string_end(ids if end is None else ids[:end], params.stop)
            end = stop_end if stop_end is not None else end
        # Without EOS or a stop string a sequence runs to max_new_tokens, so it is truncated.
        truncated = end is None
        if end is not None:
            ids = ids[: end + 1]
        lp = logprobs[i, : len(ids)].tolist() if logprobs is not None else None
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(token_ids=ids, text=text, truncated=truncated, logprobs=lp)

    def _stop_string_end(self, ids: list[int], stop: tuple[str, ...]) -> int | None:
        """Index of the token that completes the first stop string in ``ids`` (None: no stop string).

        Bisection over prefixes: once a prefix's text contains a stop string, every longer prefix does.
        """

        def has_stop(n: int) -> bool:
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            return any(s in text for s in stop)

        if not ids or not has_stop(len(ids)):
            return None
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if has_stop(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo - 1


def _eos_ids(tokenizer: Any) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos_token: responses could never end; set one in the tokenizer"
        )
    return [int(tokenizer.eos_token_id)]


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-pad prompts to one length. Shapes: -> input_ids ``[P, Lmax]``, attention_mask ``[P, Lmax]``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)
