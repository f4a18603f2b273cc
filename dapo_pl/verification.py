"""Verifier plugins: discovery, the data they exchange, and checked calls into them.

- :class:`Sample` is what a verifier sees of one response; :class:`Verdict` is what it returns.
- :func:`get_plugin_manager` loads every plugin of the ``dapo_pl.verifiers`` entry-point group (the built-ins
  in ``verifiers/`` come the same way), limited by ``DAPO_PL_PLUGINS`` when that variable is set.
- :func:`build_verifier` turns a name plus YAML options into a callable whose output is checked: a plugin
  that returns the wrong number of verdicts, a non-Verdict or a non-finite reward fails loudly, naming itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol

import pluggy

from dapo_pl import hookspecs
from dapo_pl.errors import DapoUserError

PLUGINS_ENV = "DAPO_PL_PLUGINS"


@dataclass(frozen=True)
class Sample:
    """One response to score.

    ``response_length`` is in tokens (0 when unknown, e.g. ``dapo-pl verify`` on text), ``max_response_length``
    the generation cap in tokens (None when unknown), ``truncated`` whether generation hit that cap without EOS.
    """

    response: str
    reference: str | None = None
    prompt: str = ""
    response_length: int = 0
    max_response_length: int | None = None
    truncated: bool = False
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """A verifier's judgement of one sample.

    ``reward`` is added into the training reward; ``correct`` is True/False for verifiers that judge
    correctness and None for pure shaping terms (e.g. overlong); ``extracted`` the answer found in the
    response (None if none); ``error`` a message when the sample could not be judged (then ``correct`` is False).
    """

    reward: float
    correct: bool | None = None
    extracted: str | None = None
    error: str | None = None


class Verifier(Protocol):
    """What a verifier factory returns: scores a batch, one verdict per sample, in order."""

    def __call__(self, samples: Sequence[Sample]) -> Sequence[Verdict]: ...


@dataclass(frozen=True)
class VerifierInfo:
    """A registered verifier: its name, the factory called with YAML options, and where it came from."""

    name: str
    factory: Callable[..., Verifier]
    description: str
    plugin: str


class VerifierError(DapoUserError, RuntimeError):
    """A verifier is unknown, misconfigured, or returned output that breaks the contract."""


class _Registry:
    def __init__(self) -> None:
        self.verifiers: dict[str, VerifierInfo] = {}

    def collect(self, pm: pluggy.PluginManager) -> None:
        # Call each implementation ourselves (not pm.hook) so every verifier is attributed to its plugin.
        for impl in pm.hook.register_verifiers.get_hookimpls():
            label = _plugin_label(pm, impl.plugin)

            def register(
                name: str, factory: Callable[..., Verifier], description: str | None = None, _p: str = label
            ) -> None:
                self.add(name, factory, description, _p)

            impl.function(register=register)

    def add(self, name: str, factory: Callable[..., Verifier], description: str | None, plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise VerifierError(f"plugin {plugin!r} registered a verifier with an invalid name {name!r}")
        if not callable(factory):
            raise VerifierError(f"plugin {plugin!r}: the factory of verifier {name!r} is not callable")
        if name in self.verifiers:
            other = self.verifiers[name].plugin
            raise VerifierError(
                f"verifier {name!r} is registered twice: by plugin {other!r} and by {plugin!r}"
            )
        if description is None:
            lines = (factory.__doc__ or "").strip().splitlines()
            description = lines[0] if lines else ""
        self.verifiers[name] = VerifierInfo(name, factory, description.strip(), plugin)


# plugin name -> distribution that provides it, for plugins loaded from entry points
_DISTRIBUTIONS: dict[str, str] = {}


def _plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    """``name (distribution)`` for entry-point plugins, ``name`` for plugins registered by hand."""
    name = pm.get_name(plugin) or repr(plugin)
    dist = _DISTRIBUTIONS.get(name)
    return f"{name} ({dist})" if dist else name


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get(PLUGINS_ENV)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Load the ``dapo_pl.verifiers`` entry points; with ``DAPO_PL_PLUGINS`` set, only those it names.

    A name in ``DAPO_PL_PLUGINS`` matches an entry-point name or the distribution that provides it.
    """
    allowed = _allowed_plugins()
    for ep in metadata.entry_points(group=hookspecs.PROJECT):
        dist = ep.dist.name if ep.dist is not None else ""
        if allowed is not None and ep.name not in allowed and dist not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must say which one it is
            raise VerifierError(
                f"could not load verifier plugin {ep.name!r} ({ep.value}) from {dist!r}: {exc}"
            ) from exc
        pm.register(plugin, name=ep.name)
        _DISTRIBUTIONS[ep.name] = dist


_PM: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with entry-point plugins loaded and hook names checked."""
    global _PM
    if _PM is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        _load_entry_points(pm)
        pm.check_pending()
        _PM = pm
    return _PM


def reset_plugin_manager() -> None:
    """Forget the loaded plugins (tests use this after changing ``DAPO_PL_PLUGINS``)."""
    global _PM
    _PM = None


def available_verifiers(pm: pluggy.PluginManager | None = None) -> dict[str, VerifierInfo]:
    """Every verifier registered by the loaded plugins, by name."""
    pm = pm or get_plugin_manager()
    pm.check_pending()
    registry = _Registry()
    registry.collect(pm)
    return registry.verifiers


def build_verifier(
    name: str, options: Mapping[str, Any] | None = None, pm: pluggy.PluginManager | None = None
) -> Verifier:
    """The verifier ``name`` configured with ``options``, wrapped so its output is checked on every call."""
    verifiers = available_verifiers(pm)
    if name not in verifiers:
        known = ", ".join(sorted(verifiers)) or "none"
        raise VerifierError(
            f"unknown verifier {name!r}; available: {known}. "
            f"(Is its plugin installed? {PLUGINS_ENV}={os.environ.get(PLUGINS_ENV)!r})"
        )
    info = verifiers[name]
    try:
        fn = info.factory(**dict(options or {}))
    except TypeError as exc:
        raise VerifierError(f"bad options for verifier {name!r} ({info.plugin}): {exc}") from exc
    return _CheckedVerifier(info, fn)


class _CheckedVerifier:
    def __init__(self, info: VerifierInfo, fn: Verifier) -> None:
        self.info = info
        self.fn = fn

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        verdicts = list(self.fn(samples))
        where = f"verifier {self.info.name!r} (plugin {self.info.plugin})"
        if len(verdicts) != len(samples):
            raise VerifierError(f"{where} returned {len(verdicts)} verdicts for {len(samples)} samples")
        for i, v in enumerate(verdicts):
            if not isinstance(v, Verdict):
                raise VerifierError(f"{where} returned {type(v).__name__} for sample {i}; expected Verdict")
            if not isinstance(v.reward, (int, float)) or not math.isfinite(v.reward):
                raise VerifierError(
                    f"{where} returned a non-finite or non-numeric reward {v.reward!r} for sample {i}"
                )
            if v.correct is not None and not isinstance(v.correct, bool):
                raise VerifierError(
                    f"{where} returned correct={v.correct!r} for sample {i}; expected bool or None"
                )
        return verdicts
