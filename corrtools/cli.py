"""The ``corrtools`` command. Each subcommand lives in ``corrtools/commands/<name>.py`` and provides
``add_parser(subparsers)`` and ``run(args) -> int``; this module only dispatches and turns
``CorrtoolsError`` into a one-line message with exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from corrtools import __version__
from corrtools.errors import CorrtoolsError

# subcommand modules, in the order `corrtools --help` lists them
_COMMANDS = ("demo", "info", "delta", "rho", "experiment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corrtools",
        description="Record per-weight trajectories, measure their decorrelation time, train sparse.",
    )
    parser.add_argument("--version", action="version", version=f"corrtools {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        module = importlib.import_module(f"corrtools.commands.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CorrtoolsError as err:
        print(f"corrtools {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"corrtools {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
