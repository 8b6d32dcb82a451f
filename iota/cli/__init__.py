"""The `iota` command: each subcommand reads its settings once and calls into the package."""

from __future__ import annotations

import argparse
import sys

from iota import __version__
from iota.cli import admin, roles, training
from iota.cli.logs import configure_logging
from iota.config.settings import SettingsError, log_level, unknown_variables


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="iota", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument("--version", action="version", version=f"iota {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    for group in (roles, training, admin):  # the order `iota --help` lists them in
        group.add_parsers(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Settings that cannot work end it with one line per problem on stderr and exit 2, as
    argparse does for a bad argument: an operator reads the variable to fix, not a traceback."""
    args = parser().parse_args(argv)
    configure_logging(log_level())
    for warning in unknown_variables():
        print(f"iota: {warning}", file=sys.stderr)
    try:
        return int(args.func(args))
    except SettingsError as error:
        for problem in error.problems:
            print(f"iota: error: {problem}", file=sys.stderr)
        return 2
