"""The LlamaIndex integration: vectors equal Encoder.encode (sync, batch, async), a real VectorStoreIndex retrieves
with them (no LLM), and llama-index-core stays optional."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_index.core", reason="needs llama-index-core (pip install 'allmpnet[llamaindex]')")

from llama_index.core import Document, VectorStoreIndex  # noqa: E402
from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402
from llama_index.core.schema import TextNode  # noqa: E402

from allmpnet import Encoder  # noqa: E402
from allmpnet.integrations.llama_index import AllMpnetEmbedding  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src" / "allmpnet"
TEXTS = ["the cat sat on the mat", "a dog in the car", "the sun and the moon", "hello world",
         "a much longer text about the weather in the mountains, which changes quickly in spring"]
# documents and questions whose answers a real sentence-embedding model ranks first; words barely overlap
DOCUMENTS = {
    "volcano": "Lava and ash erupted from the mountain, forcing villages nearby to evacuate.",
    "bread": "Knead the dough for ten minutes, let it rise, then bake it at 220 degrees.",
    "football": "The striker scored twice in the second half and the home team won the match.",
    "vaccine": "The immunisation trial reported fewer infections among people who got the shot.",
    "stocks": "Share prices tumbled on Wall Street after the central bank raised interest rates.",
}
QUESTIONS = {"How do I make a loaf at home?": "bread", "Which side won the soccer game?": "football",
             "Did the markets fall?": "stocks", "Is the new jab effective against the disease?": "vaccine",
             "What happened when the volcano became active?": "volcano"}


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir):
    return Encoder(tiny_model_dir, device="cpu")


def as_array(vectors) -> np.ndarray:
    return np.asarray(vectors, dtype=np.float32)


def test_vectors_equal_encoder_encode(tiny_encoder, tiny_model_dir):
    embed = AllMpnetEmbedding(encoder=tiny_encoder)
    assert isinstance(embed, BaseEmbedding)
    assert embed.model_name == str(tiny_model_dir) and embed.class_name() == "AllMpnetEmbedding"
    expected = tiny_encoder.encode(TEXTS)
    batch = embed.get_text_embedding_batch(TEXTS)
    assert all(isinstance(v, list) and isinstance(v[0], float) for v in batch)
    np.testing.assert_allclose(as_array(batch), expected, atol=1e-6)
    np.testing.assert_allclose(as_array(embed.get_text_embedding(TEXTS[4])), tiny_encoder.encode(TEXTS[4]), atol=1e-6)
    np.testing.assert_allclose(as_array(embed.get_query_embedding(TEXTS[2])), tiny_encoder.encode(TEXTS[2]), atol=1e-6)
    np.testing.assert_allclose(as_array(asyncio.run(embed.aget_text_embedding_batch(TEXTS))), expected, atol=1e-6)
    np.testing.assert_allclose(as_array(asyncio.run(embed.aget_query_embedding(TEXTS[1]))),
                               tiny_encoder.encode(TEXTS[1]), atol=1e-6)
    np.testing.assert_allclose(as_array(asyncio.run(embed.aget_text_embedding(TEXTS[3]))),
                               tiny_encoder.encode(TEXTS[3]), atol=1e-6)
    # LlamaIndex cuts the list into groups of embed_batch_size; the vectors do not depend on it
    small_groups = AllMpnetEmbedding(encoder=tiny_encoder, embed_batch_size=2, batch_size=1)
    np.testing.assert_allclose(as_array(small_groups.get_text_embedding_batch(TEXTS)), expected, atol=1e-6)
    assert embed.get_text_embedding_batch([]) == []
    with pytest.raises(TypeError, match="one string"):
        embed.get_query_embedding(TEXTS)
    # loaded by name or directory, like any LlamaIndex embedding class
    by_path = AllMpnetEmbedding(tiny_model_dir, device="cpu")
    np.testing.assert_allclose(as_array(by_path.get_text_embedding_batch(TEXTS)), expected, atol=1e-6)


def test_retrieval_through_a_vector_store_index(tiny_encoder):
    """The index's stored vectors are ours, and a document's own text retrieves it first (cosine 1)."""
    embed = AllMpnetEmbedding(encoder=tiny_encoder)
    nodes = [TextNode(text=text, id_=name) for name, text in DOCUMENTS.items()]
    index = VectorStoreIndex(nodes, embed_model=embed)
    stored = index.vector_store.to_dict()["embedding_dict"]
    for name, text in DOCUMENTS.items():
        np.testing.assert_allclose(as_array(stored[name]), tiny_encoder.encode(text), atol=1e-6)
    for name, text in DOCUMENTS.items():
        hits = index.as_retriever(similarity_top_k=3).retrieve(text)
        assert len(hits) == 3 and hits[0].node.node_id == name
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[1].score == pytest.approx(float(tiny_encoder.encode(text) @ as_array(stored[hits[1].node.node_id])),
                                              abs=1e-5)


def test_from_documents_with_the_default_node_parser(tiny_encoder):
    """from_documents, LlamaIndex's everyday route: its own splitter (its bundled tokenizer file, no network)."""
    documents = [Document(text=text, doc_id=name) for name, text in DOCUMENTS.items()]
    index = VectorStoreIndex.from_documents(documents, embed_model=AllMpnetEmbedding(encoder=tiny_encoder))
    hits = asyncio.run(index.as_retriever(similarity_top_k=1).aretrieve(DOCUMENTS["stocks"]))
    assert hits[0].node.ref_doc_id == "stocks" and hits[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.real_weights
def test_real_model_ranks_the_answering_document_first(real_encoder):
    embed = AllMpnetEmbedding(encoder=real_encoder)
    index = VectorStoreIndex([TextNode(text=text, id_=name) for name, text in DOCUMENTS.items()], embed_model=embed)
    retriever = index.as_retriever(similarity_top_k=2)
    for question, answer in QUESTIONS.items():
        hits = retriever.retrieve(question)
        assert hits[0].node.node_id == answer, (question, [(h.node.node_id, h.score) for h in hits])
        assert hits[0].score > hits[1].score
        np.testing.assert_allclose(hits[0].score, real_encoder.encode(question) @ real_encoder.encode(DOCUMENTS[answer]),
                                   atol=1e-5)


def test_llama_index_is_imported_only_by_the_integration():
    importers = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
                 if "from llama_index" in p.read_text() or "import llama_index" in p.read_text()]
    assert importers == ["integrations/llama_index.py"]
    code = ("import sys, allmpnet, allmpnet.cli, allmpnet.search, allmpnet.serve, allmpnet.train, "
            "allmpnet.integrations; print(any(m.startswith('llama_index') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC.parent)})
    assert out.stdout.strip() == "False"
