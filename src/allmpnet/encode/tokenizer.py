"""Word-piece tokenization with the model's own tokenizer.json, truncated at max_seq_length and never silently.

A long text is tokenized from a prefix of its characters, not whole: the model reads only its first
max_seq_length word pieces, and the tokenizer library keeps every word piece of a text (with its offsets and
strings, ~100 bytes each) until the call returns, so 2,048 texts of 20,000 characters cost ~800 MB of memory
and seconds of CPU for pieces that are thrown away. The prefix gives exactly the ids and truncation flag of the
whole text (see `TextTokenizer.__call__`).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from allmpnet.errors import InvalidInput
from allmpnet.model.files import ModelFileError
from allmpnet.model.sentence import TOKENIZER_FILES

# first prefix tried for a long text, in characters per word piece of max_seq_length: English runs ~4.5, so
# most long texts need one pass; a prefix that proves too short is grown 4x and tokenized again
PREFIX_CHARS_PER_TOKEN = 6
# texts per call into the tokenizer library: what it holds at once stays small whatever the request size
TOKENIZE_CHUNK = 256
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(text: str) -> int | None:
    """Position of the first lone surrogate (a code point UTF-8 cannot encode, e.g. from JSON "\\ud800"), or None."""
    found = LONE_SURROGATE.search(text)
    return None if found is None else found.start()


def check_encodable(texts: Sequence[str], field: str = "texts") -> None:
    """A ValueError naming the first text that is not valid Unicode (the tokenizer could not read it)."""
    for i, text in enumerate(texts):
        at = lone_surrogate_at(text)
        if at is not None:
            raise InvalidInput(f"{field}[{i}] is not valid Unicode: a lone surrogate U+{ord(text[at]):04X} at "
                               f"character {at} (UTF-8 cannot encode it)")


@dataclass
class Tokenized:
    ids: list[list[int]]  # one id list per text, special tokens included, already truncated
    truncated: list[bool]  # True where the text had more word pieces than max_seq_length allowed

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(i) for i in self.ids), dtype=np.int64, count=len(self.ids))


class TextTokenizer:
    FILES = TOKENIZER_FILES

    def __init__(self, tokenizer: Tokenizer, max_seq_length: int, pad_id: int):
        self._tok = tokenizer
        # tokenizer.json carries the fixed 128-token padding/truncation of training: inference must not inherit it
        self._tok.no_padding()
        self.pad_id = pad_id
        self.max_seq_length = max_seq_length
        self._whole: Tokenizer | None = None  # an untruncated copy, made on first use (document chunking)

    @classmethod
    def from_dir(cls, model_dir: Path, max_seq_length: int, pad_id: int) -> "TextTokenizer":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise ModelFileError(f"{path} not found: the model directory needs a tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for every kind of damage
            raise ModelFileError(f"{path} is not a readable tokenizer file ({_first_line(e)}); "
                                 "restore it from the model's source") from None
        return cls(tokenizer, max_seq_length, pad_id)

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if value < 2:
            raise InvalidInput(f"max_seq_length must leave room for the two special tokens, got {value}")
        self._max_seq_length = int(value)
        self._tok.enable_truncation(self._max_seq_length)

    def __call__(self, texts: Sequence[str]) -> Tokenized:
        """Ids truncated at max_seq_length, and which texts were cut; texts must be valid Unicode (ValueError).

        A text longer than the prefix is tokenized from its first `prefix` characters. The word pieces of every
        word but the prefix's last are those of the whole text (the normalizer and pre-tokenizer act on single
        characters and words), so when the kept pieces all come from earlier words and more pieces follow, they
        are the whole text's, and it is truncated. Otherwise the prefix is grown and the text tokenized again.
        """
        texts = list(texts)
        ids: list[list[int]] = [[] for _ in texts]
        truncated = [False] * len(texts)
        prefix = self.max_seq_length * PREFIX_CHARS_PER_TOKEN
        pending = list(range(len(texts)))
        while pending:
            retry = []
            for start in range(0, len(pending), TOKENIZE_CHUNK):
                chunk = pending[start:start + TOKENIZE_CHUNK]
                encodings = self._encode([texts[i][:prefix] for i in chunk], texts, chunk)
                for i, encoding in zip(chunk, encodings):
                    if len(texts[i]) <= prefix:
                        ids[i], truncated[i] = encoding.ids, bool(encoding.overflowing)
                    elif _kept_pieces_are_final(encoding):
                        ids[i], truncated[i] = encoding.ids, True
                    else:
                        retry.append(i)
            pending, prefix = retry, prefix * 4
        return Tokenized(ids, truncated)

    def _encode(self, pieces: list[str], texts: list[str], rows: list[int]) -> list:
        try:
            return self._tok.encode_batch(pieces)
        except TypeError:  # the library cannot take a lone surrogate, and says only that the input has a wrong type
            check_encodable([texts[i] for i in rows])
            raise

    def tokenize_whole(self, texts: Sequence[str]) -> list:
        """Every word piece of each text, without special tokens or truncation, with character offsets and word
        ids (`tokenizers.Encoding`s): what document chunking splits."""
        if self._whole is None:
            whole = Tokenizer.from_str(self._tok.to_str())
            whole.no_truncation()
            whole.no_padding()
            self._whole = whole
        return self._whole.encode_batch(list(texts), add_special_tokens=False)

    @functools.cached_property
    def inner_special_ids(self) -> frozenset[int]:
        """The special tokens a text may hold inside as strings ("<s>", "</s>", "<pad>", "<mask>", "<unk>"), less
        the word-piece model's own unknown token, which any emoji or unknown character becomes."""
        unknown = getattr(self._tok.model, "unk_token", None)
        unknown_id = None if unknown is None else self._tok.token_to_id(unknown)
        return frozenset(i for i, token in self._tok.get_added_tokens_decoder().items()
                         if token.special and i != unknown_id)

    @property
    def special_ids(self) -> tuple[list[int], list[int]]:
        """The special token ids the model puts before and after a text's word pieces (<s> and </s>)."""
        encoding = self._tok.encode("a")
        mask = encoding.special_tokens_mask
        first, last = mask.index(0), len(mask) - 1 - mask[::-1].index(0)
        return list(encoding.ids[:first]), list(encoding.ids[last + 1:])

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def pad(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest item: (B, T) input ids and (B, T) attention mask (for graphs that take a
        padded batch, such as an ONNX export; our own model takes ragged ids)."""
        width = max(len(i) for i in ids)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return torch.from_numpy(input_ids), torch.from_numpy(mask)


def _kept_pieces_are_final(encoding) -> bool:
    """Whether a truncated prefix's kept word pieces all precede its last word (the one the cut may have split)."""
    if not encoding.overflowing:
        return False
    kept = [w for w in encoding.word_ids if w is not None]
    last = max((w for w in encoding.overflowing[-1].word_ids if w is not None), default=None)
    return bool(kept) and last is not None and max(kept) < last


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
