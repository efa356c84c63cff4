"""The errors that mean "the input was wrong", as opposed to a bug in moglstm.

The command line prints a :class:`UserError` as one line and exits with status 2; any
other exception is a bug (or a failure of the machine) and shows its traceback. Library
code raises a :class:`UserError` subclass for bad input it is given (a config key, a
file, a run folder, a corpus), never a bare ``ValueError``/``TypeError``, so the split
is made where the error is raised, not guessed where it is caught.

:class:`UserError` subclasses :class:`ValueError`, so callers' ``except ValueError``
keeps working; :class:`ConfigTypeError` is also a :class:`TypeError` (a value of the
wrong type in a config, as ``from_dict`` always reported it).
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "ConfigTypeError", "UserError"]


class UserError(ValueError):
    """Bad input from the user: a config value, a file, a run folder, a command's option."""


class ConfigError(UserError):
    """A config (preset, YAML file, dotted override, checkpoint's config) is invalid."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value has the wrong type (a list for an int, text for a bool)."""


class CheckpointError(UserError):
    """A file that is not a readable moglstm checkpoint (truncated, corrupt or foreign)."""
