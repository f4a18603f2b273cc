"""Errors the user can fix: bad configuration, data or model folder. The CLI prints them as one paragraph.

Every check of user input raises a :class:`DapoUserError` (or a subclass) whose message names the file, line and
key where known and says what to do. :func:`dapo_pl.cli.main` prints that message alone, without a traceback, and
exits with status 2; ``DAPO_PL_DEBUG=1`` shows the traceback as well. Any other exception is a bug (ours or a
plugin's) and keeps its traceback.

The classes also derive from the builtin a caller would expect (``ValueError``, ``FileNotFoundError``), so code
that catches those keeps working.
"""

from __future__ import annotations

import os

DEBUG_ENV = "DAPO_PL_DEBUG"
USER_ERROR_EXIT = 2


class DapoUserError(Exception):
    """A problem in what the user gave us (configuration, data, model folder), explained by its message."""


class ConfigError(DapoUserError, ValueError):
    """A configuration value that cannot work; the message names the key (``model.algorithm.eps_low``)."""


class MissingPathError(DapoUserError, FileNotFoundError):
    """A file or folder named in the configuration does not exist."""


class ModelError(DapoUserError, ValueError):
    """The model folder (config, tokenizer) cannot be used as it is: e.g. an EOS id outside the vocabulary."""


def debug_enabled() -> bool:
    """``DAPO_PL_DEBUG`` set to anything but empty, ``0`` or ``false``: show tracebacks of user errors too."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def user_error_paragraph(exc: BaseException) -> str:
    """The message of ``exc`` as one paragraph (no blank lines), prefixed ``error:``, with the debug hint."""
    lines = [line.rstrip() for line in str(exc).strip().splitlines() if line.strip()]
    text = "\n".join(lines) or type(exc).__name__
    return f"error: {text}\n(set {DEBUG_ENV}=1 to see the traceback)"
