"""The HTTP API on a live loopback server with the tiny model: answers, limits, errors, auth, overload."""
from __future__ import annotations

import base64
import threading
import time

import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer

from allmpnet import Encoder, TruncationWarning
from allmpnet.serve import ServeConfig, create_app
from allmpnet.serve.background import BackgroundServer

TEXTS = ["hello world", "a cat", "the dog is on the moon", ""]
LONG = " ".join(["the cat"] * 100)  # 200 word pieces: over the tiny model's 64


@pytest.fixture(scope="module")
def enc(tiny_model_dir) -> Encoder:
    return Encoder(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def client(enc):
    config = ServeConfig(model_name="tiny-test", max_items=8, max_chars=2000, max_body_bytes=64 * 1024, max_queue=64)
    with BackgroundServer(create_app(enc, config)) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


def assert_error(response: httpx.Response, status: int, code: str | None = None, says: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] and says.lower() in error["message"].lower(), error
    if code is not None:
        assert error["code"] == code
    return error


def test_embeddings_float_equal_encoder(client, enc):
    r = client.post("/v1/embeddings", json={"input": TEXTS, "model": "tiny-test"})
    np.testing.assert_allclose(vectors(r), enc.encode(TEXTS), atol=1e-5)
    body = r.json()
    assert body["object"] == "list" and body["model"] == "tiny-test"
    assert [row["index"] for row in body["data"]] == [0, 1, 2, 3]
    assert body["truncated"] == []


def test_texts_holding_special_tokens_get_the_reference_vectors(client, tiny_model_dir):
    from special_texts import SPECIAL_TEXTS, sentence_transformers_vectors
    got = np.concatenate([vectors(client.post("/v1/embeddings", json={"input": SPECIAL_TEXTS[i:i + 8]}))
                          for i in range(0, len(SPECIAL_TEXTS), 8)])
    np.testing.assert_allclose(got, sentence_transformers_vectors(tiny_model_dir), atol=1e-5)


def test_embeddings_base64_is_little_endian_float32(client, enc):
    r = client.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    decoded = np.stack([np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4") for row in r.json()["data"]])
    np.testing.assert_allclose(decoded, enc.encode(TEXTS), atol=1e-5)


def test_single_string_input_and_usage_counts_word_pieces(client, enc):
    r = client.post("/v1/embeddings", json={"input": "hello world"})
    assert vectors(r).shape == (1, enc.dim)
    # <s> hello world </s>, counted by the tokenizer library directly
    assert r.json()["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    tok = Tokenizer.from_file(str(enc.model_dir / "tokenizer.json"))
    r = client.post("/v1/embeddings", json={"input": TEXTS})
    expected = sum(len(tok.encode(t).ids) for t in TEXTS)
    assert r.json()["usage"]["prompt_tokens"] == expected


def test_long_inputs_are_truncated_and_reported(client, enc):
    r = client.post("/v1/embeddings", json={"input": ["a cat", LONG]})
    with pytest.warns(TruncationWarning):
        expected = enc.encode(["a cat", LONG])
    np.testing.assert_allclose(vectors(r), expected, atol=1e-5)
    assert r.json()["truncated"] == [1]
    assert r.json()["usage"]["prompt_tokens"] == 4 + enc.max_seq_length


def test_truncation_can_be_refused_per_request(client):
    r = client.post("/v1/embeddings", json={"input": ["a cat", LONG], "truncate": False})
    assert_error(r, 413, "text_too_long", "input[1]")


def test_server_refusing_truncation(enc):
    with BackgroundServer(create_app(enc, ServeConfig(truncate=False))) as url:
        r = httpx.post(f"{url}/v1/embeddings", json={"input": [LONG, "a", LONG]})
        assert_error(r, 413, "text_too_long", "input[0, 2]")
        r = httpx.post(f"{url}/v1/embeddings", json={"input": [LONG], "truncate": True})
        assert r.status_code == 200 and r.json()["truncated"] == [0]


def test_models_and_model_check(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["tiny-test"]
    assert client.get("/v1/models/tiny-test").json()["id"] == "tiny-test"
    assert_error(client.get("/v1/models/text-embedding-3-small"), 404, "model_not_found")
    r = client.post("/v1/embeddings", json={"input": "x", "model": "text-embedding-3-small"})
    assert_error(r, 404, "model_not_found", "tiny-test")
    r = client.post("/v1/embeddings", json={"input": "x", "dimensions": 16})
    assert_error(r, 422, "invalid_dimensions", "32")


@pytest.mark.parametrize("body, says", [
    (b"{not json", "not valid JSON"),
    (b'["a", "b"]', "JSON object"),
    (b'{"model": "tiny-test"}', "input: field required"),
    (b'{"input": []}', "empty"),
    (b'{"input": [1, 2, 3]}', "token-id input is not supported"),
    (b'{"input": [[1, 2], [3]]}', "token-id input is not supported"),
    (b'{"input": ["ok", null]}', "input[1] is null"),
    (b'{"input": ["ok", {"text": "x"}]}', "input[1] is an object"),
    (b'{"input": 42}', "got a number"),
    (b'{"input": "x", "encoding_format": "hex"}', "encoding_format"),
])
def test_malformed_bodies_answer_422(client, body, says):
    r = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid_request", says)


def test_size_limits_answer_413(client):
    assert_error(client.post("/v1/embeddings", json={"input": ["a"] * 9}), 413, "too_many_items", "at most 8")
    assert_error(client.post("/v1/embeddings", json={"input": ["a", "b" * 2001]}), 413, "text_too_long", "input[1]")
    too_big = {"input": ["a " * 900] * 40}  # ~72 KB body, over the 64 KiB limit
    assert_error(client.post("/v1/embeddings", json=too_big), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit applies while the body streams in
        yield b'{"input": ["'
        for _ in range(100):
            yield b"a" * 1024
        yield b'"]}'
    r = client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "body_too_large")


def test_unknown_route_and_method_are_json(client):
    assert_error(client.get("/v2/nothing"), 404, "not_found")
    assert_error(client.get("/v1/embeddings"), 405, "method_not_allowed")


def test_similarity_is_cosine_of_the_vectors(client, enc):
    r = client.post("/similarity", json={"a": "hello world", "b": ["a cat", "hello world", LONG]})
    assert r.status_code == 200, r.text
    a = enc.encode(["hello world"])
    with pytest.warns(TruncationWarning):
        b = enc.encode(["a cat", "hello world", LONG])
    expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    np.testing.assert_allclose(np.array(r.json()["scores"]), expected, atol=1e-5)
    assert r.json()["truncated"] == {"a": [], "b": [2]}
    assert_error(client.post("/similarity", json={"a": "x"}), 422, says="b: field required")
    assert_error(client.post("/similarity", json={"a": ["x"] * 5, "b": ["y"] * 4}), 413, "too_many_items")


def test_tokenize_shows_word_pieces(client, enc):
    r = client.post("/tokenize", json={"input": ["hello world", LONG]})
    assert r.status_code == 200, r.text
    first, second = r.json()["data"]
    assert first["tokens"] == ["<s>", "hello", "world", "</s>"] and first["count"] == 4
    assert not first["truncated"]
    assert second["truncated"] and second["count"] == enc.max_seq_length
    assert r.json()["max_seq_length"] == enc.max_seq_length


def test_search_without_index_says_how_to_get_one(client):
    assert_error(client.post("/search", json={"query": "x"}), 404, "no_index", "--index")


def test_health_and_metrics(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["dimensions"] == 32 and health["queue_capacity"] == 64
    before = client.get("/metrics").text
    client.post("/v1/embeddings", json={"input": TEXTS})
    after = client.get("/metrics").text

    def value(text: str, name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    assert value(after, "allmpnet_texts_embedded_total") - value(before, "allmpnet_texts_embedded_total") == 4
    assert value(after, 'allmpnet_requests_total{route="/v1/embeddings",status="200"}') >= 1
    assert "allmpnet_batch_rows_bucket" in after


def test_api_key(enc, monkeypatch):
    with BackgroundServer(create_app(enc, ServeConfig(api_key="s3cret"))) as url:
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "x"})
        assert_error(r, 401, "invalid_api_key", "Authorization: Bearer")
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer wrong"})
        assert_error(r, 401, "invalid_api_key")
        assert_error(httpx.get(f"{url}/v1/models"), 401)
        assert_error(httpx.post(f"{url}/similarity", json={"a": "x", "b": "y"}), 401)
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key


def test_full_queue_answers_503_with_retry_after(tiny_model_dir, monkeypatch):
    enc = Encoder(tiny_model_dir, device="cpu")
    inner, entered, opened = enc.embed_ids, threading.Event(), threading.Event()

    def gated(ids, normalize=None):  # holds the worker so the queue fills deterministically
        entered.set()
        opened.wait(20)
        return inner(ids, normalize)

    monkeypatch.setattr(enc, "embed_ids", gated)
    config = ServeConfig(max_items=4, max_queue=4, warm_up=False)  # the gate would hold the warm-up pass too
    with BackgroundServer(create_app(enc, config)) as url:
        results: dict[str, httpx.Response] = {}

        def post(name: str, texts: list[str]) -> None:
            results[name] = httpx.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=30)

        busy = threading.Thread(target=post, args=("busy", ["a"]))
        busy.start()
        assert entered.wait(10)
        queued = threading.Thread(target=post, args=("queued", ["a", "b", "c", "d"]))
        queued.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["queued"] < 4:
            assert time.monotonic() < deadline, "the second request never reached the queue"
            time.sleep(0.01)
        r = httpx.post(f"{url}/v1/embeddings", json={"input": ["e"]})
        assert_error(r, 503, "queue_full", "retry")
        assert int(r.headers["retry-after"]) >= 1
        opened.set()
        busy.join(20)
        queued.join(20)
    assert results["busy"].status_code == 200 and results["queued"].status_code == 200
    np.testing.assert_allclose(vectors(results["queued"]), Encoder(tiny_model_dir, device="cpu").encode(
        ["a", "b", "c", "d"]), atol=1e-5)


def test_health_fails_when_the_worker_is_gone(enc):
    app = create_app(enc, ServeConfig(warm_up=False))
    with BackgroundServer(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        app.state.service.batcher.close()
        assert_error(httpx.get(f"{url}/health"), 503, "unhealthy", "not running")
        assert_error(httpx.post(f"{url}/v1/embeddings", json={"input": "x"}), 503, "shutting_down", "shutting down")
