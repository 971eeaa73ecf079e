"""The index with the published weights: sensible hits, HNSW = exact on a small corpus, other 768-d model refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from allmpnet import Encoder
from allmpnet.model import MPNetConfig
from allmpnet.search import Index, IndexMismatchError
from allmpnet.testing import build_random_model
from boundaries import EPS, assert_top_k, cosines64

pytestmark = pytest.mark.real_weights
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo_corpus.txt"


@pytest.fixture(scope="module")
def demo_index(real_encoder, tmp_path_factory):
    texts = [t for t in DEMO.read_text().splitlines() if t.strip()]
    return Index.build(tmp_path_factory.mktemp("real") / "ix", texts, encoder=real_encoder), texts


def test_real_index_answers_like_exact_search(demo_index):
    index, texts = demo_index
    queries = ["How do plants make their food?", "Which programming language is good for beginners?"]
    approximate, exact = index.search(queries, k=5, exact=False), index.search(queries, k=5, exact=True)
    # both are the top 5 of the float64 cosines (the HNSW candidates re-scored in numpy, the exact search in
    # torch: their order may differ only between cosines within EPS, see boundaries.py)
    cosines = cosines64(index.query_vectors(queries), np.asarray(index.vectors))
    for i in range(len(queries)):
        assert_top_k([h.row for h in approximate[i]], cosines[i], k=5)
        assert_top_k([h.row for h in exact[i]], cosines[i], k=5)
    # the corpus opens with three plant sentences, then programming languages
    assert cosines[0][:3].min() > np.delete(cosines[0], [0, 1, 2]).max() + EPS
    assert {h.row for h in approximate[0][:3]} == {0, 1, 2}
    assert approximate[1][0].text.startswith("Python")


def test_other_model_of_the_same_dimension_is_refused(demo_index, tmp_path):
    index, _ = demo_index
    cfg = MPNetConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=256,
                      max_position_embeddings=66)
    impostor = Encoder(build_random_model(tmp_path / "m", cfg), device="cpu")
    assert impostor.dim == index.dim == 768
    with pytest.raises(IndexMismatchError, match="different model"):
        Index.open(index.root, encoder=impostor)
    Index.open(index.root, encoder=Encoder(index.manifest["model"]["name"], device="cpu", precision="bf16"))
