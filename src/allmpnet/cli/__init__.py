"""The `allmpnet` command: a thin layer over the library. Each module here registers one group of subcommands."""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

# one entry per command module; each defines register(subparsers)
COMMAND_MODULES = ["allmpnet.cli.core", "allmpnet.cli.serve", "allmpnet.cli.search", "allmpnet.cli.bulk", "allmpnet.cli.evaluate", "allmpnet.cli.train", "allmpnet.cli.export", "allmpnet.cli.mining"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="allmpnet", description="all-mpnet-base-v2 sentence embeddings")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, TypeError, OSError) as e:  # user-facing problems: one clear line
        print(f"allmpnet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
