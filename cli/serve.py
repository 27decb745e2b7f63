"""``gramstyle serve``: load the model once and serve gramstyle.v1.StyleTransferService.

The flags, their environment variables, defaults, bounds and help all come from the settings
declared in :class:`gramstyle.server.config.ServeConfig`."""

from __future__ import annotations

import argparse

from gramstyle.cli.envflags import add_setting_flags, resolve
from gramstyle.cli.flags import EXIT_FAILURE, EXIT_OK, SERVER_EXTRA_INSTALL, CLIError
from gramstyle.server.config import ServeConfig, SettingError
from gramstyle.server.signals import Signals, StartupCancelled


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC server (gramstyle.v1.StyleTransferService)",
                       description="Load the model once and serve Stylize, ComputeLosses and "
                                   "GetServerInfo, plus grpc.health.v1 and reflection. Prints "
                                   "one 'ready' line; SIGTERM drains and exits 0. Every flag "
                                   "may also come from its GRAMSTYLE_* environment variable; "
                                   "the flag beats it.")
    add_setting_flags(p, ServeConfig.settings())
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the settings, then load the model and serve until SIGTERM. The signal handlers
    come first, so that a stop while torch imports or the model loads exits 0."""
    with Signals() as signals:
        try:
            return _serve(args, signals)
        except StartupCancelled:
            return EXIT_OK


def _serve(args: argparse.Namespace, signals: Signals) -> int:
    values, sources = resolve(args, ServeConfig.settings())  # flags, else GRAMSTYLE_* variables
    try:
        config = ServeConfig(**values)
    except SettingError as exc:
        setting = next(s for s in ServeConfig.settings() if s.name == exc.name)
        if sources[exc.name] == setting.flag:
            raise CLIError(f"{setting.flag}: {exc.problem}") from None
        raise CLIError(f"{setting.variable}: {exc.problem} (from the environment, for "
                       f"{setting.flag})") from None
    try:
        from gramstyle.server.serve import configure_logging
        from gramstyle.server.serve import run as serve
    except ImportError as exc:
        raise CLIError(f"serve needs the server extra ({SERVER_EXTRA_INSTALL}): {exc}",
                       EXIT_FAILURE) from exc
    configure_logging(config.log_level, config.log_format)
    try:
        return serve(config, signals)
    except OSError as exc:  # "port N is already in use", or the metrics port
        message = str(exc)
        raise CLIError(message if message.startswith("--") else f"--port: {message}",
                       EXIT_FAILURE) from None
