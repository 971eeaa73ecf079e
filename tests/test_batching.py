"""The batch planner (token budget, order restored), tokenization prefetch, and the callers that share it."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from allmpnet import Encoder
from allmpnet.encode.batching import TokenBudget, default_batch_tokens, embed_in_batches, prefetched, windows

TEXTS = ["hello world", "the cat is on the moon", "", "   ", "a dog and a car", "x" * 80,
         "this is a test sentence with more words than the others in the list", "sun", "plant search query"]


def test_budget_batches_cover_every_row_once_within_limits():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    budget = TokenBudget(max_tokens=2048, max_texts=64)
    batches = list(budget.batches(lengths))
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(500))
    for batch in batches:
        assert len(batch) <= 64
        assert len(batch) * lengths[batch].max() <= 2048 or len(batch) == 1
        assert lengths[batch[0]] == lengths[batch].max()  # longest first: the batch pads to its first row
        assert budget.fits(len(batch), int(lengths[batch].max())) or len(batch) == 1
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)


def test_budget_gives_short_texts_full_batches_and_long_texts_small_ones():
    lengths = np.array([10] * 100 + [400] * 10)
    sizes = [len(b) for b in TokenBudget(max_tokens=1000, max_texts=32).batches(lengths)]
    assert sizes == [2, 2, 2, 2, 2, 32, 32, 32, 4]  # 2 x 400 tokens fit, 3 do not; then the count cap binds


def test_a_single_text_over_the_budget_still_gets_a_batch():
    assert [b.tolist() for b in TokenBudget(100, 8).batches([500, 3])] == [[0], [1]]


def test_budget_limits_can_be_lifted():
    assert [len(b) for b in TokenBudget(None, 32).batches([300] * 70)] == [32, 32, 6]
    lengths = np.array([10] * 1000 + [250] * 20)
    assert [len(b) for b in TokenBudget(1000, None).batches(lengths)] == [4] * 5 + [100] * 10
    assert [len(b) for b in TokenBudget(None, None).batches([5, 6, 7])] == [3]


def test_fits_is_the_rule_batches_follow():
    budget = TokenBudget(max_tokens=100, max_texts=4)
    assert budget.fits(4, 25) and not budget.fits(5, 1) and not budget.fits(2, 51)


@pytest.mark.parametrize("texts,tokens", [(0, 10), (4, 0)])
def test_budget_rejects_bad_limits(texts, tokens):
    with pytest.raises(ValueError):
        TokenBudget(tokens, texts)


def test_embed_in_batches_restores_the_callers_order():
    ids = [[i] * n for i, n in enumerate([3, 9, 1, 5, 5, 2])]
    seen = []

    def embed(batch):
        seen.append([len(seq) for seq in batch])
        return np.array([[seq[0], len(seq)] for seq in batch], dtype=np.float32)  # (text id, its length)

    out = np.zeros((6, 2), dtype=np.float32)
    embed_in_batches(ids, embed, TokenBudget(max_tokens=10, max_texts=None), out)
    assert out[:, 0].tolist() == [0, 1, 2, 3, 4, 5] and out[:, 1].tolist() == [3, 9, 1, 5, 5, 2]
    assert seen == [[9], [5, 5], [3, 2, 1]]  # longest first, each batch within 10 padded tokens
    as_tensor = torch.zeros(6, 2)
    embed_in_batches(ids, embed, TokenBudget(max_tokens=10), as_tensor)
    np.testing.assert_array_equal(as_tensor.numpy(), out)


def test_default_budgets_by_device():
    assert default_batch_tokens("cpu") == 4096 and default_batch_tokens("cuda") == 16384
    assert default_batch_tokens("mps") == 4096


def test_windows_split_exactly():
    assert windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert windows(0, 4) == []


def test_prefetched_keeps_order_and_prepares_next_item_while_caller_works():
    events: list[str] = []
    threads: set[str] = set()

    def prepare(i: int) -> int:
        threads.add(threading.current_thread().name)
        events.append(f"prepared {i}")
        return i * 10

    got = []
    for item, ready in prefetched([0, 1, 2], prepare):
        time.sleep(0.05)  # the caller's "model" work; item+1 is prepared meanwhile
        events.append(f"used {item}")
        got.append((item, ready))
    assert got == [(0, 0), (1, 10), (2, 20)]
    assert events.index("prepared 1") < events.index("used 0")
    assert threads and all(t.startswith("allmpnet-tokenize") for t in threads)
    assert list(prefetched([], prepare)) == []


def test_prefetched_single_item_runs_inline():
    threads = []
    got = list(prefetched(["only"], lambda item: threads.append(threading.current_thread().name) or item.upper()))
    assert got == [("only", "ONLY")]
    assert threads == [threading.current_thread().name]  # a lone query pays no thread start-up


# ---------------------------------------------------------------- the encoder on the planner


def test_encode_batches_by_token_budget(tiny_model_dir, monkeypatch):
    enc = Encoder(tiny_model_dir, device="cpu", max_batch_tokens=64)
    seen = []
    original = enc.embed_ids
    monkeypatch.setattr(enc, "embed_ids", lambda ids, normalize=None: seen.append(len(ids)) or original(ids))
    texts = ["cat"] * 100  # 3 tokens each with <s> and </s>
    vectors = enc.encode(texts)
    assert seen == [21] * 4 + [16]  # 64 // 3 texts per batch, not a fixed 32
    np.testing.assert_allclose(vectors, enc.encode(texts, batch_size=7), atol=1e-6)


def test_max_batch_tokens_does_not_change_vectors(tiny_model_dir):
    free = Encoder(tiny_model_dir, device="cpu", max_batch_tokens=None).encode(TEXTS)
    tight = Encoder(tiny_model_dir, device="cpu", max_batch_tokens=20).encode(TEXTS, batch_size=3)
    np.testing.assert_allclose(tight, free, atol=1e-6)


def test_encode_windows_restore_order(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu")
    enc.sort_window = 4  # several prefetched windows on a small input
    windowed = enc.encode(TEXTS * 3)
    one_by_one = np.stack([enc.encode(t) for t in TEXTS * 3])
    np.testing.assert_allclose(windowed, one_by_one, atol=1e-5)


def test_encode_ids_equals_encode(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu", max_batch_tokens=40)
    tokenized = enc.tokenize(TEXTS)
    np.testing.assert_array_equal(enc.encode_ids(tokenized.ids).numpy(), enc.encode(TEXTS))
    assert enc.embed_ids([]).shape == (0, enc.dim)


def test_bad_budget_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Encoder(tiny_model_dir, device="cpu", max_batch_tokens=0)
