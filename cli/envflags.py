"""Settings that may come from the command line or from environment variables:
``--queue-size`` or ``GRAMSTYLE_QUEUE_SIZE`` and so on (``gramstyle serve``, configured the way
container platforms do it). A flag on the command line beats its variable; an empty variable
counts as unset.

How: :func:`add_setting_flags` adds a flag for every declared
:class:`~gramstyle.server.config.Setting`, with an unset-marker default and its variable
named in ``--help``; after parsing, :func:`resolve` takes each setting from the command line,
else from its variable (converted and checked like the flag, errors naming the variable), else
its declared default, and says where each value came from.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gramstyle.cli.flags import CLIError
from gramstyle.server.config import Setting

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
#: Parsers whose own errors argparse words well ("invalid int value: 'x'").
_BUILTIN_PARSERS = (int, float, str, str.upper)


class _Unset:
    """The default of a flag whose value is decided after parsing (command line > variable >
    default)."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError message is shown as it is."""
    if parse in _BUILTIN_PARSERS:
        return parse

    def converted(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    converted.__name__ = getattr(parse, "__name__", "value")
    return converted


def help_text(setting: Setting) -> str:
    """A setting's ``--help`` line: its help, its default and its variable."""
    text = f"{setting.help} (default {setting.shown_default()}) [env {setting.variable}]"
    return text.replace("%", "%%")  # argparse formats help with %


def add_setting_flags(parser: argparse.ArgumentParser, settings: Sequence[Setting]) -> None:
    """A flag for every setting that has one, in sections by group; every flag defaults to an
    unset marker, for :func:`resolve`."""
    groups: dict[str, Any] = {}
    for setting in settings:
        if setting.flag is None:
            continue
        if setting.group not in groups:
            groups[setting.group] = parser.add_argument_group(setting.group)
        kwargs: dict[str, Any] = {"dest": setting.name, "default": _UNSET,
                                  "help": help_text(setting)}
        if setting.switch:
            kwargs["action"] = "store_true"
        else:
            if setting.parse is not None:
                kwargs["type"] = _argparse_type(setting.parse)
            if setting.choices is not None:
                kwargs["choices"] = setting.choices
            if setting.metavar is not None:
                kwargs["metavar"] = setting.metavar
        groups[setting.group].add_argument(setting.flag, **kwargs)


def _from_variable(setting: Setting, text: str) -> Any:
    """``text`` from the setting's variable, converted and checked as the flag would be."""
    variable = setting.variable
    if setting.switch:
        word = text.strip().lower()
        if word not in _TRUE | _FALSE:
            raise CLIError(f"{variable}: expected 1/true/yes/on or 0/false/no/off, got {text!r}")
        return word in _TRUE
    try:
        value = setting.parse(text) if setting.parse is not None else text
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{variable}: {exc} (from the environment, for {setting.flag})"
                       ) from None
    if setting.choices is not None and value not in setting.choices:
        raise CLIError(f"{variable}: must be one of {', '.join(setting.choices)}, got {text!r}")
    return value


def resolve(args: argparse.Namespace, settings: Sequence[Setting],
            environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Each setting's value and where it came from: ``(values, sources)``, keyed by setting
    name; a source is the flag (command line or default) or the variable (``environ``,
    default ``os.environ``, when set and not empty). Raises CLIError naming the variable for
    a bad value. Settings without a flag are left out (their default applies)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in settings:
        if setting.flag is None:
            continue
        given = getattr(args, setting.name, _UNSET)
        text = environ.get(setting.variable, "")
        if given is not _UNSET:
            values[setting.name], sources[setting.name] = given, setting.flag
        elif text.strip():
            values[setting.name] = _from_variable(setting, text)
            sources[setting.name] = setting.variable
        else:
            values[setting.name], sources[setting.name] = setting.default, setting.flag
    return values, sources


__all__ = ["add_setting_flags", "help_text", "resolve"]
