"""``scalekv`` command line: one subcommand per module in ``scalekv/commands/``, each with ``add_parser(sub)``."""

from __future__ import annotations

import argparse
import sys

from .commands import calibrate, demo, generate, plan, train
from .commands import eval as evaluate

COMMANDS = (generate, demo, plan, train, calibrate, evaluate)  # the order `scalekv --help` lists them in


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalekv",
        description="VAR and Infinity image generation with a compressed KV cache (ScaleKV and its baselines)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
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
