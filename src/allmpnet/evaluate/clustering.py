"""Clustering: do k-means clusters of the vectors recover the gold groups?

Protocol of mteb 1.0: per cluster set, MiniBatchKMeans with k = number of distinct gold labels and
batch_size=500, then v-measure against the gold labels; main score: mean v-measure over sets, ×100.
mteb 1.0 left the k-means seed to numpy's global generator, which its evaluator had just seeded with 42
(a RandomState(42) is the same stream), and used scikit-learn's then default n_init=3 (1.4+ default to 1);
here both are explicit. On the same scikit-learn this gives mteb 1.0's clusters exactly; other
scikit-learn versions cluster differently (docs/evaluate.md).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import v_measure_score

from allmpnet.errors import InvalidInput
from allmpnet.evaluate.data import ClusteringSet, Task, read_clustering


def cluster_v_measure(vectors: np.ndarray, labels: Sequence, batch_size: int = 500, n_init: int = 3,
                      seed: int = 42) -> float:
    """v-measure ×100 of MiniBatchKMeans(k = distinct labels) on (N, D) vectors."""
    k = len(set(labels))
    model = MiniBatchKMeans(n_clusters=k, batch_size=batch_size, n_init=n_init, random_state=seed)
    assigned = model.fit_predict(np.asarray(vectors, dtype=np.float32))
    return 100 * float(v_measure_score(list(map(str, labels)), assigned))


def evaluate_clustering(encoder, sets: Sequence[ClusteringSet], batch_size: int = 32, seed: int = 42,
                        show_progress_bar: bool = False) -> dict[str, float]:
    if not sets:
        raise InvalidInput("clustering needs at least one cluster set")
    scores = []
    for cluster_set in sets:
        if not cluster_set.sentences:
            raise InvalidInput("clustering got an empty cluster set")
        if len(cluster_set.sentences) != len(cluster_set.labels):
            raise InvalidInput(f"a cluster set has {len(cluster_set.sentences)} sentences but "
                               f"{len(cluster_set.labels)} labels")
        vectors = np.asarray(encoder.encode(cluster_set.sentences, batch_size=batch_size,
                                            show_progress_bar=show_progress_bar))
        scores.append(cluster_v_measure(vectors, cluster_set.labels, seed=seed))
    return {"v_measure": float(np.mean(scores)), "v_measure_std": float(np.std(scores))}


def run(task: Task, encoder, batch_size: int = 32, show_progress_bar: bool = False) -> dict[str, float]:
    return evaluate_clustering(encoder, read_clustering(task), batch_size, show_progress_bar=show_progress_bar)
