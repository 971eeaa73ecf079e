"""TEI-compatible routes (serve/tei.py) against huggingface_hub's real InferenceClient and TEI's documented shapes.

Expected vectors come from Encoder.encode (or Encoder.embed_ids of ids the `tokenizers` library gives), never from
the server's code; TEI's answers and errors are checked field by field as TEI documents them.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from tokenizers import Tokenizer

from allmpnet import Encoder, TruncationWarning
from allmpnet.serve import ServeConfig, create_app
from allmpnet.serve.background import BackgroundServer
from allmpnet.serve.batching import QueueFull

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import InferenceClient  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402

KEY = "tei-key"
TEXTS = ["This is an example sentence", "Each sentence is converted", "", "a cat sat on the mat"]
LONG = " ".join(["the cat sat on a mat"] * 20) + " end of it"  # ~130 word pieces: over the tiny model's 64
EXAMPLES = int(os.environ.get("ALLMPNET_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def enc(tiny_model_dir) -> Encoder:
    return Encoder(tiny_model_dir, device="cpu")


@pytest.fixture(autouse=True)
def hub_reaches_loopback(monkeypatch):
    # with HF_HUB_OFFLINE set, huggingface_hub refuses every request, even to a server on this machine
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def url(enc):
    """A server with a key and the defaults: token ids refused, truncation on (TEI's auto_truncate)."""
    config = ServeConfig(model_name="tiny-tei", api_key=KEY, max_items=8, warm_up=False)
    with BackgroundServer(create_app(enc, config)) as base:
        yield base


@pytest.fixture(scope="module")
def open_url(enc):
    """No key, token ids accepted, small limits (so the fuzzer reaches them)."""
    config = ServeConfig(model_name="tiny-tei", accept_token_ids=True, max_items=8, max_chars=2000,
                         max_body_bytes=32 * 1024, max_queue=64, warm_up=False)
    with BackgroundServer(create_app(enc, config)) as base:
        yield base


def post(base: str, path: str, body, key: str | None = KEY) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(base + path, content=content, headers=headers, timeout=60)


def tei_error(response: httpx.Response, status: int, error_type: str, says: str = "") -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str), body
    assert body["error_type"] == error_type and says.lower() in body["error"].lower(), body
    return body["error"]


def encode(enc: Encoder, texts: list[str]) -> np.ndarray:
    with warnings.catch_warnings():  # Encoder.encode warns about truncated texts, as it should
        warnings.simplefilter("ignore", TruncationWarning)
        return enc.encode(texts)


def left_truncated_ids(tiny_model_dir, text: str, limit: int) -> list[int]:
    """The ids the `tokenizers` library keeps of a text cut from the left: its last word pieces within <s> … </s>."""
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(limit, direction="left")
    return tokenizer.encode(text).ids


# ---------------------------------------------------------------- the real InferenceClient

def test_inference_client_feature_extraction_gets_encoder_vectors(url, enc):
    # with a base URL the client posts {"inputs": ...} to the URL itself: TEI's POST /
    client = InferenceClient(base_url=url, api_key=KEY, timeout=60)
    one = client.feature_extraction(TEXTS[0])
    assert one.shape == (1, enc.dim) and one.dtype == np.float32
    np.testing.assert_allclose(one, encode(enc, TEXTS[:1]), atol=1e-5)
    np.testing.assert_allclose(client.feature_extraction(TEXTS), encode(enc, TEXTS), atol=1e-5)
    np.testing.assert_allclose(client.feature_extraction(TEXTS, normalize=True, truncate=True), encode(enc, TEXTS),
                               atol=1e-5)


def test_inference_client_truncation_options(url, enc, tiny_model_dir):
    client = InferenceClient(base_url=url, api_key=KEY, timeout=60)
    # the server's own setting (truncate) when the client says nothing: cut at the end, as Encoder.encode cuts
    np.testing.assert_allclose(client.feature_extraction(LONG), encode(enc, [LONG]), atol=1e-5)
    expected = enc.embed_ids([left_truncated_ids(tiny_model_dir, LONG, enc.max_seq_length)]).numpy()
    got = client.feature_extraction(LONG, truncate=True, truncation_direction="left")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - encode(enc, [LONG])).max() > 1e-3  # the other end of the text: another vector
    with pytest.raises(HfHubHTTPError, match="truncation is off") as refused:
        client.feature_extraction(LONG, truncate=False)
    assert refused.value.response.status_code == 413


def test_inference_client_gets_the_pooled_vectors_before_normalization(url, enc):
    # all-mpnet-base-v2 ends in L2 normalization; normalize=false asks for the mean-pooled vectors before it
    client = InferenceClient(base_url=url, api_key=KEY, timeout=60)
    got = client.feature_extraction(TEXTS, normalize=False)
    expected = enc.encode(TEXTS, normalize=False)
    assert not np.allclose(np.linalg.norm(expected, axis=1), 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_inference_client_sees_the_servers_refusals(url):
    client = InferenceClient(base_url=url, api_key=KEY, timeout=60)
    with pytest.raises(HfHubHTTPError) as refused:
        client.feature_extraction("a cat", dimensions=16)
    assert refused.value.response.status_code == 422 and "dimensions=16" in refused.value.response.text
    with pytest.raises(HfHubHTTPError) as refused:
        InferenceClient(base_url=url, api_key="wrong", timeout=60).feature_extraction("a cat")
    assert refused.value.response.status_code == 401


# ---------------------------------------------------------------- POST /embed and POST /, plain HTTP

@pytest.mark.parametrize("path", ["/embed", "/"])
def test_embed_answers_a_list_of_vectors(url, enc, path):
    single = post(url, path, {"inputs": TEXTS[0]})
    assert single.status_code == 200 and single.headers["content-type"].startswith("application/json")
    assert len(single.json()) == 1 and len(single.json()[0]) == enc.dim  # a string still gives a list of one
    np.testing.assert_allclose(np.array(single.json(), dtype=np.float32), encode(enc, TEXTS[:1]), atol=1e-5)
    # TEI's documented fields, both spellings of the direction, and a field TEI does not know (ignored, as TEI does)
    body = {"inputs": TEXTS, "truncate": True, "truncation_direction": "Right", "normalize": True,
            "prompt_name": None, "dimensions": enc.dim, "encoding_format": "float", "priority": 3}
    got = np.array(post(url, path, body).json(), dtype=np.float32)
    np.testing.assert_allclose(got, encode(enc, TEXTS), atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_embed_left_truncation_of_texts(url, enc, tiny_model_dir):
    texts = [LONG, "a short one", LONG[::-1]]
    expected = enc.embed_ids([left_truncated_ids(tiny_model_dir, t, enc.max_seq_length) for t in texts]).numpy()
    for direction in ("left", "Left"):
        r = post(url, "/embed", {"inputs": texts, "truncate": True, "truncation_direction": direction})
        np.testing.assert_allclose(np.array(r.json(), dtype=np.float32), expected, atol=1e-5)


@pytest.mark.parametrize("body, status, error_type, says", [
    ({"inputs": []}, 400, "Empty", "`inputs` cannot be empty"),
    ({"inputs": ["a"] * 9}, 413, "Validation", "batch size 9 > maximum allowed batch size 8"),
    ({"inputs": ["fine", LONG], "truncate": False}, 413, "Validation", "truncation is off: inputs[1]"),
    ({"inputs": ["ok", "\ud800"]}, 422, "Validation", "lone surrogate"),
    ({"inputs": 42}, 422, "Validation", "got a number"),
    ({"inputs": ["a", None]}, 422, "Validation", "inputs[1] is null"),
    ({"texts": ["a"]}, 422, "Validation", "inputs: field required"),
    ({"inputs": "a", "truncate": "yes"}, 422, "Validation", "truncate"),
    ({"inputs": "a", "normalize": 0}, 422, "Validation", "normalize"),
    ({"inputs": "a", "truncation_direction": "middle"}, 422, "Validation", "truncation_direction"),
    ({"inputs": "a", "prompt_name": "query"}, 422, "Validation", "applies no prompts"),
    ({"inputs": "a", "dimensions": 16}, 422, "Validation", "dimensions=16 is not available"),
    ({"inputs": "a", "encoding_format": "base64"}, 422, "Validation", "encoding_format"),
    ({"inputs": [[0, 7, 2]]}, 422, "Validation", "token-id input is not supported"),
    ({"inputs": ["a", [0, 7, 2]]}, 422, "Validation", "--accept-token-ids"),
    (b"{not json", 422, "Validation", "not valid JSON"),
    (b'{"inputs": "caf\xe9"}', 422, "Validation", "UTF-8"),
    (b'{"inputs": "a", "\\ud800": 1}', 422, "Validation", "not valid Unicode"),
])
def test_embed_errors_are_teis(url, body, status, error_type, says):
    for path in ("/embed", "/"):
        tei_error(post(url, path, body), status, error_type, says)


def test_overloaded_is_429_and_a_failed_batch_424(tiny_model_dir, monkeypatch):
    app = create_app(Encoder(tiny_model_dir, device="cpu"), ServeConfig(warm_up=False))
    service = app.state.service

    def full(ids, normalize=None):
        raise QueueFull(service.batcher.capacity, service.batcher.capacity, retry_after=7)

    def broken(ids, normalize=None):
        raise RuntimeError("the device fell over")

    with BackgroundServer(app) as base:
        with monkeypatch.context() as patched:
            patched.setattr(service.batcher, "submit", full)
            r = post(base, "/embed", {"inputs": "a cat"}, key=None)
            tei_error(r, 429, "Overloaded", "queue is full")
            assert r.headers["retry-after"] == "7"
        with monkeypatch.context() as patched:
            patched.setattr(service.encoder, "embed_ids", broken)
            tei_error(post(base, "/embed", {"inputs": "a cat"}, key=None), 424, "Backend", "the device fell over")
        assert post(base, "/embed", {"inputs": "a cat"}, key=None).status_code == 200  # and it keeps serving


def test_normalize_on_a_model_that_does_not(tiny_model_dir, tmp_path):
    # the same weights without the Normalize module: the server's vectors are the raw mean-pooled ones
    model = shutil.copytree(tiny_model_dir, tmp_path / "raw")
    modules = json.loads((model / "modules.json").read_text())
    (model / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    raw = Encoder(model, device="cpu")
    assert not raw.normalize
    with BackgroundServer(create_app(raw, ServeConfig(warm_up=False))) as base:
        unnormalized = np.array(post(base, "/embed", {"inputs": TEXTS, "normalize": False}, key=None).json())
        normalized = np.array(post(base, "/embed", {"inputs": TEXTS}, key=None).json())
    expected = raw.encode(TEXTS)
    assert not np.allclose(np.linalg.norm(expected, axis=1), 1)
    np.testing.assert_allclose(unnormalized, expected, atol=1e-5)
    np.testing.assert_allclose(normalized, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)


# ---------------------------------------------------------------- token ids, when the server accepts them

def test_embed_takes_this_models_ids_and_mixed_batches(open_url, enc, tok, tiny_model_dir):
    ids = [tok.encode(t).ids for t in TEXTS]
    got = np.array(post(open_url, "/embed", {"inputs": ids}, key=None).json(), dtype=np.float32)
    np.testing.assert_allclose(got, encode(enc, TEXTS), atol=1e-5)
    # one id list alone is one input, as in TEI
    single = post(open_url, "/embed", {"inputs": ids[0]}, key=None).json()
    np.testing.assert_allclose(np.array(single, dtype=np.float32), encode(enc, TEXTS[:1]), atol=1e-5)
    mixed = ["a cat", ids[1], LONG, tok.encode(LONG).ids]
    got = np.array(post(open_url, "/embed", {"inputs": mixed}, key=None).json(), dtype=np.float32)
    np.testing.assert_allclose(got, encode(enc, ["a cat", TEXTS[1], LONG, LONG]), atol=1e-5)
    # ids cut from the left keep <s> and </s>, as the tokenizer cuts the text
    r = post(open_url, "/embed", {"inputs": [tok.encode(LONG).ids], "truncation_direction": "left"}, key=None)
    expected = enc.embed_ids([left_truncated_ids(tiny_model_dir, LONG, enc.max_seq_length)]).numpy()
    np.testing.assert_allclose(np.array(r.json(), dtype=np.float32), expected, atol=1e-5)
    tei_error(post(open_url, "/embed", {"inputs": [[0, 99999, 2]]}, key=None), 422, "Validation",
              "token ids run from 0 to")
    tei_error(post(open_url, "/embed", {"inputs": ["a", [0, 1.5, 2]]}, key=None), 422, "Validation",
              "inputs (its id lists)[0][1] is 1.5")


# ---------------------------------------------------------------- POST /tokenize with TEI's body, GET /info

def test_tokenize_in_teis_shape(url, enc, tok):
    text = "Hello world, <s> cat"
    r = post(url, "/tokenize", {"inputs": [text, "a"]})
    assert r.status_code == 200, r.text
    encoding = tok.encode(text)
    expected = [{"id": i, "text": "<s>" if i == 0 else "</s>", "special": True, "start": None, "stop": None}
                if special else {"id": i, "text": text[a:b], "special": False, "start": a, "stop": b}
                for i, (a, b), special in zip(encoding.ids, encoding.offsets, encoding.special_tokens_mask)]
    assert r.json()[0] == expected
    assert [t["id"] for t in r.json()[1]] == tok.encode("a").ids
    plain = post(url, "/tokenize", {"inputs": text, "add_special_tokens": False}).json()
    assert [t["id"] for t in plain[0]] == tok.encode(text, add_special_tokens=False).ids
    assert not any(t["special"] for t in plain[0])
    # the listing of our own shape is unchanged, and gives the same ids
    ours = post(url, "/tokenize", {"input": text}).json()["data"][0]
    assert ours["ids"] == encoding.ids


def test_tokenize_refusals(url):
    r = post(url, "/tokenize", {"inputs": ["fine", LONG]})
    assert r.status_code == 413 and "inputs[1]" in r.json()["error"]["message"]  # the path's errors: OpenAI's
    for body, says in [({"inputs": "a", "input": "a"}, "not both"), ({"inputs": "a", "truncate": True}, "truncate"),
                       ({"input": "a", "add_special_tokens": True}, "add_special_tokens"),
                       ({"inputs": "a", "prompt_name": "query"}, "no prompts"), ({}, "input: field required")]:
        r = post(url, "/tokenize", body)
        assert r.status_code == 422 and says in r.json()["error"]["message"], r.text


def test_info_in_teis_fields(url, enc):
    r = httpx.get(url + "/info", headers={"authorization": f"Bearer {KEY}"})
    info = r.json()
    assert info["model_id"] == "tiny-tei" and info["model_dtype"] == "float32"
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == enc.max_seq_length and info["max_client_batch_size"] == 8
    assert info["auto_truncate"] is True
    for field in ("max_concurrent_requests", "max_batch_tokens", "max_batch_requests", "tokenization_workers"):
        assert isinstance(info[field], int) and info[field] > 0, field
    assert isinstance(info["version"], str)
    assert httpx.get(url + "/info").status_code == 401


# ---------------------------------------------------------------- the routes fuzzed from their own schema

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])


def test_generated_requests_get_teis_answers(open_url):
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.generation import GenerationMode
    schema = httpx.get(open_url + "/api-doc/openapi.json").json()
    assert {"/embed", "/", "/info"} <= set(schema["paths"])
    # the main schema (whose errors are all OpenAI's) leaves these routes out
    assert not {"/embed", "/", "/info"} & set(httpx.get(open_url + "/openapi.json").json()["paths"])
    sent = 0
    for operation in [result.ok() for result in schemathesis.openapi.from_dict(schema).get_all_operations()]:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                nonlocal sent
                try:
                    response = case.call(base_url=open_url, timeout=60)
                except (ValueError, UnicodeError):  # a header no HTTP client can send never reaches the server
                    return
                sent += 1
                assert response.status_code < 500, response.text[:500]
                if response.status_code >= 400:
                    error = response.json()["error"]
                    if isinstance(error, dict):  # refused by the guards before any route ran: OpenAI's shape
                        assert error["code"] == "body_too_large", error
                    else:
                        tei_error(response, response.status_code, response.json()["error_type"])

            try:
                check()
            except Unsatisfiable:  # nothing in a GET's schema can be violated
                assert mode == GenerationMode.NEGATIVE
    assert sent >= min(EXAMPLES, 5) * 3
