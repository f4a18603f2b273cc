"""Bad input through the real ``dapo-pl`` command: one paragraph, exit status 2, no traceback.

Each case runs ``python -m dapo_pl fit`` in a subprocess on the quickstart settings with one thing wrong (the
issue's list: config values, data files, model folder, plugin names, YAML syntax, tokenizer EOS, prompt lengths).
``DAPO_PL_DEBUG=1`` brings the traceback back, and an exception that is not ours keeps its traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HINT = "(set DAPO_PL_DEBUG=1 to see the traceback)"

pytestmark = pytest.mark.slow  # every case starts the real command (Lightning, transformers): seconds each


def _base(qs: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.model_name_or_path", str(qs / "model"),
        "--data.train.path", str(qs / "data" / "train.jsonl"), "--data.val.path", str(qs / "data" / "val.jsonl"),
        "--data.val.limit", "4", "--data.val_rollout.n", "2", "--trainer.max_steps", "1",
    ]  # fmt: skip


def _dapo_pl(
    cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if k != "DAPO_PL_DEBUG"}
    db = f"sqlite:///{cwd / 'runs.db'}"
    return subprocess.run(
        [sys.executable, "-m", "dapo_pl", *args],
        cwd=cwd,
        env={**inherited, "MLFLOW_TRACKING_URI": db, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _model_without_eos_key(qs: Path, tmp: Path) -> str:
    """The quickstart model with ``eos_token`` removed from tokenizer_config.json: transformers then invents an
    EOS token (id 259) beyond the model's 259-token vocabulary."""
    model = tmp / "model_without_eos"
    shutil.copytree(qs / "model", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return str(model)


Case = Callable[
    [Path, Path], tuple[list[str], list[str]]
]  # (quickstart, tmp) -> (extra args, expected texts)

CASES: dict[str, Case] = {
    "negative_eps": lambda qs, tmp: (
        ["--model.algorithm.eps_low", "-0.1"],
        ["model.algorithm.eps_low must be >= 0, got -0.1"],
    ),
    "mini_batch_not_dividing": lambda qs, tmp: (
        ["--model.algorithm.mini_batch_size", "7"],
        ["model.algorithm.mini_batch_size=7 does not divide the rollout batch of 128", "divisor of 128"],
    ),
    "missing_train_file": lambda qs, tmp: (
        ["--data.train.path", str(tmp / "nope.jsonl")],
        [f"dataset file not found: {tmp / 'nope.jsonl'}"],
    ),
    "broken_json_line": lambda qs, tmp: (
        [
            "--data.train.path",
            _write(tmp / "broken.jsonl", '{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n'),
        ],
        [f"{tmp / 'broken.jsonl'}:2: invalid JSON"],
    ),
    "row_missing_answer": lambda qs, tmp: (
        [
            "--data.train.path",
            _write(tmp / "noans.jsonl", '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n'),
        ],
        [f"{tmp / 'noans.jsonl'}:2: no field 'answer' (the row has: prompt)"],
    ),
    "empty_file": lambda qs, tmp: (
        ["--data.train.path", _write(tmp / "empty.jsonl", "")],
        [f"{tmp / 'empty.jsonl'}: no prompts found"],
    ),
    "missing_model_folder": lambda qs, tmp: (
        ["--model.model_name_or_path", str(tmp / "no_model")],
        [f"model folder '{tmp / 'no_model'}' does not exist"],
    ),
    "unknown_verifier": lambda qs, tmp: (
        ["--data.reward.correctness.name", "no_such_verifier"],
        ["unknown verifier 'no_such_verifier'; available: ", "exact_match"],
    ),
    "bad_verifier_options": lambda qs, tmp: (
        ["--data.reward.correctness.options", '{"bogus": 1}'],
        ["bad options for verifier 'exact_match' (exact_match (dapo-pl))", "bogus"],
    ),
    "unknown_engine": lambda qs, tmp: (
        ["--data.engine.name", "no_such_engine"],
        ["data.engine: unknown rollout engine 'no_such_engine'; choose one of transformers, vllm"],
    ),
    "max_new_tokens_0": lambda qs, tmp: (
        ["--data.rollout.max_new_tokens", "0"],
        ["data.rollout.max_new_tokens must be >= 1, got 0"],
    ),
    "prompts_per_step_0": lambda qs, tmp: (
        ["--data.prompts_per_step", "0"],
        ["data.prompts_per_step must be >= 1, got 0"],
    ),
    "yaml_syntax_error": lambda qs, tmp: (
        ["--config", _write(tmp / "typo.yaml", "trainer:\n  max_steps: 3\n   bad: [\n")],
        [f"{tmp / 'typo.yaml'}, line 3, column 7: YAML syntax error"],
    ),
    "eos_outside_vocabulary": lambda qs, tmp: (
        ["--model.model_name_or_path", _model_without_eos_key(qs, tmp)],
        [
            "gives the EOS token '<|endoftext|>' the id 259, outside the model's vocabulary of 259 tokens",
            "tokenizer_config.json lacks an `eos_token` key",
            "eos_token_id 1, token '<eos>'",
        ],
    ),  # fmt: skip
    "prompt_longer_than_vllm_max_model_len": lambda qs, tmp: (
        ["--data.engine.name", "vllm", "--data.engine.options", '{"max_model_len": 5}'],
        [
            "prompts leave no room for a response within max_model_len=5 tokens",
            "Raise data.engine.options.max_model_len",
        ],
    ),  # fmt: skip
}


def assert_one_paragraph(result: subprocess.CompletedProcess[str], expected: list[str]) -> None:
    """Exit 2, no traceback, and stderr ends with exactly one ``error:`` line (the message) and the hint."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.rstrip("\n").splitlines()
    assert lines[-1] == HINT and lines[-2].startswith("error: "), lines[-5:]
    assert [line for line in lines if line.startswith("error:")] == [lines[-2]]
    for text in expected:
        assert text in lines[-2]


def _run_case(name: str, qs: Path, tmp: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    extra, expected = CASES[name](qs, tmp)
    return _dapo_pl(tmp, "fit", *_base(qs), *extra), expected


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_paragraph_and_exit_2(name: str, quickstart_dir: Path, tmp_path: Path) -> None:
    result, expected = _run_case(name, quickstart_dir, tmp_path)
    assert_one_paragraph(result, expected)
    if name == "prompt_longer_than_vllm_max_model_len":  # measured with the tokenizer: no vLLM engine started
        assert "EngineCore" not in result.stderr and "vLLM" not in result.stderr


def test_debug_env_shows_the_traceback(quickstart_dir: Path, tmp_path: Path) -> None:
    result = _dapo_pl(
        tmp_path, "fit", *_base(quickstart_dir), "--data.prompts_per_step", "0", env={"DAPO_PL_DEBUG": "1"}
    )
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert "dapo_pl.errors.ConfigError: data.prompts_per_step must be >= 1, got 0" in result.stderr


def test_an_exception_that_is_not_ours_keeps_its_traceback(quickstart_dir: Path, tmp_path: Path) -> None:
    """Weights that are not a safetensors file: the library's own error, with its traceback, exit 1."""
    model = tmp_path / "model"
    shutil.copytree(quickstart_dir / "model", model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    result = _dapo_pl(tmp_path, "fit", *_base(quickstart_dir), "--model.model_name_or_path", str(model))
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert HINT not in result.stderr


def test_validate_without_a_checkpoint_says_which_weights_it_scores(
    quickstart_dir: Path, tmp_path: Path
) -> None:
    result = _dapo_pl(tmp_path, "validate", *_base(quickstart_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in result.stdout.splitlines() if line.startswith("[dapo-pl] validate:")]
    assert said == [
        f"[dapo-pl] validate: no --ckpt_path, scoring the weights in {quickstart_dir / 'model'} as they are"
    ]
