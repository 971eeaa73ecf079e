"""evaluate_task: any task folder, any encoder -> one result dict; saving results and the comparison table."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType

from allmpnet.errors import InvalidInput
from allmpnet.evaluate import (classification, clustering, pair_classification, reranking, retrieval, sts,
                               summarization)
from allmpnet.evaluate.card import Comparison, card_metric, compare, markdown_table
from allmpnet.evaluate.data import Task, load_task

EVALUATORS: dict[str, ModuleType] = {
    "STS": sts, "Classification": classification, "Clustering": clustering, "Retrieval": retrieval,
    "Reranking": reranking, "PairClassification": pair_classification, "Summarization": summarization,
}
# used when a task.json names no main score (the card's metric names)
MAIN_SCORES = {"STS": "cos_sim_spearman", "Classification": "accuracy", "Clustering": "v_measure",
               "Retrieval": "ndcg_at_10", "Reranking": "map", "PairClassification": "cos_sim_ap",
               "Summarization": "cos_sim_spearman"}


def evaluate_task(task: Task | str | os.PathLike, encoder, batch_size: int = 32, show_progress_bar: bool = False,
                  data_root: str | os.PathLike | None = None, **options) -> dict:
    """Run one task's evaluator; `encoder` is anything with `.encode(texts, batch_size=..., show_progress_bar=...)`.

    Returns {"task", "type", "main_score", "scores", "seconds", ...}; scores are ×100 as on the model card.
    "precision" and "exact" say what the vectors were computed in (the encoder's precision plan, where it has
    one: exact is PrecisionPlan.exact, fp32 throughout); "subset" is the task.json's, where it names one.
    `options` go to the evaluator (e.g. corpus_chunk_size for Retrieval).
    """
    if not isinstance(task, Task):
        task = load_task(task, data_root)
    started = time.perf_counter()
    scores = EVALUATORS[task.type].run(task, encoder, batch_size=batch_size, show_progress_bar=show_progress_bar,
                                       **options)
    main = card_metric(task.main_score or MAIN_SCORES[task.type])
    if main not in scores:
        raise InvalidInput(f"{task.path / 'task.json'}: main_score {task.main_score!r} is not one of the "
                           f"{task.type} scores {sorted(scores)}")
    plan = getattr(encoder, "plan", None)  # a CachedEncoder passes its encoder's through
    subset = {"subset": task.params["subset"]} if task.params.get("subset") is not None else {}
    return {"task": task.name, **subset, "type": task.type, "split": task.params.get("eval_split", "test"),
            "main_score": main, "main_score_value": scores[main], "scores": scores,
            "model": str(getattr(encoder, "name", type(encoder).__name__)),
            "precision": getattr(encoder, "precision", None), "exact": getattr(plan, "exact", None),
            "protocol": "mteb 1.0", "seconds": round(time.perf_counter() - started, 1)}


def table_rows(results: list[dict], card: dict[str, dict[str, float]] | None) -> list[Comparison]:
    """Each task's main score beside the card; SummEval also in the legacy mean the card's number came from."""
    rows = []
    for result, row in zip(results, compare(results, card)):
        rows.append(row)
        legacy = result["scores"].get(f"{result['main_score']}_legacy")
        if legacy is not None:
            rows.append(Comparison(row.task, row.type, f"{row.metric} (legacy mean)", legacy, row.card,
                                   row.precision, row.exact))
    return rows


def save_results(results: list[dict], out_dir: str | os.PathLike, card: dict | None = None,
                 name: str = "table.md") -> Path:
    """One JSON per task (TASK.json) and a Markdown table of the main scores (against the card when given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for result in results:
        (out / f"{result['task']}.json").write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    table = out / name
    table.write_text(markdown_table(table_rows(results, card)))
    return table


def run_tasks(tasks: list[Task], encoder, model_name: str, out_dir: str | os.PathLike, card: dict | None = None,
              batch_size: int = 32, after_each=None) -> list[dict]:
    """Evaluate tasks in turn, saving results after each so an interrupted run keeps what it finished.

    `after_each(results)` runs after every save (the card-check script rewrites its own table there).
    """
    results = []
    for i, task in enumerate(tasks, start=1):
        print(f"[{i}/{len(tasks)}] {task.name} ({task.type})", file=sys.stderr, flush=True)
        result = evaluate_task(task, encoder, batch_size=batch_size, show_progress_bar=True)
        result["model"] = model_name
        results.append(result)
        print(f"  {result['main_score']} = {result['main_score_value']:.2f}  ({result['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
        save_results(results, out_dir, card)
        if after_each is not None:
            after_each(results)
    return results
