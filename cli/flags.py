"""What the commands share: the option flags (generated from the StyleOptions declarations),
the network and remote flags, and the error type.

Option flags default to None, so that only the flags actually given count: in-process the
declaration's default applies, and with --server the server's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from gramstyle.errors import FieldError, GramstyleError
from gramstyle.images import load_image
from gramstyle.inputs import INPUTS, SKIP, check_order, inputs_of
from gramstyle.options import (
    ARCHS,
    DEFAULT_ARCH,
    DEFAULT_DEVICE,
    DEFAULT_POOLING,
    DEFAULT_WEIGHTS,
    DEVICES,
    MODEL_DEFAULTS,
    POOLINGS,
    TILE_CHOICES,
    OptionSpec,
    StyleOptions,
    flag_of,
    split_list,
)
from gramstyle.presets import PRESET_NAMES, preset_values

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

#: Field names whose CLI flag is not simply --field-with-dashes, beyond the options' own.
_EXTRA_FLAGS = {"progress_sheet": "--progress-sheet"}
_FLAGS = {name: flag_of(name, spec) for name, spec, _ in StyleOptions.specs()}
_FLAGS.update({entry.name: entry.flag for entry in INPUTS if entry.flag.startswith("-")})
#: The call each command makes (its image inputs are those of gramstyle.inputs for it).
COMMAND_RPC = {"stylize": "Stylize", "losses": "ComputeLosses"}


class CLIError(GramstyleError):
    """An error to print and exit with; ``code`` is the exit status. Its message names the
    flag (or environment variable) already."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def flag_for(field: str) -> str | None:
    """The CLI flag of an API field: ``content_weight`` -> ``--content-weight``,
    ``style_blend_weights`` -> ``--style-weights``, ``content[1]`` -> ``--content #2`` (the
    second --content); None for a field that is not one name (``content/style``)."""
    name, bracket, rest = field.partition("[")
    if not (name.isidentifier() and name.isascii() and name.islower()):
        return None
    flag = _FLAGS.get(name) or _EXTRA_FLAGS.get(name) or "--" + name.replace("_", "-")
    if not bracket:
        return flag
    index = rest.removesuffix("]")
    return f"{flag} #{int(index) + 1}" if rest.endswith("]") and index.isdigit() else None


def flag_message(error: BaseException) -> str:
    """The message of an error (or warning) for the command line: a FieldError's (or
    FieldWarning's) message names the flag of its ``.field`` instead of the field
    ("content[1]: file not found" -> "--content #2: file not found"); any other is as is."""
    field, problem = getattr(error, "field", None), getattr(error, "problem", None)
    flag = flag_for(field) if isinstance(field, str) and isinstance(problem, str) else None
    return f"{flag}: {problem}" if flag is not None else str(error)


# ---------------------------------------------------------------------------- value parsers

def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text.strip()!r} is not a number") from None


def finite_float(text: str) -> float:
    value = _number(text)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _float_list(text: str) -> tuple[float, ...]:
    values = []
    for part in split_list(text):
        value = _number(part)
        if math.isnan(value) or value < 0 or math.isinf(value):
            raise argparse.ArgumentTypeError(f"{part.strip()!r}: weights must be finite "
                                             f"and >= 0")
        values.append(value)
    return tuple(values)


def _tile(text: str) -> str | int:
    """A ``--tile`` value: auto, off or a side in pixels (its bounds are checked with the
    other options)."""
    if text.strip().lower() in TILE_CHOICES:
        return text.strip().lower()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, off or a side in "
                                         "pixels") from None


def _skippable_path(text: str) -> str | None:
    """A file of a skippable input (a per-style mask), or None for :data:`SKIP` ('-': this
    style has none); a file named '-' is given as './-'."""
    return None if text == SKIP else text


def _argparse_kwargs(spec: OptionSpec, default: Any) -> dict[str, Any]:
    """How argparse reads one option, from its declared kind."""
    shown = ",".join(default) if isinstance(default, tuple) else default
    help_text = spec.help + (f" (default {shown})" if default is not None else "")
    kwargs: dict[str, Any] = {"default": None, "help": help_text}
    if spec.metavar:
        kwargs["metavar"] = spec.metavar
    if spec.kind == "bool":
        return {**kwargs, "action": "store_true"}
    if spec.kind == "choice":
        return {**kwargs, "choices": spec.choices}
    if spec.kind == "tile":
        return {**kwargs, "type": _tile}
    parse = {"int": int, "float": finite_float if spec.low == 0 else _number,
             "layers": split_list, "layer_weights": _float_list,
             "blend_weights": _float_list}[spec.kind]
    return {**kwargs, "type": parse}


def add_option_flags(parser: argparse.ArgumentParser, scope: str,
                     skip_inputs: tuple[str, ...] = ()) -> None:
    """A flag for every option in ``scope`` ('losses' or 'stylize'), and one for every image
    input of the command's call (:mod:`gramstyle.inputs`: --content, --style, ...) except
    those in ``skip_inputs`` (and their blend weights: ``gramstyle batch`` takes its content
    images its own way)."""
    images = parser.add_argument_group("images")
    for entry in inputs_of(COMMAND_RPC[scope]):
        if entry.name in skip_inputs:
            continue
        if not entry.flag.startswith("-"):  # positional
            parser.add_argument(entry.name, metavar=entry.metavar, help=entry.help,
                                **({"nargs": "*"} if entry.repeated else {}))
        elif entry.repeated:
            images.add_argument(entry.flag, dest=entry.name, action="append", default=[],
                                metavar=entry.metavar, help=entry.help,
                                **({"type": _skippable_path} if entry.skippable else {}))
        else:
            images.add_argument(entry.flag, dest=entry.name, metavar=entry.metavar,
                                help=entry.help)
    groups = {"losses": parser.add_argument_group("losses")}
    groups["losses"].add_argument(
        "--preset", metavar="NAME",
        help=f"start from a named bundle of option values: {', '.join(PRESET_NAMES)} "
             "(docs/options.md, \"Presets\"); the options given here win over it")
    if scope == "stylize":
        groups["stylize"] = parser.add_argument_group("optimisation")
    for name, spec, default in StyleOptions.specs(scope):
        if spec.kind == "blend_weights" and spec.of in skip_inputs:
            continue
        group = images if spec.kind == "blend_weights" else groups[spec.scope]
        group.add_argument(flag_of(name, spec), dest=name, **_argparse_kwargs(spec, default))


def given_options(args: argparse.Namespace, scope: str) -> dict[str, Any]:
    """The options given on the command line (those left out are absent), over the values
    of ``--preset`` when one is given (:func:`gramstyle.presets.preset_values`)."""
    given = {name: getattr(args, name) for name, _, _ in StyleOptions.specs(scope)
             if getattr(args, name, None) is not None}
    return preset_values(getattr(args, "preset", None), given, scope)


def image_arguments(args: argparse.Namespace, scope: str) -> dict[str, Any]:
    """The image inputs of the command's call as given on the command line, by input name:
    the keyword arguments of the client's and the engine's call (paths; a list for a
    repeated input, a path or None for a single one)."""
    return {entry.name: getattr(args, entry.name) for entry in inputs_of(COMMAND_RPC[scope])}


def check_image_files(args: argparse.Namespace, scope: str) -> dict[str, list[tuple[int, int]]]:
    """Decode every image file given once (the candidate first), so a bad one fails before a
    model loads or a server is called, then check that a paired input (a per-style mask)
    has one file per file of its pair (or none); return each input's (width, height) sizes as
    decoded (None for a skipped entry, ``--style-mask -``). The paths (not the decoded
    images) are passed on afterwards, so that a server receives the original bytes."""
    sizes: dict[str, list[tuple[int, int] | None]] = {}
    for entry in check_order(COMMAND_RPC[scope]):
        given = getattr(args, entry.name)
        paths = given if entry.repeated else [] if given is None else [given]
        sizes[entry.name] = [None if path is None else
                             load_image(path, entry.error_field(i), max_pixels=None).size
                             for i, path in enumerate(paths)]
    for entry in check_order(COMMAND_RPC[scope]):
        given, pair = sizes[entry.name], sizes.get(entry.paired_with or "")
        if given and pair is not None and len(given) != len(pair):
            # A paired input (a per-style mask): one file per file of its pair, or none.
            skip = (f"; give '{SKIP}' for a {flag_for(entry.paired_with)} without one"
                    if entry.skippable else "")
            raise FieldError(entry.name, f"expected {len(pair)} file(s), one per "
                             f"{flag_for(entry.paired_with)}, in the same order; got "
                             f"{len(given)}{skip}", len(given))
    return sizes


# ---------------------------------------------------------------------------- network, remote

# The network flags' defaults (gramstyle.options.MODEL_DEFAULTS) are filled in after parsing
# (the parser's default is None) so that with --server only the flags actually given are
# sent: a server picks its own default model, and --pooling/--device are the server's choice.


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--arch, --weights, --pooling, --device: which network runs in-process, or which of a
    server's models with --server."""
    group = parser.add_argument_group("network")
    group.add_argument("--arch", choices=ARCHS,
                       help=f"feature extractor (default: {DEFAULT_ARCH}; with --server: the "
                            "server's default model)")
    group.add_argument("--weights",
                       help="imagenet (torchvision download cache), random (seeded RandomNet) "
                            "or a path to a VGG / VGG-features state_dict (default: "
                            f"{DEFAULT_WEIGHTS}); with --server: one of the weights the "
                            "server loaded")
    group.add_argument("--pooling", choices=POOLINGS,
                       help=f"{' or '.join(POOLINGS)} (default {DEFAULT_POOLING})")
    group.add_argument("--device", choices=DEVICES,
                       help=f"{', '.join(DEVICES)} (default {DEFAULT_DEVICE})")


def model_option(args: argparse.Namespace, name: str) -> str:
    """The value of a network flag, or its default."""
    return getattr(args, name, None) or MODEL_DEFAULTS[name]


#: The environment variable the CLI reads the bearer token from when --token is not given.
TOKEN_ENV = "GRAMSTYLE_TOKEN"

#: The flags that only mean something with --server (dest: flag).
_REMOTE_ONLY = {"timeout": "--timeout", "retries": "--retries", "tls": "--tls",
                "tls_ca": "--tls-ca", "tls_cert": "--tls-cert", "tls_key": "--tls-key",
                "tls_server_name": "--tls-server-name", "token": "--token"}


def add_remote_flags(parser: argparse.ArgumentParser) -> None:
    """--server, --timeout, --retries, the TLS flags and --token: run the command on a
    gramstyle server instead of in-process."""
    group = parser.add_argument_group("remote")
    group.add_argument("--server", metavar="HOST:PORT",
                       help="run on this gramstyle server (several: comma-separated, balanced "
                            "round_robin; or a gRPC target such as dns:///host:port)")
    group.add_argument("--timeout", type=finite_float, metavar="SECONDS",
                       help="deadline of the call with --server, all retries included "
                            "(default: none)")
    group.add_argument("--retries", type=int, metavar="N",
                       help="repeat a call that fails with UNAVAILABLE (a replica died or "
                            "drained) up to N times, from the start (default 2; 0: never)")
    tls = parser.add_argument_group("TLS and authentication (with --server)")
    tls.add_argument("--tls", action="store_true", default=None,
                     help="connect with TLS, trusting the system's root certificates")
    tls.add_argument("--tls-ca", metavar="FILE",
                     help="trust this CA certificate (PEM) instead; implies --tls")
    tls.add_argument("--tls-cert", metavar="FILE",
                     help="client certificate (PEM) for mutual TLS; needs --tls-key")
    tls.add_argument("--tls-key", metavar="FILE",
                     help="the client certificate's private key (PEM)")
    tls.add_argument("--tls-server-name", metavar="NAME",
                     help="check the server certificate against NAME instead of the host "
                          "in --server")
    tls.add_argument("--token", metavar="TOKEN",
                     help=f"bearer token sent with every call; prefer the {TOKEN_ENV} "
                          "environment variable, which stays out of shell history and ps "
                          "(the flag beats the variable)")


def connect(args: argparse.Namespace):
    """A Client for --server (use it in a ``with``); --pooling/--device are refused there.

    The token is --token, else $GRAMSTYLE_TOKEN (an empty variable counts as unset).
    Errors name the flag: ``--tls-ca: cannot read 'ca.pem': No such file or directory``.
    """
    import warnings

    from gramstyle.client.client import Client

    for name in ("pooling", "device"):
        if getattr(args, name, None) is not None:
            raise CLIError(f"--{name}: is chosen when the server starts (gramstyle serve "
                           f"--{name}); it cannot be set with --server")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    retries = 2 if args.retries is None else args.retries
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            client = Client(args.server, timeout=args.timeout, retries=retries,
                            tls=bool(args.tls), tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                            tls_key=args.tls_key, tls_server_name=args.tls_server_name,
                            token=token)
        except ValueError as exc:
            raise CLIError(_remote_message(exc, args)) from None
    for warning in caught:
        print(f"gramstyle: warning: {_remote_message(warning.message, args)}",
              file=sys.stderr)
    return client


def _remote_message(error: BaseException, args: argparse.Namespace) -> str:
    """A client error or warning about field "tls_ca" with the flag (or the variable) it
    came from."""
    if getattr(error, "field", None) == "token" and args.token is None:
        return f"{TOKEN_ENV}: {error.problem}"
    return flag_message(error)


def refuse_remote_flags(args: argparse.Namespace) -> None:
    """Without --server, the flags of a remote call are a mistake, not something to ignore."""
    for name, flag in _REMOTE_ONLY.items():
        if getattr(args, name, None) is not None:
            what = ("is the deadline of a call to --server" if name == "timeout"
                    else "applies to a call to --server")
            raise CLIError(f"{flag}: {what}; it does not apply in-process")


#: How a source checkout installs the server extra (torch, torchvision, ...): the README's
#: Run command. gramstyle is not on a package registry.
SERVER_EXTRA_INSTALL = ("pip install -r requirements-build.txt && pip install "
                        "--no-build-isolation '.[server]' in the source checkout")


def import_server_extra(module: str, what: str, alternative: str = ""):
    """Import ``module``, which needs the server extra (torch); a client-only install gets
    an error (exit 1) that says how to install the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CLIError(f"{what} needs the server extra ({SERVER_EXTRA_INSTALL}): "
                       f"{exc}{alternative}", EXIT_FAILURE) from exc


def load_engine(args: argparse.Namespace):
    """The in-process engine; the torch-based server extra is imported only here."""
    refuse_remote_flags(args)
    transfer = import_server_extra("gramstyle.engine.transfer", "running in-process",
                                   "; or pass --server HOST:PORT")
    return transfer.StyleTransfer(arch=model_option(args, "arch"),
                                  weights=model_option(args, "weights"),
                                  pooling=model_option(args, "pooling"),
                                  device=model_option(args, "device"))
