"""Texts that hold the model's special tokens as plain strings, and sentence-transformers' vectors of them: every
path that builds a batch must give them the vectors of the reference, whose absolute positions skip the pad id
(transformers' create_position_ids_from_input_ids) while attention and pooling still count the token."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

SPECIAL_TEXTS = [
    "<pad>", "hello <pad> world", "<pad><pad> the cat <pad>", "<s>", "</s> a dog", "<mask> is on the moon",
    "[UNK] sun", "the <pad> cat <s> sat </s> on <mask> the [UNK] mat",
    "<pad> " + " ".join(["the dog and the car"] * 4),  # a pad at the start of a longer text
    "a plain sentence about a cat and a dog", "",
]


@functools.lru_cache(maxsize=4)
def _reference(model_dir: str, texts: tuple[str, ...]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(model_dir, device="cpu").encode(list(texts), batch_size=len(texts),
                                                                 convert_to_numpy=True)


def sentence_transformers_vectors(model_dir: Path | str, texts: list[str] = SPECIAL_TEXTS) -> np.ndarray:
    """The real sentence-transformers' normalised vectors of `texts` (cached per model directory)."""
    return _reference(str(model_dir), tuple(texts))
