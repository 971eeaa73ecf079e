"""The recipe's loss against a naive reference written here with explicit loops."""
import math

import pytest
import torch

from allmpnet.train import contrastive_loss, lr_factor


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def naive_row_ce(anchors, candidates, scale, i) -> float:
    """-log softmax of candidate i among all candidates, for anchor i."""
    logits = [scale * cosine(anchors[i], c) for c in candidates]
    return -(logits[i] - math.log(sum(math.exp(x) for x in logits)))


def naive_pairs(anchors, positives, scale) -> float:
    n = len(anchors)
    rows = sum(naive_row_ce(anchors, positives, scale, i) for i in range(n)) / n
    cols = sum(naive_row_ce(positives, anchors, scale, j) for j in range(n)) / n  # each positive picks its anchor
    return (rows + cols) / 2


def naive_triplets(anchors, positives, negatives, scale) -> float:
    n = len(anchors)
    candidates = list(positives) + list(negatives)
    return sum(naive_row_ce(anchors, candidates, scale, i) for i in range(n)) / n


@pytest.mark.parametrize("scale", [20.0, 1.0])
def test_pairs_match_naive_reference(scale):
    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(6, 16, generator=g, dtype=torch.float64), torch.randn(6, 16, generator=g, dtype=torch.float64)
    assert float(contrastive_loss(a, p, scale)) == pytest.approx(naive_pairs(a, p, scale), rel=1e-5)


@pytest.mark.parametrize("scale", [20.0, 3.0])
def test_triplets_match_naive_reference(scale):
    g = torch.Generator().manual_seed(1)
    a, p, n = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    got = float(contrastive_loss(a, torch.cat([p, n]), scale))
    assert got == pytest.approx(naive_triplets(a, p, n, scale), rel=1e-5)


def test_pairs_loss_is_not_one_directional():
    # an anchor matrix where rows and columns disagree: the symmetric loss differs from the row-only loss
    g = torch.Generator().manual_seed(2)
    a, p = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    row_only = sum(naive_row_ce(a.double(), p.double(), 20.0, i) for i in range(4)) / 4
    assert float(contrastive_loss(a, p)) != pytest.approx(row_only, rel=1e-3)


def test_loss_ignores_vector_length_and_rewards_alignment():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 8, generator=g)
    assert float(contrastive_loss(a, 5 * a)) == pytest.approx(float(contrastive_loss(a, a)), rel=1e-5)
    assert float(contrastive_loss(a, a)) < float(contrastive_loss(a, torch.randn(4, 8, generator=g)))


def test_wrong_candidate_count_is_an_error():
    with pytest.raises(ValueError, match="candidates"):
        contrastive_loss(torch.randn(4, 8), torch.randn(5, 8))


def test_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, warmup=4, total=10) for s in range(10)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == pytest.approx(1.0)
    assert factors[4:] == pytest.approx([(10 - s) / 6 for s in range(4, 10)])
    assert lr_factor(10, 4, 10) == 0.0
    assert lr_factor(0, 0, 5) == pytest.approx(1.0)
