"""Clustering of embeddings: fast threshold-based community detection, and k-means (scikit-learn)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from allmpnet.errors import InvalidInput
from allmpnet.search.exact import Array, as_matrix, cosine_scores

# rows scored against the whole set at once; bounds the (batch x n) score block to about 256 MB of float32
MAX_SCORE_BLOCK = 64_000_000


def community_detection(embeddings: Array, threshold: float = 0.75, min_community_size: int = 10,
                        batch_size: int = 1024, show_progress_bar: bool = False) -> list[list[int]]:
    """Groups of rows whose cosine to a central row is at least `threshold`, largest group first.

    A row seeds a community when at least min_community_size rows (itself included) lie within the threshold.
    Communities are then taken largest first and made disjoint: a row already taken is dropped from the later
    ones, and a community that falls below min_community_size is discarded. Each list starts with its centre,
    then members by decreasing similarity to it. Rows in no list belong to no community.
    """
    if not -1.0 <= threshold <= 1.0:
        raise InvalidInput(f"threshold is a cosine in [-1, 1], got {threshold}")
    if min_community_size < 1 or batch_size < 1:
        raise InvalidInput("min_community_size and batch_size must be at least 1")
    x = as_matrix(embeddings, "embeddings")
    n = len(x)
    if n == 0 or min_community_size > n:
        return []
    batch = max(1, min(batch_size, MAX_SCORE_BLOCK // n))
    candidates: list[list[int]] = []
    for start in tqdm(range(0, n, batch), desc="communities", unit="batch", disable=not show_progress_bar):
        scores = cosine_scores(x[start:start + batch], x).float()  # (B, n)
        # a row can seed only if its min_community_size-th best neighbour is still above the threshold
        kth = scores.topk(min_community_size, dim=1).values[:, -1]
        for r in torch.nonzero(kth >= threshold).flatten().tolist():
            row = scores[r]
            members = torch.nonzero(row >= threshold).flatten()
            order = torch.argsort(row[members], descending=True, stable=True)
            ranked = members[order].tolist()
            centre = start + r
            candidates.append([centre] + [m for m in ranked if m != centre])
    candidates.sort(key=lambda c: (-len(c), c[0]))
    taken = np.zeros(n, dtype=bool)
    communities = []
    for community in candidates:
        if taken[community[0]]:
            continue  # its centre already belongs to a larger community
        remaining = [m for m in community if not taken[m]]
        if len(remaining) >= min_community_size:
            taken[remaining] = True
            communities.append(remaining)
    return communities


@dataclass
class KMeansResult:
    labels: np.ndarray      # (n,) cluster of each row
    centroids: np.ndarray   # (n_clusters, dim)
    inertia: float


def kmeans(embeddings: Array, n_clusters: int, seed: int = 0, normalize: bool = True,
           minibatch_above: int = 50_000) -> KMeansResult:
    """k-means over the (by default L2-normalised, so distances follow cosine) embeddings.

    Above `minibatch_above` rows, scikit-learn's MiniBatchKMeans keeps time and memory bounded.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans
    x = as_matrix(embeddings, "embeddings").float()
    n = len(x)
    if not 1 <= n_clusters <= n:
        raise InvalidInput(f"n_clusters must be between 1 and the number of rows ({n}), got {n_clusters}")
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    data = x.cpu().numpy()
    model_cls = MiniBatchKMeans if n > minibatch_above else KMeans
    model = model_cls(n_clusters=n_clusters, random_state=seed, n_init="auto").fit(data)
    return KMeansResult(labels=model.labels_.astype(np.int64), centroids=model.cluster_centers_.astype(np.float32),
                        inertia=float(model.inertia_))
