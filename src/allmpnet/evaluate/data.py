"""Evaluation tasks from local folders (the layout of ../shared/data/README.md), checked row by row.

Every problem in a dataset file raises DatasetError naming the file and the line, so a bad folder is
fixed in one look instead of surfacing as a crash deep inside a metric.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from allmpnet.errors import AllmpnetError

TASK_TYPES = ("STS", "Classification", "Clustering", "Retrieval", "Reranking", "PairClassification",
              "Summarization")


class DatasetError(AllmpnetError, ValueError):
    """A dataset folder or file that does not match the expected layout."""

    def __init__(self, path: Path | str, message: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path, self.line = Path(path), line


@dataclass
class Task:
    """One evaluation task: its task.json settings and the folder its files live in."""
    name: str
    type: str
    path: Path
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def main_score(self) -> str | None:
        return self.params.get("main_score")


def load_task(task_dir: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Task:
    """A task from its folder, or from `data_root/NAME` when given a bare task name."""
    path = Path(task_dir)
    if not path.is_dir() and data_root is not None and (Path(data_root) / str(task_dir)).is_dir():
        path = Path(data_root) / str(task_dir)
    if not path.is_dir():
        where = f" (looked in {data_root})" if data_root is not None else ""
        raise FileNotFoundError(f"no task folder {str(task_dir)!r}{where}")
    meta_path = path / "task.json"
    if not meta_path.is_file():
        raise DatasetError(meta_path, "missing: every task folder needs a task.json with at least its type")
    try:
        params = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(meta_path, f"not valid JSON ({e})", getattr(e, "lineno", None)) from None
    if not isinstance(params, dict) or params.get("type") not in TASK_TYPES:
        raise DatasetError(meta_path, f"'type' must be one of {', '.join(TASK_TYPES)}, got "
                           f"{params.get('type') if isinstance(params, dict) else params!r}")
    return Task(name=str(params.get("name", path.name)), type=params["type"], path=path, params=params)


# --- line readers -----------------------------------------------------------------------------------------

def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line; the newline that ends the file starts no extra line."""
    if not path.is_file():
        raise DatasetError(path, "missing file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DatasetError(path, f"not valid UTF-8 ({e.reason} at byte {e.start})", number) from None


Check = Callable[[Any], bool]
IS_STR: Check = lambda v: isinstance(v, str)  # noqa: E731
IS_STR_LIST: Check = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
IS_LABEL: Check = lambda v: isinstance(v, (str, int)) and not isinstance(v, bool)  # noqa: E731
IS_NUMBER: Check = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731


def read_jsonl(path: Path, fields: dict[str, tuple[Check, str]]) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line; each field in `fields` must pass its check."""
    records = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(path, f"not valid JSON ({e.msg})", number) from None
        if not isinstance(record, dict):
            raise DatasetError(path, f"expected a JSON object, got {type(record).__name__}", number)
        for name, (check, expected) in fields.items():
            if name not in record:
                raise DatasetError(path, f"missing field {name!r} (has {sorted(record)})", number)
            if not check(record[name]):
                raise DatasetError(path, f"field {name!r} must be {expected}, got {record[name]!r:.80}", number)
        records.append((number, record))
    if not records:
        raise DatasetError(path, "no rows")
    return records


def read_tsv(path: Path, header: list[str]) -> list[tuple[int, list[str]]]:
    """Rows of a tab-separated file whose first line is `header`; tab is the only separator, no quoting."""
    rows = []
    lines = _lines(path)
    first = next(lines, None)
    if first is None or first[1].split("\t") != header:
        got = first[1].split("\t") if first else "an empty file"
        raise DatasetError(path, f"expected header columns {header}, got {got}", 1)
    for number, line in lines:
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            raise DatasetError(path, f"expected {len(header)} tab-separated columns ({', '.join(header)}), "
                               f"got {len(cells)}", number)
        rows.append((number, cells))
    if not rows:
        raise DatasetError(path, "no rows after the header")
    return rows


def _number(path: Path, number: int, column: str, value: str, kind: type = float) -> float:
    try:
        return kind(value)
    except ValueError:
        raise DatasetError(path, f"column {column!r} must be a number, got {value!r}", number) from None


# --- per task type ------------------------------------------------------------------------------------------

@dataclass
class STSData:
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]


def read_sts(task: Task) -> STSData:
    path = task.path / "sts.tsv"
    rows = read_tsv(path, ["sentence1", "sentence2", "score"])
    return STSData([r[0] for _, r in rows], [r[1] for _, r in rows],
                   [_number(path, n, "score", r[2]) for n, r in rows])


@dataclass
class ClassificationData:
    train_texts: list[str]
    train_labels: list[str | int]
    test_texts: list[str]
    test_labels: list[str | int]


def read_classification(task: Task) -> ClassificationData:
    fields = {"text": (IS_STR, "a string"), "label": (IS_LABEL, "a string or an integer")}
    train_path = task.path / f"{task.params.get('train_split', 'train')}.jsonl"
    test_path = task.path / f"{task.params.get('eval_split', 'test')}.jsonl"
    train, test = read_jsonl(train_path, fields), read_jsonl(test_path, fields)
    known = {r["label"] for _, r in train}
    for number, record in test:
        if record["label"] not in known:
            raise DatasetError(test_path, f"label {record['label']!r} never occurs in {train_path.name}, so no "
                               "classifier trained there can predict it", number)
    return ClassificationData([r["text"] for _, r in train], [r["label"] for _, r in train],
                              [r["text"] for _, r in test], [r["label"] for _, r in test])


@dataclass
class ClusteringSet:
    sentences: list[str]
    labels: list[str | int]


def read_clustering(task: Task) -> list[ClusteringSet]:
    path = task.path / "sets.jsonl"
    sets = []
    for number, r in read_jsonl(path, {"sentences": (IS_STR_LIST, "a list of strings"),
                                       "labels": (lambda v: isinstance(v, list) and all(map(IS_LABEL, v)),
                                                  "a list of strings or integers")}):
        if len(r["sentences"]) != len(r["labels"]):
            raise DatasetError(path, f"{len(r['sentences'])} sentences but {len(r['labels'])} labels", number)
        if not r["sentences"]:
            raise DatasetError(path, "empty cluster set", number)
        sets.append(ClusteringSet(r["sentences"], r["labels"]))
    return sets


@dataclass
class RetrievalData:
    corpus: dict[str, dict[str, str]]   # doc id -> {"title", "text"}
    queries: dict[str, str]             # query id -> text
    qrels: dict[str, dict[str, int]]    # query id -> {doc id: relevance}


def read_retrieval(task: Task, queries_file: str = "queries.jsonl", qrels_file: str = "qrels.tsv") -> RetrievalData:
    corpus_path, queries_path, qrels_path = task.path / "corpus.jsonl", task.path / queries_file, task.path / qrels_file
    corpus: dict[str, dict[str, str]] = {}
    for number, r in read_jsonl(corpus_path, {"_id": (IS_LABEL, "a string"), "text": (IS_STR, "a string")}):
        doc_id = str(r["_id"])
        if doc_id in corpus:
            raise DatasetError(corpus_path, f"duplicate document id {doc_id!r}", number)
        title = r.get("title") or ""
        if not isinstance(title, str):
            raise DatasetError(corpus_path, f"field 'title' must be a string, got {title!r:.80}", number)
        corpus[doc_id] = {"title": title, "text": r["text"]}
    queries: dict[str, str] = {}
    for number, r in read_jsonl(queries_path, {"_id": (IS_LABEL, "a string"), "text": (IS_STR, "a string")}):
        if str(r["_id"]) in queries:
            raise DatasetError(queries_path, f"duplicate query id {r['_id']!r}", number)
        queries[str(r["_id"])] = r["text"]
    qrels: dict[str, dict[str, int]] = {}
    for number, (qid, did, score) in read_tsv(qrels_path, ["query-id", "corpus-id", "score"]):
        if qid not in queries:
            raise DatasetError(qrels_path, f"query id {qid!r} is not in {queries_path.name}", number)
        if did not in corpus:
            raise DatasetError(qrels_path, f"document id {did!r} is not in {corpus_path.name}", number)
        qrels.setdefault(qid, {})[did] = int(_number(qrels_path, number, "score", score, int))
    # the protocol evaluates the queries that have judgements; the others carry no signal
    return RetrievalData(corpus, {q: t for q, t in queries.items() if q in qrels}, qrels)


@dataclass
class RerankingSample:
    query: str | list[str]
    positive: list[str]
    negative: list[str]


def read_reranking(task: Task) -> list[RerankingSample]:
    path = task.path / "samples.jsonl"
    records = read_jsonl(path, {"query": (lambda v: IS_STR(v) or (IS_STR_LIST(v) and len(v) > 0),
                                          "a string or a non-empty list of strings"),
                                "positive": (IS_STR_LIST, "a list of strings"),
                                "negative": (IS_STR_LIST, "a list of strings")})
    return [RerankingSample(r["query"], r["positive"], r["negative"]) for _, r in records]


@dataclass
class PairData:
    sentences1: list[str]
    sentences2: list[str]
    labels: list[int]


def read_pairs(task: Task) -> PairData:
    records = read_jsonl(task.path / "pairs.jsonl",
                         {"sentence1": (IS_STR, "a string"), "sentence2": (IS_STR, "a string"),
                          "label": (lambda v: v in (0, 1) and not isinstance(v, float), "0 or 1")})
    return PairData([r["sentence1"] for _, r in records], [r["sentence2"] for _, r in records],
                    [int(r["label"]) for _, r in records])


@dataclass
class SummaryText:
    human_summaries: list[str]
    machine_summaries: list[str]
    relevance: list[float]


def read_summarization(task: Task) -> list[SummaryText]:
    path = task.path / "summeval.jsonl"
    texts = []
    for number, r in read_jsonl(path, {"human_summaries": (IS_STR_LIST, "a list of strings"),
                                       "machine_summaries": (IS_STR_LIST, "a list of strings"),
                                       "relevance": (lambda v: isinstance(v, list) and all(map(IS_NUMBER, v)),
                                                     "a list of numbers")}):
        if len(r["relevance"]) != len(r["machine_summaries"]):
            raise DatasetError(path, f"{len(r['machine_summaries'])} machine summaries but "
                               f"{len(r['relevance'])} relevance scores", number)
        if not r["human_summaries"] or not r["machine_summaries"]:
            raise DatasetError(path, "needs at least one human and one machine summary", number)
        texts.append(SummaryText(r["human_summaries"], r["machine_summaries"], [float(x) for x in r["relevance"]]))
    return texts


READERS = {"STS": read_sts, "Classification": read_classification, "Clustering": read_clustering,
           "Retrieval": read_retrieval, "Reranking": read_reranking, "PairClassification": read_pairs,
           "Summarization": read_summarization}


def read_task(task: Task):
    """The task's data, every row checked (a bad file raises DatasetError naming file and line)."""
    return READERS[task.type](task)
