"""The `allmpnet` command: a thin layer over the library. Each module here registers one group of subcommands.

Errors a user can fix (allmpnet.errors.AllmpnetError: a missing or damaged file, a bad value, an unusable device or
precision; and the operating system's errors on the user's files) print one line naming the file and what is
wrong, and exit with 2; anything else is an internal error: one line that says to run again with --debug, exit 1.
`--debug`, before or after the command, adds the traceback. Options that can also come from the environment
(every `serve` option, and --precision everywhere) say so in their help (cli/environment.py); a malformed
variable is a one-line error naming it, exit 2.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from importlib import import_module

from allmpnet.cli.environment import BadEnvironmentValue
from allmpnet.errors import AllmpnetError

# one entry per command module; each defines register(subparsers)
COMMAND_MODULES = ["allmpnet.cli.core", "allmpnet.cli.serve", "allmpnet.cli.search", "allmpnet.cli.bulk", "allmpnet.cli.evaluate", "allmpnet.cli.train", "allmpnet.cli.export", "allmpnet.cli.mining"]
DEBUG_HELP = "on an error, print the traceback too"
USAGE_EXIT, INTERNAL_EXIT = 2, 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="allmpnet", description="all-mpnet-base-v2 sentence embeddings")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        import_module(name).register(subparsers)
    for sub in _all_subparsers(parser):  # `allmpnet encode … --debug` works as well as `allmpnet --debug encode …`
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _all_subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found += [sub, *_all_subparsers(sub)]
    return found


def is_user_error(error: BaseException) -> bool:
    """Errors about the user's input, files or machine: allmpnet's own (AllmpnetError), and the operating system's
    (a file that cannot be read or written). A plain ValueError or TypeError is a defect of ours, not the user's."""
    return isinstance(error, (AllmpnetError, OSError))


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except BadEnvironmentValue as e:  # a malformed ALLMPNET_* variable: one line naming it, as argparse's errors
        print(f"{e.prog}: error: {one_line(e)}", file=sys.stderr)
        return USAGE_EXIT
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        if is_user_error(e):
            print(f"allmpnet {args.command}: error: {one_line(e)}", file=sys.stderr)
            return USAGE_EXIT
        hint = "" if args.debug else " (run again with --debug for the traceback)"
        print(f"allmpnet {args.command}: internal error: {type(e).__name__}: {one_line(e)}{hint}", file=sys.stderr)
        return INTERNAL_EXIT


if __name__ == "__main__":
    sys.exit(main())
