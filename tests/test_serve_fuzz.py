"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis + Hypothesis), on loopback, with the tiny model.

Every operation gets schema-valid and schema-violating requests; no answer may be a 5xx, and every error is
our JSON shape with a code. Bounded: ALLMPNET_FUZZ_EXAMPLES (default 25) examples per operation and mode,
derandomized so CI sees the same requests each run; raise it locally for a longer hunt.
"""
from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation import GenerationMode  # noqa: E402

from allmpnet import Encoder  # noqa: E402
from allmpnet.serve import ServeConfig, create_app  # noqa: E402
from allmpnet.serve.background import BackgroundServer  # noqa: E402

search = pytest.importorskip("allmpnet.search")
EXAMPLES = int(os.environ.get("ALLMPNET_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    enc = Encoder(tiny_model_dir, device="cpu")
    index = search.Index.build(tmp_path_factory.mktemp("ix") / "ix", texts=["a cat", "the dog", "hello"], encoder=enc)
    # small limits, so generated inputs reach them: every refusal path is fuzzed too
    config = ServeConfig(model_name="tiny-test", max_items=16, max_chars=500, max_body_bytes=32 * 1024,
                         max_queue=64, max_search_k=20, max_search_hits=40, header_timeout=5, read_timeout=5)
    app = create_app(enc, config, index)
    with BackgroundServer(app) as url:
        yield app, url


def operations(app):
    schema = schemathesis.openapi.from_dict(app.openapi())
    found = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in found} >= {
        "POST /v1/embeddings", "POST /similarity", "POST /tokenize", "POST /search", "GET /v1/models",
        "GET /health"}
    return found


def assert_handled(response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["code"], error


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_generated_request_gets_a_server_error(served, mode):
    app, url = served
    sent: dict[str, int] = {}
    for operation in operations(app):
        name = f"{operation.method.upper()} {operation.path}"

        @FUZZ
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            try:
                response = case.call(base_url=url, timeout=60)
            except (ValueError, UnicodeError):  # a header no HTTP client can send never reaches the server
                return
            sent[name] = sent.get(name, 0) + 1
            assert_handled(response)

        try:
            check()
        except Unsatisfiable:  # nothing in this operation's schema can be violated (e.g. GET /health)
            assert mode == GenerationMode.NEGATIVE
    fuzzed_routes = {"POST /v1/embeddings", "POST /similarity", "POST /tokenize", "POST /search"}
    assert all(sent.get(name, 0) >= min(EXAMPLES, 5) for name in fuzzed_routes), sent


TEXT_ROUTES = {"/v1/embeddings": "input", "/tokenize": "input", "/search": "query", "/similarity": "a"}
# any code point, lone surrogates drawn often (a plain draw of all of Unicode rarely picks one)
ANY_CODE_POINT = st.lists(st.one_of(st.characters(exclude_categories=[]), st.characters(categories=["Cs"])),
                          max_size=40).map("".join)


@FUZZ
@given(route=st.sampled_from(sorted(TEXT_ROUTES)), texts=st.lists(ANY_CODE_POINT, min_size=1, max_size=6))
def test_any_code_points_in_texts_never_give_a_server_error(served, route, texts):
    _, url = served
    body = {TEXT_ROUTES[route]: texts}
    if route == "/similarity":
        body["b"] = texts[:1]
    # json.dumps escapes a lone surrogate as \udxxx, which is what reaches the server from a careless client
    r = httpx.post(url + route, content=json.dumps(body).encode(), headers={"content-type": "application/json"},
                   timeout=60)
    assert_handled(r)
    if any(0xD800 <= ord(c) <= 0xDFFF for t in texts for c in t):
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_text"
