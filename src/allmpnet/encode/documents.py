"""Long documents as chunks: split on the tokenizer's own word pieces, prefer paragraph and sentence ends.

A document is tokenized once, whole (no truncation), keeping each word piece's character offsets. Chunks are runs
of those word pieces: at most `chunk_tokens` model tokens each, the two special tokens included, so a chunk is
never truncated. Each chunk ends at the best break in the second half of its room, the latest of the best kind:

    paragraph end (a blank line)  >  sentence end or line break  >  space between words
    >  word boundary without a space (e.g. inside a URL)  >  between two pieces of one word (only if nothing else)

and the next chunk starts up to `overlap` word pieces earlier, at the earliest best break in that stretch, so a
sentence cut at a chunk's end is seen whole by the next one. A chunk's span is the characters from its first word
piece's start to its last one's end: `document[start:end]` is the passage it embeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from allmpnet.errors import InvalidInput

# break levels of the boundary before a word piece (see the module docstring)
INSIDE_WORD, NO_SPACE, SPACE, SENTENCE, PARAGRAPH = range(5)
SENTENCE_ENDS = ".!?…。！？"
CLOSERS = "\"')]}»”’"

# benchmarks/long_documents.py (results/long_documents/README.md): of 128/16, 256/32 and 384/48, 128/16 had the best
# recall@1 and MRR@10 (0.913, 0.939; recall@10 1.0) at 2-3x the vectors; all three were within 2 of 46 queries
DEFAULT_CHUNK_TOKENS = 128
DEFAULT_OVERLAP = 16


@dataclass(frozen=True)
class ChunkSettings:
    """chunk_tokens: model tokens per chunk, special tokens included (at most the model's max_seq_length);
    overlap: word pieces a chunk may repeat from the end of the one before (at most half a chunk's text)."""
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    overlap: int = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 8:
            raise InvalidInput(f"chunk_tokens must be an integer of at least 8, got {self.chunk_tokens!r}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or self.overlap < 0:
            raise InvalidInput(f"overlap must be a non-negative integer, got {self.overlap!r}")

    def text_tokens(self, special_tokens: int) -> int:
        """Word pieces of text a chunk holds once the model's special tokens are in."""
        room = self.chunk_tokens - special_tokens
        if self.overlap > room // 2:
            raise InvalidInput(f"overlap ({self.overlap}) must be at most half of a chunk's {room} text word pieces "
                               f"(chunk_tokens {self.chunk_tokens} less {special_tokens} special tokens)")
        return room

    def as_dict(self) -> dict:
        return {"chunk_tokens": self.chunk_tokens, "overlap": self.overlap}

    @classmethod
    def for_model(cls, max_seq_length: int, chunk_tokens: int | None = None,
                  overlap: int | None = None) -> "ChunkSettings":
        """The settings asked for, with the defaults scaled down to a model shorter than they assume."""
        if chunk_tokens is None:
            chunk_tokens = min(DEFAULT_CHUNK_TOKENS, max_seq_length)
        if overlap is None:
            overlap = min(DEFAULT_OVERLAP, max(0, (chunk_tokens - 2) // 4))
        settings = cls(chunk_tokens, overlap)
        if chunk_tokens > max_seq_length:
            raise InvalidInput(f"chunk_tokens ({chunk_tokens}) is above the model's max_seq_length "
                               f"({max_seq_length}): its chunks would be truncated")
        return settings


@dataclass
class DocumentChunks:
    """Chunks of several documents, in document order and, within one, in text order."""
    vectors: np.ndarray    # (n_chunks, dim) float32
    documents: np.ndarray  # (n_chunks,) int64: the position of each chunk's document in the input
    spans: np.ndarray      # (n_chunks, 2) int64: [start, end) character offsets of the chunk in its document

    def __len__(self) -> int:
        return len(self.documents)

    def passages(self, docs: Sequence[str]) -> list[str]:
        """The text each chunk embeds (`docs` is the list given to encode_documents)."""
        return [docs[d][s:e] for d, (s, e) in zip(self.documents.tolist(), self.spans.tolist())]

    def of(self, document: int) -> slice:
        """Rows of one document's chunks."""
        start, stop = np.searchsorted(self.documents, [document, document + 1])
        return slice(int(start), int(stop))


def break_levels(text: str, offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None]) -> np.ndarray:
    """levels[b]: how good a place the boundary before word piece b is to end a chunk (b = 1 .. n-1)."""
    n = len(offsets)
    levels = np.zeros(n + 1, dtype=np.int8)
    levels[0] = levels[n] = PARAGRAPH  # the document's own ends
    for b in range(1, n):
        prev_end, start = offsets[b - 1][1], offsets[b][0]
        gap = text[prev_end:start]
        if word_ids[b] is not None and word_ids[b] == word_ids[b - 1] and not gap:
            levels[b] = INSIDE_WORD
        elif gap.count("\n") >= 2:
            levels[b] = PARAGRAPH
        elif gap and ("\n" in gap or ends_sentence(text, prev_end)):
            levels[b] = SENTENCE
        elif gap:
            levels[b] = SPACE
        else:
            levels[b] = NO_SPACE
    return levels


def ends_sentence(text: str, end: int) -> bool:
    """Whether text[:end] ends with a sentence-final mark, possibly followed by closing quotes or brackets."""
    i = end - 1
    while i >= 0 and text[i] in CLOSERS:
        i -= 1
    return i >= 0 and text[i] in SENTENCE_ENDS


def split_points(levels: np.ndarray, room: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) word-piece ranges of the chunks of a document of len(levels) - 1 pieces."""
    n = len(levels) - 1
    if n == 0:
        return [(0, 0)]
    chunks: list[tuple[int, int]] = []
    start = 0
    while True:
        limit = start + room
        if limit >= n:
            chunks.append((start, n))
            return chunks
        lowest = start + max(1, room // 2)  # a chunk is never cut below half its room
        window = levels[lowest:limit + 1]
        best = int(window.max())
        end = lowest + int(np.flatnonzero(window == best)[-1]) if best > INSIDE_WORD else limit
        chunks.append((start, end))
        next_start = end
        if overlap:
            back = levels[end - overlap:end]
            best_back = int(back.max()) if len(back) else INSIDE_WORD
            if best_back > INSIDE_WORD:
                next_start = end - overlap + int(np.flatnonzero(back == best_back)[0])
        start = max(next_start, start + 1)


def chunk_token_ranges(tokenizer, docs: Sequence[str], settings: ChunkSettings
                       ) -> tuple[list[list[int]], list[int], list[tuple[int, int]]]:
    """Model inputs (special tokens added), document positions and character spans of every chunk of `docs`."""
    prefix, suffix = tokenizer.special_ids
    room = settings.text_tokens(len(prefix) + len(suffix))
    ids: list[list[int]] = []
    documents: list[int] = []
    spans: list[tuple[int, int]] = []
    for position, (text, encoding) in enumerate(zip(docs, tokenizer.tokenize_whole(docs))):
        offsets = encoding.offsets
        levels = break_levels(text, offsets, encoding.word_ids)
        for start, end in split_points(levels, room, settings.overlap):
            ids.append(prefix + encoding.ids[start:end] + suffix)
            documents.append(position)
            spans.append((offsets[start][0], offsets[end - 1][1]) if end > start else (0, 0))
    return ids, documents, spans
