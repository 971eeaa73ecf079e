"""Reading texts from user files (plain text, JSONL, CSV) with bad rows reported by line number."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from allmpnet.errors import InvalidInput
from allmpnet.textfiles import bad_rows_error, check_input_file, decoded_lines


@dataclass
class TextRows:
    texts: list[str] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)  # 1-based source line of each text
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, why)


def read_texts(path: str | Path, field_name: str = "text", skip_bad: bool = False) -> TextRows:
    """Texts from .txt (one per line, empty lines kept), .jsonl (a string field) or .csv (a column).

    A bad row (not UTF-8, over 16 MB, not JSON, field missing or not a string) raises ValueError naming its line,
    unless skip_bad, in which case it is counted in `bad` and left out.
    """
    path = Path(path)
    check_input_file(path)
    rows = TextRows()
    suffix = path.suffix.lower()
    decoded: list[tuple[int, str]] = []
    for number, line, why in decoded_lines(path):
        if why is None:
            decoded.append((number, line))
        else:
            rows.bad.append((number, why))
    if suffix == ".csv":
        _read_csv(decoded, field_name, rows, path)
    else:
        for number, line in decoded:
            if suffix == ".jsonl":
                _read_json_line(number, line, field_name, rows)
            else:
                rows.texts.append(line)
                rows.line_numbers.append(number)
    if rows.bad and not skip_bad:
        rows.bad.sort()
        raise bad_rows_error(path, rows.bad)
    return rows


def _read_json_line(number: int, line: str, field_name: str, rows: TextRows) -> None:
    if not line.strip():
        rows.bad.append((number, "empty line"))
        return
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        rows.bad.append((number, f"not JSON ({e.msg})"))
        return
    value = record.get(field_name) if isinstance(record, dict) else None
    if not isinstance(value, str):
        rows.bad.append((number, f"field {field_name!r} missing or not a string"))
        return
    rows.texts.append(value)
    rows.line_numbers.append(number)


def _read_csv(decoded: list[tuple[int, str]], column: str, rows: TextRows, path: Path) -> None:
    if not decoded:
        return
    reader = csv.reader(line for _, line in decoded)
    header = next(reader)
    if column not in header:
        raise InvalidInput(f"{path}: no column {column!r} in the header {header}")
    index = header.index(column)
    # multi-line quoted cells make csv line numbers drift from file lines; track the reader's own count
    for record in reader:
        number = decoded[min(reader.line_num, len(decoded)) - 1][0]
        if len(record) != len(header):
            rows.bad.append((number, f"{len(record)} columns, header has {len(header)}"))
            continue
        rows.texts.append(record[index])
        rows.line_numbers.append(number)
