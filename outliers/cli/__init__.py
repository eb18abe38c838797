"""``outliers`` command line: a thin front end over the Python API.

One module per command (``models``, ``env``, ``eval``, ``scan``, ``ablate``, ``sinks``, ``superweights``,
``weights``, ``kvcache``, ``generate``, ``sensitivity``, ``range``, ``tokens``, ``trace``), each with
``register(subparsers)`` and ``run(args)``; a new command is a new module added to ``COMMANDS``. Another
package adds a command through the ``outliers.commands`` entry-point group (``PLUGINS``), whose entries name
such a ``register``: that is how ``outliers profile`` comes from ``studies`` without this package importing it.
Errors the toolkit raises on purpose (``OutliersError``) print one line, ``outliers: error: ...``, and exit 2,
like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from outliers.errors import OutliersError

__all__ = ["main", "dispatch", "build_parser", "COMMANDS", "PLUGINS", "plugin_commands"]

COMMANDS = (
    "models",
    "env",
    "eval",
    "scan",
    "ablate",
    "sinks",
    "superweights",
    "weights",
    "kvcache",
    "generate",
    "sensitivity",
    "range",
    "tokens",
    "trace",
)


PLUGINS = "outliers.commands"  # the entry-point group of commands other installed packages add


def plugin_commands() -> list:
    """The installed ``outliers.commands`` entry points, by name, leaving out any that shadows a built-in."""
    from importlib.metadata import entry_points

    return sorted((ep for ep in entry_points(group=PLUGINS) if ep.name not in COMMANDS), key=lambda ep: ep.name)


def build_parser() -> argparse.ArgumentParser:
    from outliers import __version__

    parser = argparse.ArgumentParser(prog="outliers", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"outliers {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"outliers.cli.{name}").register(sub)
    for ep in plugin_commands():
        try:
            register = ep.load()
        except ImportError as e:  # a plugin whose package is broken: the other commands still work
            print(f"outliers: note: command {ep.name!r} ({ep.value}) could not be loaded: {e}", file=sys.stderr)
            continue
        register(sub)
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Run the chosen subcommand; the toolkit's own errors become one line and exit code 2."""
    args = parser.parse_args(argv)
    try:
        from outliers.cli.common import apply_int8_gemm

        apply_int8_gemm(args)
        return args.func(args)
    except OutliersError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    from outliers.threads import configure_threads

    configure_threads()  # before torch loads: import outliers is lazy
    return dispatch(build_parser(), argv)
