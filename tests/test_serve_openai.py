"""End to end with the official openai client: the server's vectors equal Encoder.encode (<= 1e-5)."""
from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

from allmpnet import Encoder
from allmpnet.serve import ServeConfig, create_app
from allmpnet.serve.background import BackgroundServer

TEXTS = ["This is an example sentence", "Each sentence is converted", "", "a cat sat on the mat"]


def embed_with_openai(url: str, texts: list[str], model: str, **kwargs) -> list:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0, timeout=120)
    response = client.embeddings.create(model=model, input=texts, **kwargs)
    assert [d.index for d in response.data] == list(range(len(texts)))
    assert response.model == model and response.usage.prompt_tokens > 0
    return [d.embedding for d in response.data]


def check_formats(url: str, enc: Encoder, model: str) -> None:
    expected = enc.encode(TEXTS)
    # float, as asked for explicitly
    got = np.array(embed_with_openai(url, TEXTS, model, encoding_format="float"), dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # the client's default: it asks for base64 and decodes it into floats itself
    got = np.array(embed_with_openai(url, TEXTS, model), dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # base64 asked for explicitly: the client hands back the strings
    strings = embed_with_openai(url, TEXTS, model, encoding_format="base64")
    got = np.stack([np.frombuffer(base64.b64decode(s), dtype="<f4") for s in strings])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_openai_client_gets_encoder_vectors(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu")
    config = ServeConfig(model_name="tiny", api_key="test-key")
    with BackgroundServer(create_app(enc, config)) as url:
        check_formats(url, enc, "tiny")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).embeddings.create(
                model="tiny", input="x")
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.embeddings.create(model="text-embedding-3-small", input="x")
        with pytest.raises(openai.UnprocessableEntityError, match="token-id input"):
            client.embeddings.create(model="tiny", input=[[1, 2, 3]])
        with pytest.raises(openai.APIStatusError, match="truncation is off") as refused:
            client.embeddings.create(model="tiny", input=["a cat " * 100], extra_body={"truncate": False})
        assert refused.value.status_code == 413


@pytest.mark.real_weights
def test_openai_client_gets_published_model_vectors(real_encoder):
    # served as sentence-transformers/all-mpnet-base-v2; no warm-up pass, to keep this test short on CPU
    config = ServeConfig(api_key="test-key", warm_up=False)
    with BackgroundServer(create_app(real_encoder, config)) as url:
        check_formats(url, real_encoder, "sentence-transformers/all-mpnet-base-v2")
