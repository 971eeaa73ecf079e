"""Summarization (SummEval): does cosine similarity to human summaries rank machine summaries like experts do?

Protocol of mteb 1.0: a machine summary's score is its highest cosine to any human summary of the same
text; per source text, Spearman (and Pearson) of those scores against the human relevance ratings; texts
whose ratings are all equal are skipped; main score: mean cosine Spearman over texts, ×100.

The `*_legacy` scores reproduce the historic figures (the card's 27.49): mteb up to 1.14.3 took np.mean over
(statistic, p-value) result tuples, so each text's p-value was averaged in with its correlation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr

from allmpnet.errors import InvalidInput
from allmpnet.evaluate.data import SummaryText, Task, read_summarization


def best_match_scores(machine: np.ndarray, human: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each machine summary (M, D) against human summaries (H, D): (max cosine, max dot), each (M,)."""
    dots = machine @ human.T  # (M, H)
    norms = np.linalg.norm(machine, axis=1)[:, None] * np.linalg.norm(human, axis=1)[None, :]
    return (dots / np.maximum(norms, 1e-12)).max(axis=1), dots.max(axis=1)


def _mean(results: list, legacy: bool) -> float:
    """Mean correlation ×100; legacy: mean over statistics and p-values together (the old np.mean of tuples)."""
    if not results:
        return float("nan")
    values = np.array([(r[0], r[1]) for r in results], dtype=np.float64)  # (texts, 2)
    return 100 * float(np.mean(values) if legacy else np.mean(values[:, 0]))


def evaluate_summarization(encoder, texts: Sequence[SummaryText], batch_size: int = 32,
                           show_progress_bar: bool = False) -> dict[str, float]:
    """Correlations ×100 averaged over texts; each also as `NAME_legacy`, the historic mean with p-values."""
    if not texts:
        raise InvalidInput("summarization needs at least one source text")
    human_all = [s for t in texts for s in t.human_summaries]
    machine_all = [s for t in texts for s in t.machine_summaries]
    # one encode call per side keeps the length-sorted batching efficient
    human_vecs = np.asarray(encoder.encode(human_all, batch_size=batch_size, show_progress_bar=show_progress_bar))
    machine_vecs = np.asarray(encoder.encode(machine_all, batch_size=batch_size,
                                             show_progress_bar=show_progress_bar))
    stats: dict[str, list] = {"cos_sim_spearman": [], "cos_sim_pearson": [], "dot_spearman": [], "dot_pearson": []}
    h = m = 0
    skipped = 0
    for text in texts:
        human = human_vecs[h:h + len(text.human_summaries)]
        machine = machine_vecs[m:m + len(text.machine_summaries)]
        h, m = h + len(text.human_summaries), m + len(text.machine_summaries)
        if len(set(text.relevance)) == 1 or len(text.relevance) < 2:
            skipped += 1  # no ranking to agree with
            continue
        cosine, dot = best_match_scores(machine, human)
        for name, predicted in (("cos_sim", cosine), ("dot", dot)):
            if np.ptp(predicted) == 0:
                nan = (float("nan"), float("nan"))
                stats[f"{name}_spearman"].append(nan)
                stats[f"{name}_pearson"].append(nan)
                continue
            rho, r = spearmanr(text.relevance, predicted), pearsonr(text.relevance, predicted)
            stats[f"{name}_spearman"].append((rho.statistic, rho.pvalue))
            stats[f"{name}_pearson"].append((r.statistic, r.pvalue))
    if skipped == len(texts):
        raise InvalidInput("every source text has equal relevance for all its machine summaries: nothing to rank")
    scores = {name: _mean(results, legacy=False) for name, results in stats.items()}
    scores.update({f"{name}_legacy": _mean(results, legacy=True) for name, results in stats.items()})
    scores["texts_scored"] = len(texts) - skipped
    return scores


def run(task: Task, encoder, batch_size: int = 32, show_progress_bar: bool = False) -> dict[str, float]:
    return evaluate_summarization(encoder, read_summarization(task), batch_size, show_progress_bar)
