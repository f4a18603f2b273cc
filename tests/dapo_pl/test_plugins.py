"""The plugin mechanism: entry-point discovery, DAPO_PL_PLUGINS, plugins registered in tests, misspelled hooks,
duplicate names, checked output, and the plugin guide (every hook documented, its example runs, the example
package installs with pip and is discovered)."""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pluggy
import pytest

from dapo_pl import hookspecs
from dapo_pl.hookspecs import hookimpl
from dapo_pl.verification import (
    PLUGINS_ENV,
    Sample,
    Verdict,
    VerifierError,
    available_verifiers,
    build_verifier,
    get_plugin_manager,
    reset_plugin_manager,
)

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "verifier-plugins.md"
BUILT_INS = {"exact_match", "overlong", "math_equivalence"}


@pytest.fixture()
def pm(monkeypatch: pytest.MonkeyPatch) -> Iterator[pluggy.PluginManager]:
    """A fresh plugin manager with every installed plugin; reset again afterwards."""
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    reset_plugin_manager()
    yield get_plugin_manager()
    reset_plugin_manager()


class _Plugin:
    """A plugin object registered by hand; its verifier returns whatever ``make`` builds."""

    def __init__(self, name: str, make: Any) -> None:
        self.name, self.make = name, make

    @hookimpl
    def register_verifiers(self, register: Any) -> None:
        register(self.name, lambda **_: self.make, "a test verifier")


def test_built_ins_come_through_the_entry_points(pm: pluggy.PluginManager) -> None:
    infos = available_verifiers(pm)
    assert BUILT_INS <= set(infos)
    for name in BUILT_INS:
        assert infos[name].plugin == f"{name} (dapo-pl)"
        assert infos[name].description
    assert pm.get_plugin("math_equivalence") is not None


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [("exact_match", {"exact_match"}), ("overlong, math_equivalence", {"overlong", "math_equivalence"}),
     ("dapo-pl", BUILT_INS), ("nothing_by_that_name", set()), ("", set())],
)  # fmt: skip
def test_dapo_pl_plugins_limits_loading(
    monkeypatch: pytest.MonkeyPatch, allowed: str, expected: set[str]
) -> None:
    monkeypatch.setenv(PLUGINS_ENV, allowed)
    reset_plugin_manager()
    try:
        assert set(available_verifiers()) & (BUILT_INS | {"answer_format"}) == expected
        if "math_equivalence" not in expected:
            with pytest.raises(VerifierError, match="unknown verifier 'math_equivalence'"):
                build_verifier("math_equivalence")
    finally:
        reset_plugin_manager()


def test_a_plugin_registered_in_a_test(pm: pluggy.PluginManager) -> None:
    def always_right(samples: Sequence[Sample]) -> list[Verdict]:
        return [Verdict(1.0, True, s.response, None) for s in samples]

    pm.register(_Plugin("always_right", always_right), name="test-plugin")
    info = available_verifiers(pm)["always_right"]
    assert (info.plugin, info.description) == ("test-plugin", "a test verifier")
    verdicts = build_verifier("always_right", pm=pm)([Sample("a", "b"), Sample("c", "d")])
    assert [v.extracted for v in verdicts] == ["a", "c"]


def test_a_misspelled_hook_fails_loudly(pm: pluggy.PluginManager) -> None:
    class Misspelled:
        @hookimpl
        def register_verifier(self, register: Any) -> None:  # missing "s"
            register("never", lambda **_: None)

    pm.register(Misspelled(), name="misspelled")
    with pytest.raises(pluggy.PluginValidationError, match="register_verifier"):
        pm.check_pending()
    with pytest.raises(pluggy.PluginValidationError):
        available_verifiers(pm)


def test_duplicate_names_name_both_plugins(pm: pluggy.PluginManager) -> None:
    pm.register(_Plugin("math_equivalence", None), name="impostor")
    with pytest.raises(VerifierError, match=r"registered twice.*math_equivalence \(dapo-pl\).*impostor"):
        available_verifiers(pm)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ([], "returned 0 verdicts for 1 samples"),
        (["not a verdict"], "returned str for sample 0"),
        ([Verdict(math.nan, True)], "non-finite"),
        ([Verdict(math.inf, True)], "non-finite"),
        ([Verdict(1.0, "yes")], "correct='yes'"),  # type: ignore[arg-type]
    ],
)
def test_bad_output_is_an_error_naming_the_plugin(
    pm: pluggy.PluginManager, output: list[Any], message: str
) -> None:
    pm.register(_Plugin("broken", lambda samples: output), name="broken-plugin")
    verifier = build_verifier("broken", pm=pm)
    with pytest.raises(VerifierError, match=re.escape(message)) as err:
        verifier([Sample("x", "y")])
    assert "verifier 'broken' (plugin broken-plugin)" in str(err.value)


def test_bad_options_name_the_verifier(pm: pluggy.PluginManager) -> None:
    with pytest.raises(
        VerifierError, match=r"bad options for verifier 'exact_match' \(exact_match \(dapo-pl\)\)"
    ):
        build_verifier("exact_match", {"no_such_option": 1}, pm=pm)


# ---------------------------------------------------------------- the plugin guide


def test_every_hook_is_documented_in_the_guide() -> None:
    guide = GUIDE.read_text()
    headings = [line for line in guide.splitlines() if line.startswith("#")]
    names = hookspecs._hook_names()
    assert names, "no hooks found in dapo_pl.hookspecs"
    for name in names:
        assert any(f"`{name}(" in h for h in headings), f"hook {name!r} has no section in {GUIDE.name}"
        assert f"def {name}(" in guide, f"hook {name!r} has no signature in {GUIDE.name}"


def _guide_example() -> str:
    text = GUIDE.read_text()
    section = text.split("## A complete plugin", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_guide_example_works(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    code = _guide_example()
    assert len(code.strip().splitlines()) <= 25  # "a 20-line example"
    path = tmp_path / "guide_example_plugin.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("guide_example_plugin", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pm.register(module, name="last_line")
    verifier = build_verifier("last_line", {"correct_reward": 2.0}, pm=pm)
    assert [v.reward for v in verifier([Sample("work\n42\n", "42"), Sample("41", "42")])] == [2.0, -1.0]


@pytest.mark.slow
def test_the_example_package_installs_with_pip_and_is_discovered(tmp_path: Path) -> None:
    source = tmp_path / "example_plugin"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(REPO / "tools" / "example_plugin", source, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, cwd=tmp_path)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    probe = (
        "from dapo_pl.verification import available_verifiers, build_verifier, Sample\n"
        "info = available_verifiers()['answer_format']\n"
        "print(info.plugin)\n"
        "print(build_verifier('answer_format')([Sample('x\\nAnswer: 1', '1')])[0].reward)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["answer_format", "(dapo-pl-answer-format)", "0.1"]
    tests = source / "tests"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tests)],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
