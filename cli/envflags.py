"""Flags that may also come from environment variables: ``--queue-size`` from
``GRAMSTYLE_QUEUE_SIZE`` and so on (``gramstyle serve``, configured the way container
platforms do it). A flag on the command line beats its variable; an empty variable counts as
unset.

How: :func:`add_env_variables` gives every optional flag of a parser an unset-marker
default and notes its variable in ``--help``; after parsing, :func:`apply_env` fills each
flag not given on the command line from its variable (converted and checked like the flag,
errors naming the variable) or else from the flag's own default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from gramstyle.cli.flags import CLIError

PREFIX = "GRAMSTYLE_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class _Unset:
    """The default of a flag whose value is decided after parsing (command line > variable >
    default)."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()
_DEFAULTS = "_env_defaults"


def env_name(flag: str, prefix: str = PREFIX) -> str:
    """``--queue-size`` -> ``GRAMSTYLE_QUEUE_SIZE``."""
    return prefix + flag.lstrip("-").replace("-", "_").upper()


def _long_flag(action: argparse.Action) -> str | None:
    flags = [s for s in action.option_strings if s.startswith("--")]
    return flags[0] if flags else None


def add_env_variables(parser: argparse.ArgumentParser, prefix: str = PREFIX) -> None:
    """Let each optional flag of ``parser`` (but --help) come from ``prefix + FLAG_NAME``;
    call after adding the flags, then :func:`apply_env` on the parsed namespace."""
    defaults: dict[str, tuple[str, object, argparse.Action]] = {}
    for action in parser._actions:  # argparse has no public list of a parser's actions
        flag = _long_flag(action)
        if flag is None or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        variable = env_name(flag, prefix)
        defaults[action.dest] = (variable, action.default, action)
        action.default = _UNSET
        if action.help is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} [env {variable}]".lstrip()
    parser.set_defaults(**{_DEFAULTS: defaults})


def _convert(action: argparse.Action, variable: str, text: str) -> object:
    """``text`` from ``variable`` converted and checked as the flag would be."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        word = text.strip().lower()
        if word not in _TRUE | _FALSE:
            raise CLIError(f"{variable}: expected 1/true/yes/on or 0/false/no/off, got {text!r}")
        return (word in _TRUE) == isinstance(action, argparse._StoreTrueAction)
    try:
        value = action.type(text) if action.type is not None else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise CLIError(f"{variable}: {exc} (from the environment, for {_long_flag(action)})"
                       ) from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise CLIError(f"{variable}: must be one of {choices}, got {text!r}")
    return value


def apply_env(args: argparse.Namespace, environ: Mapping[str, str] | None = None
              ) -> argparse.Namespace:
    """Fill the flags of ``args`` that the command line did not set: from their variable in
    ``environ`` (default ``os.environ``) when set and not empty, else their default. Raises
    CLIError naming the variable for a bad value."""
    environ = os.environ if environ is None else environ
    defaults: dict[str, tuple[str, object, argparse.Action]] = getattr(args, _DEFAULTS, {})
    for dest, (variable, default, action) in defaults.items():
        if getattr(args, dest, _UNSET) is not _UNSET:
            continue  # given on the command line
        text = environ.get(variable, "")
        value = _convert(action, variable, text) if text.strip() else default
        setattr(args, dest, value)
    if hasattr(args, _DEFAULTS):
        delattr(args, _DEFAULTS)
    return args


__all__ = ["PREFIX", "add_env_variables", "apply_env", "env_name"]
