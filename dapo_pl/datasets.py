"""Named dataset layouts (presets) and de-duplication: DAPO-Math-17k, AIME 2024, MATH-style jsonl.

A preset says how a row of a known dataset becomes a :class:`~dapo_pl.data.PromptRecord`; the file itself is
read by :func:`dapo_pl.data.iter_rows` (jsonl, json, parquet, ``datasets`` folders). In YAML::

    data:
      train: {path: data/dapo-math-17k.parquet, preset: dapo-math-17k}   # deduplicated, count reported
      val: {path: data/aime-2024.parquet, preset: aime-2024}

- ``dapo-math-17k``: DAPO's training set in verl's layout: ``prompt`` is a list of chat messages (rendered by the
  tokenizer's chat template), the answer is ``reward_model.ground_truth``. The public release repeats each of its
  ~17.9k prompts 100 times (1,791,700 rows), so this preset deduplicates (``dedupe: false`` keeps the copies).
- ``aime-2024``: the 30 AIME 2024 problems, either in DAPO's release (verl layout, each problem repeated 32 times
  for avg@32 with one sample each; deduplicated here, K comes from ``val_rollout.n``) or as plain rows with
  ``problem``/``Problem`` and ``answer``/``Answer`` (e.g. the common ``AIME_2024`` jsonl), which are wrapped in
  :data:`DAPO_INSTRUCTION` so evaluation prompts ask for the answer the way the training prompts do.
- ``math``: MATH-style jsonl: ``problem`` and ``answer`` (MATH-500), or only ``solution`` (the original MATH),
  whose last ``\\boxed{...}`` is the answer; wrapped in :data:`DAPO_INSTRUCTION` like ``aime-2024``.

With a preset, ``prompt_field``/``answer_field`` must stay at their defaults (the preset decides the fields);
``template``, if set, replaces :data:`DAPO_INSTRUCTION` for problem/answer rows (``{prompt}`` is the problem).
De-duplication keeps the first copy of each (prompt, answer) pair; it applies before ``limit``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from dapo_pl.data import PRESET_NAMES, DataError, PromptDataConfig, PromptRecord, _record, iter_rows

# The instruction of DAPO-Math-17k's prompts, so that AIME / MATH prompts ask for the answer the same way.
DAPO_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{prompt}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)

RowToRecord = Callable[[str, Mapping[str, Any], PromptDataConfig], PromptRecord]


@dataclass(frozen=True)
class Preset:
    """A known dataset layout: how one row becomes a record, and whether copies are dropped by default."""

    name: str
    description: str
    to_record: RowToRecord
    dedupe: bool


@dataclass(frozen=True)
class LoadReport:
    """What loading read: rows read, prompts kept, duplicates removed (``deduped`` says whether it looked)."""

    path: str
    rows: int
    prompts: int
    duplicates: int
    deduped: bool

    def summary(self) -> str:
        share = f" ({self.duplicates / self.rows:.1%} of the rows)" if self.rows else ""
        return (
            f"[dapo-pl] {self.path}: {self.rows:,} rows read, {self.duplicates:,} duplicates removed{share}, "
            f"{self.prompts:,} prompts kept"
        )


# ---- row layouts ---------------------------------------------------------------------------------------------
def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) and "content" in m for m in value)


def _verl_row(where: str, row: Mapping[str, Any], cfg: PromptDataConfig) -> PromptRecord:
    """verl's layout (DAPO-Math-17k, DAPO's AIME 2024): chat messages in ``prompt``, ``reward_model.ground_truth``."""
    return _record(where, row, replace(cfg, prompt_field="prompt", answer_field="reward_model.ground_truth"))


def _first(row: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text`` with balanced braces, else None.

    ``last_boxed(r"so $\\boxed{\\frac{1}{2}}$.") == r"\\frac{1}{2}"``; an unclosed last box gives None.
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def _problem_row(
    where: str, row: Mapping[str, Any], cfg: PromptDataConfig, *, from_solution: bool
) -> PromptRecord:
    """A plain problem/answer row, wrapped as one user chat message (DAPO's instruction or ``cfg.template``)."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    if _is_chat(row.get("prompt")) and "reward_model" in row:
        return _verl_row(where, row, cfg)
    fields = ", ".join(sorted(row)) or "none"
    problem = _first(row, ("problem", "Problem", "question", "Question"))
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: no problem text (expected 'problem' or 'Problem'; the row has: {fields})")
    answer = _first(row, ("answer", "Answer"))
    if answer is None and from_solution:
        solution = _first(row, ("solution", "Solution"))
        answer = last_boxed(solution) if isinstance(solution, str) else None
        if answer is None:
            raise DataError(f"{where}: no 'answer' field and no \\boxed{{...}} answer in 'solution'")
    if answer is None or not str(answer).strip():
        raise DataError(f"{where}: no answer (expected 'answer' or 'Answer'; the row has: {fields})")
    template = DAPO_INSTRUCTION if cfg.template == "{prompt}" else cfg.template
    try:
        content = template.format(**{**row, "prompt": problem})
    except KeyError as exc:
        raise DataError(f"{where}: template {cfg.template!r} names a missing field {exc}") from None
    return PromptRecord(
        prompt=[{"role": "user", "content": content}], reference=str(answer).strip(), where=where
    )


def _aime_row(where: str, row: Mapping[str, Any], cfg: PromptDataConfig) -> PromptRecord:
    return _problem_row(where, row, cfg, from_solution=False)


def _math_row(where: str, row: Mapping[str, Any], cfg: PromptDataConfig) -> PromptRecord:
    return _problem_row(where, row, cfg, from_solution=True)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "dapo-math-17k",
            "DAPO-Math-17k parquet (verl layout: chat-message prompt, reward_model.ground_truth); deduplicated",
            _verl_row,
            dedupe=True,
        ),
        Preset(
            "aime-2024",
            "AIME 2024: DAPO's parquet (verl layout, repeated 32x) or problem/answer rows; deduplicated",
            _aime_row,
            dedupe=True,
        ),
        Preset(
            "math",
            "MATH-style jsonl: problem + answer, or problem + solution (last \\boxed{} is the answer)",
            _math_row,
            dedupe=False,
        ),
    )
}
if tuple(PRESETS) != PRESET_NAMES:  # data.PromptDataConfig checks names against PRESET_NAMES at build time
    raise ImportError(f"dapo_pl.data.PRESET_NAMES {PRESET_NAMES} must list the presets {tuple(PRESETS)}")


def get_preset(name: str) -> Preset:
    """The preset ``name``; an unknown name fails with the list of known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def _check_fields(cfg: PromptDataConfig) -> None:
    defaults = PromptDataConfig(path="")
    for name in ("prompt_field", "answer_field"):
        if getattr(cfg, name) != getattr(defaults, name):
            raise DataError(
                f"{cfg.path}: preset {cfg.preset!r} decides the row layout; remove {name}={getattr(cfg, name)!r} "
                "(or drop the preset and name the fields yourself)"
            )


# ---- loading -------------------------------------------------------------------------------------------------
def dedupe_key(record: PromptRecord) -> str:
    """Two records are copies when their prompt (text or messages) and reference answer are equal."""
    return json.dumps([record.prompt, record.reference], sort_keys=True, ensure_ascii=False)


def load_with_report(cfg: PromptDataConfig) -> tuple[list[PromptRecord], LoadReport]:
    """Every prompt of ``cfg`` (up to ``cfg.limit`` distinct ones when deduplicating) and what loading did."""
    to_record: RowToRecord = _record
    dedupe = bool(cfg.dedupe)
    if cfg.preset is not None:
        preset = get_preset(cfg.preset)
        _check_fields(cfg)
        to_record = preset.to_record
        dedupe = preset.dedupe if cfg.dedupe is None else cfg.dedupe
    records: list[PromptRecord] = []
    seen: set[str] = set()
    rows = 0
    for where, row in iter_rows(cfg.path, cfg.split):
        if cfg.limit is not None and len(records) >= cfg.limit:
            break
        rows += 1
        record = to_record(where, row, cfg)
        if dedupe:
            key = dedupe_key(record)
            if key in seen:
                continue
            seen.add(key)
        records.append(record)
    if not records:
        raise DataError(f"{cfg.path}: no prompts found")
    return records, LoadReport(cfg.path, rows, len(records), rows - len(records), dedupe)


__all__ = [
    "DAPO_INSTRUCTION",
    "PRESETS",
    "LoadReport",
    "Preset",
    "dedupe_key",
    "get_preset",
    "last_boxed",
    "load_with_report",
]


def load_prompts(cfg: PromptDataConfig) -> list[PromptRecord]:
    """Every prompt of ``cfg`` (up to ``cfg.limit``), validated; raises :class:`DataError` naming a bad row.

    Presets and de-duplication are applied (:func:`load_with_report`); the duplicates removed are reported.
    """
    records, report = load_with_report(cfg)
    if report.deduped:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(report.summary())
    return records
