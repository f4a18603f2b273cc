"""Prompt datasets: local jsonl / parquet files, saved ``datasets`` folders, or ``datasets`` hub names.

Loading with presets and de-duplication is :func:`dapo_pl.datasets.load_prompts`, which builds on this module.
Each row becomes a :class:`PromptRecord` (prompt text after the template, reference answer). Field names may be
dotted paths into nested rows (DAPO-Math-17k keeps its answer in ``reward_model.ground_truth``). Bad rows fail
with the file and line (or row) that is wrong; nothing is silently skipped.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapo_pl.errors import DapoUserError, MissingPathError, ModelError

PRESET_NAMES = ("dapo-math-17k", "aime-2024", "math")  # implemented in dapo_pl.datasets.PRESETS


class DataError(DapoUserError, ValueError):
    """A dataset row or file that cannot be used, with where it is."""


@dataclass(frozen=True)
class PromptDataConfig:
    """Where prompts come from and how they become model input.

    Attributes:
        path: a ``.jsonl``/``.json`` or ``.parquet`` file, a folder written by ``datasets.save_to_disk``, or a
            name/folder for ``datasets.load_dataset`` (needs the ``datasets`` extra and, for hub names, network).
        prompt_field: field (dotted path allowed) holding the prompt: a string, or a list of chat messages
            (``[{"role": ..., "content": ...}]``), which the tokenizer's chat template renders.
        answer_field: field (dotted path allowed) holding the reference answer given to the verifiers.
        template: Python format string applied to string prompts; ``{prompt}`` is the prompt, and any other
            top-level field of the row can be named too.
        split: split for ``datasets`` sources.
        limit: use only the first ``limit`` rows (None: all); with ``dedupe``, the first ``limit`` distinct ones.
        preset: a known dataset layout (``dapo-math-17k``, ``aime-2024``, ``math``; see :mod:`dapo_pl.datasets`)
            that decides the fields (leave ``prompt_field``/``answer_field`` at their defaults) and de-duplication.
        dedupe: drop repeated (prompt, answer) rows, keeping the first, and report how many were removed
            (None: the preset's choice, else off).
    """

    path: str
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    template: str = "{prompt}"
    split: str = "train"
    limit: int | None = None
    preset: str | None = None
    dedupe: bool | None = None

    def __post_init__(self) -> None:
        # An unknown name fails when the config is built, not after model loading. The presets themselves live in
        # dapo_pl.datasets, which builds on this module (never the other way round).
        if self.preset is not None and self.preset not in PRESET_NAMES:
            raise ValueError(
                f"unknown dataset preset {self.preset!r}; choose one of {', '.join(PRESET_NAMES)}"
            )


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: ``prompt`` is a rendered string or a list of chat messages; ``where`` names its source row."""

    prompt: str | list[dict[str, str]]
    reference: str
    where: str


def _get(row: Mapping[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        yield from _iter_jsonl(path)  # many ".json" datasets are really JSON lines
        return
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows (or JSON lines), got {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):  # streamed: DAPO-Math-17k has 1.8M rows
        for row in batch.to_pylist():
            yield f"{path} row {i}", row
            i += 1


def _iter_datasets(source: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"{source!r} is not a .jsonl/.json/.parquet file; loading it needs the `datasets` package "
            "(pip install 'dapo-pl[datasets]')"
        ) from exc
    path = Path(source)
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(source, split=split)
    for i, row in enumerate(ds):
        yield f"{source}[{split}] row {i}", row


def iter_rows(path: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """``(where, row)`` pairs from any supported source; ``where`` is a file:line or row locator for errors."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in {".jsonl", ".json", ".parquet"} and not p.exists():
        raise DataError(f"dataset file not found: {path}")
    if suffix == ".jsonl":
        return _iter_jsonl(p)
    if suffix == ".json":
        return _iter_json(p)
    if suffix == ".parquet":
        return _iter_parquet(p)
    return _iter_datasets(path, split)


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _record(where: str, row: Any, cfg: PromptDataConfig) -> PromptRecord:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    fields = ", ".join(sorted(row)) or "none"
    for name in (cfg.prompt_field, cfg.answer_field):
        try:
            _get(row, name)
        except KeyError:
            raise DataError(f"{where}: no field {name!r} (the row has: {fields})") from None
    prompt, answer = _get(row, cfg.prompt_field), _get(row, cfg.answer_field)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise DataError(f"{where}: the answer field {cfg.answer_field!r} is empty")
    if isinstance(prompt, str):
        missing = _template_fields(cfg.template) - {"prompt"} - set(row)
        if missing:
            raise DataError(f"{where}: template {cfg.template!r} names missing field(s) {sorted(missing)}")
        prompt = cfg.template.format(**{**row, "prompt": prompt})
    elif not (isinstance(prompt, list) and all(isinstance(m, Mapping) and "content" in m for m in prompt)):
        raise DataError(
            f"{where}: field {cfg.prompt_field!r} must be a string or a list of chat messages "
            f"({{'role', 'content'}}), got {type(prompt).__name__}"
        )
    else:
        prompt = [dict(m) for m in prompt]
    return PromptRecord(prompt=prompt, reference=str(answer), where=where)


def render_prompt(record: PromptRecord, tokenizer: Any) -> list[int]:
    """Token ids of a prompt: chat messages through the tokenizer's chat template, strings as they are."""
    if isinstance(record.prompt, str):
        return list(tokenizer(record.prompt, add_special_tokens=False)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{record.where}: the prompt is a list of chat messages but the tokenizer has no chat template"
        )
    ids = tokenizer.apply_chat_template(record.prompt, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def check_model_source(name_or_path: str) -> str:
    """Fail early and clearly when a model that is meant to be a local folder is not there.

    Anything that looks like a path (relative with a ``/`` that exists nowhere, ``./``, ``/``, ``~``) must exist;
    other names are left to ``from_pretrained`` (hub ids such as ``Qwen/Qwen2.5-7B``).
    """
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if path.exists():
        return str(path)
    if looks_local:
        hint = ""
        if "quickstart" in name_or_path:
            hint = " (the quickstart builds it: python tools/make_quickstart.py --out artifacts/quickstart, or make quickstart)"
        raise MissingPathError(f"model folder {name_or_path!r} does not exist{hint}")
    return name_or_path


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def _text_config(name_or_path: str) -> Any:
    """The model's (text) config, or None when it cannot be read here (e.g. a hub name without network)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(name_or_path: str) -> int | None:
    """The model's context length from its config (what vLLM takes as ``max_model_len`` by default), or None."""
    config = _text_config(name_or_path)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_eos(tokenizer: Any, name_or_path: str) -> None:
    """The tokenizer's EOS id must be a token the model can emit, else no response could ever end.

    A ``tokenizer_config.json`` without ``eos_token`` makes transformers add a token of its own, whose id lies
    beyond the model's vocabulary: training would then run with every response truncated.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError(
            f"the tokenizer of {name_or_path!r} has no eos_token: responses could never end. Set eos_token in "
            "its tokenizer_config.json to the model's end-of-sequence token"
        )
    config = _text_config(name_or_path)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or 0 <= eos < vocab:
        return
    hint = ""
    model_eos = getattr(config, "eos_token_id", None)
    model_eos = model_eos[0] if isinstance(model_eos, list) and model_eos else model_eos
    if isinstance(model_eos, int) and 0 <= model_eos < vocab:
        hint = f" (the model's config.json says eos_token_id {model_eos}, token {tokenizer.convert_ids_to_tokens(model_eos)!r})"
    raise ModelError(
        f"the tokenizer of {name_or_path!r} gives the EOS token {tokenizer.eos_token!r} the id {eos}, outside the "
        f"model's vocabulary of {vocab} tokens: the model could never end a response and every response would "
        "be truncated. Usually tokenizer_config.json lacks an `eos_token` key and transformers invented one; set "
        f"`eos_token` there to the model's end-of-sequence token{hint}"
    )


def check_prompt_lengths(records: list[PromptRecord], tokenizer: Any, max_model_len: int, key: str) -> None:
    """Every prompt leaves room for a response within ``max_model_len`` tokens (checked before the engine
    starts; ``key`` is the config key of the limit, for the message)."""
    too_long = [(r, n) for r in records if (n := len(render_prompt(r, tokenizer))) >= max_model_len]
    if not too_long:
        return
    record, length = max(too_long, key=lambda item: item[1])
    raise DataError(
        f"{len(too_long)} of {len(records)} prompts leave no room for a response within max_model_len="
        f"{max_model_len} tokens (the longest, {record.where}, has {length} tokens). Raise {key} (up to the "
        "model's context length) or remove the long prompts"
    )
