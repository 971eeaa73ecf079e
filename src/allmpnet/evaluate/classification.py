"""Classification: a logistic regression trained on a few embedded examples per label.

Protocol of mteb 1.0: 10 experiments; each undersamples the train split to `samples_per_label` examples
per label, walking an index list re-shuffled in place before every experiment by numpy freshly seeded 42;
LogisticRegression(max_iter=100, random_state=42) on the vectors; accuracy and macro F1 on the test split,
plus, for two labels, average precision of the hard predictions (as mteb 1.0 computed it). Main score:
mean accuracy over experiments, ×100.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Hashable, Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, f1_score

from allmpnet.errors import InvalidInput
from allmpnet.evaluate.data import Task, read_classification

# mteb's own per-task settings; anything else uses 8 (task.json's samples_per_label wins over both)
SAMPLES_PER_LABEL = {"AmazonCounterfactualClassification": 32, "ToxicConversationsClassification": 32,
                     "TweetSentimentExtractionClassification": 32, "EmotionClassification": 16}


def undersample_plan(labels: Sequence[Hashable], samples_per_label: int, n_experiments: int,
                     seed: int = 42) -> list[list[int]]:
    """The train rows each experiment uses: the first `samples_per_label` of each label in the shuffled order.

    mteb 1.0 keeps one index list and shuffles it in place before each experiment, but the evaluator it
    builds right after each shuffle re-seeds numpy's global generator with 42. So every shuffle is the same
    seeded permutation, applied to the order the previous experiments left (experiment i sees it i+1 times),
    not the next draws of one long-running generator.
    """
    order = np.arange(len(labels))
    plan = []
    for _ in range(n_experiments):
        np.random.RandomState(seed).shuffle(order)
        taken: dict[Hashable, int] = defaultdict(int)
        rows = []
        for i in order:
            if taken[labels[i]] < samples_per_label:
                rows.append(int(i))
                taken[labels[i]] += 1
        plan.append(rows)
    return plan


def positive_label(labels: Sequence[Hashable]) -> Hashable:
    """The larger of two labels (numerically when both are integers or integer strings): 1 in a 0/1 task."""
    distinct = set(labels)
    try:
        return max(distinct, key=lambda v: int(v))
    except (TypeError, ValueError):
        return max(distinct, key=str)


def fit_and_score(x_train: np.ndarray, y_train: Sequence, x_test: np.ndarray, y_test: Sequence,
                  max_iter: int = 100, seed: int = 42) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter=100 is the protocol, not a mistake
        clf = LogisticRegression(max_iter=max_iter, random_state=seed).fit(x_train, list(y_train))
    predicted = clf.predict(x_test)
    scores = {"accuracy": 100 * accuracy_score(y_test, predicted),
              "f1": 100 * f1_score(y_test, predicted, average="macro")}
    if len(set(y_train)) == 2:
        positive = positive_label(y_train)
        scores["ap"] = 100 * average_precision_score(np.asarray(y_test) == positive, predicted == positive)
    return scores


def evaluate_classification(encoder, train_texts: Sequence[str], train_labels: Sequence[Hashable],
                            test_texts: Sequence[str], test_labels: Sequence[Hashable], samples_per_label: int = 8,
                            n_experiments: int = 10, max_iter: int = 100, seed: int = 42, batch_size: int = 32,
                            show_progress_bar: bool = False) -> dict[str, float]:
    if len(train_texts) != len(train_labels) or len(test_texts) != len(test_labels):
        raise InvalidInput("every text needs exactly one label")
    if not train_texts or not test_texts:
        raise InvalidInput("classification needs a non-empty train and test split")
    if len(set(train_labels)) < 2:
        raise InvalidInput("classification needs at least two labels in the train split, got "
                           f"{sorted(set(train_labels))}")
    unseen = set(test_labels) - set(train_labels)
    if unseen:
        raise InvalidInput(f"test labels never seen in training: {sorted(map(str, unseen))[:5]}")
    plan = undersample_plan(train_labels, samples_per_label, n_experiments, seed)
    # encode each sampled train text once, not once per experiment
    used = sorted({i for rows in plan for i in rows})
    used_vectors = np.asarray(encoder.encode([train_texts[i] for i in used], batch_size=batch_size,
                                             show_progress_bar=show_progress_bar))
    vector_of = {i: used_vectors[n] for n, i in enumerate(used)}
    x_test = np.asarray(encoder.encode(list(test_texts), batch_size=batch_size, show_progress_bar=show_progress_bar))
    runs = [fit_and_score(np.stack([vector_of[i] for i in rows]), [train_labels[i] for i in rows], x_test,
                          test_labels, max_iter, seed) for rows in plan]
    scores = {name: float(np.mean([r[name] for r in runs])) for name in runs[0]}
    scores.update({f"{name}_stderr": float(np.std([r[name] for r in runs])) for name in runs[0]})
    return scores


def run(task: Task, encoder, batch_size: int = 32, show_progress_bar: bool = False) -> dict[str, float]:
    data = read_classification(task)
    per_label = task.params.get("samples_per_label", SAMPLES_PER_LABEL.get(task.name, 8))
    return evaluate_classification(encoder, data.train_texts, data.train_labels, data.test_texts, data.test_labels,
                                   samples_per_label=per_label, n_experiments=task.params.get("n_experiments", 10),
                                   batch_size=batch_size, show_progress_bar=show_progress_bar)
