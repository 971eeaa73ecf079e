"""STS: how well cosine similarity of two sentences' vectors ranks pairs like human similarity scores.

Protocol of mteb 1.0: encode both sides; Pearson and Spearman of the gold scores against cosine
similarity (and against negative Euclidean and Manhattan distances). Main score: cosine Spearman, ×100.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics.pairwise import paired_cosine_distances, paired_euclidean_distances, paired_manhattan_distances

from allmpnet.errors import InvalidInput
from allmpnet.evaluate.data import Task, read_sts


def correlations(gold: Sequence[float], predicted: np.ndarray, prefix: str) -> dict[str, float]:
    """Pearson and Spearman ×100; NaN (with no exception) where either side is constant."""
    gold, predicted = np.asarray(gold, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if np.ptp(gold) == 0 or np.ptp(predicted) == 0:
        return {f"{prefix}_pearson": float("nan"), f"{prefix}_spearman": float("nan")}
    return {f"{prefix}_pearson": 100 * float(pearsonr(gold, predicted)[0]),
            f"{prefix}_spearman": 100 * float(spearmanr(gold, predicted)[0])}


def evaluate_sts(encoder, sentences1: Sequence[str], sentences2: Sequence[str], gold: Sequence[float],
                 batch_size: int = 32, show_progress_bar: bool = False) -> dict[str, float]:
    if not (len(sentences1) == len(sentences2) == len(gold)):
        raise InvalidInput(f"STS needs as many second sentences and scores as first sentences; got "
                           f"{len(sentences1)}, {len(sentences2)}, {len(gold)}")
    if len(gold) < 2:
        raise InvalidInput(f"STS needs at least two scored pairs to correlate, got {len(gold)}")
    a = np.asarray(encoder.encode(list(sentences1), batch_size=batch_size, show_progress_bar=show_progress_bar))
    b = np.asarray(encoder.encode(list(sentences2), batch_size=batch_size, show_progress_bar=show_progress_bar))
    scores = correlations(gold, 1 - paired_cosine_distances(a, b), "cos_sim")
    scores.update(correlations(gold, -paired_euclidean_distances(a, b), "euclidean"))
    scores.update(correlations(gold, -paired_manhattan_distances(a, b), "manhattan"))
    return scores


def run(task: Task, encoder, batch_size: int = 32, show_progress_bar: bool = False) -> dict[str, float]:
    data = read_sts(task)
    return evaluate_sts(encoder, data.sentences1, data.sentences2, data.scores, batch_size, show_progress_bar)
