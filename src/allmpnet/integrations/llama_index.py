"""LlamaIndex embeddings backed by our Encoder: `pip install "allmpnet[llamaindex]"`.

    from llama_index.core import Document, VectorStoreIndex
    from allmpnet.integrations.llama_index import AllMpnetEmbedding

    embed_model = AllMpnetEmbedding()                         # all-mpnet-base-v2 on this machine
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
    nodes = index.as_retriever(similarity_top_k=3).retrieve("a question")

The vectors are exactly `Encoder.encode`'s (normalised all-mpnet-base-v2 vectors, as lists of floats), for queries
and texts alike: the model is symmetric and was trained without instructions. LlamaIndex hands texts over in groups
of `embed_batch_size`; inside a group the Encoder makes its own length-sorted batches by token budget, so the default
here is larger than LlamaIndex's 10. Texts longer than the model's 384 word pieces are truncated with a
TruncationWarning, as in `encode` (LlamaIndex's default node parser cuts documents into chunks of 1,024 of its
tokens, longer than that: give `VectorStoreIndex.from_documents` a `SentenceSplitter(chunk_size=256)`, say). The
async methods run the encoder on a worker thread, so an event loop keeps serving while a batch is embedded.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

from allmpnet.errors import InvalidInputType

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from pydantic import Field, PrivateAttr
except ImportError as e:  # the extra is not installed
    raise ImportError('the LlamaIndex integration needs llama-index-core: pip install "allmpnet[llamaindex]"') from e

from allmpnet.encode import Encoder
from allmpnet.weights import DEFAULT_MODEL

# texts per call into the Encoder: enough for it to sort by length and fill its token budget (LlamaIndex's own
# default, 10, would make a batch of ten whatever their lengths)
DEFAULT_EMBED_BATCH_SIZE = 256


class AllMpnetEmbedding(BaseEmbedding):
    """A LlamaIndex `BaseEmbedding` over an allmpnet `Encoder` (one is loaded unless `encoder=` is given)."""

    model_name: str = Field(default=DEFAULT_MODEL, description="The allmpnet model: a name or a directory.")
    embed_batch_size: int = Field(default=DEFAULT_EMBED_BATCH_SIZE, gt=0, le=2048,
                                  description="Texts per call into the Encoder, which batches them by tokens.")
    _encoder: Encoder = PrivateAttr()
    _batch_size: int | None = PrivateAttr(default=None)

    def __init__(self, model_name: str | os.PathLike = DEFAULT_MODEL, *, encoder: Encoder | None = None,
                 device: str | None = None, precision: str | None = None, batch_size: int | None = None,
                 **kwargs: Any) -> None:
        """`batch_size` caps the texts per model batch (None: the Encoder's token budget decides); other keyword
        arguments are BaseEmbedding's (`embed_batch_size`, `callback_manager`, `embeddings_cache`, ...)."""
        name = getattr(encoder, "name", None) if encoder is not None else None
        super().__init__(model_name=str(name or model_name), **kwargs)
        self._encoder = encoder if encoder is not None else Encoder(model_name, device=device, precision=precision)
        self._batch_size = batch_size

    @classmethod
    def class_name(cls) -> str:
        return "AllMpnetEmbedding"

    @property
    def encoder(self) -> Encoder:
        return self._encoder

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._one(query, "query")

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._one(text, "text")

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return self._encoder.encode(list(texts), batch_size=self._batch_size).tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    def _one(self, text: str, what: str) -> list[float]:
        if not isinstance(text, str):
            raise InvalidInputType(f"a {what} embedding takes one string, got {type(text).__name__}")
        return self._encoder.encode([text], batch_size=self._batch_size)[0].tolist()
