"""Reading a corpus to index: ids, texts and metadata from .txt, .jsonl or .csv, streamed, bad rows by line number.

Two passes over the file: `scan` checks every row (UTF-8, JSON, types, sizes, duplicate ids) before anything is
encoded, so a bad row stops the build at once or is skipped and counted; `iter_records` then streams the good rows.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from allmpnet.errors import InvalidInput
from allmpnet.textfiles import bad_rows_error, check_input_file, decoded_lines

FORMATS = (".txt", ".jsonl", ".csv")


@dataclass
class Record:
    line: int        # 1-based source line
    id: str
    text: str
    metadata: dict


@dataclass
class CorpusSpec:
    """How to read rows: which fields hold the id, the text (joined by a space) and the metadata."""
    text_fields: tuple[str, ...] = ("text",)
    id_field: str | None = None          # None: "id", else "_id" if the first record has it, else line numbers
    meta_fields: tuple[str, ...] | None = None  # None: every other field
    max_chars: int = 100_000


@dataclass
class ScanReport:
    path: Path
    rows: int = 0                                    # good rows
    bad: list[tuple[int, str]] = field(default_factory=list)
    blank: int = 0                                   # blank lines of a .txt file, skipped
    id_field: str | None = None                      # the id field used (None: line numbers)

    def summary(self) -> str:
        parts = [f"{self.rows} row(s)"]
        if self.bad:
            parts.append(f"{len(self.bad)} bad row(s) skipped (first: line {self.bad[0][0]}: {self.bad[0][1]})")
        if self.blank:
            parts.append(f"{self.blank} blank line(s) skipped")
        return ", ".join(parts)


def corpus_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return suffix if suffix in FORMATS else ".txt"


def scan(path: str | Path, spec: CorpusSpec = CorpusSpec(), existing_ids: set[str] | frozenset = frozenset(),
         skip_bad: bool = False) -> ScanReport:
    """Check every row; raise ValueError listing bad rows (unless skip_bad) or when no row is left."""
    path = Path(path)
    check_input_file(path)
    report = ScanReport(path)
    spec = _with_id_field(path, spec)
    report.id_field = spec.id_field
    seen: set[str] = set()
    for number, item in _parse(path, spec, report):
        if isinstance(item, str):
            report.bad.append((number, item))
        elif item.id in existing_ids:
            report.bad.append((number, f"id {item.id!r} is already in the index"))
        elif item.id in seen:
            report.bad.append((number, f"duplicate id {item.id!r}"))
        else:
            seen.add(item.id)
            report.rows += 1
    if report.bad and not skip_bad:
        raise bad_rows_error(path, report.bad)
    if report.rows == 0:
        raise InvalidInput(f"{path}: no rows to index ({report.summary()})")
    return report


def iter_records(path: str | Path, report: ScanReport, spec: CorpusSpec = CorpusSpec()) -> Iterator[Record]:
    """The good rows found by `scan`, streamed in file order."""
    path = Path(path)
    spec = CorpusSpec(spec.text_fields, report.id_field, spec.meta_fields, spec.max_chars)
    bad_lines = {n for n, _ in report.bad}
    for number, item in _parse(path, spec, ScanReport(path)):
        if number not in bad_lines and isinstance(item, Record):
            yield item


def _with_id_field(path: Path, spec: CorpusSpec) -> CorpusSpec:
    if spec.id_field is not None or corpus_format(path) == ".txt":
        return spec
    for number, item in _parse(path, CorpusSpec(spec.text_fields, "", spec.meta_fields, spec.max_chars),
                               ScanReport(path), peek=True):
        if isinstance(item, dict):  # the first parseable record decides; bad lines before it are skipped
            for candidate in ("id", "_id"):
                if candidate in item:
                    return CorpusSpec(spec.text_fields, candidate, spec.meta_fields, spec.max_chars)
        if not isinstance(item, str):
            break
    return spec


def _parse(path: Path, spec: CorpusSpec, report: ScanReport, peek: bool = False
           ) -> Iterator[tuple[int, Record | str | dict]]:
    """(line, Record) for good rows and (line, reason) for bad ones; peek yields the raw dict of the first record."""
    kind = corpus_format(path)
    if kind == ".csv":
        yield from _parse_csv(path, spec, peek)
        return
    for number, line, why in decoded_lines(path):
        if why is not None:
            yield number, why
        elif kind == ".txt":
            if not line.strip():
                report.blank += 1
                continue
            yield number, _check_text(Record(number, str(number), line, {}), spec)
        else:
            if not line.strip():
                yield number, "empty line"
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                yield number, f"not JSON ({e.msg})"
                continue
            if peek:
                yield number, value
                return
            yield number, _from_fields(number, value, spec)


def _parse_csv(path: Path, spec: CorpusSpec, peek: bool) -> Iterator[tuple[int, Record | str | dict]]:
    numbers: list[int] = []  # source line of each decoded line fed to the csv reader
    pending_bad: list[tuple[int, str]] = []

    def good_lines() -> Iterator[str]:
        for number, line, why in decoded_lines(path):
            if why is not None:
                pending_bad.append((number, why))
                continue
            numbers.append(number)
            yield line + "\n"  # keeps newlines inside quoted multi-line cells

    reader = csv.reader(good_lines())
    header = next(reader, None)
    if header is None:
        yield from pending_bad
        return
    for record in reader:
        yield from pending_bad
        pending_bad.clear()
        number = numbers[min(reader.line_num, len(numbers)) - 1]
        if len(record) != len(header):
            yield number, f"{len(record)} columns, header has {len(header)}"
            continue
        row = dict(zip(header, record))
        if peek:
            yield number, row
            return
        yield number, _from_fields(number, row, spec)
    yield from pending_bad


def _from_fields(number: int, value: object, spec: CorpusSpec) -> Record | str:
    if not isinstance(value, dict):
        return f"expected a JSON object, got {type(value).__name__}"
    parts = []
    for name in spec.text_fields:
        if name not in value:
            return f"field {name!r} missing"
        if not isinstance(value[name], str):
            return f"field {name!r} is {type(value[name]).__name__}, expected a string"
        parts.append(value[name])
    if spec.id_field:
        if spec.id_field not in value:
            return f"id field {spec.id_field!r} missing"
        raw_id = value[spec.id_field]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            return f"id field {spec.id_field!r} is {type(raw_id).__name__}, expected a string or integer"
        record_id = str(raw_id)
        if not record_id.strip():
            return "empty id"
    else:
        record_id = str(number)
    used = set(spec.text_fields) | {spec.id_field}
    names = spec.meta_fields if spec.meta_fields is not None else [k for k in value if k not in used]
    metadata = {k: value[k] for k in names if k in value}
    return _check_text(Record(number, record_id, " ".join(parts).strip(), metadata), spec)


def _check_text(record: Record, spec: CorpusSpec) -> Record | str:
    if not record.text.strip():
        return "empty text"
    if len(record.text) > spec.max_chars:
        return f"text of {len(record.text)} characters is over the limit of {spec.max_chars} (--max-chars)"
    return record
