"""Command-line options that can also come from the environment (as TEI's and infinity-emb's do, for containers).

`env_option(parser, "--max-items", type=int, default=2048, help=…)` adds the option and wires it to
ALLMPNET_MAX_ITEMS (ALLMPNET_ + the option's dest, upper-cased). A flag on the command line wins over the
variable, the variable over the default. The help text ends with "[env: ALLMPNET_MAX_ITEMS]" (never the value:
it may be a key). An empty variable counts as unset. A boolean flag (`--no-truncate`) takes 1/true/yes/on or
0/false/no/off.

How: a variable that is set becomes the option's default, as a string. argparse converts a string default with
the option's `type` only when the option was not given on the command line (documented argparse behaviour), so
precedence comes for free. The string is an `EnvValue`, which lets the type converter tell it from a
command-line string: a bad value from the environment raises `BadEnvironmentValue` naming the variable, while a
bad flag keeps argparse's usual message. The value is read when the parser is built but checked when it parses,
so a malformed variable of one subcommand does not break the others.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from allmpnet.errors import AllmpnetError

ENV_PREFIX = "ALLMPNET_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class BadEnvironmentValue(AllmpnetError):
    """A malformed ALLMPNET_* variable. Deliberately not a ValueError: argparse turns those, raised by a type
    converter, into its own message (naming the flag, not the variable); this one passes through to the CLI's
    handler, which prints it as one line and exits with 2."""

    def __init__(self, message: str, prog: str = "allmpnet"):
        super().__init__(message)
        self.prog = prog


class EnvValue(str):
    """An option's value read from the environment (a str that remembers its variable)."""
    variable: str


def env_variable(action: argparse.Action) -> str:
    return ENV_PREFIX + action.dest.upper()


def env_help(text: str | None, variable: str) -> str:
    return f"{text} [env: {variable}]" if text else f"[env: {variable}]"


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: use {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}")


TYPE_WORDS = {"int": "an integer", "float": "a number"}


class _Converter:
    """An option's `type` that also checks values from the environment, and names their variable when they fail.
    Command-line values get exactly what the option's own type does."""

    def __init__(self, action: argparse.Action, convert: Callable[[str], Any] | None, prog: str):
        self.action, self.convert, self.prog = action, convert, prog
        # argparse's message for a bad command-line value names the type ("invalid int value: 'x'")
        self.__name__ = getattr(convert, "__name__", "value")

    def __call__(self, text: str) -> Any:
        if not isinstance(text, EnvValue):
            return text if self.convert is None else self.convert(text)
        try:
            value = str(text) if self.convert is None else self.convert(str(text))
        except argparse.ArgumentTypeError as e:
            raise BadEnvironmentValue(f"${text.variable}={str(text)!r}: {e}", self.prog) from None
        except (TypeError, ValueError):
            what = TYPE_WORDS.get(self.__name__, f"a valid {self.__name__}")
            raise BadEnvironmentValue(f"${text.variable}={str(text)!r}: not {what}", self.prog) from None
        choices = self.action.choices
        if choices is not None and value not in choices:  # argparse checks the choices of given values only
            raise BadEnvironmentValue(f"${text.variable}={str(text)!r}: choose from "
                                      f"{', '.join(map(str, choices))}", self.prog)
        return value


def env_option(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> argparse.Action:
    """parser.add_argument(*flags, **kwargs), also settable from ALLMPNET_<DEST> (see the module's docstring).
    Works for options that take one value and for store_true/store_false/store_const flags."""
    action = parser.add_argument(*flags, **kwargs)
    variable = env_variable(action)
    if action.help and "%(default)s" in action.help:
        # the help states the built-in default, not whatever the environment made it
        action.help = action.help.replace("%(default)s", str(action.default).replace("%", "%%"))
    action.help = env_help(action.help, variable)
    if action.nargs == 0:  # store_true, store_false, store_const: the variable turns the flag on or off
        on, off = action.const, action.default

        def flag(text: str) -> Any:
            return on if parse_bool(text) else off
        # argparse never calls a flag's type for the command line (a flag takes no value), only for this default
        action.type = _Converter(action, flag, parser.prog)
    else:
        action.type = _Converter(action, action.type, parser.prog)
    raw = os.environ.get(variable, "").strip()
    if raw:
        value = EnvValue(raw)
        value.variable = variable
        action.default = value
    return action
