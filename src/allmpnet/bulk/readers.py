"""Reading one shard's rows back from its input file, checking each row and naming the bad ones by location."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field

import numpy as np

from allmpnet.bulk.plan import NEWLINE, ShardSpec, filesystem, record_ends


@dataclass
class ShardRows:
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    meta: dict[str, list] = field(default_factory=dict)  # kept columns, one value per good row
    bad: list[tuple[str, str]] = field(default_factory=list)  # (location, why)


def read_shard(spec: ShardSpec, id_field: str, text_field: str, keep: tuple[str, ...] = ()) -> ShardRows:
    if spec.format == "parquet":
        return _read_parquet(spec, id_field, text_field, keep)
    rows = ShardRows(meta={k: [] for k in keep})
    fs, path = filesystem(spec.uri)
    with fs.open_input_file(path) as handle:
        handle.seek(spec.byte_start)
        data = handle.read(spec.byte_stop - spec.byte_start)
    parse = _parse_json if spec.format == "jsonl" else _csv_parser(spec.header)
    for line, raw in split_records(data, spec.format == "csv", spec.first_line):
        location = f"{spec.uri}:{line}"
        if line == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not part of the first record
        try:
            record = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.bad.append((location, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
            continue
        parsed = parse(record)
        if isinstance(parsed, str):
            rows.bad.append((location, parsed))
            continue
        why = _check_row(parsed, id_field, text_field)
        if why:
            rows.bad.append((location, why))
            continue
        _keep_row(rows, parsed, id_field, text_field, keep)
    if len(rows.ids) + len(rows.bad) != spec.rows:
        raise RuntimeError(f"{spec.uri}: expected {spec.rows} rows at bytes {spec.byte_start}-{spec.byte_stop}, "
                           f"found {len(rows.ids) + len(rows.bad)}; did the file change during the run?")
    return rows


def split_records(data: bytes, quoted: bool, first_line: int) -> list[tuple[int, bytes]]:
    """(1-based line the record starts on, its bytes without the line ending) for each record in data."""
    arr = np.frombuffer(data, dtype=np.uint8)
    ends, _, _ = record_ends(arr, quoted)
    newlines_before = np.cumsum(arr == NEWLINE)  # newlines up to and including each byte
    starts = [0] + (ends + 1).tolist()
    stops = ends.tolist() + [len(data)]
    out = []
    for start, stop in zip(starts, stops):
        if start >= len(data):
            break
        line = first_line + (int(newlines_before[start - 1]) if start else 0)
        out.append((line, data[start:stop].removesuffix(b"\r")))
    return out


def _parse_json(record: str) -> dict | str:
    if not record.strip():
        return "empty line"
    try:
        value = json.loads(record)
    except json.JSONDecodeError as e:
        return f"not JSON ({e.msg} at column {e.colno})"
    return value if isinstance(value, dict) else f"a JSON {type(value).__name__}, expected an object"


def _csv_parser(header: list[str]):
    def parse(record: str) -> dict | str:
        try:
            cells = next(csv.reader(io.StringIO(record, newline="")), [])
        except csv.Error as e:
            return f"bad CSV ({e})"
        if len(cells) != len(header):
            return f"{len(cells)} columns, header has {len(header)}"
        return dict(zip(header, cells))
    return parse


def _check_row(row: dict, id_field: str, text_field: str) -> str | None:
    ident = row.get(id_field)
    if ident is None or ident == "":
        return f"missing id {id_field!r}"
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        return f"id {id_field!r} is {type(ident).__name__}, expected a string or an integer"
    text = row.get(text_field)
    if text is None:
        return f"missing text {text_field!r}"
    if not isinstance(text, str):
        return f"text {text_field!r} is {type(text).__name__}, expected a string"
    return None


def _keep_row(rows: ShardRows, row: dict, id_field: str, text_field: str, keep: tuple[str, ...]) -> None:
    rows.ids.append(str(row[id_field]))
    rows.texts.append(row[text_field])
    for column in keep:
        value = row.get(column)
        # JSON values of any type become text, so every shard has the same column types
        rows.meta[column].append(value if value is None or isinstance(value, str) else json.dumps(value))


def _read_parquet(spec: ShardSpec, id_field: str, text_field: str, keep: tuple[str, ...]) -> ShardRows:
    import pyarrow.parquet as pq
    fs, path = filesystem(spec.uri)
    with fs.open_input_file(path) as handle:
        pf = pq.ParquetFile(handle)
        groups, first_row, row = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row < spec.row_stop and row + n > spec.row_start:
                groups.append(g)
                first_row = row if first_row is None else first_row
            row += n
        columns = list(dict.fromkeys((id_field, text_field, *keep)))
        table = pf.read_row_groups(groups, columns=columns).slice(spec.row_start - (first_row or 0), spec.rows)
    ids, texts = table.column(id_field).to_pylist(), table.column(text_field).to_pylist()
    rows = ShardRows(meta={k: [] for k in keep})
    good = []
    for i, (ident, text) in enumerate(zip(ids, texts)):
        why = _check_row({id_field: ident, text_field: text}, id_field, text_field)
        if why:
            rows.bad.append((f"{spec.uri} row {spec.row_start + i + 1}", why))
        else:
            good.append(i)
            rows.ids.append(str(ident))
            rows.texts.append(text)
    for column in keep:
        rows.meta[column] = table.column(column).take(good) if len(good) != len(ids) else table.column(column)
    return rows
