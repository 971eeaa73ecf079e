"""Exact chunked search, paraphrase mining and clustering against brute-force numpy answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from allmpnet.search import community_detection, kmeans, paraphrase_mining, semantic_search


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((20, 16)).astype(np.float32), rng.standard_normal((503, 16)).astype(np.float32)


@pytest.mark.parametrize("corpus_chunk, query_chunk", [(7, 3), (100, 100), (100_000, 1)])
def test_semantic_search_equals_full_matrix_topk(data, corpus_chunk, query_chunk):
    queries, corpus = data
    full = unit(queries) @ unit(corpus).T  # (20, 503)
    expected = np.argsort(-full, axis=1, kind="stable")[:, :10]
    got = semantic_search(queries, corpus, top_k=10, corpus_chunk_size=corpus_chunk, query_chunk_size=query_chunk)
    assert [[m.corpus_id for m in row] for row in got] == expected.tolist()
    np.testing.assert_allclose([[m.score for m in row] for row in got],
                               np.take_along_axis(full, expected, axis=1), atol=1e-5)


def test_semantic_search_reads_a_memmap_chunk_by_chunk(data, tmp_path):
    queries, corpus = data
    np.save(tmp_path / "c.npy", corpus)
    mapped = np.load(tmp_path / "c.npy", mmap_mode="r")
    got = semantic_search(queries[:2], mapped, top_k=3, corpus_chunk_size=50)
    expected = np.argsort(-(unit(queries[:2]) @ unit(corpus).T), axis=1)[:, :3]
    assert [[m.corpus_id for m in row] for row in got] == expected.tolist()


def test_semantic_search_dot_score_torch_input_and_small_corpus(data):
    queries, corpus = data
    got = semantic_search(torch.from_numpy(queries[0]), torch.from_numpy(corpus[:4]), top_k=10,
                          score_function="dot")
    assert len(got) == 1 and len(got[0]) == 4  # k is capped at the corpus size
    assert [m.corpus_id for m in got[0]] == np.argsort(-(corpus[:4] @ queries[0])).tolist()


def test_semantic_search_rejects_bad_input(data):
    queries, corpus = data
    with pytest.raises(ValueError, match="empty"):
        semantic_search(queries, corpus[:0])
    with pytest.raises(ValueError, match="dimension"):
        semantic_search(queries[:, :8], corpus)
    with pytest.raises(ValueError, match="top_k"):
        semantic_search(queries, corpus, top_k=0)
    with pytest.raises(ValueError, match="score_function"):
        semantic_search(queries, corpus, score_function="euclid")


def test_paraphrase_mining_with_full_neighbourhood_lists_every_pair_in_order(data):
    _, corpus = data
    x = corpus[:30]
    pairs = paraphrase_mining(x, top_k=30, chunk_size=7)
    sims = unit(x) @ unit(x).T
    expected = sorted(((sims[i, j], i, j) for i in range(30) for j in range(i + 1, 30)), key=lambda p: -p[0])
    assert len(pairs) == 30 * 29 // 2
    assert [(p.i, p.j) for p in pairs[:20]] == [(i, j) for _, i, j in expected[:20]]
    np.testing.assert_allclose([p.score for p in pairs], [s for s, _, _ in expected], atol=1e-5)


def test_paraphrase_mining_finds_planted_duplicates_and_respects_limits(data):
    _, corpus = data
    x = np.vstack([corpus[:50], corpus[3] + 0.01, corpus[17] * 2])  # rows 50 ~ 3, 51 = 17 scaled
    pairs = paraphrase_mining(x, top_k=5, max_pairs=2, chunk_size=16)
    assert {(p.i, p.j) for p in pairs} == {(3, 50), (17, 51)}
    assert all(p.score > 0.99 for p in pairs)
    assert paraphrase_mining(x, top_k=5, min_score=0.99) == pairs
    assert paraphrase_mining(x[:1]) == []


def planted_groups(rng, sizes, dim=24, noise=0.05):
    centres = unit(rng.standard_normal((len(sizes), dim)))
    rows, labels = [], []
    for g, size in enumerate(sizes):
        rows.append(centres[g] + noise * rng.standard_normal((size, dim)))
        labels += [g] * size
    return np.vstack(rows).astype(np.float32), np.array(labels)


def test_community_detection_recovers_planted_groups_largest_first():
    rng = np.random.default_rng(1)
    x, labels = planted_groups(rng, [12, 30, 6, 3])
    noise = unit(rng.standard_normal((40, 24))).astype(np.float32)  # scattered rows belong nowhere
    order = rng.permutation(len(x) + len(noise))
    data = np.vstack([x, noise])[order]
    truth = np.concatenate([labels, np.full(40, -1)])[order]
    communities = community_detection(data, threshold=0.8, min_community_size=5, batch_size=13)
    assert [len(c) for c in communities] == [30, 12, 6]  # the group of 3 is below min_community_size
    for community, group in zip(communities, [1, 0, 2]):
        assert set(community) == set(np.flatnonzero(truth == group).tolist())
    centre = communities[0][0]
    sims = unit(data[communities[0]]) @ unit(data[centre:centre + 1]).T
    assert np.all(np.diff(sims[:, 0]) <= 1e-6)  # members by decreasing similarity to the centre


def test_community_detection_edge_cases():
    x = np.eye(4, dtype=np.float32)
    assert community_detection(x, threshold=0.5, min_community_size=2) == []
    assert community_detection(x, threshold=0.5, min_community_size=1) == [[0], [1], [2], [3]]
    assert community_detection(x[:0].reshape(0, 4)) == []
    with pytest.raises(ValueError, match="threshold"):
        community_detection(x, threshold=2.0)


def test_kmeans_separates_blobs():
    from sklearn.metrics import adjusted_rand_score
    rng = np.random.default_rng(2)
    x, labels = planted_groups(rng, [20, 25, 15], noise=0.1)
    result = kmeans(x, 3)
    assert adjusted_rand_score(labels, result.labels) == 1.0
    assert result.centroids.shape == (3, 24)
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(x[:2], 3)
