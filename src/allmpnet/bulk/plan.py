"""Finding the input files and cutting them into shards: fixed row ranges, so a re-run names the same shards.

Text formats (JSONL, CSV) are cut at record boundaries found by one streaming pass over the bytes; each shard
then carries its byte range and the line number it starts on, so a worker reads only its own bytes and still
reports bad rows by line. Parquet files are cut by row number from their footer alone.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from allmpnet.errors import InvalidInput

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
SCAN_CHUNK = 16 << 20
AUTO_SHARDS, AUTO_GRAIN, AUTO_MAX_ROWS = 64, 1_000, 10_000  # the default shard size: auto_shard_rows
NEWLINE, QUOTE = 10, 34


@dataclass(frozen=True)
class InputFile:
    uri: str  # absolute local path, or scheme://path for any filesystem pyarrow opens
    format: str
    size: int
    mtime_ns: int | None


@dataclass(frozen=True)
class ShardSpec:
    name: str
    uri: str
    format: str
    row_start: int  # records of the file (after a CSV header), 0-based, stop exclusive
    row_stop: int
    byte_start: int = 0  # text formats: the shard's bytes, whole records only
    byte_stop: int = 0
    first_line: int = 1  # text formats: 1-based line the first record starts on
    header: list[str] = field(default_factory=list)  # CSV column names

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start

    def to_dict(self) -> dict:
        return asdict(self)


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI such as s3://bucket/key."""
    from pyarrow import fs
    if "://" in uri and not uri.startswith("file://"):
        return fs.FileSystem.from_uri(uri)
    return fs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def _uri(original: str, path: str) -> str:
    """Turn a filesystem-relative path back into something filesystem() opens again."""
    if "://" in original and not original.startswith("file://"):
        return original.split("://", 1)[0] + "://" + path
    return path


def find_inputs(inputs: list[str]) -> list[InputFile]:
    """Files named directly, plus the supported files directly inside named directories, in a stable order."""
    from pyarrow import fs as pafs
    found: list[InputFile] = []
    for given in inputs:
        fs, path = filesystem(str(given))
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{given}: no such file or directory")
        if info.type == pafs.FileType.Directory:
            entries = sorted((e for e in fs.get_file_info(pafs.FileSelector(path))
                              if e.type == pafs.FileType.File and _format(e.path, strict=False)),
                             key=lambda e: e.path)
            if not entries:
                raise InvalidInput(f"{given}: no {', '.join(sorted(FORMATS))} files in this directory")
        else:
            entries = [info]
        for e in entries:
            found.append(InputFile(uri=_uri(str(given), e.path), format=_format(e.path), size=e.size,
                                   mtime_ns=e.mtime_ns))
    if len({f.uri for f in found}) != len(found):
        raise InvalidInput("an input file is named more than once")
    return found


def _format(path: str, strict: bool = True) -> str | None:
    name = path.lower()
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            return fmt
    if strict:
        hint = " (decompress it first)" if name.endswith((".gz", ".bz2", ".zst", ".xz")) else ""
        raise InvalidInput(f"{path}: unsupported input{hint}; expected one of {', '.join(sorted(FORMATS))}")
    return None


def auto_shard_rows(total_rows: int) -> int:
    """The default shard size: about AUTO_SHARDS shards, in whole AUTO_GRAIN rows, from AUTO_GRAIN to
    AUTO_MAX_ROWS. Shards are the unit handed to workers, so a corpus cut into only a few of them leaves
    workers idle at the end (16,000 rows in shards of 10,000: one worker had 10,000 rows, the other 6,000);
    it depends on the inputs alone, so a re-run cuts the same shards whatever the cluster."""
    per_shard = -(-total_rows // AUTO_SHARDS)
    return min(AUTO_MAX_ROWS, max(AUTO_GRAIN, -(-per_shard // AUTO_GRAIN) * AUTO_GRAIN))


def plan_shards(files: list[InputFile], shard_rows: int | None, id_field: str, text_field: str,
                keep: tuple[str, ...] = ()) -> list[ShardSpec]:
    """Every file cut into runs of shard_rows records (None: auto_shard_rows of the whole input); columns the
    job needs are checked here, once per file."""
    if shard_rows is not None and shard_rows < 1:
        raise InvalidInput(f"shard_rows must be at least 1, got {shard_rows}")
    # the default size depends on the total, known only after the one pass over the inputs: that pass cuts at
    # every AUTO_GRAIN rows, and the cuts are then merged into shards of the size chosen
    step = shard_rows or AUTO_GRAIN
    per_file = []
    for index, f in enumerate(files):
        if f.format == "parquet":
            per_file.append(_plan_parquet(index, f, step, id_field, text_field, keep))
        else:
            per_file.append(_plan_text(index, f, step, id_field, text_field, keep))
    if shard_rows is None:
        group = auto_shard_rows(sum(s.rows for specs in per_file for s in specs)) // AUTO_GRAIN
        per_file = [[_merged(index, specs[k:k + group]) for k in range(0, len(specs), group)]
                    for index, specs in enumerate(per_file)]
    return [s for specs in per_file for s in specs]


def _merged(index: int, run: list[ShardSpec]) -> ShardSpec:
    """One shard covering consecutive shards of one file."""
    first, last = run[0], run[-1]
    return ShardSpec(shard_name(index, first.row_start, last.row_stop), first.uri, first.format, first.row_start,
                     last.row_stop, byte_start=first.byte_start, byte_stop=last.byte_stop,
                     first_line=first.first_line, header=first.header)


def shard_name(file_index: int, row_start: int, row_stop: int) -> str:
    return f"shard-{file_index:05d}-{row_start:012d}-{row_stop:012d}.parquet"


def _plan_parquet(index: int, f: InputFile, shard_rows: int, id_field: str, text_field: str,
                  keep: tuple[str, ...]) -> list[ShardSpec]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    fs, path = filesystem(f.uri)
    with fs.open_input_file(path) as handle:
        meta = pq.ParquetFile(handle).metadata
        schema = meta.schema.to_arrow_schema()
    for column in (id_field, text_field, *keep):
        if column not in schema.names:
            raise InvalidInput(f"{f.uri}: no column {column!r} (columns: {schema.names})")
    id_type, text_type = schema.field(id_field).type, schema.field(text_field).type
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise InvalidInput(f"{f.uri}: id column {id_field!r} is {id_type}, expected integers or strings")
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise InvalidInput(f"{f.uri}: text column {text_field!r} is {text_type}, expected strings")
    return [ShardSpec(shard_name(index, start, min(start + shard_rows, meta.num_rows)), f.uri, f.format,
                      start, min(start + shard_rows, meta.num_rows), first_line=start + 1)
            for start in range(0, meta.num_rows, shard_rows)]


def record_ends(data: np.ndarray, quoted: bool, parity: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Positions of the newlines that end a record, their ordinals among all newlines, and the quote parity after.

    In CSV (quoted=True) a newline inside a quoted cell does not end the record: it does so only where an even
    number of quote characters came before it, which also holds for doubled quotes ("") inside a cell.
    """
    newlines = np.flatnonzero(data == NEWLINE)
    ordinals = np.arange(1, len(newlines) + 1)
    if not quoted:
        return newlines, ordinals, parity
    quotes = np.cumsum(data == QUOTE)
    closed = (quotes[newlines] + parity) % 2 == 0
    tail = int((parity + (quotes[-1] if len(quotes) else 0)) % 2)
    return newlines[closed], ordinals[closed], tail


def _plan_text(index: int, f: InputFile, shard_rows: int, id_field: str, text_field: str,
               keep: tuple[str, ...]) -> list[ShardSpec]:
    quoted = f.format == "csv"
    fs, path = filesystem(f.uri)
    cuts: list[tuple[int, int]] = []  # (byte just past a shard's last record, newlines up to there)
    data_start, data_lines = 0, 0  # where the records begin: after the CSV header
    records = 0  # record-ending newlines seen, the header included
    last_end = 0
    offset, newlines_before, parity = 0, 0, 0
    head = b""  # the first bytes, kept until the CSV header is complete
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(SCAN_CHUNK):
            if quoted and records == 0:
                head += chunk
                if len(head) > 4 * SCAN_CHUNK:
                    raise InvalidInput(f"{f.uri}: no end to the CSV header in its first {len(head) >> 20} MiB "
                                       "(an unclosed quote?)")
            arr = np.frombuffer(chunk, dtype=np.uint8)
            positions, ordinals, parity = record_ends(arr, quoted, parity)
            if len(positions):
                if quoted and records == 0:
                    data_start, data_lines = offset + int(positions[0]) + 1, newlines_before + int(ordinals[0])
                numbers = records + np.arange(1, len(positions) + 1) - (1 if quoted else 0)  # data records so far
                cut = (numbers > 0) & (numbers % shard_rows == 0)
                cuts += zip((offset + positions[cut] + 1).tolist(), (newlines_before + ordinals[cut]).tolist())
                records += len(positions)
                last_end = offset + int(positions[-1]) + 1
            newlines_before += int(np.count_nonzero(arr == NEWLINE))
            offset += len(chunk)
    header: list[str] = []
    if quoted:
        if offset == 0:
            raise InvalidInput(f"{f.uri}: empty CSV file (no header)")
        header = _csv_header(head[:data_start] if records else head, f.uri)
        for column in (id_field, text_field, *keep):
            if column not in header:
                raise InvalidInput(f"{f.uri}: no column {column!r} in the header {header}")
        if records:
            records -= 1
        else:
            data_start = offset  # a header with no newline after it: no records
    total = records + (1 if offset > max(last_end, data_start) else 0)  # a last record without its newline
    bounds = [(data_start, data_lines)] + cuts
    if len(cuts) * shard_rows < total:
        bounds.append((offset, -1))
    return [ShardSpec(shard_name(index, k * shard_rows, min((k + 1) * shard_rows, total)), f.uri, f.format,
                      k * shard_rows, min((k + 1) * shard_rows, total), byte_start=bounds[k][0],
                      byte_stop=bounds[k + 1][0], first_line=bounds[k][1] + 1, header=header)
            for k in range(len(bounds) - 1)]


def _csv_header(raw: bytes, uri: str) -> list[str]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{uri}: the CSV header is not valid UTF-8 ({e.reason})") from None
    header = next(csv.reader(io.StringIO(text, newline="")), [])
    if len(set(header)) != len(header):
        raise InvalidInput(f"{uri}: repeated column names in the header {header}")
    return header
