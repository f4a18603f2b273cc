"""Verifier plugins: discovery, the data they exchange, and checked calls into them.

- :class:`Sample` is what a verifier sees of one response; :class:`Verdict` is what it returns.
- :func:`get_plugin_manager` loads every plugin of the ``dapo_pl.verifiers`` entry-point group (the built-ins
  in ``verifiers/`` come the same way), limited by ``DAPO_PL_PLUGINS`` when that variable is set.
- :func:`build_verifier` turns a name plus YAML options into a callable whose output is checked: a plugin
  that returns the wrong number of verdicts, a non-Verdict or a non-finite reward fails loudly, naming itself;
  every call has a time limit (:class:`CheckedVerifier`), and :meth:`CheckedVerifier.score` turns a failed batch
  into verdicts that count as wrong, with ``error`` naming the verifier and its plugin.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any, Protocol

import pluggy

from dapo_pl import hookspecs
from dapo_pl.errors import DapoUserError

PLUGINS_ENV = "DAPO_PL_PLUGINS"
DEFAULT_TIMEOUT_S = 300.0  # seconds per verifier call (one batch); data.reward.timeout_s


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
    name: str,
    options: Mapping[str, Any] | None = None,
    pm: pluggy.PluginManager | None = None,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> CheckedVerifier:
    """The verifier ``name`` configured with ``options``, wrapped so its output is checked on every call and
    each call takes at most ``timeout_s`` seconds (None: no limit)."""
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
    return CheckedVerifier(info, fn, timeout_s=timeout_s)


class VerifierTimeout(VerifierError):
    """A verifier did not return within its time limit (its thread is abandoned, see :class:`CheckedVerifier`)."""


class CheckedVerifier:
    """A verifier plugin behind the one call wrapper that training and ``dapo-pl verify`` share.

    - ``verifier(samples)`` (strict): the plugin's verdicts, checked against the contract; a plugin exception, a
      broken contract or a call longer than ``timeout_s`` raises :class:`VerifierError` naming verifier and plugin.
    - :meth:`score` (guarded): the same call, but a failure turns into one ``failed`` verdict per sample with
      ``error`` set to that message, so the responses of a hung or raising batch count as wrong and the caller
      goes on.

    The time limit: Python cannot kill a thread, so a call with a limit runs in a daemon worker thread and, past
    the limit, is abandoned (it keeps running until the plugin returns on its own, and it cannot keep the
    process alive at exit). At most one abandoned call per verifier: the next call first waits for it, within
    its own limit, and fails at once if it is still stuck, so a plugin that hangs for good costs one time limit
    per batch, never a pile of threads or two concurrent calls into one plugin. A verifier that can hang in C
    code or that must be killed belongs in worker processes (as ``math_equivalence`` does); this limit is the
    backstop for the rest.
    """

    def __init__(self, info: VerifierInfo, fn: Verifier, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise VerifierError(
                f"the time limit of verifier {info.name!r} must be > 0 (or null), got {timeout_s}"
            )
        self.info = info
        self.fn = fn
        self.timeout_s = timeout_s
        self._stuck: threading.Thread | None = None  # an abandoned call still running

    @property
    def where(self) -> str:
        return f"verifier {self.info.name!r} (plugin {self.info.plugin})"

    def __call__(self, samples: Sequence[Sample]) -> list[Verdict]:
        verdicts = self._run(samples)
        self._check(verdicts, len(samples))
        return verdicts

    def score(self, samples: Sequence[Sample], failed: Verdict) -> tuple[list[Verdict], str | None]:
        """One verdict per sample and the batch's error (None if it went through); never raises for the plugin:
        on any failure every sample gets ``failed`` with ``error`` set to the message naming the verifier."""
        try:
            return self(samples), None
        except Exception as exc:
            message = str(exc) if isinstance(exc, VerifierError) else f"{self.where} raised {exc!r}"
            return [replace(failed, error=message) for _ in samples], message

    def _run(self, samples: Sequence[Sample]) -> list[Verdict]:
        if self.timeout_s is None:
            return self._direct(samples)
        deadline = time.monotonic() + self.timeout_s
        if self._stuck is not None:
            self._stuck.join(self.timeout_s)
            if self._stuck.is_alive():
                raise VerifierTimeout(
                    f"{self.where} is still stuck in an earlier batch that timed out (limit {self.timeout_s:g} s)"
                )
            self._stuck = None
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["out"] = self._direct(samples)
            except BaseException as exc:  # handed to the caller's thread
                box["exc"] = exc

        worker = threading.Thread(target=target, name=f"verifier-{self.info.name}", daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            self._stuck = worker
            raise VerifierTimeout(
                f"{self.where} timed out after {self.timeout_s:g} s on a batch of {len(samples)} samples "
                "(data.reward.timeout_s)"
            )
        if "exc" in box:
            raise box["exc"]
        return list(box["out"])

    def _direct(self, samples: Sequence[Sample]) -> list[Verdict]:
        try:
            return list(self.fn(samples))
        except VerifierError:
            raise
        except Exception as exc:
            raise VerifierError(f"{self.where} raised {type(exc).__name__}: {exc}") from exc

    def _check(self, verdicts: list[Verdict], num_samples: int) -> None:
        where = self.where
        if len(verdicts) != num_samples:
            raise VerifierError(f"{where} returned {len(verdicts)} verdicts for {num_samples} samples")
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
