"""Tokenizing hostile texts: prefix tokenization gives exactly the ids of the whole text, at a bounded cost;
text that is not valid Unicode and vectors that are not finite are errors, never a 500 or a silent NaN."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from allmpnet import ChecksumError, Encoder, NonFiniteOutputError
from allmpnet.encode import tokenizer as tokenizer_module
from allmpnet.encode.tokenizer import TextTokenizer
from allmpnet.weights import STAMP, sha256_of, write_stamp

PIECES = ["the", "cat", "unbelievable", "hello", "world", ",", ".", "!", "  ", " ", "\n", "\t", "é", "e\u0301",
          "\u0301\u0302", "中文", "字", "😀", "ａｂ", "x" * 120, "a-b", "\x00", "\u200b", "ß", "İ", "ﬁ", "Ω"]


def whole_text_tokenizer(model_dir, max_seq_length: int) -> Tokenizer:
    """The library's own truncation on the whole text: the reference the prefix path must match."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_seq_length)
    return tok


def texts_strategy():
    word = st.one_of(st.sampled_from(PIECES), st.text(min_size=1, max_size=12))
    return st.lists(st.lists(word, max_size=60).map("".join), min_size=1, max_size=8)


@pytest.mark.parametrize("max_seq_length", [2, 5, 16])
def test_prefix_tokenization_equals_the_whole_text(tiny_model_dir, monkeypatch, max_seq_length):
    # 1 character per word piece: almost every prefix is too short at first, so the regrowth path runs too
    monkeypatch.setattr(tokenizer_module, "PREFIX_CHARS_PER_TOKEN", 1)
    ours = TextTokenizer.from_dir(tiny_model_dir, max_seq_length, pad_id=1)
    reference = whole_text_tokenizer(tiny_model_dir, max_seq_length)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(texts_strategy())
    def check(texts):
        texts = [t for t in texts if tokenizer_module.lone_surrogate_at(t) is None]
        got = ours(texts)
        for text, ids, cut in zip(texts, got.ids, got.truncated):
            expected = reference.encode(text)
            assert (ids, cut) == (expected.ids, bool(expected.overflowing)), text

    check()


@pytest.mark.real_weights
def test_prefix_tokenization_equals_the_whole_text_on_the_published_tokenizer(real_model_dir, monkeypatch):
    ours = TextTokenizer.from_dir(real_model_dir, 384, pad_id=1)
    reference = whole_text_tokenizer(real_model_dir, 384)
    words = ["The", "quick", "brown", "fox", "unbelievably", "naïve", "café", "中文字", "😀", "—", "(x)", "e\u0301",
             "a" * 150, "\n", "2026-11-27", "https://example.com/a?b=c"]
    rng = __import__("random").Random(0)
    texts = [" ".join(rng.choices(words, k=rng.randint(200, 4000))) for _ in range(40)]
    texts += ["word " * 382 + "unbelievable", "word " * 381 + "unbelievable", " " * 5000 + "cat", "x" * 20000]
    for chars in (1, 2, 6):
        monkeypatch.setattr(tokenizer_module, "PREFIX_CHARS_PER_TOKEN", chars)
        got = ours(texts)
        for text, ids, cut in zip(texts, got.ids, got.truncated):
            expected = reference.encode(text)
            assert (ids, cut) == (expected.ids, bool(expected.overflowing))


PEAK = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from allmpnet.encode.tokenizer import TextTokenizer
    tok = TextTokenizer.from_dir(Path(sys.argv[1]), 64, 1)
    texts = [("the cat sat on a mat " * 1000)[:20000] + str(i) for i in range(1024)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = tok(texts)
    assert all(result.truncated) and all(len(ids) == 64 for ids in result.ids)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
""")


def test_tokenizing_huge_texts_costs_memory_by_the_prefix(tiny_model_dir):
    """1,024 texts of 20,000 characters: the whole-text path held ~400 MB of word pieces; the prefix path little."""
    out = subprocess.run([sys.executable, "-c", PEAK, str(tiny_model_dir)], capture_output=True, text=True,
                         check=True)
    assert float(out.stdout) < 60, f"peak RSS grew {out.stdout.strip()} MB while tokenizing"


def test_lone_surrogates_are_a_value_error_naming_the_text(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu")
    for bad in ("\ud800", "ok \udfff tail", "\ud83d"):
        with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode: a lone surrogate U\+D"):
            enc.tokenize(["fine", bad])
        with pytest.raises(ValueError, match="lone surrogate"):
            enc.encode(["fine", bad])
    assert enc.tokenize(["😀 \U0001f600"]).ids  # a real astral character is fine


def poisoned_copy(src, dst, stamp: bool = False):
    import shutil
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("LayerNorm.weight"))
    tensors[name][0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return dst


def test_nan_in_the_output_is_an_error_not_a_vector(tiny_model_dir, tmp_path):
    enc = Encoder(poisoned_copy(tiny_model_dir, tmp_path / "nan"), device="cpu")
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite values for 2 of 2 texts"):
        enc.encode(["a cat", "the dog"])
    with pytest.raises(NonFiniteOutputError):
        enc.embed_ids(enc.tokenize(["a cat"]).ids)


def test_inf_from_a_batch_function_is_caught_by_the_planner():
    from allmpnet.encode.batching import TokenBudget, embed_in_batches
    out = torch.empty((3, 2))

    def embed(batch):
        vectors = torch.ones((len(batch), 2))
        vectors[-1, 0] = float("inf")
        return vectors

    with pytest.raises(NonFiniteOutputError, match="1 of 3"):
        embed_in_batches([[1], [2], [3]], embed, TokenBudget(None), out)


def test_byte_flip_with_restored_mtime_is_refused(tiny_model_dir, tmp_path):
    import shutil
    model = tmp_path / "stamped"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    write_stamp(model, sha256_of(weights))
    Encoder(model, device="cpu")  # intact: loads without re-hashing
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x7F  # same size, inside the tensor data
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # what `touch -r` would do
    assert weights.stat().st_mtime_ns == json.loads((model / STAMP).read_text())["mtime_ns"]
    with pytest.raises(ChecksumError, match="corrupted"):
        Encoder(model, device="cpu")
