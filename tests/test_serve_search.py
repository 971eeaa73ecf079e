"""POST /search on a server started with an index (tiny model): hits match exact cosine top-k."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from allmpnet import Encoder
from allmpnet.serve import ServeConfig, create_app
from allmpnet.serve.background import BackgroundServer
from boundaries import assert_top_k, cosines64

search = pytest.importorskip("allmpnet.search")

CORPUS = ["the cat sat on the mat", "a dog in the car", "the sun and the moon", "plant a tree in the sun",
          "hello world", "search query text", "each sentence is converted", "this is an example sentence",
          "the moon is a rock", "cats and dogs"]


def cosines(enc: Encoder, corpus: list[str], query: str) -> np.ndarray:
    """The query's float64 cosine to each corpus text: the reference ranking."""
    return cosines64(enc.encode([query]), enc.encode(corpus))[0]


def test_search_returns_exact_top_k_and_sees_added_documents(tiny_model_dir, tmp_path):
    enc = Encoder(tiny_model_dir, device="cpu")
    ids = [f"doc{i}" for i in range(len(CORPUS))]
    index = search.Index.build(tmp_path / "idx", texts=CORPUS, ids=ids, encoder=enc,
                               metadata=[{"n": i} for i in range(len(CORPUS))])
    with BackgroundServer(create_app(enc, ServeConfig(max_search_k=5), index)) as url:
        assert httpx.get(f"{url}/health").json()["index"] == len(CORPUS)
        r = httpx.post(f"{url}/search", json={"query": ["a cat on a mat", "moon"], "k": 3})
        assert r.status_code == 200, r.text
        for query, result in zip(["a cat on a mat", "moon"], r.json()["results"]):
            scores = cosines(enc, CORPUS, query)
            assert result["query"] == query
            rows = [ids.index(h["id"]) for h in result["hits"]]
            assert_top_k(rows, scores, k=3)  # the exact top 3, in order but for near-ties (boundaries.py)
            assert [h["text"] for h in result["hits"]] == [CORPUS[i] for i in rows]
            assert [h["metadata"]["n"] for h in result["hits"]] == rows
            np.testing.assert_allclose([h["score"] for h in result["hits"]], scores[rows], atol=1e-5)

        r = httpx.post(f"{url}/search", json={"query": "x", "k": 6})
        assert r.status_code == 413 and r.json()["error"]["code"] == "k_too_large"
        r = httpx.post(f"{url}/search", json={"query": "x", "k": 0})
        assert r.status_code == 422 and r.json()["error"]["param"] == "k"

        # a writer commits a new version while the server runs: the next search sees it
        index.add(texts=["a cat on a mat"], ids=["new"], metadata=[{"n": -1}])
        r = httpx.post(f"{url}/search", json={"query": "a cat on a mat", "k": 1})
        assert r.json()["results"][0]["hits"][0]["id"] == "new"
        assert r.json()["results"][0]["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
