"""The contrastive loss of the all-* recipe: one pure function from embeddings to a scalar, used by every variant."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from allmpnet.errors import InvalidInput


def contrastive_loss(anchors: torch.Tensor, candidates: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """In-batch-negatives cross-entropy over scaled cosine similarities.

    anchors: (N, D). candidates: (N, D) for pairs, or (2N, D) for triplets laid out as all N positives followed by
    all N hard negatives. The positive of anchor i is candidates[i]; every other candidate is a negative.
    Pairs are scored both ways (mean of the row and column cross-entropies); triplets one way, as in the recipe.
    """
    n = anchors.shape[0]
    if candidates.shape[0] not in (n, 2 * n):
        raise InvalidInput(f"expected {n} (pairs) or {2 * n} (triplets) candidates for {n} anchors, "
                           f"got {candidates.shape[0]}")
    scores = scale * F.normalize(anchors.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T  # (N, M)
    labels = torch.arange(n, device=scores.device)
    loss = F.cross_entropy(scores, labels)
    if candidates.shape[0] == n:  # pairs: also pick the right anchor for each positive
        loss = (loss + F.cross_entropy(scores.T, labels)) / 2
    return loss
