"""The `iota` command: each subcommand reads its settings once and calls into the package."""

from __future__ import annotations

import argparse

from iota.cli import admin, roles, training


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="iota", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True)
    for group in (roles, training, admin):  # the order `iota --help` lists them in
        group.add_parsers(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))
