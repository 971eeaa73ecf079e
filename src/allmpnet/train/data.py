"""Training data: streamed .jsonl(.gz) datasets, the weighted batch sampler and its duplicate window.

A data config is a JSON list of {"name": path, "weight": int} entries (an optional "lines" count is accepted).
Each line of a data file is a JSON list of 2 or 3 texts, or {"texts": [...]}: (anchor, positive[, hard negative]).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from allmpnet.errors import AllmpnetError, InvalidInput


class DataError(AllmpnetError, ValueError):
    """Bad training data; the message names the file and line."""


@dataclass
class DatasetSpec:
    path: Path
    weight: int
    lines: int | None = None  # informational; the stream never needs it


@dataclass
class Batch:
    dataset: int  # index into the sampler's datasets
    columns: list[list[str]]  # [anchors, positives] or [anchors, positives, negatives], each batch_size long

    @property
    def size(self) -> int:
        return len(self.columns[0])


def load_data_config(path: str | os.PathLike) -> list[DatasetSpec]:
    """Read a data config; relative data paths are taken from the config file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data config {path} not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{path}: expected a non-empty JSON list of {{\"name\": path, \"weight\": int}} entries")
    specs = []
    for i, entry in enumerate(raw):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DataError(f"{where}: expected {{\"name\": path, \"weight\": int}}, got {entry!r}")
        weight = entry.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
            raise DataError(f"{where}: weight must be a positive integer, got {weight!r}")
        data_path = Path(entry["name"]).expanduser()
        data_path = data_path if data_path.is_absolute() else path.parent / data_path
        if not data_path.is_file():
            raise FileNotFoundError(f"{where}: data file {data_path} not found")
        specs.append(DatasetSpec(data_path, weight, entry.get("lines")))
    return specs


def parse_example(line: bytes, where: str) -> tuple[str, ...]:
    """One data line -> its texts; anything else raises DataError naming `where` (file:line)."""
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
    texts = value.get("texts") if isinstance(value, dict) else value
    if not isinstance(texts, list):
        raise DataError(f"{where}: expected a list of texts or {{\"texts\": [...]}}, got {type(value).__name__}")
    if len(texts) not in (2, 3):
        raise DataError(f"{where}: expected 2 texts (pair) or 3 (triplet), got {len(texts)}")
    for k, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{where}: text {k} is {type(text).__name__}, expected a string")
        if not text.strip():
            raise DataError(f"{where}: text {k} is empty")
    return tuple(texts)


@dataclass
class BadLines:
    count: int = 0
    first: list[str] = field(default_factory=list)  # a few messages, to show the user what was skipped

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(message)


class JsonlDataset:
    """An endless, shuffled stream of examples from one file, never loaded whole.

    Each pass re-reads the file through a shuffle buffer seeded by (seed, pass), so a file no larger than the buffer
    is fully reshuffled every pass. The position is (pass, examples served), which is all resume needs.
    """

    def __init__(self, spec: DatasetSpec, seed: int = 0, buffer_size: int = 10_000, skip_bad: bool = False):
        self.spec = spec
        self.seed = seed
        self.buffer_size = buffer_size
        self.skip_bad = skip_bad
        self.columns: int | None = None  # 2 or 3, fixed by the file's first good line
        self.bad = BadLines()
        self.pass_index = 0
        self.served = 0
        self._stream: Iterator[tuple[str, ...]] | None = None

    @property
    def name(self) -> str:
        return str(self.spec.path)

    def _lines(self) -> Iterator[tuple[str, ...]]:
        opener = gzip.open if self.spec.path.suffix == ".gz" else open
        with opener(self.spec.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines hold no data
                where = f"{self.spec.path}:{number}"
                try:
                    texts = parse_example(line, where)
                    if self.columns is None:
                        self.columns = len(texts)
                    elif len(texts) != self.columns:
                        raise DataError(f"{where}: wrong column count: {len(texts)} texts where the file's first "
                                        f"example has {self.columns} (pairs and triplets go in separate files)")
                except DataError as e:
                    if not self.skip_bad:
                        raise
                    if self.pass_index == 0:  # count each bad line once, not once per pass
                        self.bad.add(str(e))
                    continue
                yield texts

    def _pass(self, pass_index: int) -> Iterator[tuple[str, ...]]:
        rng = np.random.default_rng([self.seed, pass_index])
        buffer: list[tuple[str, ...]] = []
        for texts in self._lines():
            if len(buffer) < self.buffer_size:
                buffer.append(texts)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], texts = texts, buffer[j]
            yield texts
        for j in rng.permutation(len(buffer)):
            yield buffer[j]

    def __iter__(self) -> "JsonlDataset":
        return self

    def __next__(self) -> tuple[str, ...]:
        for _ in range(2):  # a pass that yields nothing right after another means the file has no good line
            if self._stream is None:
                self._stream = self._pass(self.pass_index)
            try:
                texts = next(self._stream)
                self.served += 1
                return texts
            except StopIteration:
                self._stream = None
                if self.served == 0:
                    break
                self.pass_index, self.served = self.pass_index + 1, 0
        raise DataError(f"{self.spec.path}: no usable example"
                        + (f" ({self.bad.count} bad lines skipped; first: {self.bad.first[0]})" if self.bad.count
                           else ""))

    def state_dict(self) -> dict:
        return {"pass_index": self.pass_index, "served": self.served, "columns": self.columns,
                "bad_count": self.bad.count, "bad_first": list(self.bad.first)}

    def load_state_dict(self, state: dict) -> None:
        """Re-stream the saved pass up to the saved position (deterministic: same seed, same shuffle)."""
        self.pass_index, self.served, self._stream = state["pass_index"], 0, None
        target = state["served"]
        self._stream = self._pass(self.pass_index)
        for _ in range(target):
            next(self._stream)
        self.served = target
        self.columns = state["columns"]
        self.bad = BadLines(state["bad_count"], list(state["bad_first"]))


def text_key(text: str) -> bytes:
    """A stable short key for the duplicate window (Python's hash() changes between processes)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


class BatchSampler:
    """Whole batches, each from one dataset drawn with probability proportional to its weight.

    A sample is skipped (and counted) when one of its texts appeared in this batch or in the previous
    `dedup_window - 1` batches: in-batch negatives would otherwise include false negatives. Every process of a
    distributed run builds the same global batch from the same seed and takes its own slice of it.
    """

    def __init__(self, datasets: list[JsonlDataset], batch_size: int, seed: int = 0, dedup_window: int = 3):
        if batch_size < 2:
            raise InvalidInput(f"batch_size must be at least 2 (in-batch negatives), got {batch_size}")
        if dedup_window < 1:
            raise InvalidInput(f"dedup_window counts batches and includes the current one: at least 1, "
                               f"got {dedup_window}")
        self.datasets = datasets
        self.batch_size = batch_size
        weights = np.array([d.spec.weight for d in datasets], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.rng = np.random.default_rng(seed)
        self.recent: deque[set[bytes]] = deque(maxlen=dedup_window - 1)
        self.skipped = Counter()  # dataset index -> samples skipped as duplicates

    def choose_dataset(self) -> int:
        return int(self.rng.choice(len(self.datasets), p=self.probabilities))

    def next_batch(self) -> Batch:
        index = self.choose_dataset()
        dataset = self.datasets[index]
        seen: set[bytes] = set()
        examples: list[tuple[str, ...]] = []
        skipped_here = 0
        while len(examples) < self.batch_size:
            texts = next(dataset)
            keys = [text_key(t) for t in texts]
            if any(k in seen or any(k in old for old in self.recent) for k in keys):
                skipped_here += 1
                self.skipped[index] += 1
                if skipped_here > 20 * self.batch_size + 10_000:
                    raise DataError(f"{dataset.name}: cannot fill a batch of {self.batch_size} examples without "
                                    f"repeating a text within {len(self.recent) + 1} batch(es); lower the batch "
                                    "size or the dedup window")
                continue
            seen.update(keys)
            examples.append(texts)
        if self.recent.maxlen:
            self.recent.append(seen)
        return Batch(index, [list(column) for column in zip(*examples)])

    @property
    def bad_lines(self) -> dict[str, int]:
        return {d.name: d.bad.count for d in self.datasets if d.bad.count}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "recent": [sorted(s) for s in self.recent],
                "skipped": dict(self.skipped), "datasets": [d.state_dict() for d in self.datasets]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["datasets"]) != len(self.datasets):
            raise InvalidInput(f"checkpoint has {len(state['datasets'])} datasets, the data config "
                               f"{len(self.datasets)}")
        self.rng.bit_generator.state = state["rng"]
        self.recent.clear()
        self.recent.extend(set(s) for s in state["recent"])
        self.skipped = Counter(state["skipped"])
        for dataset, saved in zip(self.datasets, state["datasets"]):
            dataset.load_state_dict(saved)


def build_sampler(data_config: str | os.PathLike, batch_size: int, seed: int = 0, dedup_window: int = 3,
                  buffer_size: int = 10_000, skip_bad: bool = False) -> BatchSampler:
    specs = load_data_config(data_config)
    datasets = [JsonlDataset(spec, seed=seed * 1000 + i, buffer_size=buffer_size, skip_bad=skip_bad)
                for i, spec in enumerate(specs)]
    return BatchSampler(datasets, batch_size, seed=seed, dedup_window=dedup_window)
