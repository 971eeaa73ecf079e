"""Reading a model card's `model-index` (its YAML front matter) and setting our scores beside it."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from allmpnet.errors import InvalidInput

# names the task.json files use (newer mteb) -> the names on the card (mteb 1.0)
METRIC_ALIASES = {"cosine_spearman": "cos_sim_spearman", "cosine_pearson": "cos_sim_pearson", "cosine_ap": "cos_sim_ap",
                  "cosine_accuracy": "cos_sim_accuracy", "cosine_f1": "cos_sim_f1"}


def card_metric(name: str) -> str:
    return METRIC_ALIASES.get(name, name)


def model_index_results(path: str | os.PathLike) -> list[dict]:
    """Every result of a model card's model-index, one dict each: task, type, subset, split, dataset, revision,
    metrics ({metric: value}). The task name is the card's without 'MTEB ' and its subset suffix."""
    import yaml

    path = Path(path)
    if path.is_dir():
        path = path / "README.md"
    text = path.read_text(encoding="utf-8")
    match = re.match(r"\A---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not match:
        raise InvalidInput(f"{path}: no YAML front matter (a model card starts with a '---' block)")
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as e:
        raise InvalidInput(f"{path}: front matter is not valid YAML ({e})") from None
    entries = []
    try:
        for model in meta.get("model-index") or []:
            for result in model.get("results") or []:
                dataset = result.get("dataset") or {}
                config = str(dataset.get("config") or "default")
                name = re.sub(r"^MTEB\s+", "", str(dataset.get("name", ""))).replace(f" ({config})", "")
                entries.append({"task": name, "type": (result.get("task") or {}).get("type"), "subset": config,
                                "split": dataset.get("split"), "dataset": dataset.get("type"),
                                "revision": dataset.get("revision"),
                                "metrics": {m["type"]: float(m["value"]) for m in result.get("metrics") or []
                                            if "type" in m}})
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # a hand-edited card: say where, not a traceback from deep inside the walk
        raise InvalidInput(f"{path}: model-index is not in the expected form ({type(e).__name__}: {e})") from None
    if not entries:
        raise InvalidInput(f"{path}: front matter has no model-index results")
    return entries


def scores_by_task(entries: list[dict]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}}; a subset other than the default or 'en' stays in the name, e.g. 'STS17 (en-en)'."""
    scores = {}
    for entry in entries:
        subset = entry.get("subset") or "default"
        name = entry["task"] if subset in ("default", "en") else f"{entry['task']} ({subset})"
        scores[name] = dict(entry["metrics"])
    return scores


def read_card(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """{task name: {metric: value}} from a model card's model-index; the 'MTEB ' prefix and '(en)' are dropped."""
    return scores_by_task(model_index_results(path))


# The published model's own README carries no model-index, so its card's scores ship with the package
# (benchmarks/card_scores.py wrote them from the card; tests check them against it).
BUILTIN_CARD_FILE = Path(__file__).with_name("card_scores.json")


def builtin_card() -> dict:
    """The packaged model-index of sentence-transformers/all-mpnet-base-v2: {"model", "source", "results"}."""
    return json.loads(BUILTIN_CARD_FILE.read_text(encoding="utf-8"))


def is_published_model(model_dir: str | os.PathLike) -> bool:
    """Whether a model directory holds the published all-mpnet-base-v2 weights (by their SHA-256)."""
    from allmpnet.evaluate.cache import weights_sha256
    from allmpnet.weights import ALL_MPNET, WEIGHTS

    weights = Path(model_dir) / WEIGHTS
    if not weights.is_file() or weights.stat().st_size != ALL_MPNET.size:
        return False
    return weights_sha256(Path(model_dir)) == ALL_MPNET.sha256


def card_for_model(model_dir: str | os.PathLike) -> tuple[dict[str, dict[str, float]] | None, str]:
    """The scores to compare a model with, and where they come from (or why there are none).

    A model directory's own README model-index wins; without one, the published weights get the built-in
    card scores; any other model has nothing to compare with.
    """
    readme = Path(model_dir) / "README.md"
    own_problem = f"{readme} does not exist"
    if readme.is_file():
        try:
            return read_card(readme), f"the model-index in {readme}"
        except ValueError as e:
            own_problem = str(e)
    if is_published_model(model_dir):
        return scores_by_task(builtin_card()["results"]), \
            "the model card of sentence-transformers/all-mpnet-base-v2 (built in)"
    return None, f"{own_problem}, and these are not the published all-mpnet-base-v2 weights (pass --card CARD.md)"


@dataclass
class Comparison:
    task: str
    type: str
    metric: str
    ours: float
    card: float | None
    precision: str | None = None  # the precision our score was computed in (None: not recorded)
    exact: bool = True  # whether that was exact fp32 (PrecisionPlan.exact): what "exact" rows need

    @property
    def difference(self) -> float | None:
        return None if self.card is None else self.ours - self.card


def card_scores(card: dict[str, dict[str, float]] | None, task: str, subset: str | None = None) -> dict[str, float]:
    """The card's scores for one task: under its name, or under 'NAME (SUBSET)' when the result says its subset.

    The card keeps a subset other than the default or 'en' in the name ('STS17 (en-en)'), while a task folder is
    named as in MTEB ('STS17') and holds the subset the card's protocol uses: a task the card lists under a
    single subset is found by its bare name too. A result naming a subset the card lacks finds nothing."""
    card = card or {}
    if subset not in (None, "default", "en"):
        return card.get(f"{task} ({subset})", {})
    if task in card:
        return card[task]
    subsets = [name for name in card if name.startswith(f"{task} (") and name.endswith(")")]
    return card[subsets[0]] if len(subsets) == 1 else {}


def ran_exact(result: dict) -> bool:
    """Whether a result's vectors came from exact fp32: the plan's own verdict where recorded ("exact"), else
    its precision's name (results saved before the verdict was); an encoder that records neither counts as exact."""
    if result.get("exact") is not None:
        return bool(result["exact"])
    return result.get("precision") in (None, "fp32")


def compare(results: list[dict], card: dict[str, dict[str, float]] | None) -> list[Comparison]:
    """One row per task result: its main score beside the card's value for the same task and metric."""
    rows = []
    for result in results:
        metric = card_metric(result["main_score"])
        card_value = card_scores(card, result["task"], result.get("subset")).get(metric)
        rows.append(Comparison(result["task"], result["type"], metric, result["scores"][result["main_score"]],
                               card_value, result.get("precision"), ran_exact(result)))
    return rows


# How closely each task type can match the card, and why (docs/evaluate.md has the measurements behind these)
EXPECTED_MATCH: dict[str, tuple[str, str]] = {
    "STS": ("exact", "no randomness: cosine similarities and rank correlations; only float rounding moves the "
                     "last digit (tiny sets such as BIOSSES: ~0.02)"),
    "Retrieval": ("exact", "no randomness: exact cosine search and pytrec_eval; only float rounding can swap "
                           "near-tied documents at a cutoff"),
    "Reranking": ("exact", "no randomness: cosine ranking of each sample's candidates"),
    "PairClassification": ("exact", "no randomness: cosine scores and the best threshold over them"),
    "Summarization": ("exact (legacy mean)", "no randomness; the card's figure averages each text's Spearman "
                                             "statistic together with its p-value (mteb <= 1.14.3), shown as "
                                             "the legacy-mean row"),
    "Classification": ("within sampling noise", "our training subsets are exactly mteb 1.0's (seeded), but the "
                                                "card came from mteb 0.0.2, whose first shuffle drew from "
                                                "numpy's unseeded global generator: the card's subsets were "
                                                "random, so its mean over 10 experiments carries their noise "
                                                "(a few tenths of a point with many training rows, such as "
                                                "Banking77's 616; points with few, such as Emotion's 96)"),
    "Clustering": ("within k-means noise", "MiniBatchKMeans is seeded exactly as mteb 1.0 seeds it (the same "
                                           "clusters on the same scikit-learn), but its clusters change with the "
                                           "scikit-learn version: about a point either way"),
}


# What a precision other than exact fp32 (bf16, fp16, int8, auto's choice) promises instead: the project's quality
# contract bounds each vector (cosine to fp32's) and one score, STSBenchmark's Spearman; every other score moves
# with the rounding of the vectors, unbounded by the contract (STS sets have moved by up to ~0.2 under int8).
CONTRACT_TASK, CONTRACT_TOLERANCE, CONTRACT_MIN_COSINE = "STSBenchmark", 0.1, 0.99


def _fast(row: Comparison) -> str:
    return row.precision if row.precision and row.precision != "fp32" else "inexact fp32"


def expected_match(row: Comparison) -> str:
    """The short 'expected' entry of a table row (the reasons are in EXPECTED_MATCH).

    "exact" only where the score came from exact fp32; from a fast precision the deterministic types instead
    state the contract's bound ("within 0.1 of fp32 (int8)", STSBenchmark's) or, where it sets none, "near fp32"."""
    if row.card is None:
        return "–"
    if row.type == "Summarization" and "legacy" not in row.metric:
        return "differs by design (fixed mean)"
    label = EXPECTED_MATCH.get(row.type, ("–", ""))[0]
    if row.exact or not label.startswith("exact"):
        return label
    if row.type == "STS" and row.task == CONTRACT_TASK:
        return f"within {CONTRACT_TOLERANCE} of fp32 ({_fast(row)})"
    legacy = ", legacy mean" if "legacy" in label else ""
    return f"near fp32 ({_fast(row)}{legacy})"


def markdown_table(rows: list[Comparison], card_source: str | None = None) -> str:
    """The rows as a Markdown table, then one line per task type present on how exactly it can match."""
    def fmt(v: float | None, signed: bool = False) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return f"{v:+.2f}" if signed else f"{v:.2f}"

    lines = ["| task | type | metric | ours | card | difference | expected |", "|---|---|---|---:|---:|---:|---|"]
    lines += [f"| {r.task} | {r.type} | {r.metric} | {fmt(r.ours)} | {fmt(r.card)} | {fmt(r.difference, True)} "
              f"| {expected_match(r)} |" for r in rows]
    compared = [r for r in rows if r.card is not None and r.type in EXPECTED_MATCH]
    if compared:
        lines.append("")
        if card_source:
            lines.append(f"Card: {card_source}.")
        for t, exact in dict.fromkeys((r.type, r.exact or not EXPECTED_MATCH[r.type][0].startswith("exact"))
                                      for r in compared):
            label, why = EXPECTED_MATCH[t]
            lines.append(f"- {t}: {label}: {why}." if exact else f"- {t}: near fp32 (exact only in exact fp32: {why}).")
        fast = list(dict.fromkeys(_fast(r) for r in compared if not r.exact))
        if fast:
            lines.append(f"- {', '.join(fast)}: the project's quality contract for a precision other than exact "
                         f"fp32: each vector keeps a cosine of at least {CONTRACT_MIN_COSINE} to fp32's, and "
                         f"{CONTRACT_TASK}'s Spearman within {CONTRACT_TOLERANCE} of fp32's; other scores move with "
                         f"the rounding of the vectors (by up to a few tenths of a point), beyond what fp32's "
                         f"reasons above allow.")
    return "\n".join(lines) + "\n"
