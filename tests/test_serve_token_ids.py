"""Token-id input on /v1/embeddings: refused with its likely cause by default, this model's own ids when accepted.

The clients are the real ones: LangChain's OpenAIEmbeddings (which sends tiktoken ids unless told otherwise) and
the official openai client. Expected vectors come from Encoder.encode / Encoder.embed_ids of ids the `tokenizers`
library gives, never from the server's code.
"""
from __future__ import annotations

import base64
import warnings

import httpx
import numpy as np
import openai
import pytest

from allmpnet import Encoder, TruncationWarning
from allmpnet.serve import ServeConfig, create_app
from allmpnet.serve.background import BackgroundServer

langchain_openai = pytest.importorskip("langchain_openai")

KEY = "ids-key"
TEXTS = ["This is an example sentence", "Each sentence is converted", "a cat sat on the mat"]
LONG = " ".join(["the cat sat on a mat"] * 20) + " end of it"  # ~130 word pieces: over the tiny model's 64
# what OpenAIEmbeddings sends for "Hello world" at its defaults: tiktoken's cl100k_base ids, one list per text
TIKTOKEN_HELLO_WORLD = [9906, 1917]


@pytest.fixture(scope="module")
def enc(tiny_model_dir) -> Encoder:
    return Encoder(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def url(enc):
    """The default: token ids refused."""
    with BackgroundServer(create_app(enc, ServeConfig(model_name="tiny", api_key=KEY, warm_up=False))) as base:
        yield base


@pytest.fixture(scope="module")
def accepting(enc):
    config = ServeConfig(model_name="tiny", api_key=KEY, accept_token_ids=True, max_items=4, warm_up=False)
    with BackgroundServer(create_app(enc, config)) as base:
        yield base


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)


def embeddings(base: str, **kwargs):
    """LangChain's OpenAIEmbeddings pointed at the server."""
    return langchain_openai.OpenAIEmbeddings(model="tiny", openai_api_base=f"{base}/v1", api_key=KEY, max_retries=0,
                                             **kwargs)


def encode(enc: Encoder, texts) -> np.ndarray:
    with warnings.catch_warnings():  # Encoder.encode warns about truncated texts, as it should
        warnings.simplefilter("ignore", TruncationWarning)
        return enc.encode(texts)


def cl100k_unavailable() -> str | None:
    """Why tiktoken cannot load cl100k_base here (it fetches the BPE file on first use), or None if it can."""
    import tiktoken
    try:
        tiktoken.get_encoding("cl100k_base")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return (f"tiktoken cannot load cl100k_base, which OpenAIEmbeddings' default tokenization needs "
                f"({type(e).__name__}: {first}); no copy is in its cache: set TIKTOKEN_CACHE_DIR to a folder "
                "holding it to run this test")
    return None


# ---------------------------------------------------------------- the default: refused, saying why

def byte_level_encoding():
    """A tiktoken encoding of single bytes: what OpenAIEmbeddings tokenizes with where cl100k_base's file cannot be
    fetched (no network here). The client's code path is its default one; only the ids differ."""
    import tiktoken
    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={})


def test_langchain_at_its_defaults_gets_the_refusal_and_its_cause(url, monkeypatch):
    if cl100k_unavailable() is not None:
        import tiktoken
        monkeypatch.setattr(tiktoken, "encoding_for_model", lambda name: byte_level_encoding())
        monkeypatch.setattr(tiktoken, "get_encoding", lambda name: byte_level_encoding())
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        embeddings(url).embed_documents(TEXTS)
    message = str(refused.value)
    assert "token-id input is not supported" in message and "check_embedding_ctx_length=False" in message
    assert "--accept-token-ids" in message


def test_tiktoken_ids_from_the_openai_client_are_refused_with_their_likely_cause(url):
    # the request OpenAIEmbeddings makes at its defaults, sent by the client it makes it with
    for ids in ([TIKTOKEN_HELLO_WORLD], TIKTOKEN_HELLO_WORLD, [TIKTOKEN_HELLO_WORLD, [2]]):
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            client(url).embeddings.create(model="tiny", input=ids)
        error = refused.value.body
        assert error["param"] == "input" and error["code"] == "invalid_request"
        for cause in ("this server tokenizes text itself", "LangChain's OpenAIEmbeddings sends tiktoken",
                      "check_embedding_ctx_length=False", "--accept-token-ids"):
            assert cause in error["message"], error["message"]


def test_langchain_sending_text_gets_encoder_vectors(url, enc):
    lc = embeddings(url, check_embedding_ctx_length=False)
    np.testing.assert_allclose(np.array(lc.embed_documents(TEXTS), dtype=np.float32), encode(enc, TEXTS), atol=1e-5)
    np.testing.assert_allclose(np.array(lc.embed_query(TEXTS[0]), dtype=np.float32), encode(enc, TEXTS[0]),
                               atol=1e-5)


def test_langchain_with_a_hugging_face_tokenizer_sends_text(url, enc, tiny_model_dir):
    # tiktoken_enabled=False: the client tokenizes with transformers (offline, from the model's own directory),
    # then sends each chunk decoded back to text, which the server embeds like any text
    from transformers import AutoTokenizer
    reference = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    sent = [reference.decode(reference.encode(t, add_special_tokens=False)) for t in TEXTS]
    lc = embeddings(url, tiktoken_enabled=False, tiktoken_model_name=str(tiny_model_dir))
    np.testing.assert_allclose(np.array(lc.embed_documents(TEXTS), dtype=np.float32), encode(enc, sent), atol=1e-5)


# ---------------------------------------------------------------- --accept-token-ids: this model's own ids

def test_accepted_ids_embed_as_their_text(accepting, enc, tok):
    ids = [tok.encode(t).ids for t in TEXTS]
    for encoding_format in ("float", "base64"):  # the client asks for base64 unless told
        response = client(accepting).embeddings.create(model="tiny", input=ids, encoding_format=encoding_format)
        if encoding_format == "base64":
            got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
                            for d in response.data])
        else:
            got = np.array([d.embedding for d in response.data], dtype=np.float32)
        np.testing.assert_allclose(got, encode(enc, TEXTS), atol=1e-5)
        assert response.usage.prompt_tokens == response.usage.total_tokens == sum(map(len, ids))
    one = client(accepting).embeddings.create(model="tiny", input=ids[0], encoding_format="float")
    assert len(one.data) == 1
    np.testing.assert_allclose(np.array(one.data[0].embedding, dtype=np.float32), encode(enc, TEXTS[0]), atol=1e-5)


def test_ids_from_tokenize_round_trip(accepting, enc):
    headers = {"authorization": f"Bearer {KEY}"}
    listed = httpx.post(accepting + "/tokenize", json={"input": TEXTS}, headers=headers).json()["data"]
    r = httpx.post(accepting + "/v1/embeddings", json={"input": [row["ids"] for row in listed]}, headers=headers)
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, encode(enc, TEXTS), atol=1e-5)
    assert r.json()["truncated"] == []


def test_long_ids_are_cut_as_the_tokenizer_cuts_the_text(accepting, enc, tok):
    whole = tok.encode(LONG).ids  # <s> … </s>, every word piece
    assert len(whole) > enc.max_seq_length
    r = client(accepting).embeddings.create(model="tiny", input=[whole, tok.encode(TEXTS[0]).ids],
                                            encoding_format="float")
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    # the ids keep <s> and </s> around the first word pieces: exactly what the text gives, truncated
    np.testing.assert_allclose(got, encode(enc, [LONG, TEXTS[0]]), atol=1e-5)
    assert r.model_extra["truncated"] == [0]
    assert r.usage.prompt_tokens == enc.max_seq_length + len(tok.encode(TEXTS[0]).ids)
    # ids without a closing </s> are simply cut
    bare = tok.encode(LONG, add_special_tokens=False).ids
    r = client(accepting).embeddings.create(model="tiny", input=[bare], encoding_format="float")
    np.testing.assert_allclose(np.array(r.data[0].embedding, dtype=np.float32),
                               enc.embed_ids([bare[:enc.max_seq_length]])[0].numpy(), atol=1e-5)
    with pytest.raises(openai.APIStatusError, match="truncation is off") as refused:
        client(accepting).embeddings.create(model="tiny", input=[whole], extra_body={"truncate": False})
    assert refused.value.status_code == 413 and refused.value.body["code"] == "text_too_long"


def test_the_servers_no_truncate_setting_applies_to_ids(enc, tok):
    config = ServeConfig(model_name="tiny", accept_token_ids=True, truncate=False, warm_up=False)
    with BackgroundServer(create_app(enc, config)) as base:
        r = httpx.post(base + "/v1/embeddings", json={"input": [tok.encode(LONG).ids]})
        assert r.status_code == 413 and "input[0]" in r.json()["error"]["message"]
        assert httpx.post(base + "/v1/embeddings", json={"input": [tok.encode(LONG).ids],
                                                         "truncate": True}).status_code == 200


@pytest.mark.parametrize("ids, status, code, says", [
    ([[0, 99999, 2]], 422, "invalid_token_ids", "input[0][1] is 99999: this model's token ids run from 0 to 30526"),
    ([[0, 5, 2], [0, -1, 2]], 422, "invalid_token_ids", "input[1][1] is -1"),
    ([[0, 1.5, 2]], 422, "invalid_token_ids", "input[0][1] is 1.5, expected a token id"),
    ([[0, True, 2]], 422, "invalid_token_ids", "input[0][1] is a boolean"),
    ([[0, [5], 2]], 422, "invalid_token_ids", "input[0][1] is a list"),
    ([[0, "5", 2]], 422, "invalid_token_ids", "input[0][1] is a string"),
    ([[0, 5, 2], []], 422, "invalid_token_ids", "input[1] is an empty list"),
    ([[0, 2]] * 5, 413, "too_many_items", "at most 4"),
    ([[0, 5, 2], "a cat"], 422, "invalid_request", "input[0] is a list, expected a string"),
])
def test_malformed_ids_are_refused(accepting, ids, status, code, says):
    r = httpx.post(accepting + "/v1/embeddings", json={"input": ids}, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and says in error["message"], error
