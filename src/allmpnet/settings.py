"""Settings that apply across the library, read from the environment.

`ALLMPNET_PRECISION` is the one default precision of everything that embeds: `Encoder(...)`, `EncodePool`, the
bulk job's `BulkConfig`, the LangChain integration, every CLI subcommand with `--precision`, and the server.
An explicit argument or flag always wins; with the variable unset the default stays "fp32", the exact vectors
of sentence-transformers. Training does not follow it: its autocast precision is a training choice
(`allmpnet train --precision`), not a serving one.

The variable is read on each call (not at import), so a process that sets it before building its encoders,
and tests, get what they set. This module imports no torch: the bulk job's driver and `allmpnet --help` use it.
"""
from __future__ import annotations

import os
from typing import TypeVar

from allmpnet.errors import InvalidInput

P = TypeVar("P")

PRECISION_ENV = "ALLMPNET_PRECISION"
LIBRARY_PRECISION = "fp32"  # the default when the variable is unset: exact, as sentence-transformers


def default_precision() -> str:
    """The precision used where none is given: $ALLMPNET_PRECISION if set (and not empty), else "fp32".
    An unknown name raises InvalidInput naming the variable and the accepted values."""
    value = os.environ.get(PRECISION_ENV, "").strip()
    if not value:
        return LIBRARY_PRECISION
    # imported here, not above: encode.precision imports torch, which the unset case never needs
    from allmpnet.encode.precision import PRECISIONS
    accepted = ("auto", *PRECISIONS)
    if value.lower() not in accepted:
        raise InvalidInput(f"${PRECISION_ENV}={value!r} is not a precision: use one of {', '.join(accepted)} "
                           "(or unset it for fp32)")
    return value.lower()


def precision_or_default(precision: P | None) -> P | str:
    """`precision` when given (a name, or an encoder's PrecisionPlan), else default_precision()."""
    return precision if precision is not None else default_precision()
