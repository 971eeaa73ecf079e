"""LangChain embeddings backed by our Encoder: `pip install "allmpnet[langchain]"`.

    from allmpnet.integrations.langchain import AllMpnetEmbeddings
    embeddings = AllMpnetEmbeddings()                       # all-mpnet-base-v2 on this machine
    vectors = embeddings.embed_documents(["first passage", "second passage"])
    store = InMemoryVectorStore.from_texts(texts, embeddings)   # any LangChain vector store

The vectors are exactly `Encoder.encode`'s (normalised all-mpnet-base-v2 vectors, as lists of floats). Texts longer
than the model's 384 word pieces are truncated with a TruncationWarning, as in `encode`: split long documents first
(a LangChain text splitter, or `Encoder.encode_documents`). The async methods run the encoder on a worker thread,
so an event loop keeps serving while a batch is embedded.
"""
from __future__ import annotations

import asyncio
import os

from allmpnet.errors import InvalidInputType

try:
    from langchain_core.embeddings import Embeddings
except ImportError as e:  # the extra is not installed
    raise ImportError('the LangChain integration needs langchain-core: pip install "allmpnet[langchain]"') from e

from allmpnet.encode import Encoder
from allmpnet.weights import DEFAULT_MODEL


class AllMpnetEmbeddings(Embeddings):
    """A LangChain `Embeddings` over an allmpnet `Encoder` (one is loaded unless `encoder=` is given)."""

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, encoder: Encoder | None = None,
                 device: str | None = None, precision: str | None = None, batch_size: int | None = None):
        self.encoder = encoder if encoder is not None else Encoder(model, device=device, precision=precision)
        self.batch_size = batch_size

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return self.encoder.encode(list(texts), batch_size=self.batch_size).tolist()

    def embed_query(self, text: str) -> list[float]:
        if not isinstance(text, str):
            raise InvalidInputType(f"embed_query takes one string, got {type(text).__name__}")
        return self.encoder.encode([text], batch_size=self.batch_size)[0].tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)
