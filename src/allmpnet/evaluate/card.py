"""Reading a model card's `model-index` (its YAML front matter) and setting our scores beside it."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

# names the task.json files use (newer mteb) -> the names on the card (mteb 1.0)
METRIC_ALIASES = {"cosine_spearman": "cos_sim_spearman", "cosine_pearson": "cos_sim_pearson", "cosine_ap": "cos_sim_ap",
                  "cosine_accuracy": "cos_sim_accuracy", "cosine_f1": "cos_sim_f1"}


def card_metric(name: str) -> str:
    return METRIC_ALIASES.get(name, name)


def read_card(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """{task name: {metric: value}} from a model card's model-index; the 'MTEB ' prefix and '(en)' are dropped."""
    import yaml

    path = Path(path)
    if path.is_dir():
        path = path / "README.md"
    text = path.read_text(encoding="utf-8")
    match = re.match(r"\A---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not match:
        raise ValueError(f"{path}: no YAML front matter (a model card starts with a '---' block)")
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: front matter is not valid YAML ({e})") from None
    scores: dict[str, dict[str, float]] = {}
    for model in meta.get("model-index") or []:
        for result in model.get("results") or []:
            dataset = result.get("dataset") or {}
            name = re.sub(r"^MTEB\s+", "", str(dataset.get("name", "")))
            config = dataset.get("config")
            if config and config != "default":
                name = name.replace(f" ({config})", "")
                name = f"{name} ({config})" if config != "en" else name
            scores[name] = {m["type"]: float(m["value"]) for m in result.get("metrics") or [] if "type" in m}
    if not scores:
        raise ValueError(f"{path}: front matter has no model-index results")
    return scores


@dataclass
class Comparison:
    task: str
    type: str
    metric: str
    ours: float
    card: float | None

    @property
    def difference(self) -> float | None:
        return None if self.card is None else self.ours - self.card


def compare(results: list[dict], card: dict[str, dict[str, float]] | None) -> list[Comparison]:
    """One row per task result: its main score beside the card's value for the same task and metric."""
    rows = []
    for result in results:
        metric = card_metric(result["main_score"])
        card_value = (card or {}).get(result["task"], {}).get(metric)
        rows.append(Comparison(result["task"], result["type"], metric, result["scores"][result["main_score"]],
                               card_value))
    return rows


def markdown_table(rows: list[Comparison]) -> str:
    def fmt(v: float | None, signed: bool = False) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return f"{v:+.2f}" if signed else f"{v:.2f}"

    lines = ["| task | type | metric | ours | card | difference |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r.task} | {r.type} | {r.metric} | {fmt(r.ours)} | {fmt(r.card)} | {fmt(r.difference, True)} |"
              for r in rows]
    return "\n".join(lines) + "\n"
