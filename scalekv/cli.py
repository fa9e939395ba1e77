"""``scalekv`` command line. Each subcommand lives in ``scalekv/commands/<name>.py`` with ``add_parser``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["generate", "demo", "plan", "train", "calibrate", "eval"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalekv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"scalekv.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"scalekv.commands.{name}":
                continue  # not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"scalekv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
