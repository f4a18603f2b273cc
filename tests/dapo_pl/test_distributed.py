"""Data parallelism: 2 CPU ranks (gloo, ``ddp_fork``) against 1 rank on the same global batch, uneven dynamic
sampling over ranks, one MLflow run per fit; and the single-process pieces (sharding, agreement, alignment).

The rollout engine here is scripted: response j of a prompt ``a+b=`` is right for even j and wrong for odd j
(every group mixed, so nothing is filtered), its length varies with the prompt and j, and it does not depend on
the rank or the seed. A 1-rank and a 2-rank run then see the same groups, and the 2-rank run must reproduce the
1-rank run's gradient at every optimizer step: the one token-mean denominator all-reduced over ranks and divided
by the world size (DDP averages gradients), with every rank running the same forward/backward passes.
Float64 parameters (``model.dtype``) keep the comparison tight (1e-10), with no gradient clipping to hide a factor.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from dapo_pl.batch import MicroBatch, padding_micro_batch
from dapo_pl.data import PromptDataConfig
from dapo_pl.datamodule import DAPODataModule, DynamicSamplingConfig, check_shardable
from dapo_pl.distributed import DataParallel, full_parameter_buckets, is_sharded, shard
from dapo_pl.engines import Completion, SamplingConfig
from dapo_pl.module import (
    AlgorithmConfig,
    DAPOModule,
    OptimConfig,
    align_micro_batches,
)
from dapo_pl.sampling import DynamicSamplingExhausted, GroupBuffer, fill_batch

REPO = Path(__file__).resolve().parents[2]


def _char_tokenizer() -> Any:
    """The quickstart's character-level tokenizer (tools/make_quickstart.py)."""
    spec = importlib.util.spec_from_file_location(
        "dapo_tools_make_quickstart", REPO / "tools" / "make_quickstart.py"
    )
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    spec.loader.exec_module(tool)
    return tool.make_tokenizer()


# ---- fixtures: a tiny model and addition prompts ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen2 (hidden 32) with the quickstart's character tokenizer, and 24 addition prompts."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("tiny")
    tokenizer = _char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    rows = [
        {"prompt": f"{a}+{b}=", "answer": str(a + b)}
        for a, b in zip(range(3, 99, 4), range(24), strict=False)
    ]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


class ScriptedEngine:
    """Rollouts that are a function of the prompt alone: response j is right for even j, wrong for odd j.

    ``all_right_on_rank``: on that data-parallel rank every response is right, so every group it generates has
    zero variance and dynamic sampling filters all of them.
    """

    def __init__(self, tokenizer: Any, all_right_on_rank: int | None = None) -> None:
        self.tokenizer, self.all_right_on_rank = tokenizer, all_right_on_rank

    def sync_weights(self, model: torch.nn.Module) -> None:
        pass

    def close(self) -> None:
        pass

    def generate(self, prompts: list[list[int]], params: SamplingConfig, seed: int) -> list[list[Completion]]:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        out = []
        for ids in prompts:
            a, b = self.tokenizer.decode(ids).rstrip("=").split("+")
            group = []
            for j in range(params.n):
                right = j % 2 == 0 or rank == self.all_right_on_rank
                text = "ok " * ((int(a) + j) % 3) + f"Answer: {int(a) + int(b) + (0 if right else 1)}"
                tokens = self.tokenizer(text)["input_ids"] + [self.tokenizer.eos_token_id]
                group.append(Completion(token_ids=tokens, text=text, truncated=False))
            out.append(group)
        return out


def _flat(tensors: Any) -> torch.Tensor:
    """One flat CPU vector; FSDP2's sharded DTensors are gathered first (a collective: every rank calls it)."""
    full = [t.full_tensor() if callable(getattr(t, "full_tensor", None)) else t for t in tensors]
    return torch.cat([t.detach().flatten().cpu() for t in full])


class Record(Callback):
    """Per rank: the gradient at every optimizer step, the logged metrics per step, the final parameters."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.grads: list[torch.Tensor] = []
        self.metrics: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.grads.append(_flat(p.grad for p in pl_module.policy.parameters()))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *_: Any) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        params = _flat(pl_module.policy.parameters())
        buckets = full_parameter_buckets(pl_module.policy, bucket_bytes=4096)  # the vLLM weight-sync contract
        bucketed = torch.cat([t.detach().flatten().cpu() for bucket in buckets for _, t in bucket])
        record = {"grads": self.grads, "metrics": self.metrics, "params": params, "step": trainer.global_step,
                  "bucketed": bucketed, "sharded": is_sharded(pl_module.policy)}  # fmt: skip
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


def _fit(
    tiny: Path, out: Path, *, devices: int, loss_agg: str = "token-mean", all_right_on_rank: int | None = None,
    logger: Any = False, max_steps: int = 4, strategy: Any = None, collect: bool = True, export: bool = False,
    mini_batch_size: int = 8, algorithm: dict[str, Any] | None = None, engine: Any = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Fit 2 rollout steps of 4 groups x 4 responses, mini-batches of 8 responses (2 optimizer steps each);
    return each rank's :class:`Record` (``collect=False``: inside a rank, which cannot wait for the others).
    ``algorithm``: more ``AlgorithmConfig`` fields; ``engine``: a class built like :class:`ScriptedEngine`."""
    out.mkdir(parents=True, exist_ok=True)
    dm = DAPODataModule(
        train=PromptDataConfig(str(tiny / "train.jsonl")), model_name_or_path=str(tiny / "model"),
        prompts_per_step=4, rollout=SamplingConfig(n=4, max_new_tokens=16),
        dynamic_sampling=DynamicSamplingConfig(max_num_gen_batches=2, on_exhausted="train"),
    )  # fmt: skip
    from transformers import AutoTokenizer

    dm.engine = (engine or ScriptedEngine)(AutoTokenizer.from_pretrained(tiny / "model"), all_right_on_rank)
    module = DAPOModule(
        str(tiny / "model"),
        # A budget of 40 padded tokens cuts each rank's mini-batch into a different number of micro-batches.
        algorithm=AlgorithmConfig(
            mini_batch_size=mini_batch_size, micro_batch_max_tokens=40, loss_agg=loss_agg, **(algorithm or {})
        ),
        optim=OptimConfig(lr=1e-2, weight_decay=0.0, warmup_steps=0, grad_clip=0.0),
        export_dir=str(out / "exported") if export else None,
        dtype="float64",  # not precision="64-true": ModelParallelStrategy (FSDP2) refuses it
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy or ("ddp_fork" if devices > 1 else "auto"),
        max_steps=max_steps, max_epochs=-1, logger=logger, log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Record(out)], default_root_dir=str(out),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    if not collect:
        return []
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)]


def _torchrun_like(fn: Any, world: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``world`` forked processes carrying the environment torchrun gives its workers, so
    Lightning's TorchElasticEnvironment finds processes it did not start itself (as under torchrun or SLURM)."""
    import multiprocessing

    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    port = find_free_network_port()
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_torchrun_worker, args=(rank, world, port, fn, args)) for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * world


def _torchrun_worker(rank: int, world: int, port: int, fn: Any, args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", TORCHELASTIC_RUN_ID="dapo-pl-test",
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    # As torchrun (OMP_NUM_THREADS=1) and Lightning's own fork launcher do: a forked child that inherits the
    # parent's OpenMP pool state hangs in its first parallel region.
    torch.set_num_threads(1)
    fn(*args)


@pytest.fixture(scope="module")
def one_rank(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 1-process reference run (token-mean), shared by the DDP and FSDP2 comparisons."""
    return _fit(tiny, tmp_path_factory.mktemp("one"), devices=1)[0]


def _assert_same_update(one: dict[str, Any], two: list[dict[str, Any]]) -> None:
    assert one["step"] == two[0]["step"] == two[1]["step"] == 4
    assert len(one["grads"]) == len(two[0]["grads"]) == len(two[1]["grads"]) == 4
    for g1, g2a, g2b in zip(one["grads"], two[0]["grads"], two[1]["grads"], strict=True):
        assert g1.abs().max() > 1e-4  # a real update
        torch.testing.assert_close(g2a, g2b, rtol=0, atol=0)  # both ranks hold the averaged gradient
        torch.testing.assert_close(g2a, g1, rtol=0, atol=1e-10)
    torch.testing.assert_close(two[0]["params"], one["params"], rtol=0, atol=1e-10)
    torch.testing.assert_close(two[0]["bucketed"], two[0]["params"], rtol=0, atol=0)
    # Metrics are of the whole batch, not of rank 0's half.
    for m1, m2 in zip(one["metrics"], two[0]["metrics"], strict=True):
        for key in ("train/acc", "train/num_groups", "train/entropy", "train/loss", "train/clipfrac_high",
                    "train/response_length_mean", "train/kept_group_frac", "train/grad_norm"):  # fmt: skip
            assert m2[key] == pytest.approx(m1[key], rel=1e-9, abs=1e-12), key


# ---- 2 processes --------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
def test_two_ddp_ranks_reproduce_the_one_rank_update(
    tiny: Path, tmp_path: Path, one_rank: dict[str, Any]
) -> None:
    _assert_same_update(one_rank, _fit(tiny, tmp_path, devices=2))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ddp_ranks_reproduce_the_one_rank_seq_mean_update(tiny: Path, tmp_path: Path) -> None:
    """seq-mean-token-mean shares its row count over ranks the way token-mean shares its token count."""
    one = _fit(tiny, tmp_path / "one", devices=1, loss_agg="seq-mean-token-mean")[0]
    _assert_same_update(one, _fit(tiny, tmp_path / "two", devices=2, loss_agg="seq-mean-token-mean"))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ddp_ranks_reproduce_the_one_rank_on_policy_update(tiny: Path, tmp_path: Path) -> None:
    """One mini-batch per rollout (16 responses): no separate old-log-prob pass; the loss pass's entropy and
    engine-gap sums are reduced over ranks, so the logged metrics are the whole batch's as well."""
    one = _fit(tiny, tmp_path / "one", devices=1, mini_batch_size=16)[0]
    _assert_same_update(one, _fit(tiny, tmp_path / "two", devices=2, mini_batch_size=16))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_fsdp2_ranks_reproduce_the_one_rank_update(
    tiny: Path, tmp_path: Path, one_rank: dict[str, Any]
) -> None:
    """FSDP2 (ModelParallelStrategy, the module shards each decoder layer) on 2 gloo processes started the way
    torchrun starts them: sharded parameters, every forward a collective, the same update as 1 process."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    def run() -> None:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        _fit(tiny, tmp_path, devices=2, strategy=strategy, collect=False, export=True)

    _torchrun_like(run, 2)
    two = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert two[0]["sharded"] and two[1]["sharded"] and not one_rank["sharded"]
    _assert_same_update(one_rank, two)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(
        tmp_path / "exported", dtype=torch.float64
    )  # gathered shards
    torch.testing.assert_close(_flat(exported.parameters()), two[0]["params"], rtol=0, atol=0)


@pytest.mark.distributed
@pytest.mark.slow
def test_uneven_filtering_over_ranks_completes_and_logs_one_mlflow_run(tiny: Path, tmp_path: Path) -> None:
    """Rank 1's groups are all right, so all filtered: after 2 generation batches rank 0 trains on its share and
    rank 1 on nothing, yet both run the same 4 optimizer steps (rank 1 on padding) and end with equal weights."""
    import mlflow

    from dapo_pl.tracking import DAPOMLFlowLogger

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    logger = DAPOMLFlowLogger(experiment_name="ddp", tracking_uri=uri)
    ranks = _fit(tiny, tmp_path / "run", devices=2, all_right_on_rank=1, logger=logger)
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    assert all(
        g.abs().max() > 0 for g in ranks[1]["grads"]
    )  # rank 1 trained on nothing, yet got rank 0's share
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    last = ranks[0]["metrics"][-1]
    assert last["train/ds_exhausted"] == 1.0 and last["train/num_gen_batches"] == 2.0
    assert last["train/num_groups"] == 2.0  # rank 0's 2 groups; rank 1 kept none
    assert last["train/kept_group_frac"] == pytest.approx(4 / 8)  # 8 groups generated over both ranks, 4 kept
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/grad_norm")
    assert len(history) == 2  # one point per training step, written by rank 0 only


@pytest.mark.distributed
@pytest.mark.slow
def test_cli_fit_on_two_cpu_ranks_with_ddp(quickstart_dir: Path, tmp_path: Path) -> None:
    """The README command: `dapo-pl fit ... --trainer.devices 2 --trainer.strategy ddp` (Lightning relaunches the
    command for rank 1; fine outside pytest), one MLflow run with one point per optimizer step."""
    import mlflow

    args = [
        sys.executable, "-m", "dapo_pl", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--model.model_name_or_path", str(quickstart_dir / "model"),
        "--data.train.path", str(quickstart_dir / "data" / "train.jsonl"),
        "--data.val.path", str(quickstart_dir / "data" / "val.jsonl"), "--data.val.limit", "9",
        "--data.val_rollout.n", "2", "--data.prompts_per_step", "8", "--data.rollout.n", "4",
        "--model.algorithm.mini_batch_size", "32", "--model.export_dir", str(tmp_path / "exported"),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'runs.db'}"}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(9 prompts)" in result.stdout  # validation over both shards, padding not counted
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/grad_norm")
    steps = sorted(m.step for m in history)
    # One point per rollout step, written by rank 0 only, on the optimizer-step axis that max_steps counts (a
    # rollout step whose groups all had equal answers trains on nothing and logs at the same step again).
    assert steps == sorted(steps) and {1, 2, 3} <= set(steps) and max(steps) == 3
    assert "val/pass_at_2" in run.data.metrics
    assert (tmp_path / "exported" / "model.safetensors").exists()


# ---- the pieces, in one process -----------------------------------------------------------------------------
class _TwoRanks:
    """A stand-in strategy for rank 0 of 2: the other rank's values are scripted."""

    root_device = torch.device("cpu")

    def __init__(self, other: list[list[float]] | None = None, other_done: list[bool] | None = None) -> None:
        self.other, self.other_done = list(other or []), list(other_done or [])

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        theirs = torch.tensor(self.other.pop(0), dtype=tensor.dtype)
        return tensor + theirs if reduce_op == "sum" else torch.maximum(tensor, theirs)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision and self.other_done.pop(0)


def test_shard_is_disjoint_and_covering() -> None:
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == items


def test_prompt_stream_is_sharded_across_ranks_without_repeats(tmp_path: Path) -> None:
    """Each rank walks the same seeded shuffle and takes every other prompt: together they see each prompt once
    per epoch, and their stream state (saved by rank 0 in checkpoints) stays identical."""
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": str(i), "answer": "0"}) + "\n" for i in range(10)))
    single = DAPODataModule(train=PromptDataConfig(str(path)), seed=3)
    ranks = [DAPODataModule(train=PromptDataConfig(str(path)), seed=3) for _ in range(2)]
    for r, dm in enumerate(ranks):
        dm._dp = lambda r=r: DataParallel(r, 2, None)  # type: ignore[method-assign]
    from dapo_pl.datasets import load_prompts

    for dm in [single, *ranks]:
        dm._train = load_prompts(dm.train_cfg)
    whole = [p.prompt for p in single._next_prompts(4)] + [p.prompt for p in single._next_prompts(4)]
    mine = [[p.prompt for p in dm._next_prompts(2)] + [p.prompt for p in dm._next_prompts(2)] for dm in ranks]
    assert mine[0] == whole[0:4:2] + whole[4:8:2] and mine[1] == whole[1:4:2] + whole[5:8:2]
    assert ranks[0].stream_state() == ranks[1].stream_state() == single.stream_state()
    seen = [p.prompt for dm in ranks for p in dm._next_prompts(1)]  # 8 + 2 = one epoch of 10
    assert sorted(mine[0] + mine[1] + seen, key=int) == [str(i) for i in range(10)]


def test_fill_batch_keeps_generating_until_every_rank_is_full() -> None:
    """This rank is full after one generation batch, the other after three: both run three."""
    buffer: GroupBuffer[str] = GroupBuffer()
    calls: list[int] = []

    def generate() -> list[str]:
        calls.append(1)
        return [f"g{len(calls)}a", f"g{len(calls)}b"]

    others_full = iter([False, False, False, True])
    groups, stats = fill_batch(
        buffer, 2, generate, lambda gs: [True] * len(gs), max_num_gen_batches=5,
        all_done=lambda mine: next(others_full) and mine,  # one all-reduce per call, as on real ranks
    )  # fmt: skip
    assert groups == ["g1a", "g1b"] and stats.num_gen_batches == 3 and not stats.exhausted
    assert buffer.state() == ["g2a", "g2b", "g3a", "g3b"]  # surplus carried over


def test_fill_batch_exhaustion_is_one_decision_for_all_ranks() -> None:
    """The other rank stays short: this full rank reports exhaustion too, and raises with `raise`."""
    never = lambda mine: False  # noqa: E731
    groups, stats = fill_batch(GroupBuffer(), 1, lambda: ["a"], lambda gs: [True], max_num_gen_batches=2,
                               all_done=never)  # fmt: skip
    assert groups == ["a"] and stats.exhausted and stats.num_gen_batches == 2
    with pytest.raises(DynamicSamplingExhausted, match="another data-parallel rank did not"):
        fill_batch(GroupBuffer(), 1, lambda: ["a"], lambda gs: [True], max_num_gen_batches=2, all_done=never,
                   on_exhausted="raise")  # fmt: skip


def test_align_micro_batches_pads_the_short_rank() -> None:
    """Mine: 1 mini-batch of 2 micro-batches; the other rank: 2 mini-batches of 1 and 3. Agreed: [2, 3]."""
    mb = padding_micro_batch(0)
    dp = DataParallel(0, 2, _TwoRanks(other=[[2.0], [1.0, 3.0]]))
    aligned = align_micro_batches([[mb, mb]], dp, pad_id=0)
    assert [len(m) for m in aligned] == [2, 3]
    assert all(float(m.loss_mask.sum()) == 0 for m in aligned[1])
    nothing = align_micro_batches([], DataParallel(0, 2, _TwoRanks(other=[[0.0]])), pad_id=0)
    assert nothing == []


def test_padding_micro_batch_adds_zero_loss_but_touches_every_parameter() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dapo_pl.update import accumulate_gradients, score_old

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    mbs: list[MicroBatch] = [padding_micro_batch(0)]
    score_old(model, mbs, 1.0)
    totals = accumulate_gradients(model, mbs, temperature=1.0, algo=AlgorithmConfig(), num_tokens=torch.tensor(1.0),
                                  backward=torch.Tensor.backward)  # fmt: skip
    assert totals["loss"] == 0.0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.all(g == 0) for g in grads)  # every hook fired, nothing moved


def _gather_worker(rank: int, port: int, rows: list[list[int]], out: Any) -> None:
    import torch.distributed as dist

    from dapo_pl.evaluation import gather_prompt_rows

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    class _Gloo:  # the one method DataParallel uses of a Lightning strategy, on a real gloo group
        root_device = torch.device("cpu")

        def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if reduce_op == "sum" else dist.ReduceOp.MAX)
            return tensor

    mine = torch.tensor(rows, dtype=torch.long)[rank::2]  # the round-robin shard of the datamodule
    out[rank] = gather_prompt_rows(mine, DataParallel(rank, 2, _Gloo())).tolist()
    dist.destroy_process_group()


def test_validation_rows_gathered_over_two_gloo_ranks_equal_the_whole_matrix() -> None:
    """5 prompts on 2 real gloo ranks (3 + 2, round-robin): both get the whole [5, n] vote matrix back in the
    original order, so the metrics and their bootstrap intervals equal the 1-rank ones exactly."""
    import socket

    import torch.multiprocessing as mp

    from dapo_pl.evaluation import EvalStatsConfig, evaluation_metrics

    rows = [[0, 1], [-1, -1], [0, 0], [2, 0], [1, 1]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(_gather_worker, args=(port, rows, out), nprocs=2, start_method="fork")
    assert out[0] == out[1] == rows
    stats = EvalStatsConfig(k=(1, 2), bootstrap=200)
    whole = evaluation_metrics(torch.tensor(rows), stats)
    assert evaluation_metrics(torch.tensor(out[0]), stats) == whole


def test_batch_sizes_must_split_over_ranks() -> None:
    check_shardable(16, None, 2)
    with pytest.raises(ValueError, match=r"data.prompts_per_step=15 .* multiple of the 2 ranks"):
        check_shardable(15, None, 2)
    with pytest.raises(ValueError, match=r"gen_batch_prompts=9"):
        check_shardable(16, 9, 2)
    from dapo_pl.module import check_mini_batch

    with pytest.raises(ValueError, match=r"mini_batch_size=5 .* not a multiple of the 2"):
        check_mini_batch(20, 5, 2)


def test_full_parameter_buckets_cover_every_name_within_the_budget() -> None:
    """Buckets close as soon as they reach the budget; tied weights come under each of their names."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))  # weights: 64 bytes, biases: 16
    model[1].weight = model[0].weight
    buckets = list(full_parameter_buckets(model, bucket_bytes=64))
    assert [[n for n, _ in b] for b in buckets] == [["0.weight"], ["0.bias", "1.weight"], ["1.bias"]]
    assert (
        buckets[1][1][1] is not None and buckets[1][1][1].data_ptr() == model[0].weight.data_ptr()
    )  # no copy
