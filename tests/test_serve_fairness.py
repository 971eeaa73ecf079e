"""Fair, honest admission and scheduling: a request is charged what it can cost, a giant cannot hold a small
request behind it, and a request refused before routing is counted under its route."""
from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from allmpnet import Encoder
from allmpnet.serve import ServeConfig, create_app
from allmpnet.serve.background import BackgroundServer
from allmpnet.serve.batching import DynamicBatcher

WORDS = "the cat sat on a mat while dogs ran in the park and birds sang over green fields".split()


@pytest.fixture(scope="module")
def enc(tiny_model_dir) -> Encoder:
    return Encoder(tiny_model_dir, device="cpu")


class Gate:
    """Holds every forward pass until opened, so requests pile up in flight; records each pass's rows."""

    def __init__(self, enc: Encoder):
        self.inner, self.opened, self.passes = enc.embed_ids, threading.Event(), []

    def __call__(self, ids, normalize=None):
        self.passes.append([list(row) for row in ids])
        assert self.opened.wait(60), "the test never opened the gate"
        return self.inner(ids, normalize)


def moderate_texts(seed: int) -> list[str]:
    # the load: 6 texts of 250 words (a ~9 KB body)
    return [" ".join(WORDS[(seed + i * 7 + j) % len(WORDS)] for j in range(250)) for i in range(6)]


def test_moderate_requests_are_charged_their_own_size_and_all_admitted_at_once(enc, monkeypatch):
    # Charged as 2,048 texts each (the most their body size allows), three of these filled the default budget and
    # the rest waited, or got 503 server_busy once the first took longer than the admission timeout
    gate = Gate(enc)
    monkeypatch.setattr(enc, "embed_ids", gate)
    app = create_app(enc, ServeConfig(warm_up=False, admission_timeout=5))
    statuses: list[int] = []
    with BackgroundServer(app) as base:
        def client(seed: int) -> None:
            r = httpx.post(base + "/v1/embeddings", json={"input": moderate_texts(seed)}, timeout=120)
            statuses.append(r.status_code)

        clients = [threading.Thread(target=client, args=(seed,)) for seed in range(24)]
        for t in clients:
            t.start()
        service = app.state.service
        deadline = time.monotonic() + 30
        # every request is admitted and queued while the first forward pass is held
        while service.batcher.queued + sum(map(len, gate.passes)) < 24 * 6:
            assert time.monotonic() < deadline, (f"only {service.batcher.queued} texts reached the queue: "
                                                 f"{service.budget.used} bytes charged of {service.budget.capacity}")
            time.sleep(0.02)
        charged = service.budget.used
        gate.opened.set()
        for t in clients:
            t.join(60)
    assert statuses == [200] * 24
    # what 24 answers of 6 vectors can take as JSON, plus their bodies: well under a tenth of the budget
    assert charged < 24 * (6 * enc.dim * 16 + 20_000)


def test_a_giant_request_cannot_hold_a_one_text_query_behind_it(enc, monkeypatch):
    gate = Gate(enc)
    monkeypatch.setattr(enc, "embed_ids", gate)
    batcher = DynamicBatcher(enc, max_batch_tokens=8 * enc.max_seq_length, max_batch_size=8).start()
    try:
        long_text = " ".join(WORDS * 40)
        giants = [batcher.submit(enc.tokenize([f"{i} {long_text}"] * 100).ids) for i in range(3)]
        time.sleep(0.2)  # the first pass has been taken (and waits at the gate); the query arrives after it
        query_ids = enc.tokenize(["where is the cat"]).ids
        query = batcher.submit(query_ids)
        gate.opened.set()
        query.result(60)
        for giant in giants:
            giant.result(120)
    finally:
        batcher.close()
    # 300 full-length rows ahead of it, 8 per pass: first come, first served it ran in pass 39
    taken = next(i for i, rows in enumerate(gate.passes) if query_ids[0] in rows)
    assert taken <= 1, f"the query ran in pass {taken} of {len(gate.passes)}"
    # the giants took turns too: each had rows in the first passes, none waited for another to finish
    first_rows = [row[1] for rows in gate.passes[:2] for row in rows]
    assert len({row for row in first_rows}) >= 3


def test_requests_refused_before_routing_are_counted_under_their_route(enc):
    app = create_app(enc, ServeConfig(warm_up=False, admission_timeout=0.2, max_inflight_bytes=1_000_000))
    with BackgroundServer(app) as base:
        budget = app.state.service.budget
        budget.used = budget.bodies = budget.capacity  # the server is full
        try:
            r = httpx.post(base + "/v1/embeddings", json={"input": "a cat"})
        finally:
            budget.used = budget.bodies = 0
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
        assert httpx.post(base + "/no/such/route", json={}).status_code == 404
        metrics = httpx.get(base + "/metrics").text
    assert 'allmpnet_requests_total{route="/v1/embeddings",status="503"} 1.0' in metrics
    assert 'route="unmatched",status="404"' in metrics


def test_a_request_waits_for_room_for_its_answer_and_bodies_never_deadlock(enc):
    # Bodies may hold at most half the budget, answers at most half: requests that hold their bodies and all wait
    # for room for their answers always leave room for one of them
    config = ServeConfig(warm_up=False, max_items=2048, max_chars=2000, max_inflight_bytes=3_000_000,
                         admission_timeout=30)
    app = create_app(enc, config)
    texts = [("the cat sat on a mat " * 100)[:2000]] * 500  # ~1 MB bodies; /tokenize answers of ~9 MB
    statuses: list[int] = []
    with BackgroundServer(app) as base:
        def client() -> None:
            statuses.append(httpx.post(base + "/tokenize", content=json.dumps({"input": texts}),
                                       headers={"content-type": "application/json"}, timeout=120).status_code)

        clients = [threading.Thread(target=client) for _ in range(4)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(120)
        budget = app.state.service.budget
        deadline = time.monotonic() + 10
        while budget.used and time.monotonic() < deadline:  # released just after the last send
            time.sleep(0.01)
    assert statuses == [200] * 4
    assert 0 < budget.peak <= config.max_inflight_bytes and budget.used == 0 and budget.bodies == 0



def test_rows_asking_for_unnormalized_vectors_never_share_a_pass_with_the_rest(enc, monkeypatch):
    gate = Gate(enc)
    monkeypatch.setattr(enc, "embed_ids", gate)
    settings: list = []
    inner = gate.inner
    gate.inner = lambda ids, normalize=None: settings.append(normalize) or inner(ids, normalize)
    batcher = DynamicBatcher(enc, max_batch_tokens=4 * enc.max_seq_length, max_batch_size=4).start()
    texts = ["a cat sat", "the dog ran far away", "birds", "green fields and a park"]
    try:
        raw = batcher.submit(enc.tokenize(texts * 3).ids, normalize=False)
        unit = [batcher.submit(enc.tokenize([t]).ids) for t in texts]
        gate.opened.set()
        raw_vectors = raw.result(60).numpy()
        unit_vectors = np.concatenate([u.result(60).numpy() for u in unit])
    finally:
        batcher.close()
    assert len(settings) == len(gate.passes) and set(settings) == {False, None}
    np.testing.assert_allclose(raw_vectors, enc.encode(texts * 3, normalize=False), atol=1e-6)
    np.testing.assert_allclose(unit_vectors, enc.encode(texts), atol=1e-6)
    assert not np.allclose(np.linalg.norm(raw_vectors, axis=1), 1.0)
