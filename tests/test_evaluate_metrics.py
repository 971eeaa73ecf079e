"""Each evaluator on small hand-built cases; every expected figure is worked out by hand in the comment beside it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from allmpnet.evaluate import (evaluate_classification, evaluate_clustering, evaluate_pair_classification,
                               evaluate_reranking, evaluate_retrieval, evaluate_sts, evaluate_summarization,
                               exact_top_k, score_run, search)
from allmpnet.evaluate.classification import fit_and_score, undersample_plan
from allmpnet.evaluate.data import (ClusteringSet, RerankingSample, RetrievalData, SummaryText, load_task,
                                   read_classification)
from allmpnet.evaluate.pair_classification import best_accuracy, best_f1
from allmpnet.evaluate.reranking import rank_metrics
from allmpnet.evaluate.retrieval import document_text, mrr_at_k

FIXTURES = Path(__file__).parent / "fixtures"


class LookupEncoder:
    """Stands in for the model: each text has a fixed vector, so the metrics can be checked by hand."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = {t: np.asarray(v, dtype=np.float32) for t, v in vectors.items()}
        self.calls: list[list[str]] = []

    def encode(self, texts, batch_size=32, show_progress_bar=None):
        self.calls.append(list(texts))
        return np.stack([self.vectors[t] for t in texts]) if texts else np.zeros((0, 2), np.float32)


def unit(degrees: float) -> list[float]:
    r = math.radians(degrees)
    return [math.cos(r), math.sin(r)]


# --- STS ---------------------------------------------------------------------------------------------------

# "orth" and "opp" written out: unit(90) is (6e-17, 1) and unit(180) (-1, 1e-16), and the Manhattan tie below would
# then hold only while those crumbs round away (in float64, 1 - 6e-17 + 1 is a tie broken to even)
STS_ENCODER = LookupEncoder({"x": unit(0), "same": unit(0), "near": unit(60), "orth": [0.0, 1.0], "opp": [-1.0, 0.0]})


def test_sts_perfect_ranking_and_pearson_by_hand():
    # cosines 1, 0.5, 0, -1 against gold 4, 3, 2, 1: same order -> Spearman 1.
    # Pearson: dx = .875 .375 -.125 -1.125, dy = 1.5 .5 -.5 -1.5: 3.25 / sqrt(2.1875 * 5) = 0.982708
    s = evaluate_sts(STS_ENCODER, ["x"] * 4, ["same", "near", "orth", "opp"], [4, 3, 2, 1])
    assert s["cos_sim_spearman"] == pytest.approx(100)
    assert s["cos_sim_pearson"] == pytest.approx(98.2708, abs=1e-3)
    # unit vectors: Euclidean distance falls as cosine rises, so it ranks the same way
    assert s["euclidean_spearman"] == pytest.approx(100)
    # Manhattan: |1-0|+|0-1| = 2 for "orth" equals |1+1| = 2 for "opp": tied, as in test_sts_ties below
    assert s["manhattan_spearman"] == pytest.approx(94.8683, abs=1e-3)


def test_sts_ties_in_gold_use_average_ranks():
    # gold 4, 3, 3, 1 -> ranks 4, 2.5, 2.5, 1; predicted ranks 4, 3, 2, 1.
    # centred: 1.5 0 0 -1.5 and 1.5 .5 -.5 -1.5 -> 4.5 / sqrt(4.5 * 5) = 0.948683
    s = evaluate_sts(STS_ENCODER, ["x"] * 4, ["same", "near", "orth", "opp"], [4, 3, 3, 1])
    assert s["cos_sim_spearman"] == pytest.approx(94.8683, abs=1e-3)


def test_sts_reversed_gold_and_constant_gold():
    assert evaluate_sts(STS_ENCODER, ["x"] * 3, ["same", "orth", "opp"], [0, 1, 5])["cos_sim_spearman"] \
        == pytest.approx(-100)
    # a constant gold column has no ranking: NaN, not a crash
    assert math.isnan(evaluate_sts(STS_ENCODER, ["x"] * 2, ["same", "opp"], [2, 2])["cos_sim_spearman"])


def test_sts_rejects_empty_and_mismatched_input():
    with pytest.raises(ValueError, match="at least two"):
        evaluate_sts(STS_ENCODER, [], [], [])
    with pytest.raises(ValueError, match="as many"):
        evaluate_sts(STS_ENCODER, ["x", "x"], ["same"], [1, 2])


# --- Classification ------------------------------------------------------------------------------------------

def test_undersample_plan_reseeds_before_every_shuffle_as_mteb_does():
    labels = ["a", "b", "a", "c", "b", "a", "c", "b", "a", "c"]
    plan = undersample_plan(labels, samples_per_label=2, n_experiments=3, seed=42)
    # the reference, mteb 1.0's loop: one index list shuffled in place per experiment, and numpy's global
    # generator seeded 42 again right after each shuffle (by the evaluator built for that experiment)
    np.random.seed(42)
    idxs = np.arange(len(labels))
    for rows in plan:
        np.random.shuffle(idxs)
        np.random.seed(42)
        expected, taken = [], {}
        for i in idxs:
            if taken.get(labels[i], 0) < 2:
                expected.append(int(i))
                taken[labels[i]] = taken.get(labels[i], 0) + 1
        assert rows == expected
        assert sorted(labels[i] for i in rows) == ["a", "a", "b", "b", "c", "c"]
    assert plan[0] != plan[1]  # the same permutation, applied to an already shuffled list
    # one generator drawn from throughout (the earlier, wrong reading) gives other rows from experiment 2 on
    rng, order, drifting = np.random.RandomState(42), np.arange(len(labels)), []
    for _ in range(3):
        rng.shuffle(order)
        drifting.append(order.tolist())
    np.random.seed(42)
    assert np.random.permutation(len(labels)).tolist() == drifting[0]
    assert [plan[1][0], plan[2][0]] != [drifting[1][0], drifting[2][0]]


def test_undersample_plan_matches_mteb_1_0_on_banking77(shared_data):
    # rows the real mteb 1.0.0 classes picked on this train split (benchmarks/mteb10_reference.py undersample)
    pinned = json.loads((FIXTURES / "mteb10_banking77_undersample.json").read_text())
    labels = read_classification(load_task(shared_data / "Banking77Classification")).train_labels
    plan = undersample_plan(labels, pinned["samples_per_label"], len(pinned["first_rows_per_experiment"]))
    assert [len(rows) for rows in plan] == pinned["rows_per_experiment"] == [616] * 3  # 77 labels x 8
    for rows, first in zip(plan, pinned["first_rows_per_experiment"]):
        assert rows[:len(first)] == first
    assert pinned["first_rows_per_experiment"][1][:3] == [1774, 4068, 3356]


def test_undersample_takes_every_example_of_a_rare_label():
    plan = undersample_plan(["a", "a", "a", "b"], samples_per_label=2, n_experiments=1)
    assert sorted(plan[0]).count(3) == 1 and len(plan[0]) == 3  # 2 of "a", the only "b"


def test_logistic_regression_scores_by_hand():
    x_train = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    x_test = np.array([[-3.0], [3.0], [0.5]])
    s = fit_and_score(x_train, ["a", "a", "b", "b"], x_test, ["a", "b", "a"])
    # predictions a, b, b: 2 of 3 right. F1(a): P 1, R .5 -> 2/3; F1(b): P .5, R 1 -> 2/3; macro 2/3.
    assert s["accuracy"] == pytest.approx(200 / 3)
    assert s["f1"] == pytest.approx(200 / 3)
    # binary: AP of the hard predictions for "b": truth 0 1 0, predicted 0 1 1 -> one cut, P .5 at R 1 -> 0.5
    assert s["ap"] == pytest.approx(50)


def test_classification_end_to_end_and_bad_input():
    enc = LookupEncoder({f"{side}{i}": [sign * (1 + i), 0.1 * i] for side, sign in (("l", -1), ("r", 1))
                         for i in range(6)})
    train = [f"l{i}" for i in range(4)] + [f"r{i}" for i in range(4)]
    labels = ["neg"] * 4 + ["pos"] * 4
    s = evaluate_classification(enc, train, labels, ["l5", "r5"], ["neg", "pos"], samples_per_label=2,
                                n_experiments=3)
    assert s["accuracy"] == pytest.approx(100) and s["accuracy_stderr"] == pytest.approx(0)
    assert enc.calls[1] == ["l5", "r5"]  # the test split is encoded once, not once per experiment
    with pytest.raises(ValueError, match="at least two labels"):
        evaluate_classification(enc, train[:4], labels[:4], ["l5"], ["neg"])
    with pytest.raises(ValueError, match="never seen"):
        evaluate_classification(enc, train, labels, ["l5"], ["maybe"])
    with pytest.raises(ValueError, match="non-empty"):
        evaluate_classification(enc, [], [], ["l5"], ["neg"])


# --- Clustering ----------------------------------------------------------------------------------------------

def test_clustering_separated_groups_and_single_group():
    enc = LookupEncoder({"a1": [1, 0], "a2": [0.99, 0.05], "a3": [0.98, -0.05],
                         "b1": [-1, 0], "b2": [-0.99, 0.05], "b3": [-0.98, -0.05]})
    two = ClusteringSet(["a1", "b1", "a2", "b2", "a3", "b3"], ["x", "y", "x", "y", "x", "y"])
    one = ClusteringSet(["a1", "a2", "b1"], [7, 7, 7])  # k = 1: one cluster, one class: homogeneous and complete
    s = evaluate_clustering(enc, [two, one])
    assert s["v_measure"] == pytest.approx(100)
    with pytest.raises(ValueError, match="at least one"):
        evaluate_clustering(enc, [])
    with pytest.raises(ValueError, match="2 sentences but 3 labels"):
        evaluate_clustering(enc, [ClusteringSet(["a1", "b1"], ["x", "y", "z"])])
    with pytest.raises(ValueError, match="empty cluster set"):
        evaluate_clustering(enc, [ClusteringSet([], [])])


def test_clustering_seeds_kmeans_as_mtebs_evaluator_does():
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import v_measure_score

    from allmpnet.evaluate.clustering import cluster_v_measure

    # overlapping blobs, so that the seed decides some assignments
    rng = np.random.RandomState(7)
    labels = [i % 5 for i in range(600)]
    vectors = (rng.normal(size=(5, 16))[labels] * 0.6 + rng.normal(size=(600, 16))).astype(np.float32)
    # the reference, mteb 1.0's call: its evaluator seeds numpy's global generator with 42, then an unseeded
    # MiniBatchKMeans (scikit-learn's default then: n_init=3) draws from it
    np.random.seed(42)
    assigned = MiniBatchKMeans(n_clusters=5, batch_size=500, n_init=3).fit(vectors).labels_
    reference = 100 * v_measure_score(labels, assigned)
    assert cluster_v_measure(vectors, labels) == pytest.approx(reference, abs=1e-12)
    assert 5 < reference < 95  # neither trivial nor perfect: other draws would score otherwise
    np.random.seed(0)
    other = 100 * v_measure_score(labels, MiniBatchKMeans(n_clusters=5, batch_size=500, n_init=3).fit(vectors).labels_)
    assert other != pytest.approx(reference, abs=1e-9)


# --- Retrieval -----------------------------------------------------------------------------------------------

def test_document_text_joins_title_and_text():
    assert document_text({"title": "Title", "text": "body "}) == "Title body"
    assert document_text({"title": "", "text": " body"}) == "body"


def test_exact_top_k_over_chunks_matches_the_hand_ranking():
    query = np.array([unit(0)])
    docs = np.array([unit(80), unit(10), unit(170), unit(40), unit(5)])  # cosines fall with the angle
    for chunk in (1, 2, 5):
        scores, ids = exact_top_k(query, (docs[i:i + chunk] for i in range(0, 5, chunk)), k=3)
        assert ids[0].tolist() == [4, 1, 3]
        assert scores[0].tolist() == pytest.approx([math.cos(math.radians(a)) for a in (5, 10, 40)], abs=1e-6)
    _, ids = exact_top_k(query, [docs], k=10)  # k larger than the corpus: all of it, ranked
    assert ids[0].tolist() == [4, 1, 3, 0, 2]


def test_search_skips_the_document_that_is_the_query():
    enc = LookupEncoder({"q": unit(0), "D0": unit(0), "D1": unit(30), "D2": unit(60)})
    corpus = {"q1": {"title": "", "text": "D0"}, "d1": {"title": "", "text": "D1"}, "d2": {"title": "", "text": "D2"}}
    results = search(enc, corpus, {"q1": "q"}, top_k=2, corpus_chunk_size=2)
    assert list(results["q1"]) == ["d1", "d2"]  # q1 itself scores 1.0 but is left out; still 2 hits
    assert [len(c) for c in enc.calls] == [1, 2, 1]  # the query, then the corpus in chunks of 2
    with pytest.raises(ValueError, match="non-empty corpus"):
        search(enc, {}, {"q1": "q"})
    with pytest.raises(ValueError, match="at least one query"):
        search(enc, corpus, {})


def test_score_run_by_hand():
    qrels = {"q1": {"d1": 1}, "q2": {"d3": 1, "d4": 1}}
    results = {"q1": {"d2": 0.9, "d1": 0.8, "d3": 0.7}, "q2": {"d3": 0.9, "d1": 0.8, "d4": 0.7}}
    s = score_run(qrels, results, k_values=(1, 3))
    # q1: relevant at rank 2. nDCG@1 0, nDCG@3 = (1/log2 3) / 1 = 0.63093; AP 1/2; P@3 1/3; RR 1/2
    # q2: relevant at ranks 1 and 3. nDCG@1 1; nDCG@3 = (1 + 1/log2 4) / (1 + 1/log2 3) = 1.5 / 1.63093 = 0.91972
    #     AP (1/1 + 2/3) / 2 = 0.83333; P@3 2/3; RR 1
    assert s["ndcg_at_1"] == pytest.approx(50)
    assert s["ndcg_at_3"] == pytest.approx(100 * (0.63093 + 0.91972) / 2, abs=1e-3)
    assert s["map_at_3"] == pytest.approx(100 * (0.5 + 5 / 6) / 2)
    assert s["precision_at_3"] == pytest.approx(50)
    assert s["recall_at_1"] == pytest.approx(25)  # q1 0 of 1, q2 1 of 2
    assert s["mrr_at_10"] == pytest.approx(75)


def test_mrr_cutoff_and_unretrieved_queries():
    ranked = {f"d{i}": 1 - i / 100 for i in range(12)}  # d11 sits at rank 12
    assert mrr_at_k({"q": {"d11": 1}}, {"q": ranked}, 10) == 0.0
    assert mrr_at_k({"q": {"d9": 1}}, {"q": ranked}, 10) == pytest.approx(0.1)
    assert mrr_at_k({"q": {"d0": 1}, "r": {"d0": 1}}, {"q": ranked}, 10) == pytest.approx(0.5)  # r found nothing


def test_evaluate_retrieval_end_to_end():
    enc = LookupEncoder({"q1": unit(0), "q2": unit(90), "A": unit(5), "B": unit(85), "C": unit(45)})
    data = RetrievalData({"a": {"title": "", "text": "A"}, "b": {"title": "", "text": "B"},
                          "c": {"title": "", "text": "C"}}, {"1": "q1", "2": "q2"}, {"1": {"a": 1}, "2": {"b": 1}})
    s = evaluate_retrieval(enc, data, k_values=(1, 10))
    assert s["ndcg_at_1"] == pytest.approx(100) and s["recall_at_10"] == pytest.approx(100)


# --- Reranking -----------------------------------------------------------------------------------------------

def test_rank_metrics_by_hand():
    # order 0, 2, 1, 3: positives at ranks 1 and 2 -> AP (1 + 1) / 2 = 1, RR 1
    assert rank_metrics(np.array([0.9, 0.5, 0.7, 0.1]), [True, False, True, False]) == pytest.approx((1.0, 1.0))
    # the positive ranks third -> AP 1/3, RR 1/3
    assert rank_metrics(np.array([0.2, 0.9, 0.5]), [True, False, False]) == pytest.approx((1 / 3, 1 / 3))
    # tie: one threshold takes both -> AP = precision 1/2; for MRR the given order stands (positive first)
    assert rank_metrics(np.array([0.5, 0.5]), [True, False]) == pytest.approx((0.5, 1.0))


def test_reranking_multi_text_query_takes_the_best_cosine_and_skips_one_sided_samples():
    enc = LookupEncoder({"q": unit(0), "q'": unit(90), "p": unit(80), "n": unit(30), "m": unit(200)})
    samples = [RerankingSample(["q", "q'"], ["p"], ["n"]),      # p: max(cos 80, cos 10) = .985 > n: .866 -> AP 1
               RerankingSample("q", ["p"], ["n", "m"]),          # p (.174) below n (.866): rank 2 -> AP 1/2, RR 1/2
               RerankingSample("q", ["p"], [])]                  # no negatives: skipped
    s = evaluate_reranking(enc, samples)
    assert s["map"] == pytest.approx(75) and s["mrr"] == pytest.approx(75) and s["samples_scored"] == 2
    with pytest.raises(ValueError, match="both positive and negative"):
        evaluate_reranking(enc, [RerankingSample("q", [], ["n"])])
    with pytest.raises(ValueError, match="at least one"):
        evaluate_reranking(enc, [])


# --- PairClassification --------------------------------------------------------------------------------------

def test_best_threshold_separable():
    accuracy, threshold = best_accuracy([0.9, 0.8, 0.3, 0.2], [1, 1, 0, 0])
    assert accuracy == pytest.approx(1.0) and threshold == pytest.approx(0.55)


def test_best_threshold_never_splits_tied_scores():
    scores, labels = [0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]
    # cuts at .7 -> predict 1 0 0 0 (3 right); at .3 -> 1 1 1 0 (3 right); none between the two 0.5s
    accuracy, threshold = best_accuracy(scores, labels)
    assert accuracy == pytest.approx(0.75) and threshold == pytest.approx(0.7)
    # F1: at .7 P 1 R .5 -> 2/3; at .3 P 2/3 R 1 -> 0.8
    f1, precision, recall, threshold = best_f1(scores, labels)
    assert (f1, precision, recall, threshold) == pytest.approx((0.8, 2 / 3, 1.0, 0.3))
    assert math.isnan(best_accuracy([0.5, 0.5], [1, 0])[0])  # all tied: no threshold exists


def test_pair_classification_ap_by_hand_and_one_class_error():
    enc = LookupEncoder({"x": unit(0), "a": unit(10), "b": unit(20), "c": unit(30)})
    s = evaluate_pair_classification(enc, ["x", "x", "x"], ["a", "b", "c"], [1, 0, 1])
    # ranked 1 0 1: precision at the positives 1/1 and 2/3 -> AP 5/6
    assert s["cos_sim_ap"] == pytest.approx(100 * 5 / 6)
    assert s["cos_sim_accuracy"] == pytest.approx(100 * 2 / 3)  # best cut: after the first pair
    with pytest.raises(ValueError, match="both labels"):
        evaluate_pair_classification(enc, ["x", "x"], ["a", "b"], [1, 1])


# --- Summarization -------------------------------------------------------------------------------------------

SUMM = LookupEncoder({"h1": [1, 0], "h2": [0, 1], "m1": [1, 0], "m2": [0.6, 0.8], "m3": [-1, 0],
                      "m4": [0.8, -0.6]})


def test_summarization_max_cosine_and_legacy_mean_by_hand():
    # best cosines to the human summaries: m1 1, m2 max(.6, .8) = .8, m3 max(-1, 0) = 0
    text = SummaryText(["h1", "h2"], ["m1", "m2", "m3"], [3, 2, 1])
    s = evaluate_summarization(SUMM, [text])
    assert s["cos_sim_spearman"] == pytest.approx(100)
    # legacy: mean of (rho, p) = (1 + 0) / 2; a perfect rank correlation has p-value 0
    assert s["cos_sim_spearman_legacy"] == pytest.approx(50)


def test_summarization_mean_over_texts_skips_unrankable_ones():
    agree = SummaryText(["h1", "h2"], ["m1", "m2", "m3"], [3, 2, 1])
    disagree = SummaryText(["h1", "h2"], ["m1", "m2", "m3"], [1, 2, 3])
    flat = SummaryText(["h1"], ["m1", "m4"], [2, 2])  # equal relevance: skipped
    s = evaluate_summarization(SUMM, [agree, disagree, flat])
    assert s["cos_sim_spearman"] == pytest.approx(0) and s["texts_scored"] == 2
    with pytest.raises(ValueError, match="nothing to rank"):
        evaluate_summarization(SUMM, [flat])
    with pytest.raises(ValueError, match="at least one"):
        evaluate_summarization(SUMM, [])
