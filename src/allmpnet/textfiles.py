"""Reading user text files line by line: every line numbered, unreadable ones reported instead of raised."""
from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Iterator

from allmpnet.errors import InvalidInput

MAX_LINE_BYTES = 16 * 1024 * 1024  # a longer physical line is reported as bad, never read into memory whole


def raw_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, bytes without the newline), or None for a line over MAX_LINE_BYTES (skipped)."""
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if number == 1:  # a byte-order mark (Windows editors write one) is no part of the first row
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield number, None
                continue
            yield number, raw.rstrip(b"\n").removesuffix(b"\r")


def check_input_file(path: Path) -> None:
    """A clear error, naming the path, unless it is a readable file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file (.txt, .jsonl or .csv)")
    if not path.is_file():
        raise InvalidInput(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: permission denied (not readable)")


def decoded_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line, text, None) for readable lines, (line, None, why) for unreadable ones."""
    for number, raw in raw_lines(path):
        if raw is None:
            yield number, None, f"line longer than {MAX_LINE_BYTES} bytes"
            continue
        try:
            yield number, raw.decode("utf-8"), None
        except UnicodeDecodeError as e:
            yield number, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"


def bad_rows_error(path: Path, bad: list[tuple[int, str]]) -> ValueError:
    """One error naming the first few bad rows by line, and how to go on without them."""
    shown = "; ".join(f"line {n}: {why}" for n, why in bad[:5])
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    return InvalidInput(f"{path}: {len(bad)} bad row(s): {shown}{more}; pass --skip-bad to skip and count them")
