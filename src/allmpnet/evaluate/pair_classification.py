"""PairClassification: does cosine similarity separate duplicate pairs (label 1) from the rest (label 0)?

Protocol of mteb 1.0: encode both sides; average precision (scikit-learn) of the label against cosine
similarity, plus the accuracy and F1 of the best single threshold. Main score: cosine AP, ×100. The same
figures for dot product and negated Euclidean / Manhattan distance are reported alongside.

Thresholds follow mteb's search (each cut leaves at least one pair on each side) except that a cut is
never placed between equal scores: a threshold cannot separate pairs that score the same.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score
from sklearn.metrics.pairwise import paired_cosine_distances, paired_euclidean_distances, paired_manhattan_distances

from allmpnet.errors import InvalidInput
from allmpnet.evaluate.data import PairData, Task, read_pairs


def _cuts(scores: np.ndarray, labels: np.ndarray):
    """Scores sorted high to low, and for each valid cut (after position i): positives above it, threshold."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    positives_above = np.cumsum(y)
    for i in range(len(s) - 1):
        if s[i] != s[i + 1]:
            yield i + 1, int(positives_above[i]), float((s[i] + s[i + 1]) / 2)


def best_accuracy(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, float]:
    """(accuracy, threshold): predicting 1 for scores above the threshold; (nan, nan) if no cut exists."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=int)
    n, negatives = len(labels), int((labels == 0).sum())
    best = (float("nan"), float("nan"))
    for above, pos_above, threshold in _cuts(scores, labels):
        accuracy = (pos_above + negatives - (above - pos_above)) / n
        if np.isnan(best[0]) or accuracy > best[0]:
            best = (accuracy, threshold)
    return best


def best_f1(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, float, float, float]:
    """(F1, precision, recall, threshold) of the best cut; zeros if no cut puts a positive above it."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=int)
    total_pos = int(labels.sum())
    best = (0.0, 0.0, 0.0, 0.0)
    for above, pos_above, threshold in _cuts(scores, labels):
        if pos_above == 0:
            continue
        precision, recall = pos_above / above, pos_above / total_pos
        f1 = 2 * precision * recall / (precision + recall)
        if f1 > best[0]:
            best = (f1, precision, recall, threshold)
    return best


def pair_metrics(scores: np.ndarray, labels: Sequence[int], prefix: str) -> dict[str, float]:
    accuracy, acc_threshold = best_accuracy(scores, labels)
    f1, precision, recall, f1_threshold = best_f1(scores, labels)
    return {f"{prefix}_accuracy": 100 * accuracy, f"{prefix}_accuracy_threshold": acc_threshold,
            f"{prefix}_f1": 100 * f1, f"{prefix}_precision": 100 * precision, f"{prefix}_recall": 100 * recall,
            f"{prefix}_f1_threshold": f1_threshold,
            f"{prefix}_ap": 100 * float(average_precision_score(labels, scores))}


def evaluate_pair_classification(encoder, sentences1: Sequence[str], sentences2: Sequence[str],
                                 labels: Sequence[int], batch_size: int = 32,
                                 show_progress_bar: bool = False) -> dict[str, float]:
    if not (len(sentences1) == len(sentences2) == len(labels)):
        raise InvalidInput(f"pair classification needs as many second sentences and labels as first sentences; got "
                           f"{len(sentences1)}, {len(sentences2)}, {len(labels)}")
    if set(labels) != {0, 1}:
        raise InvalidInput(f"pair classification needs both labels 0 and 1 present, got {sorted(set(labels))}")
    a = np.asarray(encoder.encode(list(sentences1), batch_size=batch_size, show_progress_bar=show_progress_bar))
    b = np.asarray(encoder.encode(list(sentences2), batch_size=batch_size, show_progress_bar=show_progress_bar))
    scores = pair_metrics(1 - paired_cosine_distances(a, b), labels, "cos_sim")
    scores.update(pair_metrics(np.einsum("nd,nd->n", a, b), labels, "dot"))
    scores.update(pair_metrics(-paired_euclidean_distances(a, b), labels, "euclidean"))
    scores.update(pair_metrics(-paired_manhattan_distances(a, b), labels, "manhattan"))
    return scores


def run(task: Task, encoder, batch_size: int = 32, show_progress_bar: bool = False) -> dict[str, float]:
    data: PairData = read_pairs(task)
    return evaluate_pair_classification(encoder, data.sentences1, data.sentences2, data.labels, batch_size,
                                        show_progress_bar)
