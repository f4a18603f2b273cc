"""``DAPODataModule``: online rollouts, rewards and dynamic sampling, producing one :class:`RolloutBatch` per step.

Rollouts are strictly on-policy: the train "dataloader" is a lazy stream and the LightningModule pulls the next
batch from ``training_step`` (``dataloader_iter``), i.e. after the previous step's updates were applied; Lightning's
one-batch prefetch of iterable datasets would otherwise generate with weights one update old (PLATFORM.md).
The exception is documented: groups kept beyond a step's need are carried over (``dynamic_sampling.carry_over``)
and trained on in the next step; their engine log-probs are dropped so they never count as an engine mismatch.

Data parallelism: ``prompts_per_step`` (and ``gen_batch_prompts``) count groups over all ranks; each rank generates
and keeps ``prompts_per_step / world_size`` of them. Every rank walks the same seeded shuffle of the prompts and
takes an interleaved share of each draw, so no prompt is generated twice per epoch and the stream state (saved in
checkpoints by rank 0) is the same on every rank. A group never spans ranks, so its keep decision is local; the
ranks agree after each generation batch whether every one has its share, so they all run the same number of
generation batches (see :func:`dapo_pl.sampling.fill_batch`). Metrics are summed over ranks. Validation prompts are
sharded the same way, padded to equal counts (the padding is generated but not scored), and the module sums the
correctness counts over ranks.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import lightning as L
import torch

from dapo_pl.batch import RolloutBatch
from dapo_pl.data import (
    DataError,
    PromptDataConfig,
    PromptRecord,
    check_eos,
    check_model_source,
    check_prompt_lengths,
    context_length,
    render_prompt,
)
from dapo_pl.datasets import load_prompts
from dapo_pl.distributed import DataParallel, shard
from dapo_pl.engines import ENGINES, Completion, RolloutEngine, SamplingConfig, build_engine
from dapo_pl.errors import ConfigError
from dapo_pl.evaluation import RIGHT, EvalStatsConfig, vote_matrix
from dapo_pl.objective import group_advantages
from dapo_pl.rewards import RewardConfig, RewardFunction
from dapo_pl.sampling import FillStats, GroupBuffer, fill_batch, group_keep_mask
from dapo_pl.seeds import global_seed, resolve_seed
from dapo_pl.verification import Sample


@dataclass(frozen=True)
class DynamicSamplingConfig:
    """DAPO's dynamic sampling (Sec. 3.2).

    Attributes:
        enabled: drop groups whose responses are all right or all wrong and refill.
        max_num_gen_batches: at most this many generation batches per step (0: unbounded, risky).
        on_exhausted: when the bound is hit with too few groups: ``train`` on what there is (logged in
            ``train/num_gen_batches`` and ``train/ds_exhausted``) or ``raise``.
        carry_over: keep surplus kept groups for the next step instead of discarding them.
        gen_batch_prompts: prompts per generation batch over all data-parallel ranks (None: ``prompts_per_step``).
    """

    enabled: bool = True
    max_num_gen_batches: int = 4
    on_exhausted: Literal["train", "raise"] = "train"
    carry_over: bool = True
    gen_batch_prompts: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    """The rollout engine: ``transformers`` (shares the trainer's module) or ``vllm``; ``options`` go to it."""

    name: str = "transformers"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ConfigError(f"unknown rollout engine {self.name!r}; choose one of {', '.join(ENGINES)}")


@dataclass
class Group:
    """One prompt's G responses with their scores; ``fresh`` is False once carried over to a later step."""

    record: PromptRecord
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: list[float]
    correct: list[bool]
    extracted: list[str | None] = field(default_factory=list)
    fresh: bool = True
    errors: list[str | None] = field(default_factory=list)  # a failed verifier batch's message, per response


class _RolloutStream:
    """An endless iterable whose ``next`` generates a rollout batch at that moment (never ahead)."""

    def __init__(self, dm: DAPODataModule) -> None:
        self.dm = dm

    def __iter__(self) -> Iterator[RolloutBatch]:
        while True:
            yield self.dm.next_rollout_batch()


class _Batches:
    """Ready-made batches as one loader (Lightning would take a plain list for a list of loaders)."""

    def __init__(self, batches: list[list[Any]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class DAPODataModule(L.LightningDataModule):
    """Prompts in, rollout batches out: generation, rewards, dynamic sampling and group advantages.

    Args:
        train: training prompts.
        val: validation prompts (None: no validation).
        model_name_or_path: the policy (linked from ``model.model_name_or_path`` by the CLI); its tokenizer is used.
        prompts_per_step: groups (prompts) per training step over all data-parallel ranks (each rank generates and
            keeps ``prompts_per_step / world_size``); each group has ``rollout.n`` responses.
        rollout: sampling for training (``n`` is the group size G).
        val_rollout: sampling for validation (``n`` is K of avg@K / pass@K).
        val_batch_prompts: validation prompts per generation call (per rank).
        val_stats: which pass@k / maj@k (k <= ``val_rollout.n``) and bootstrap intervals validation reports
            (:mod:`dapo_pl.evaluation`).
        reward: which verifiers decide correctness and add shaping.
        dynamic_sampling: DAPO's group filter and refill bound.
        engine: the rollout engine.
        scale_adv_by_std: divide advantages by the group std (GRPO/DAPO); False gives ``r - mean`` (Dr. GRPO).
        seed: shuffling seed of the prompt stream. None (the default) derives it, and ``rollout.seed``,
            ``val_rollout.seed`` and the vLLM engine's seed when they are None too, from ``seed_everything``
            (:mod:`dapo_pl.seeds`); explicit values win. The resolved ones are in :meth:`resolved_seeds`.
    """

    def __init__(
        self,
        train: PromptDataConfig,
        val: PromptDataConfig | None = None,
        model_name_or_path: str = "",
        prompts_per_step: int = 16,
        rollout: SamplingConfig = SamplingConfig(),
        val_rollout: SamplingConfig = SamplingConfig(n=4),
        val_batch_prompts: int = 64,
        val_stats: EvalStatsConfig = EvalStatsConfig(),
        reward: RewardConfig = RewardConfig(),
        dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig(),
        engine: EngineConfig = EngineConfig(),
        scale_adv_by_std: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        if dynamic_sampling.enabled and rollout.n < 2:
            raise ValueError(
                f"dynamic sampling needs groups of at least 2 responses (rollout.n = {rollout.n}): a group of one "
                "always has zero variance and would be filtered; raise rollout.n or set dynamic_sampling.enabled: false"
            )
        if dynamic_sampling.max_num_gen_batches < 0:
            raise ValueError(f"max_num_gen_batches must be >= 0, got {dynamic_sampling.max_num_gen_batches}")
        self.train_cfg, self.val_cfg = train, val
        self.model_name_or_path = model_name_or_path
        self.prompts_per_step = prompts_per_step
        self.rollout, self.val_rollout = rollout, val_rollout
        self.val_batch_prompts = val_batch_prompts
        val_stats.ks(val_rollout.n)  # a k above n fails now, naming both
        self.val_stats = val_stats
        self.reward_cfg, self.ds = reward, dynamic_sampling
        self.engine_cfg = engine
        self.scale_adv_by_std = scale_adv_by_std
        self._configured_seeds = (seed, rollout.seed, val_rollout.seed, engine.options.get("seed"))
        self.seed = 0
        self._resolve_seeds()
        self.tokenizer: Any = None
        self.engine: RolloutEngine | None = None
        self.reward_fn: RewardFunction | None = None
        self.buffer: GroupBuffer[Group] = GroupBuffer()
        self._train: list[PromptRecord] = []
        self._val: list[PromptRecord] = []
        self._order: list[int] = []
        self._cursor = 0
        self._epoch = 0
        self._gen_calls = 0

    # ---- set-up -------------------------------------------------------------------------------------------
    def _dp(self) -> DataParallel:
        return DataParallel.of(self.trainer)

    def _resolve_seeds(self) -> None:
        """Fill every seed left None from the current global seed (again in ``setup``: ``seed_everything`` may
        have been called after construction)."""
        data, rollout, val, engine = self._configured_seeds
        self.seed = resolve_seed(data, "data")
        self.rollout = replace(self.rollout, seed=resolve_seed(rollout, "rollout"))
        self.val_rollout = replace(self.val_rollout, seed=resolve_seed(val, "validation"))
        self.engine_seed = resolve_seed(engine, "engine")

    def resolved_seeds(self) -> dict[str, int]:
        """The seeds this data module uses, as logged params: ``seeds.global``, ``seeds.data``, ..."""
        assert self.rollout.seed is not None and self.val_rollout.seed is not None
        return {
            "seeds.global": global_seed(),
            "seeds.data": self.seed,
            "seeds.rollout": self.rollout.seed,
            "seeds.validation": self.val_rollout.seed,
            "seeds.engine": self.engine_seed,
        }

    def setup(self, stage: str) -> None:
        self._resolve_seeds()
        if stage == "fit":
            check_shardable(self.prompts_per_step, self.ds.gen_batch_prompts, self._dp().size)
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            if not self.model_name_or_path:
                raise ConfigError(
                    "data.model_name_or_path is empty (the CLI links it from model.model_name_or_path)"
                )
            self.tokenizer = AutoTokenizer.from_pretrained(check_model_source(self.model_name_or_path))
            check_eos(self.tokenizer, self.model_name_or_path)
        if stage == "fit" and not self._train:
            self._train = load_prompts(self.train_cfg)
        if self.val_cfg is not None and not self._val:
            self._val = load_prompts(self.val_cfg)
        if self.engine is None:
            self._check_prompt_lengths()
        if self.reward_fn is None:
            self.reward_fn = RewardFunction(self.reward_cfg)
        if self.engine is None:
            options = dict(self.engine_cfg.options)
            if self.engine_cfg.name == "vllm":  # the transformers engine takes its seed per call only
                options["seed"] = self.engine_seed
            self.engine = build_engine(self.engine_cfg.name, self.model_name_or_path, self.tokenizer, options)

    def _check_prompt_lengths(self) -> None:
        """vLLM serves at most ``max_model_len`` tokens: measure the prompts before its (slow) start."""
        if self.engine_cfg.name != "vllm":
            return
        limit = self.engine_cfg.options.get("max_model_len") or context_length(self.model_name_or_path)
        if limit:
            check_prompt_lengths(
                self._train + self._val, self.tokenizer, int(limit), "data.engine.options.max_model_len"
            )

    def teardown(self, stage: str) -> None:
        if self.reward_fn is not None and stage == "fit":
            self.reward_fn.close()
            self.reward_fn = None

    def train_dataloader(self) -> Any:
        return _RolloutStream(self)

    def val_dataloader(self) -> Any:
        # Ready-made batches, not a DataLoader: each pass over one draws a seed from the global torch RNG, which
        # would make training after a validation differ from training after a resume.
        if not self._val:
            return []
        dp = self._dp()
        mine: list[PromptRecord | None] = list(self._val)
        if dp.distributed:
            # Our own shards, not Lightning's DistributedSampler: it would repeat prompts to even the shards out
            # and count them twice. Shards are padded with None (generated, not scored) so that every rank runs
            # the same generation calls: a sharded model or a tensor-parallel engine makes each a collective.
            mine = shard(self._val, dp.rank, dp.size)
            mine += [None] * (math.ceil(len(self._val) / dp.size) - len(mine))
        size = self.val_batch_prompts
        return _Batches([mine[i : i + size] for i in range(0, len(mine), size)])

    def state_dict(self) -> dict[str, Any]:
        """The prompt stream, the training generation counter and every rank's carry-over buffer (each rank holds
        its own share of the groups; plain types only, so the checkpoint loads with ``weights_only``).

        Validation keeps no state: its seeds depend on the batch index alone (:meth:`validation_correctness`), so
        a validation pass never shifts what training draws. Called on every rank (a collective when distributed).
        """
        mine = [group_to_state(g) for g in self.buffer.state()]
        dp = self._dp()
        buffers: list[Any] = [mine]
        if dp.distributed:
            buffers = [None] * dp.size
            torch.distributed.all_gather_object(buffers, mine)
        return {**self.stream_state(), "buffers": buffers}

    def stream_state(self) -> dict[str, Any]:
        """The prompt stream and the training generation counter: the same on every rank."""
        return {
            "order": list(self._order),
            "cursor": self._cursor,
            "epoch": self._epoch,
            "gen_calls": self._gen_calls,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._order, self._cursor = list(state["order"]), int(state["cursor"])
        self._epoch, self._gen_calls = int(state["epoch"]), int(state["gen_calls"])
        buffers, dp = state.get("buffers", [[]]), self._dp()
        self.buffer = GroupBuffer()
        if len(buffers) != dp.size:
            if any(buffers):
                warnings.warn(
                    f"the checkpoint was written by {len(buffers)} data-parallel ranks and is resumed on {dp.size}: "
                    "its carried-over groups are dropped, so this resume is not exact",
                    stacklevel=2,
                )
            return
        self.buffer.add(group_from_state(g) for g in buffers[dp.rank])

    # ---- rollouts -----------------------------------------------------------------------------------------
    def _policy(self) -> torch.nn.Module:
        module = self.trainer.lightning_module if self.trainer is not None else None
        policy = getattr(module, "policy", None)
        if policy is None:
            raise RuntimeError("the LightningModule has no `policy` model to generate with")
        return policy

    def _next_prompts(self, count: int) -> list[PromptRecord]:
        """This rank's next ``count`` prompts: its interleaved share of the next ``count x ranks`` of the seeded
        shuffle, which every rank walks identically (so the stream state is the same on every rank)."""
        dp = self._dp()
        out: list[PromptRecord] = []
        while len(out) < count * dp.size:
            if self._cursor >= len(self._order):
                rng = random.Random(self.seed + self._epoch)
                self._order = rng.sample(range(len(self._train)), len(self._train))
                self._cursor, self._epoch = 0, self._epoch + 1
            out.append(self._train[self._order[self._cursor]])
            self._cursor += 1
        return shard(out, dp.rank, dp.size)

    def generate_groups(
        self, records: list[PromptRecord], params: SamplingConfig, call: int | None = None
    ) -> tuple[list[Group], float, float]:
        """Generate and score ``params.n`` responses for each record; returns groups, rollout and reward seconds.

        The engine seed is ``params.seed + call * ranks + rank``: ``call`` numbers a validation call (its seed
        then depends on it alone); None takes the next training call (the counter saved in checkpoints).
        """
        assert self.engine is not None and self.reward_fn is not None
        prompt_ids = [self._prompt_ids(r) for r in records]
        if call is None:
            call, self._gen_calls = self._gen_calls, self._gen_calls + 1
        t0 = time.perf_counter()
        dp = self._dp()  # every rank counts the same calls; each draws its own seed
        assert params.seed is not None, "seeds are resolved in __init__/setup (dapo_pl.seeds)"
        completions = self.engine.generate(prompt_ids, params, seed=params.seed + call * dp.size + dp.rank)
        t1 = time.perf_counter()
        samples = [
            Sample(
                response=c.text,
                reference=r.reference,
                prompt=r.prompt if isinstance(r.prompt, str) else str(r.prompt),
                response_length=len(c.token_ids),
                max_response_length=params.max_new_tokens,
                truncated=c.truncated,
            )
            for r, cs in zip(records, completions, strict=True)
            for c in cs
        ]
        scores = self.reward_fn(samples)
        t2 = time.perf_counter()
        n = params.n
        groups = [
            Group(
                record=r,
                prompt_ids=p,
                completions=cs,
                rewards=[s.reward for s in scores[i * n : (i + 1) * n]],
                correct=[s.correct for s in scores[i * n : (i + 1) * n]],
                extracted=[s.verdict.extracted for s in scores[i * n : (i + 1) * n]],
                errors=[s.error for s in scores[i * n : (i + 1) * n]],
            )
            for i, (r, p, cs) in enumerate(zip(records, prompt_ids, completions, strict=True))
        ]
        return groups, t1 - t0, t2 - t1

    def _prompt_ids(self, record: PromptRecord) -> list[int]:
        ids = render_prompt(record, self.tokenizer)
        if not ids:
            raise DataError(f"{record.where}: the prompt is empty after tokenization")
        return ids

    def next_rollout_batch(self) -> RolloutBatch:
        """Sync weights, then sample, score and filter until the step's groups are there; build the batch."""
        assert self.engine is not None
        self.engine.sync_weights(self._policy())
        generated: list[Group] = []
        timing = {"rollout": 0.0, "reward": 0.0}
        dp = self._dp()
        gen_prompts = (self.ds.gen_batch_prompts or self.prompts_per_step) // dp.size

        def generate() -> list[Group]:
            groups, t_gen, t_rew = self.generate_groups(self._next_prompts(gen_prompts), self.rollout)
            timing["rollout"] += t_gen
            timing["reward"] += t_rew
            generated.extend(groups)
            return groups

        def keep(groups: list[Group]) -> list[bool]:
            if not self.ds.enabled:
                return [True] * len(groups)
            return group_keep_mask(torch.tensor([g.correct for g in groups])).tolist()

        if not self.ds.carry_over:
            self.buffer = GroupBuffer()
        groups, stats = fill_batch(
            self.buffer,
            self.prompts_per_step // dp.size,
            generate,
            keep,
            max_num_gen_batches=self.ds.max_num_gen_batches if self.ds.enabled else 1,
            on_exhausted=self.ds.on_exhausted,
            all_done=dp.all if dp.distributed else None,
        )
        # Surplus groups wait one step at most: sampled with weights one update old, they are not kept longer.
        carried = [g for g in self.buffer.state() if g.fresh]
        self.buffer = GroupBuffer()
        for g in carried:
            g.fresh = False
        self.buffer.add(carried)
        metrics = _rollout_metrics(generated, groups, stats, timing, dp)
        batch = build_rollout_batch(groups, self.rollout.temperature, self.scale_adv_by_std, metrics)
        batch.samples = _sample_records(generated, kept={id(g) for g in groups})
        return batch

    def validation_correctness(self, records: list[PromptRecord | None], batch_idx: int = 0) -> torch.Tensor:
        """Correctness ``[P, K]`` of ``val_rollout.n`` samples for each record (see :meth:`validation_votes`)."""
        return self.validation_votes(records, batch_idx) == RIGHT

    def validation_votes(self, records: list[PromptRecord | None], batch_idx: int = 0) -> torch.Tensor:
        """Vote labels ``[P, K]`` (:func:`dapo_pl.evaluation.vote_matrix`: 0 = right, -1 = no answer, 1, 2, ...
        = distinct wrong answers) of ``val_rollout.n`` samples for each record, with the current policy.

        Batch ``batch_idx`` of every validation pass draws the same seeds (common random numbers: two passes
        differ by the weights alone), and no training state moves, so a resumed fit validates like an
        uninterrupted one.

        ``None`` entries (padding of a data-parallel shard) are generated with a real prompt in their place, so
        every rank makes the same calls, and left out of the result (P counts the real records only).
        """
        assert self.engine is not None
        self.engine.sync_weights(self._policy())
        real = [r for r in records if r is not None]
        filler = real[0] if real else self._val[0]
        groups, _, _ = self.generate_groups(
            [r if r is not None else filler for r in records], self.val_rollout, call=batch_idx
        )
        real_groups = [g for g, r in zip(groups, records, strict=True) if r is not None]
        correct = torch.tensor([g.correct for g in real_groups], dtype=torch.bool)
        votes = vote_matrix(
            correct.reshape(len(real_groups), self.val_rollout.n), [g.extracted for g in real_groups]
        )
        return votes  # [P, K]


def check_shardable(prompts_per_step: int, gen_batch_prompts: int | None, world_size: int) -> None:
    """Each data-parallel rank takes an equal share of the step's groups and of each generation batch."""
    for name, value in (
        ("prompts_per_step", prompts_per_step),
        ("dynamic_sampling.gen_batch_prompts", gen_batch_prompts),
    ):
        if value is not None and value % world_size:
            raise ConfigError(
                f"data.{name}={value} counts groups over all data-parallel ranks and must be a multiple of the "
                f"{world_size} ranks (each rank generates {name} / world_size of them)"
            )


def group_to_state(group: Group) -> dict[str, Any]:
    """A :class:`Group` as plain lists, dicts and numbers (for checkpoints); :func:`group_from_state` inverts it."""
    return asdict(group)


def group_from_state(state: dict[str, Any]) -> Group:
    return Group(
        record=PromptRecord(**state["record"]),
        prompt_ids=list(state["prompt_ids"]),
        completions=[Completion(**c) for c in state["completions"]],
        rewards=list(state["rewards"]),
        correct=list(state["correct"]),
        extracted=list(state["extracted"]),
        fresh=bool(state["fresh"]),
    )


def build_rollout_batch(
    groups: list[Group], temperature: float, scale_by_std: bool, metrics: dict[str, float]
) -> RolloutBatch:
    """Flatten kept groups into a :class:`RolloutBatch` with group-relative advantages."""
    sequences, prompt_lengths, truncated, engine_lps = [], [], [], []
    for g in groups:
        for c in g.completions:
            sequences.append(torch.tensor(g.prompt_ids + c.token_ids, dtype=torch.long))
            prompt_lengths.append(len(g.prompt_ids))
            truncated.append(c.truncated)
            fresh_lp = c.logprobs is not None and g.fresh
            engine_lps.append(torch.tensor(c.logprobs, dtype=torch.float32) if fresh_lp else None)
    if groups:
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)  # [num_groups, G]
        advantages = group_advantages(rewards, scale_by_std=scale_by_std).flatten().float()  # [B]
    else:
        advantages = torch.zeros(0)
    return RolloutBatch(
        sequences=sequences,
        prompt_lengths=prompt_lengths,
        advantages=advantages,
        truncated=torch.tensor(truncated, dtype=torch.bool),
        rollout_logprobs=engine_lps,
        temperature=temperature,
        metrics=metrics,
    )


def _sample_records(generated: list[Group], kept: set[int]) -> list[dict[str, Any]]:
    """One plain record per generated response, for sample tables (MLflow) and debugging."""
    return [
        {
            "prompt": g.record.prompt if isinstance(g.record.prompt, str) else str(g.record.prompt),
            "response": c.text,
            "reference": g.record.reference,
            "reward": r,
            "correct": ok,
            "extracted": g.extracted[j] if j < len(g.extracted) else None,
            "truncated": c.truncated,
            "kept": id(g) in kept,
            "error": g.errors[j] if j < len(g.errors) else None,
        }
        for g in generated
        for j, (c, r, ok) in enumerate(zip(g.completions, g.rewards, g.correct, strict=True))
    ]


def _rollout_metrics(
    generated: list[Group],
    kept: list[Group],
    stats: FillStats,
    timing: dict[str, float],
    dp: DataParallel | None = None,
) -> dict[str, float]:
    """Metrics over every response generated this step (``acc`` etc.) and over the groups trained on.

    With data-parallel ranks the sums and counts are added over ranks first (the whole step's numbers) and the
    timings are the slowest rank's; ``num_gen_batches`` and ``ds_exhausted`` are the same on every rank.
    """
    dp = dp or DataParallel()
    completions = [c for g in generated for c in g.completions]
    rewards = [r for g in generated for r in g.rewards]
    num_kept, carried, count, reward_sum, correct, length_sum, truncated, gen_groups, kept_groups, errors = dp.sum(
        [len(kept), sum(not g.fresh for g in kept), len(rewards), sum(rewards),
         sum(c for g in generated for c in g.correct), sum(len(c.token_ids) for c in completions),
         sum(c.truncated for c in completions), stats.groups_generated, stats.groups_kept,
         sum(e is not None for g in generated for e in g.errors)]
    )  # fmt: skip
    rollout_s, reward_s = dp.max([timing["rollout"], timing["reward"]])
    metrics = {
        "train/num_gen_batches": float(stats.num_gen_batches),
        "train/ds_exhausted": float(stats.exhausted),
        "train/num_groups": num_kept,
        "train/carried_group_frac": carried / max(num_kept, 1),
        "time/rollout_s": rollout_s,
        "time/reward_s": reward_s,
        "reward/errors": errors,  # responses whose verifier batch failed (counted wrong), see rewards.py
    }
    if count:  # a step served entirely from carried-over groups generated nothing to describe
        metrics["train/reward_mean"] = reward_sum / count
        metrics["train/acc"] = correct / count
        metrics["train/response_length_mean"] = length_sum / count
        metrics["train/truncated_frac"] = truncated / count
        metrics["train/kept_group_frac"] = kept_groups / gen_groups if gen_groups else 0.0
    return metrics
