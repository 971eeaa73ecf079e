"""The card's STSBenchmark score, reproduced with the published weights on CPU (the CI check of issue 3)."""
from __future__ import annotations

import pytest

from allmpnet.evaluate import evaluate_task, read_card

pytestmark = pytest.mark.real_weights


def test_stsbenchmark_reproduces_the_card(real_encoder, shared_data, seed_card):
    result = evaluate_task(shared_data / "STSBenchmark", real_encoder, batch_size=32)
    assert result["main_score"] == "cos_sim_spearman"
    card = read_card(seed_card)["STSBenchmark"]
    assert card["cos_sim_spearman"] == pytest.approx(83.42, abs=0.005)
    assert result["scores"]["cos_sim_spearman"] == pytest.approx(card["cos_sim_spearman"], abs=0.05)
    assert result["scores"]["cos_sim_pearson"] == pytest.approx(card["cos_sim_pearson"], abs=0.05)
