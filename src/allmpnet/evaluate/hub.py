"""Fetching a task by its MTEB name from the Hugging Face hub into the local folder layout (optional).

Nothing else depends on this: the evaluators only read local folders. It needs the `datasets` package (the
`eval-hub` extra: pip install "allmpnet[eval-hub]") and a reachable hub; the fetched copy is written once under
~/.cache/allmpnet/mteb-data/NAME.
"""
from __future__ import annotations

import json
from pathlib import Path

from allmpnet.errors import AllmpnetError
from allmpnet.weights import cache_root

EXTRA = "eval-hub"  # the optional extra (pyproject.toml) that installs `datasets` for this module


class MissingExtraError(AllmpnetError, ImportError):
    """An optional package this route needs is not installed: the message names the extra that installs it."""

# MTEB name -> (hub dataset, task.json); the hub copies MTEB itself loads
HUB_TASKS = {
    "STSBenchmark": ("mteb/stsbenchmark-sts", {"type": "STS", "eval_split": "test", "score_range": [0, 5],
                                               "main_score": "cosine_spearman"}),
    "Banking77Classification": ("mteb/banking77", {"type": "Classification", "train_split": "train",
                                                   "eval_split": "test", "samples_per_label": 8,
                                                   "n_experiments": 10, "main_score": "accuracy"}),
    "EmotionClassification": ("mteb/emotion", {"type": "Classification", "train_split": "train",
                                               "eval_split": "test", "samples_per_label": 16, "n_experiments": 10,
                                               "main_score": "accuracy"}),
    "SciFact": ("mteb/scifact", {"type": "Retrieval", "eval_split": "test", "main_score": "ndcg_at_10"}),
    "SummEval": ("mteb/summeval", {"type": "Summarization", "eval_split": "test", "score_range": [0, 5],
                                   "main_score": "cosine_spearman"}),
}


def hub_data_dir() -> Path:
    return cache_root() / "mteb-data"


def fetch_task(name: str, root: Path | None = None) -> Path:
    """The local folder for an MTEB task, downloading and converting it on first use."""
    if name not in HUB_TASKS:
        raise FileNotFoundError(f"no local folder for {name!r}, and it is not one of the tasks fetchable by name "
                                f"({', '.join(HUB_TASKS)})")
    folder = (root or hub_data_dir()) / name
    if (folder / "task.json").is_file():
        return folder
    try:
        from datasets import load_dataset
    except ImportError:
        raise MissingExtraError(f"no local folder for {name!r}; loading it by name needs the `datasets` package, "
                                f"which the {EXTRA!r} extra installs (pip install \"allmpnet[{EXTRA}]\"), and a "
                                "reachable Hugging Face hub; or pass --data DIR with the task's folder") from None
    hub_id, meta = HUB_TASKS[name]
    folder.mkdir(parents=True, exist_ok=True)
    if meta["type"] == "STS":
        rows = load_dataset(hub_id, split="test")
        lines = ["sentence1\tsentence2\tscore"] + [f"{r['sentence1']}\t{r['sentence2']}\t{r['score']}" for r in rows]
        (folder / "sts.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif meta["type"] == "Classification":
        for split in ("train", "test"):
            rows = load_dataset(hub_id, split=split)
            _write_jsonl(folder / f"{split}.jsonl", ({"text": r["text"], "label": r.get("label_text", r["label"])}
                                                     for r in rows))
    elif meta["type"] == "Retrieval":
        _write_jsonl(folder / "corpus.jsonl", ({"_id": str(r["_id"]), "title": r.get("title", ""), "text": r["text"]}
                                               for r in load_dataset(hub_id, "corpus", split="corpus")))
        _write_jsonl(folder / "queries.jsonl", ({"_id": str(r["_id"]), "text": r["text"]}
                                                for r in load_dataset(hub_id, "queries", split="queries")))
        qrels = load_dataset(hub_id, "default", split="test")
        lines = ["query-id\tcorpus-id\tscore"] + [f"{r['query-id']}\t{r['corpus-id']}\t{int(r['score'])}"
                                                   for r in qrels]
        (folder / "qrels.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif meta["type"] == "Summarization":
        _write_jsonl(folder / "summeval.jsonl", ({k: r[k] for k in ("text", "human_summaries", "machine_summaries",
                                                                    "relevance")}
                                                 for r in load_dataset(hub_id, split="test")))
    (folder / "task.json").write_text(json.dumps({"name": name, **meta}, indent=1) + "\n")  # last: marks it complete
    return folder


def _write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
