"""The LangChain integration: vectors equal Encoder.encode, sync and async, and langchain-core stays optional."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("langchain_core")

from langchain_core.embeddings import Embeddings  # noqa: E402

from allmpnet import Encoder  # noqa: E402
from allmpnet.integrations.langchain import AllMpnetEmbeddings  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src" / "allmpnet"
TEXTS = ["the cat sat on the mat", "a dog in the car", "the sun and the moon", "hello world"]


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir):
    return Encoder(tiny_model_dir, device="cpu")


def test_vectors_equal_encoder_encode(tiny_encoder, tiny_model_dir):
    embeddings = AllMpnetEmbeddings(encoder=tiny_encoder)
    assert isinstance(embeddings, Embeddings)
    expected = tiny_encoder.encode(TEXTS)
    documents = embeddings.embed_documents(TEXTS)
    assert isinstance(documents, list) and all(isinstance(v, list) and isinstance(v[0], float) for v in documents)
    np.testing.assert_array_equal(np.array(documents, dtype=np.float32), expected)
    np.testing.assert_array_equal(np.array(embeddings.embed_query(TEXTS[2]), dtype=np.float32),
                                  tiny_encoder.encode(TEXTS[2]))
    np.testing.assert_array_equal(np.array(asyncio.run(embeddings.aembed_documents(TEXTS)), dtype=np.float32),
                                  expected)
    np.testing.assert_array_equal(np.array(asyncio.run(embeddings.aembed_query(TEXTS[1])), dtype=np.float32),
                                  tiny_encoder.encode(TEXTS[1]))
    assert embeddings.embed_documents([]) == []
    with pytest.raises(TypeError, match="one string"):
        embeddings.embed_query(TEXTS)
    # loaded by name, like any LangChain embedding class
    by_path = AllMpnetEmbeddings(tiny_model_dir, device="cpu")
    np.testing.assert_allclose(by_path.embed_documents(TEXTS), expected, atol=1e-6)


def test_works_in_a_langchain_vector_store(tiny_encoder):
    from langchain_core.vectorstores import InMemoryVectorStore
    store = InMemoryVectorStore.from_texts(TEXTS, AllMpnetEmbeddings(encoder=tiny_encoder))
    found = store.similarity_search_with_score(TEXTS[3], k=2)
    assert found[0][0].page_content == TEXTS[3] and found[0][1] == pytest.approx(1.0, abs=1e-5)


def test_langchain_is_imported_only_by_the_integration():
    importers = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if "langchain_core" in p.read_text()]
    assert importers == ["integrations/langchain.py"]
    code = ("import sys, allmpnet, allmpnet.cli, allmpnet.search, allmpnet.serve, allmpnet.train, "
            "allmpnet.integrations; print('langchain_core' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
