"""Data parallelism on top of Lightning's strategies: each rank's share of the work, and the few collectives
that keep the ranks of an RL step in lock-step.

Lightning owns the processes (``ddp``, ``ddp_spawn``/``ddp_fork``, ``fsdp``, ``ModelParallelStrategy`` for FSDP2,
``deepspeed``; launched by itself, ``torchrun`` or SLURM) and the gradient all-reduce. An RL step adds what
supervised training does not have: rollouts generated per rank, data-dependent batch sizes (dynamic sampling), and
metrics over the whole batch. This module holds the pieces:

- :class:`DataParallel`: this rank's data-parallel index and the data-parallel size, with ``sum``/``max``/``all``
  reductions through the strategy's own ``reduce`` (one float64 tensor per call, so counts are exact). With one
  process nothing is communicated, so single-process runs take exactly the path they took before.
- :func:`shard`: a rank's share of a list (item ``i`` goes to rank ``i % size``).
- :func:`mark_synced_generation`: under a sharding strategy every forward pass is a collective, so
  ``transformers``' ``generate`` must keep stepping until every rank is done (its ``synced_gpus`` mode).
- :func:`full_state_dict` and :func:`full_parameter_buckets`: the policy's full weights from sharded parameters,
  for export and for pushing weights into a rollout engine (vLLM) in bounded-memory buckets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the data-parallel ranks, and reductions over them.

    Attributes:
        rank: data-parallel index of this process (0-based).
        size: number of data-parallel ranks (1: a single process; nothing is communicated).
        strategy: the Lightning strategy whose ``reduce`` runs the collectives (None on one process).
    """

    rank: int = 0
    size: int = 1
    strategy: Any = None

    @classmethod
    def of(cls, trainer: Any) -> DataParallel:
        """The data-parallel layout of ``trainer`` (a single process when there is no trainer)."""
        if trainer is None or trainer.world_size <= 1:
            return cls()
        strategy = trainer.strategy
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        size = int(kwargs.get("num_replicas", trainer.world_size))
        rank = int(kwargs.get("rank", trainer.global_rank))
        if size != trainer.world_size:
            raise ValueError(
                f"the trainer runs {trainer.world_size} processes but only {size} data-parallel ranks: tensor "
                "parallelism inside the trainer is not supported. Use ModelParallelStrategy with "
                f"data_parallel_size={trainer.world_size} and tensor_parallel_size=1 (rollouts can still be "
                "tensor-parallel: data.engine.options.tensor_parallel_size of the vLLM engine)"
            )
        return cls(rank, size, strategy)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def _reduce(self, values: Sequence[float], op: str) -> list[float]:
        if not self.distributed:
            return [float(v) for v in values]
        device = self.strategy.root_device
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)  # [n]
        return [float(v) for v in self.strategy.reduce(tensor, reduce_op=op).tolist()]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (every rank passes the same number of values)."""
        return self._reduce(values, "sum")

    def max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maximum over ranks."""
        return self._reduce(values, "max")

    def all(self, flag: bool) -> bool:
        """True when ``flag`` is True on every rank."""
        if not self.distributed:
            return flag
        return bool(self.strategy.reduce_boolean_decision(flag, all=True))


def shard(items: Sequence[Any], rank: int, size: int) -> list[Any]:
    """Rank ``rank``'s share of ``items``: every ``size``-th item from ``rank`` on (disjoint, covering).

    Example: 5 items over 2 ranks -> rank 0 gets items 0, 2, 4 and rank 1 gets items 1, 3.
    """
    return list(items[rank::size])


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are sharded over ranks (FSDP2 DTensors, or FSDP1 inside ``module``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(_is_dtensor(p) for p in module.parameters()):
        return True
    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def mark_synced_generation(model: nn.Module) -> None:
    """Make ``transformers``' ``generate`` on ``model`` run in lock-step over ranks (``synced_gpus``).

    With sharded parameters every forward pass gathers weights from all ranks, so a rank whose responses all
    ended early must keep stepping until every rank is done, or the others wait forever. ``generate`` turns its
    ``synced_gpus`` mode on by itself for modules carrying the ``_is_fsdp_managed_module`` flag (the flag
    ``transformers`` sets when it shards a model); we set it on the policy we sharded.
    """
    model._is_fsdp_managed_module = True  # type: ignore[assignment]


def full_state_dict(root: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """Full (unsharded) weights of ``root``'s sub-tree ``prefix``, with ``prefix`` removed from the names.

    Collective under FSDP: every rank must call it. Sharded modules go through
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True, cpu_offload=True)``,
    which gives the tensors to rank 0 only (the others get an empty dict); unsharded modules give their own
    ``state_dict()`` on every rank. ``root`` is the module the strategy wrapped (FSDP1 wraps the LightningModule,
    so the policy is reached through ``prefix="policy."``).
    """
    if not is_sharded(root):
        state = root.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(root, options=options)
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def full_parameter_buckets(
    model: nn.Module, bucket_bytes: int = 1 << 30
) -> Iterator[list[tuple[str, Tensor]]]:
    """The full parameters of ``model`` as ``(name, tensor)`` lists of about ``bucket_bytes`` each.

    The weight-sync contract for a rollout engine under FSDP2 (``ModelParallelStrategy``): every rank iterates
    to the end, in the same order (each DTensor's ``full_tensor()`` is an all-gather), and pushes each bucket into
    its colocated engine before the next is gathered, so at most one bucket of full weights exists at a time
    besides the shards. Tied parameters come under every name they have (vLLM wants ``lm_head.weight`` too).
    Unsharded parameters are yielded as they are (detached, no copy). FSDP1 (Lightning's ``FSDPStrategy``) keeps
    flat shards outside its forward: use ``FullyShardedDataParallel.summon_full_params`` there instead.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        tensor = param.detach()
        if _is_dtensor(tensor):
            tensor = tensor.full_tensor()  # type: ignore[attr-defined]
        bucket.append((name.replace("_orig_mod.", ""), tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _is_dtensor(tensor: Tensor) -> bool:
    return callable(getattr(tensor, "full_tensor", None))
