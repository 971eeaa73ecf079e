"""Word-piece tokenization with the model's own tokenizer.json, truncated at max_seq_length and never silently."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from allmpnet.model.sentence import TOKENIZER_FILES


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
            raise FileNotFoundError(f"{path} not found: the model directory needs a tokenizer.json")
        return cls(Tokenizer.from_file(str(path)), max_seq_length, pad_id)

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if value < 2:
            raise ValueError(f"max_seq_length must leave room for the two special tokens, got {value}")
        self._max_seq_length = int(value)
        self._tok.enable_truncation(self._max_seq_length)

    def __call__(self, texts: Sequence[str]) -> Tokenized:
        encodings = self._tok.encode_batch(list(texts))
        return Tokenized([e.ids for e in encodings], [bool(e.overflowing) for e in encodings])

    def tokenize_whole(self, texts: Sequence[str]) -> list:
        """Every word piece of each text, without special tokens or truncation, with character offsets and word
        ids (`tokenizers.Encoding`s): what document chunking splits."""
        if self._whole is None:
            whole = Tokenizer.from_str(self._tok.to_str())
            whole.no_truncation()
            whole.no_padding()
            self._whole = whole
        return self._whole.encode_batch(list(texts), add_special_tokens=False)

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
