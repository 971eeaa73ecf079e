"""EncodePool: spawn-started workers give Encoder.encode's rows in the caller's order; failures stop every worker."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from allmpnet import Encoder, TruncationWarning
from allmpnet.encode import EncodePool, PoolWorkerError

WORDS = "the cat sat on a mat while the dog ran to the car in the sun".split()


def texts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(0, 40)))) for _ in range(n)]


def assert_no_worker_left(pids: list[int]) -> None:
    assert mp.active_children() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class ExplodingEncoder:
    """Embeds like the real model until it meets the text "boom"."""

    def __init__(self, encoder: Encoder):
        self.encoder, self.dim = encoder, encoder.dim

    def tokenize(self, texts):
        if "boom" in texts:
            raise ValueError(f"cannot embed text #{texts.index('boom')} of this chunk")
        time.sleep(0.05)  # slow enough for the interrupt test to land mid-run
        return self.encoder.tokenize(texts)

    def encode_ids(self, ids, **kwargs):
        return self.encoder.encode_ids(ids, **kwargs)


def exploding_factory(model, device, precision, max_seq_length):  # module level: spawned workers import it
    return ExplodingEncoder(Encoder(model, device=device))


def test_pool_matches_encoder_in_input_order(tiny_model_dir):
    items = texts(300) + [""]  # an empty text is embedded, never dropped
    with EncodePool(str(tiny_model_dir), devices=["cpu", "cpu"]) as pool:
        pids = [w.pid for w in pool.workers]
        assert len(set(pids)) == 2 and os.getpid() not in pids
        with pytest.warns(TruncationWarning) as caught:  # one warning for the whole call, not one per chunk
            got = pool.encode(items, chunk_size=16, show_progress_bar=False)
        assert pool.encode([]).shape == (0, pool.dim)
        single = pool.encode(items[5])
        with pytest.raises(TypeError, match=r"texts\[1\]"):
            pool.encode(["fine", None])
    reference = Encoder(tiny_model_dir, device="cpu")
    assert len(caught) == 1
    assert str(caught[0].message).startswith(f"{len(reference.truncated_indices(items))} of 301 texts")
    with pytest.warns(TruncationWarning):
        want = reference.encode(items)
    assert got.shape == want.shape == (301, 32)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert single.shape == (32,)
    np.testing.assert_allclose(single, want[5], atol=1e-6)
    assert_no_worker_left(pids)


def test_texts_holding_special_tokens_get_the_reference_vectors(tiny_model_dir):
    from special_texts import SPECIAL_TEXTS, sentence_transformers_vectors
    with EncodePool(str(tiny_model_dir), devices=["cpu", "cpu"]) as pool:
        got = pool.encode(SPECIAL_TEXTS, chunk_size=3, show_progress_bar=False)
    np.testing.assert_allclose(got, sentence_transformers_vectors(tiny_model_dir), atol=1e-5)


def test_worker_exception_reaches_caller_and_stops_all_workers(tiny_model_dir):
    pool = EncodePool(str(tiny_model_dir), devices=["cpu", "cpu"], factory=exploding_factory)
    pids = [w.pid for w in pool.workers]
    items = texts(40)
    items[25] = "boom"
    with pytest.raises(PoolWorkerError, match=r"ValueError: cannot embed text #\d+ of this chunk"):
        pool.encode(items, chunk_size=4, show_progress_bar=False)
    assert_no_worker_left(pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.encode(["again"])


def test_interrupt_stops_all_workers(tiny_model_dir):
    pool = EncodePool(str(tiny_model_dir), devices=["cpu", "cpu"], factory=exploding_factory)
    pids = [w.pid for w in pool.workers]

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.encode(texts(4000), chunk_size=2, show_progress_bar=False)  # ~2000 chunks x 50 ms: still running
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert pool.closed
    assert_no_worker_left(pids)


def test_dead_worker_is_reported_not_waited_for(tiny_model_dir):
    pool = EncodePool(str(tiny_model_dir), devices=["cpu"])
    pid = pool.workers[0].pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(PoolWorkerError, match=r"worker 0 \(cpu\) died with exit code -9"):
        pool.encode(texts(10), show_progress_bar=False)
    assert_no_worker_left([pid])


def test_worker_that_cannot_load_fails_the_start(tiny_model_dir):
    import torch
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, so that cuda:7 cannot load")
    before = {p.pid for p in mp.active_children()}
    with pytest.raises(PoolWorkerError, match=r"worker 1 \(cuda:7\) failed: .*CUDA"):
        EncodePool(str(tiny_model_dir), devices=["cpu", "cuda:7"])
    assert {p.pid for p in mp.active_children()} == before == set()
