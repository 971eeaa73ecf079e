"""Exact chunked search, paraphrase mining and clustering against brute-force numpy answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from allmpnet.search import community_detection, kmeans, paraphrase_mining, semantic_search
from boundaries import assert_clear_of, assert_top_k, cosines64


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((20, 16)).astype(np.float32), rng.standard_normal((503, 16)).astype(np.float32)


@pytest.mark.parametrize("corpus_chunk, query_chunk", [(7, 3), (100, 100), (100_000, 1)])
def test_semantic_search_equals_full_matrix_topk(data, corpus_chunk, query_chunk):
    queries, corpus = data
    full = cosines64(queries, corpus)  # (20, 503)
    got = semantic_search(queries, corpus, top_k=10, corpus_chunk_size=corpus_chunk, query_chunk_size=query_chunk)
    assert len(got) == len(queries)
    for row, scores in zip(got, full):  # the full matrix's top 10, in order but for near-ties (boundaries.py)
        assert_top_k([m.corpus_id for m in row], scores, k=10)
        np.testing.assert_allclose([m.score for m in row], scores[[m.corpus_id for m in row]], atol=1e-5)


def test_semantic_search_reads_a_memmap_chunk_by_chunk(data, tmp_path):
    queries, corpus = data
    np.save(tmp_path / "c.npy", corpus)
    mapped = np.load(tmp_path / "c.npy", mmap_mode="r")
    got = semantic_search(queries[:2], mapped, top_k=3, corpus_chunk_size=50)
    assert len(got) == 2
    for row, scores in zip(got, cosines64(queries[:2], corpus)):
        assert_top_k([m.corpus_id for m in row], scores, k=3)


def test_semantic_search_dot_score_torch_input_and_small_corpus(data):
    queries, corpus = data
    got = semantic_search(torch.from_numpy(queries[0]), torch.from_numpy(corpus[:4]), top_k=10,
                          score_function="dot")
    assert len(got) == 1 and len(got[0]) == 4  # k is capped at the corpus size
    dots = corpus[:4].astype(np.float64) @ queries[0].astype(np.float64)
    assert_top_k([m.corpus_id for m in got[0]], dots, k=10)
    np.testing.assert_allclose([m.score for m in got[0]], dots[[m.corpus_id for m in got[0]]], rtol=1e-5, atol=1e-5)


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
    sims = cosines64(x, x)
    expected = {(i, j): sims[i, j] for i in range(30) for j in range(i + 1, 30)}
    assert len(pairs) == len(expected) == 30 * 29 // 2
    # every pair once, i < j, best first: only pairs whose cosines are within EPS may swap places (435 cosines
    # spread over [-1, 1] have a few such neighbours: 8 pairs here, each within 1e-5 of another)
    assert_top_k([(p.i, p.j) for p in pairs], expected, max_near_ties=12)
    np.testing.assert_allclose([p.score for p in pairs], [expected[(p.i, p.j)] for p in pairs], atol=1e-5)


def test_paraphrase_mining_finds_planted_duplicates_and_respects_limits(data):
    _, corpus = data
    x = np.vstack([corpus[:50], corpus[3] + 0.01, corpus[17] * 2])  # rows 50 ~ 3, 51 = 17 scaled
    pairs = paraphrase_mining(x, top_k=5, max_pairs=2, chunk_size=16)
    sims = cosines64(x, x)[np.triu_indices(len(x), 1)]
    assert np.sort(sims)[-3] < 0.99 - 0.05  # the planted pairs stand far above the rest, and above min_score
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
    sims = cosines64(data, data)
    # exact expectations below: no cosine may lie within EPS of the threshold (the groups are far apart)
    assert_clear_of(sims, 0.8, what="cosine")
    communities = community_detection(data, threshold=0.8, min_community_size=5, batch_size=13)
    assert [len(c) for c in communities] == [30, 12, 6]  # the group of 3 is below min_community_size
    for community, group in zip(communities, [1, 0, 2]):
        assert set(community) == set(np.flatnonzero(truth == group).tolist())
        # the centre first, then the members by decreasing similarity to it (near-ties in either order)
        centre = community[0]
        assert_top_k(community[1:], {m: sims[centre, m] for m in community if m != centre}, max_near_ties=4)


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
