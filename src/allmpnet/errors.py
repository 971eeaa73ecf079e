"""The errors a user can cause, under one base class.

`AllmpnetError` is anything the user can fix: bad input or values, a damaged, missing or foreign file, missing
weights, a precision or device this machine cannot run. The CLI prints one as a single line and exits with 2.
Every other exception is an internal error: the CLI prints it as one line that says to run again with --debug, and
exits with 1. Each class also derives from the built-in exception Python code would expect (ValueError, TypeError,
FileNotFoundError), so `except ValueError` keeps working.
"""
from __future__ import annotations


class AllmpnetError(Exception):
    """An error the user can fix (see the module's docstring)."""


class InvalidInput(AllmpnetError, ValueError):
    """A value or input that allmpnet cannot take: a bad argument, an empty or malformed file, a wrong option."""


class InvalidInputType(AllmpnetError, TypeError):
    """An input of the wrong type (a text that is not a string, say)."""


class PrecisionUnavailable(AllmpnetError, ValueError):
    """A precision this machine cannot run (int8 on a GPU, a CPU without any of our kernels)."""


class NonFiniteOutputError(AllmpnetError, ValueError):
    """The model gave NaN or infinite values: damaged weights (or a precision overflow), never a silent result."""

    @classmethod
    def for_rows(cls, bad: list[int], total: int) -> "NonFiniteOutputError":
        """The error for a batch of `total` texts whose rows `bad` hold NaN or inf."""
        return cls(f"the model produced NaN or infinite values for {len(bad)} of {total} texts in a batch (batch rows "
                   f"{bad[:5]}{' …' if len(bad) > 5 else ''}): its weights are damaged or the precision overflows; "
                   "no vectors were returned")
