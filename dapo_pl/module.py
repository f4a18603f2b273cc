"""``DAPOModule``: the DAPO update as a LightningModule with manual optimization.

One ``training_step`` = one rollout batch (pulled from ``dataloader_iter`` so it is generated with the current
weights) -> old log-probs -> ``ppo_epochs x mini-batches`` optimizer steps, each mini-batch in micro-batches under
a token budget, with ONE token-mean denominator per optimizer step (all micro-batches, all ranks; see
:func:`dapo_pl.objective.token_mean_denominator`). Overlong filtering zeroes truncated responses' loss mask, which
also removes their tokens from that denominator. Gradient clipping, warm-up and stepping are explicit here because
Lightning's automatic optimization cannot run several optimizer steps per batch.

Data parallelism (any Lightning strategy: ``ddp``, ``fsdp``, ``ModelParallelStrategy`` for FSDP2, ``deepspeed``):
``algorithm.mini_batch_size`` counts responses per optimizer step over *all* ranks (each rank takes
``mini_batch_size / world_size``). Every rank runs the same number of optimizer steps and, within each, the same
number of forward/backward passes (agreed by all-reduce; a short rank runs empty padding micro-batches, see
:func:`dapo_pl.batch.padding_micro_batch`), so collectives never wait on a rank that has nothing to do.
Metrics are reduced over ranks before logging (the logger writes from rank 0). See ``docs/distributed.md``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from dapo_pl.attention import choose_implementation
from dapo_pl.batch import MicroBatch, RolloutBatch, padding_micro_batch
from dapo_pl.checkpoint import restore_rng_states, rng_states
from dapo_pl.data import check_model_source
from dapo_pl.distributed import DataParallel, full_state_dict, is_sharded, mark_synced_generation
from dapo_pl.errors import ConfigError
from dapo_pl.evaluation import EvalStatsConfig, evaluation_metrics, gather_prompt_rows, summary_line
from dapo_pl.head import DEFAULT_CHUNK_TOKENS
from dapo_pl.lora import (
    AdapterDisabled,
    LoRAConfig,
    apply_lora,
    complete_state,
    export_policy,
    trainable_state,
)
from dapo_pl.objective import AGGREGATIONS, check_correction_args, token_mean_denominator
from dapo_pl.update import (
    ScoreStats,
    accumulate_gradients,
    correct_rollouts,
    correction_metrics,
    count_rows,
    cut_batch,
    is_on_policy,
    score_old,
    score_reference,
    use_engine_logprobs,
)


@dataclass(frozen=True)
class RolloutCorrectionConfig:
    """Correction of the rollout engine/trainer mismatch (docs/rollout-correction.md); off by default.

    The rollout ratio ``rho = pi_old_trainer / pi_engine`` of each sampled token (or, at sequence level, its
    product over the response) corrects for the engine (e.g. bf16 vLLM) not reproducing the trainer's numbers.

    Attributes:
        mode: ``off``; ``tis`` (truncated importance sampling: each token's policy-gradient term times
            ``min(rho, clip)``); ``mis`` (masked IS, IcePop-style: tokens or responses with ``rho`` outside
            ``[low, high]`` leave the loss and the token-mean denominator); ``both``.
        level: ``token`` (per token) or ``sequence`` (``rho`` = the product over the response, on all its tokens).
        clip: TIS truncation (>= 1). verl's default is 2.
        low: MIS lower bound (in [0, 1]).
        high: MIS upper bound (>= 1). Sequence ratios spread much wider than token ratios: widen the bounds.
    """

    mode: Literal["off", "tis", "mis", "both"] = "off"
    level: Literal["token", "sequence"] = "token"
    clip: float = 2.0
    low: float = 0.5
    high: float = 2.0

    def __post_init__(self) -> None:
        try:
            check_correction_args(self.mode, self.level, self.clip, self.low, self.high)
        except ValueError as err:
            raise ValueError(f"model.algorithm.rollout_correction: {err}") from None


@dataclass(frozen=True)
class AlgorithmConfig:
    """The DAPO objective's settings (defaults: the paper's).

    Attributes:
        eps_low: lower clip range (ratio floor ``1 - eps_low``).
        eps_high: upper clip range, Clip-Higher (ratio ceiling ``1 + eps_high``).
        clip_ratio_c: dual-clip cap for negative advantages (None: off, as in DAPO).
        loss_agg: ``token-mean`` (DAPO), ``seq-mean-token-mean`` (GRPO) or ``seq-mean-token-sum``.
        overlong_filtering: mask the loss of truncated responses (and drop their tokens from the denominator).
            Responses left without a loss token never run through the update (the same gradient, without
            their forward/backward); ``train/entropy`` then covers the other responses.
        kl_coef: weight of a KL penalty to the initial policy (0: off, no reference model loaded, as in DAPO).
        kl_estimator: ``k1`` or ``k3``.
        ppo_epochs: passes over each rollout batch.
        mini_batch_size: responses per optimizer step, over all data-parallel ranks (each takes
            ``mini_batch_size / world_size``); the batch (prompts_per_step x n) must be a multiple.
        micro_batch_max_tokens: token budget (padded) of one forward/backward pass.
        logprob_chunk_tokens: response tokens per chunk of the LM head (log-probs and entropy): peak memory of
            the head is about ``2 x logprob_chunk_tokens x vocab x 4`` bytes (1024 x 152k: 1.2 GB), whatever the
            micro-batch size; smaller saves memory, larger runs fewer, bigger matmuls.
        rollout_correction: TIS / MIS correction of the engine/trainer mismatch (off by default).
        old_logprobs: the old policy of the PPO ratio: ``trainer`` (a forward pass of the trainer before the
            update) or ``engine`` (the rollout engine's own log-probs: no old-log-prob pass; the engine must
            return log-probs; carried-over groups, which have none, are still scored by the trainer).
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_ratio_c: float | None = None
    loss_agg: str = "token-mean"
    overlong_filtering: bool = False
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k3"] = "k3"
    ppo_epochs: int = 1
    mini_batch_size: int = 512
    micro_batch_max_tokens: int = 8192
    logprob_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    rollout_correction: RolloutCorrectionConfig = RolloutCorrectionConfig()
    old_logprobs: Literal["trainer", "engine"] = "trainer"

    def __post_init__(self) -> None:
        for name in ("eps_low", "eps_high"):
            if getattr(self, name) < 0:
                raise ValueError(f"algorithm.{name} must be >= 0, got {getattr(self, name)}")
        if self.eps_low >= 1:
            raise ValueError(f"algorithm.eps_low must be < 1, got {self.eps_low}")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1:
            raise ValueError(f"algorithm.clip_ratio_c must be > 1 (or null), got {self.clip_ratio_c}")
        if self.loss_agg not in AGGREGATIONS:
            raise ValueError(f"algorithm.loss_agg must be one of {AGGREGATIONS}, got {self.loss_agg!r}")
        if self.kl_coef < 0:
            raise ValueError(f"algorithm.kl_coef must be >= 0, got {self.kl_coef}")
        for name in ("ppo_epochs", "mini_batch_size", "micro_batch_max_tokens", "logprob_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"algorithm.{name} must be >= 1, got {getattr(self, name)}")
        check_old_logprobs(self.old_logprobs, self.rollout_correction.mode)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then a constant or cosine learning rate (the paper: 1e-6, constant).

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warm-up from 0.
        schedule: ``constant`` after warm-up, or ``cosine`` decay to ``min_lr_ratio * lr`` at ``total_steps``.
        total_steps: horizon of the cosine schedule (optimizer steps).
        min_lr_ratio: floor of the cosine schedule.
        grad_clip: max global gradient norm (0: no clipping).
        max_skipped_steps: an optimizer step whose loss or gradient norm is NaN/inf is skipped (gradients
            dropped, no update, the schedule not advanced; counted in ``train/skipped_steps``); this many skipped
            in a row stop the fit with an error.
        fused: torch's fused AdamW kernel (one pass over all parameters; ~4x faster steps on CPU). None: fused
            where every trained parameter is an unsharded CPU/CUDA tensor (sharded FSDP2 parameters keep torch's
            default implementation). Results equal the default implementation's to rounding.
    """

    lr: float = 1e-6
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    schedule: Literal["constant", "cosine"] = "constant"
    total_steps: int = 1000
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    max_skipped_steps: int = 3
    fused: bool | None = None

    def __post_init__(self) -> None:
        if self.max_skipped_steps < 1:
            raise ValueError(f"optim.max_skipped_steps must be >= 1, got {self.max_skipped_steps}")


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient norm."""


def check_old_logprobs(old_logprobs: str, correction_mode: str) -> None:
    """``old_logprobs`` is ``trainer`` or ``engine``; with ``engine`` the rollout ratio is 1 by construction."""
    if old_logprobs not in ("trainer", "engine"):
        raise ValueError(f"algorithm.old_logprobs must be 'trainer' or 'engine', got {old_logprobs!r}")
    if old_logprobs == "engine" and correction_mode != "off":
        raise ValueError(
            f"algorithm.old_logprobs='engine' makes the engine's log-probs the old policy, so the rollout ratio "
            f"pi_old / pi_engine is 1 and rollout_correction.mode={correction_mode!r} has nothing to correct; "
            "set rollout_correction.mode: off, or old_logprobs: trainer"
        )


def check_engine_logprobs(engine: Any) -> None:
    """``old_logprobs: engine`` needs an engine that reports the log-probs of what it sampled."""
    if not getattr(engine, "return_logprobs", False):
        raise ValueError(
            f"model.algorithm.old_logprobs='engine' needs log-probs from the rollout engine, but "
            f"{type(engine).__name__} returns none (return_logprobs is off or unsupported); set "
            "data.engine.options.return_logprobs: true, or model.algorithm.old_logprobs: trainer"
        )


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``params``, fused as ``cfg.fused`` says (None: where every parameter is an unsharded CPU/CUDA tensor).

    The fused kernel writes the parameters without bumping their in-place version counters, which the vLLM
    weight sync reads to find what changed (:meth:`dapo_pl.engines.vllm.VLLMEngine.sync_weights`); a step
    post-hook bumps the counter of every parameter the step updated (those with a gradient).
    """
    from torch.distributed.tensor import DTensor

    fused = cfg.fused
    if fused is None:
        fused = bool(params) and all(
            not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") for p in params
        )
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, fused=fused
    )
    if fused:
        optimizer.register_step_post_hook(_bump_versions)
    return optimizer


def _bump_versions(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    stepped = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if stepped:
        torch.autograd.graph.increment_version(stepped)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): warm-up, then constant or cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DAPOModule(L.LightningModule):
    """The policy and the DAPO update.

    Args:
        model_name_or_path: a local folder or hub name for ``AutoModelForCausalLM`` (loaded in ``configure_model``).
        algorithm: the objective's settings.
        optim: optimizer and schedule.
        dtype: parameter dtype of the policy (``float32``, ``bfloat16``, ``float16``; ``float64`` for exact
            comparisons in tests, under any strategy, where Lightning's ``precision="64-true"`` is not available).
        gradient_checkpointing: trade compute for activation memory.
        export_dir: if set, the trained policy and tokenizer are saved there (``save_pretrained``) when fit ends
            (with ``peft``: an adapter folder, or a merged model with ``peft.export_merged``).
        peft: train LoRA adapters (``peft``) on a frozen base instead of all weights (None: full fine-tuning).
            Checkpoints then hold the adapters only; the KL reference is the base with adapters disabled.
        attn_implementation: transformers' ``attn_implementation`` for the policy (``sdpa``, ``eager``,
            ``flash_attention_2``, ...). None: ``dapo_sdpa`` for models with grouped key/value heads (``sdpa``
            without copying the K/V heads on CPU; :mod:`dapo_pl.attention`), else transformers' default.
    """

    def __init__(
        self,
        model_name_or_path: str,
        algorithm: AlgorithmConfig = AlgorithmConfig(),
        optim: OptimConfig = OptimConfig(),
        dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32",
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
        peft: LoRAConfig | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.save_hyperparameters()
        self.model_name_or_path = model_name_or_path
        self.algo, self.optim_cfg = algorithm, optim
        self.dtype_name = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.export_dir = export_dir
        self.peft = peft
        self.attn_implementation = attn_implementation
        self.policy: torch.nn.Module | None = None
        self.ref_policy: torch.nn.Module | None = None
        self.pad_id = 0
        self._val_votes: list[Tensor] = []
        self.last_rollout_samples: list[dict[str, Any]] = []
        self.skipped_steps, self.skipped_in_a_row = 0, 0
        self._rng_to_restore: dict[str, Any] | None = None

    # ---- set-up -------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = getattr(torch, self.dtype_name)
        source = check_model_source(self.model_name_or_path)
        config = AutoConfig.from_pretrained(source)  # read once: it picks the attention and builds the model
        attn = choose_implementation(self.attn_implementation, config)
        self.policy = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, attn_implementation=attn
        )
        self.policy.train()  # from_pretrained returns eval mode
        if self.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.pad_id = int(
            config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or 0)
        )
        if self.peft is not None:
            self.policy = apply_lora(
                self.policy, self.peft, gradient_checkpointing=self.gradient_checkpointing
            )
            if self.algo.kl_coef > 0:
                self.ref_policy = AdapterDisabled(self.policy)  # the base itself, not a second copy
        elif self.algo.kl_coef > 0:
            self.ref_policy = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation=attn
            )
            self.ref_policy.requires_grad_(False).train(False)
        mesh = self.device_mesh  # set by ModelParallelStrategy (FSDP2), else None
        if mesh is not None:
            self._fully_shard(mesh)

    def _fully_shard(self, mesh: Any) -> None:
        """FSDP2 under ``ModelParallelStrategy``: shard each decoder layer, then the rest, over the data ranks."""
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard

        dp_mesh = (
            mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        )
        for model in (self.policy, self.ref_policy):
            if model is None or isinstance(model, AdapterDisabled) or is_sharded(model):
                continue
            layer_names = set(getattr(model, "_no_split_modules", None) or [])
            for module in model.modules():
                if type(module).__name__ in layer_names:
                    fully_shard(module, mesh=dp_mesh)
            fully_shard(model, mesh=dp_mesh)
            mark_synced_generation(model)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        batch_size = getattr(dm, "prompts_per_step", 0) * getattr(getattr(dm, "rollout", None), "n", 0)
        if stage == "fit" and batch_size:
            check_mini_batch(batch_size, self.algo.mini_batch_size, self.trainer.world_size)
        if stage == "fit" and self.algo.old_logprobs == "engine" and dm is not None:
            check_engine_logprobs(dm.engine)  # the DataModule's setup (which builds the engine) ran first

    def on_fit_start(self) -> None:
        self._mark_if_sharded()

    def on_validation_start(self) -> None:
        self._mark_if_sharded()

    def _mark_if_sharded(self) -> None:
        """Strategies that shard after ``configure_model`` (FSDP1) make every forward pass a collective: the
        transformers engine must then generate in lock-step over ranks."""
        wrapped = self.trainer.strategy.model
        if (
            self.policy is not None
            and wrapped is not None
            and self.trainer.world_size > 1
            and is_sharded(wrapped)
        ):
            mark_synced_generation(self.policy)

    def configure_optimizers(self) -> Any:
        assert self.policy is not None
        cfg = self.optim_cfg
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    # ---- the update ---------------------------------------------------------------------------------------
    def training_step(self, dataloader_iter: Iterator[Any]) -> None:
        batch: RolloutBatch = next(dataloader_iter)[0]  # generated now, with the current weights
        self.last_rollout_samples = batch.samples  # for callbacks (e.g. sample tables)
        metrics = dict(batch.metrics)
        t0 = time.perf_counter()
        dp = DataParallel.of(self._trainer)
        mini_batches, on_policy = self._prepare(batch, metrics, dp)
        if not mini_batches:  # on every rank: the count is agreed
            self.print(
                "[dapo-pl] no group with mixed answers this step: nothing to train on (see train/ds_exhausted)"
            )
        for _ in range(self.algo.ppo_epochs):
            for micro_batches in mini_batches:
                metrics.update(self._optimizer_step(micro_batches, batch.temperature, dp, on_policy))
        metrics["time/update_s"] = time.perf_counter() - t0
        self._log_step(metrics)

    def _prepare(
        self, batch: RolloutBatch, metrics: dict[str, float], dp: DataParallel
    ) -> tuple[list[list[MicroBatch]], bool]:
        """Cut the batch into mini/micro-batches (aligned over ranks) and attach old (and reference) log-probs.

        Also returns whether the update is exactly on-policy (the same on every rank: the mini-batch count is
        agreed and the carried-over share is global); then the old log-probs come from the loss pass itself.
        """
        assert self.policy is not None
        mini_batches = cut_batch(
            batch,
            mini_batch_size=self.algo.mini_batch_size // dp.size,
            max_tokens=self.algo.micro_batch_max_tokens,
            pad_id=self.pad_id,
            overlong_filtering=self.algo.overlong_filtering,
        )
        if dp.distributed:
            mini_batches = align_micro_batches(mini_batches, dp, self.pad_id)
        if not mini_batches:
            return [], False
        mini_batches = [[mb.to(self.device) for mb in mbs] for mbs in mini_batches]
        flat = [mb for mbs in mini_batches for mb in mbs]
        carried = batch.metrics.get("train/carried_group_frac", 0.0)
        # The loss pass cannot supply the old log-probs when MIS needs them before it (its mask changes the
        # denominator), nor with old_logprobs: engine (the engine's are the old policy then).
        skippable = self.algo.old_logprobs == "trainer" and self.algo.rollout_correction.mode in (
            "off",
            "tis",
        )
        on_policy = skippable and is_on_policy(self.algo.ppo_epochs, len(mini_batches), carried)
        metrics.update(self._score_old(flat, batch, dp, on_policy))
        return mini_batches, on_policy

    def _score_old(
        self, flat: list[MicroBatch], batch: RolloutBatch, dp: DataParallel, on_policy: bool
    ) -> dict[str, float]:
        """Old log-probs (the trainer's pass; none when ``on_policy``; the engine's with ``old_logprobs: engine``),
        then the rollout correction, before any token-mean denominator is counted (MIS-masked tokens leave it)."""
        assert self.policy is not None
        chunk, bypass = self.algo.logprob_chunk_tokens, self.algo.old_logprobs == "engine"
        # Carried-over groups have no engine log-probs: bypass still runs the trainer's pass for them, on every
        # rank (the share is global, so a sharded model's collective forwards stay in step).
        carried = batch.metrics.get("train/carried_group_frac", 0.0) > 0
        metrics: dict[str, float] = {}
        if on_policy or (bypass and not carried):
            if self.ref_policy is not None:
                score_reference(self.ref_policy, flat, batch.temperature, chunk)
        else:
            reduce = dp.sum if dp.distributed else None
            metrics = score_old(self.policy, flat, batch.temperature, self.ref_policy, reduce, chunk)
        if bypass:
            use_engine_logprobs(flat)
            return metrics
        if on_policy:  # TIS weights come with the loss pass's own log-probs (accumulate_gradients)
            return metrics
        return {**metrics, **correct_rollouts(flat, self.algo.rollout_correction, dp)}

    def _denominator(self, micro_batches: list[MicroBatch]) -> Tensor:
        world = self.trainer.world_size
        reduce = (lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")) if world > 1 else None
        masks = [mb.loss_mask for mb in micro_batches]
        return token_mean_denominator(masks, all_reduce=reduce, grad_average_world_size=world)

    def _optimizer_step(
        self, micro_batches: list[MicroBatch], temperature: float, dp: DataParallel, on_policy: bool = False
    ) -> dict[str, float]:
        """One optimizer step over one mini-batch: shared denominator, backward per micro-batch, clip, step.

        ``on_policy``: no old log-probs were scored; the loss pass supplies them and the scoring metrics."""
        assert self.policy is not None
        opt, scheduler = self.optimizers(), self.lr_schedulers()
        token_mean = self.algo.loss_agg == "token-mean"
        num_tokens = self._denominator(micro_batches) if token_mean else None
        # seq-mean over ranks: global non-empty rows / world, as the token count above (one process: local count)
        num_rows = max(dp.sum([count_rows(micro_batches)])[0], 1.0) / dp.size if dp.distributed else None
        stats = ScoreStats() if on_policy else None
        totals = accumulate_gradients(
            self.policy, micro_batches, temperature=temperature, algo=self.algo, num_tokens=num_tokens,
            backward=self.manual_backward, num_rows=None if token_mean else num_rows, on_policy_stats=stats,
        )  # fmt: skip
        scored = stats.metrics(dp.sum if dp.distributed else None) if stats is not None else {}
        if stats is not None:  # on-policy: the old log-probs (and TIS weights) came from the loss pass
            scored.update(correction_metrics(micro_batches, self.algo.rollout_correction, dp))
        if dp.distributed:
            totals = global_totals(totals, micro_batches, dp)
        grad_norm = self._clip_gradients()
        lr = opt.param_groups[0]["lr"]
        if self._skip_non_finite(totals["loss"], grad_norm):
            opt.zero_grad(set_to_none=True)
            return {"train/skipped_steps": float(self.skipped_steps)}
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler.step()
        out = {f"train/{k}": v for k, v in totals.items()}
        return {
            **out,
            **scored,
            "train/grad_norm": grad_norm,
            "train/lr": lr,
            "train/skipped_steps": self.skipped_steps,
        }

    def _skip_non_finite(self, loss: float, grad_norm: float) -> bool:
        """True if this optimizer step must be skipped (NaN/inf loss or gradient norm, the same on every rank:
        both are global); raises :class:`NonFiniteLossError` at ``optim.max_skipped_steps`` in a row."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.skipped_in_a_row = 0
            return False
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        limit = self.optim_cfg.max_skipped_steps
        self.print(
            f"[dapo-pl] non-finite loss {loss} / grad norm {grad_norm} after optimizer step {self.trainer.global_step}: "
            f"update skipped ({self.skipped_in_a_row} in a row, the fit stops at {limit})"
        )
        if self.skipped_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{limit} optimizer steps in a row had a non-finite loss or gradient norm (last: loss {loss}, "
                f"grad norm {grad_norm}) after step {self.trainer.global_step}: the weights are those of the last "
                "finite step. Lower model.optim.lr, keep model.optim.grad_clip on, use float32 instead of float16, "
                "or raise model.optim.max_skipped_steps."
            )
        return True

    def _clip_gradients(self) -> float:
        """Clip the global gradient norm (identical on every rank after the gradient all-reduce) and return it."""
        assert self.policy is not None
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = self.trainer.strategy.model if self._trainer is not None else None
        if isinstance(wrapped, FullyShardedDataParallel):
            # FSDP1: only FSDP knows the norm of its flat shards
            return float(wrapped.clip_grad_norm_(max_norm))
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full_tensor = getattr(norm, "full_tensor", None)  # FSDP2: a DTensor
        return float(full_tensor() if callable(full_tensor) else norm)

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        """Straight to the loggers (rank 0 only), at the optimizer-step count, so every curve shares the axis
        ``trainer.max_steps`` counts; Lightning's own step axis counts rollout batches instead."""
        for logger in self.loggers:
            logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=self.trainer.global_step)

    def _log_step(self, metrics: dict[str, float]) -> None:
        """To the loggers; also into ``trainer.callback_metrics`` (callbacks, checkpoint monitors) and the progress
        bar, written directly: ``self.log`` costs about 1 ms per key in Lightning 2.6 (each call moves the stored
        metric's whole state), 30 ms a step for our ~30 metrics, a tenth of a tiny model's step."""
        prog = {"train/reward_mean": "reward", "train/acc": "acc", "train/kept_group_frac": "kept"}
        self._log_metrics(metrics)
        values = {k: float(v) for k, v in metrics.items()}
        self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        self.trainer.progress_bar_metrics.update({name: values[k] for k, name in prog.items() if k in values})

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # prompt records and rollout batches: micro-batches are moved to the device when cut

    # ---- validation ---------------------------------------------------------------------------------------
    def validation_step(self, batch: list[Any], batch_idx: int) -> None:
        votes = self.trainer.datamodule.validation_votes(
            batch, batch_idx
        )  # [P, K]: 0 right, -1 none, 1.. wrong
        self._val_votes.append(votes)

    def on_validation_epoch_end(self) -> None:
        if not self._val_votes:  # the same on every rank: the datamodule gives each rank as many batches
            return
        dp = DataParallel.of(self._trainer)
        votes = gather_prompt_rows(torch.cat(self._val_votes), dp)  # [P, K], every rank's prompts
        self._val_votes = []
        stats = getattr(getattr(self.trainer, "datamodule", None), "val_stats", None) or EvalStatsConfig()
        metrics = evaluation_metrics(votes, stats)
        step, num_prompts = self.trainer.global_step, votes.shape[0]
        self.print(f"[dapo-pl] validation at step {step}: {summary_line(metrics)} ({num_prompts} prompts)")
        self._log_metrics(metrics)  # also during the sanity check: the step-0 point starts the curve
        if (
            not self.trainer.sanity_checking
        ):  # so `trainer.validate` returns them; the loggers have them already
            self.log_dict(metrics, batch_size=max(num_prompts, 1), logger=False)  # the same on every rank

    def on_train_end(self) -> None:
        # An endless rollout stream never ends an epoch, so ModelCheckpoint alone would not save the final state:
        # write `last.ckpt` for every checkpoint callback that asks for one (`--ckpt_path last` resumes from it).
        for cb in self.trainer.checkpoint_callbacks:
            if getattr(cb, "save_last", False) and getattr(cb, "dirpath", None):
                self.trainer.save_checkpoint(os.path.join(cb.dirpath, "last.ckpt"))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        run_id = getattr(self.logger, "run_id", None)
        if run_id:
            checkpoint["mlflow_run_id"] = run_id  # resuming this checkpoint continues the same MLflow run
        checkpoint["dapo_pl"] = {
            "rng_states": rng_states(),  # rank 0's, restored on every rank (they are seeded alike)
            "skipped_steps": self.skipped_steps,
            "skipped_in_a_row": self.skipped_in_a_row,
        }
        if self.peft is not None and self.policy is not None and "state_dict" in checkpoint:
            checkpoint["state_dict"] = trainable_state(
                checkpoint["state_dict"], self.policy, prefix="policy."
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.peft is not None and "state_dict" in checkpoint:  # adapters only: the base is loaded already
            checkpoint["state_dict"] = complete_state(checkpoint["state_dict"], self.state_dict())
        state = checkpoint.get("dapo_pl", {})
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        self._rng_to_restore = state.get("rng_states")

    def on_train_start(self) -> None:
        # The generators are restored here, just before the first step, not while the checkpoint loads: model
        # set-up in between may draw from them, which the uninterrupted fit did before it saved.
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # ---- export -------------------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        if not self.export_dir or self.policy is None:
            return
        state, wrapped = None, self.trainer.strategy.model
        if wrapped is not None and self.trainer.world_size > 1 and is_sharded(wrapped):
            # Collective: every rank helps gather the shards; rank 0 receives the full weights.
            state = full_state_dict(wrapped, prefix="policy.")
        if not self.trainer.is_global_zero:
            return
        if self.peft is not None:  # an adapter folder, or the base with the adapters folded in
            export_policy(self.policy, self.export_dir, merged=self.peft.export_merged)
        else:
            self.policy.save_pretrained(
                self.export_dir, **({"state_dict": state} if state is not None else {})
            )
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.export_dir)
        self.print(f"[dapo-pl] policy exported to {self.export_dir}")


def check_mini_batch(batch_size: int, mini_batch_size: int, world_size: int = 1) -> None:
    """A rollout batch of ``batch_size`` responses must split into whole mini-batches, each split evenly over
    ``world_size`` data-parallel ranks."""
    if batch_size % mini_batch_size:
        raise ConfigError(
            f"model.algorithm.mini_batch_size={mini_batch_size} does not divide the rollout batch of {batch_size} "
            f"responses (data.prompts_per_step x data.rollout.n); choose a divisor of {batch_size}"
        )
    if mini_batch_size % world_size:
        raise ConfigError(
            f"model.algorithm.mini_batch_size={mini_batch_size} (responses per optimizer step over all ranks) is "
            f"not a multiple of the {world_size} data-parallel ranks; each rank takes mini_batch_size / world_size"
        )


def align_micro_batches(
    mini_batches: list[list[MicroBatch]], dp: DataParallel, pad_id: int
) -> list[list[MicroBatch]]:
    """Give every rank the same number of mini-batches and, in each, the same number of micro-batches.

    Ranks agree (all-reduce max) on both counts; a rank that is short (fewer kept groups, shorter sequences under
    the token budget, or nothing at all) appends :func:`dapo_pl.batch.padding_micro_batch`, whose loss is 0.
    So every rank runs the same optimizer steps and forward/backward passes, and no collective waits forever.
    """
    num = int(dp.max([len(mini_batches)])[0])
    if num == 0:
        return []
    counts = [len(mbs) for mbs in mini_batches] + [0] * (num - len(mini_batches))
    target = [int(c) for c in dp.max(counts)]
    padded = [list(mbs) for mbs in mini_batches] + [[] for _ in range(num - len(mini_batches))]
    for mbs, want in zip(padded, target, strict=True):
        mbs.extend(padding_micro_batch(pad_id) for _ in range(want - len(mbs)))
    return padded


def global_totals(
    totals: dict[str, float], micro_batches: list[MicroBatch], dp: DataParallel
) -> dict[str, float]:
    """Loss and clip statistics of the whole mini-batch from each rank's share.

    Each rank's loss is its part of the global loss times the world size (the denominators are shared and
    divided by it), so the global loss is the mean over ranks; clip fractions are token-weighted.
    """
    tokens = sum(float(mb.loss_mask.sum()) for mb in micro_batches)
    loss, pg, kl, high, low, all_tokens = dp.sum(
        [totals["loss"], totals["pg_loss"], totals["kl"], totals["clipfrac_high"] * tokens,
         totals["clipfrac_low"] * tokens, tokens]
    )  # fmt: skip
    out = {"loss": loss / dp.size, "pg_loss": pg / dp.size, "kl": kl / dp.size}
    out["clipfrac_high"] = high / max(all_tokens, 1.0)
    out["clipfrac_low"] = low / max(all_tokens, 1.0)
    return out
