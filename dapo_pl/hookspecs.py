"""The one hookspec module of dapo-pl: what a verifier plugin may implement.

A plugin is any module or object with functions decorated by :data:`hookimpl`. It is found through the
``dapo_pl.verifiers`` entry-point group (built-ins included) or registered by hand with
``get_plugin_manager().register(obj)`` (tests do this). Every hook here is documented in
``docs/verifier-plugins.md``; a test fails if one is missing there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

#: pluggy project name and entry-point group (DESIGN.md, "Plugins").
PROJECT = "dapo_pl.verifiers"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_verifiers(register: Callable[..., None]) -> None:
    """Register the verifiers this plugin provides.

    Called once per plugin when the plugin manager starts (first use of verifiers in a process).
    Call ``register(name, factory, description=None)`` once per verifier:

    - ``name``: the name YAML configs and ``dapo-pl verify --verifier`` use; unique across plugins.
    - ``factory``: called with the verifier's options from YAML (keyword arguments) and returns a callable
      ``verifier(samples: Sequence[Sample]) -> Sequence[Verdict]`` that scores a whole batch at once,
      one :class:`~dapo_pl.verification.Verdict` per :class:`~dapo_pl.verification.Sample`, in order.
    - ``description``: one line for ``dapo-pl verifiers``; defaults to the factory docstring's first line.

    Returns nothing; the return value is ignored.
    """


def _hook_names() -> list[str]:
    """Names of every hook in this module (the plugin-guide test checks each is documented)."""
    return [name for name, obj in globals().items() if callable(obj) and hasattr(obj, f"{PROJECT}_spec")]


__all__: list[Any] = ["PROJECT", "hookimpl", "hookspec", "register_verifiers"]
