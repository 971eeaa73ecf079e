"""Strict request fields: JSON's types are taken as sent, never coerced, and /v1/embeddings' leniency about unknown
fields does not reach field names that are not valid Unicode (which every other route refuses)."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from allmpnet import Encoder
from allmpnet.serve import ServeConfig, create_app
from allmpnet.serve.background import BackgroundServer

search = pytest.importorskip("allmpnet.search")


@pytest.fixture(scope="module")
def enc(tiny_model_dir) -> Encoder:
    return Encoder(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def url(enc, tmp_path_factory):
    index = search.Index.build(tmp_path_factory.mktemp("ix") / "ix", texts=["a cat", "the dog"], encoder=enc)
    with BackgroundServer(create_app(enc, ServeConfig(model_name="tiny", warm_up=False), index)) as base:
        yield base


def post_raw(base: str, path: str, raw_json: str) -> httpx.Response:
    """raw_json goes as written: a field name "\\ud800" arrives as the JSON escape, as a careless client sends it."""
    return httpx.post(base + path, content=raw_json.encode("ascii"), headers={"content-type": "application/json"},
                      timeout=60)


def refused(response: httpx.Response, field: str | None, says: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert says in message, message
    if not isinstance(error, str):
        assert error["code"] == "invalid_request" and error["param"] == field, error


def test_a_field_name_that_is_not_unicode_is_refused_on_the_lenient_routes_too(url, enc):
    surrogate_name = '{"input": "a", "\\ud800": 1}'
    refused(post_raw(url, "/v1/embeddings", surrogate_name), None, "a field name is not valid Unicode")
    # as on the strict routes, which always refused it
    refused(post_raw(url, "/tokenize", surrogate_name), None, "not valid Unicode")
    refused(post_raw(url, "/embed", surrogate_name.replace('"input"', '"inputs"')), None, "not valid Unicode")
    # unknown fields with proper names are still ignored, whatever their values
    r = post_raw(url, "/v1/embeddings", json.dumps({"input": "a cat", "extra_field": {"x": [1, "\ud800"]},
                                                    "user": "\udfff"}))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["data"][0]["embedding"], dtype=np.float32), enc.encode("a cat"),
                               atol=1e-5)


@pytest.mark.parametrize("value", ["768", 32.0, True, "32"])
def test_dimensions_must_be_a_json_integer(url, enc, value):
    assert enc.dim == 32
    refused(httpx.post(url + "/v1/embeddings", json={"input": "a", "dimensions": value}), "dimensions",
            "dimensions: Input should be a valid integer")
    assert httpx.post(url + "/v1/embeddings", json={"input": "a", "dimensions": 32}).status_code == 200


@pytest.mark.parametrize("value", ["no", "true", "false", 1, 0, "yes", "off"])
@pytest.mark.parametrize("path, body", [("/v1/embeddings", {"input": "a"}), ("/tokenize", {"input": "a"}),
                                        ("/similarity", {"a": "a", "b": "b"}), ("/search", {"query": "a"})])
def test_truncate_must_be_a_json_boolean(url, path, body, value):
    refused(httpx.post(url + path, json={**body, "truncate": value}), "truncate",
            "truncate: Input should be a valid boolean")
    assert httpx.post(url + path, json={**body, "truncate": False}).status_code == 200


@pytest.mark.parametrize("value", ["5", 5.0, True])
def test_search_k_must_be_a_json_integer(url, value):
    refused(httpx.post(url + "/search", json={"query": "a", "k": value}), "k", "k: Input should be a valid integer")
    assert httpx.post(url + "/search", json={"query": "a", "k": 2}).status_code == 200


@pytest.mark.parametrize("field, value", [("truncate", "true"), ("normalize", "false"), ("normalize", 1),
                                          ("dimensions", "32"), ("dimensions", 32.0)])
def test_teis_fields_are_strict_too(url, field, value):
    r = httpx.post(url + "/embed", json={"inputs": "a", field: value})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation" and field in r.json()["error"], r.text
