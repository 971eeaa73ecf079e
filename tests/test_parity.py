"""Real weights: our vectors against sentence-transformers and against plain transformers (the card's snippet)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.real_weights


def varied_inputs() -> list[str]:
    """≥300 inputs: short, over 384 word pieces, accents, non-Latin scripts, emoji, code, numbers, blanks."""
    rng = random.Random(1234)
    words = ("the model maps sentences and paragraphs to a dense vector space for search clustering and similarity "
             "of meaning between short texts written by people about science sport food travel music").split()
    texts = ["", " ", "   ", "\t", "\n\n", "This is an example sentence", "Each sentence is converted"]
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))).capitalize() + "." for _ in range(180)]
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(300, 600))) for _ in range(12)]
    texts += ["Crème brûlée à la façon de Zoë", "Ångström, naïve café, São Paulo, Düsseldorf", "¿Qué tal? ¡Muy bien!",
              "Füße über Straßen", "Dvořák and Łódź", "ﬁnancial ligatures"] * 4
    texts += ["日本語の文章を埋め込みます。", "机器学习模型将句子映射到向量。", "Привет, как дела?", "مرحبا بالعالم",
              "नमस्ते दुनिया", "안녕하세요 세계", "Γειά σου Κόσμε", "שלום עולם", "สวัสดีชาวโลก"] * 4
    texts += ["I love this 😍🔥", "🚀🚀🚀", "thumbs up 👍🏽 and flags 🇫🇷🇯🇵", "☕ + 📚 = 🙂"] * 4
    texts += ["def add(a, b):\n    return a + b", "for (int i = 0; i < n; ++i) { sum += x[i]; }",
              "SELECT id, name FROM users WHERE age > 30;", "<div class=\"x\">Hi</div>", "x = {'k': [1, 2, 3]}"] * 3
    texts += ["3.14159", "1,000,000", "+1 (555) 010-9999", "2024-10-08T18:25:00Z", "0x7f 0b1010 1e-9", "42"] * 3
    rng.shuffle(texts)
    return texts


@pytest.fixture(scope="module")
def inputs() -> list[str]:
    texts = varied_inputs()
    assert len(texts) >= 300
    return texts


@pytest.fixture(scope="module")
def ours(real_encoder, inputs) -> np.ndarray:
    return real_encoder.encode(inputs, batch_size=32)


def test_inputs_cover_truncation(real_encoder, inputs):
    assert len(real_encoder.truncated_indices(inputs)) >= 10


def test_parity_with_sentence_transformers(real_model_dir, inputs, ours):
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(real_model_dir), device="cpu")
    assert st.max_seq_length == 384
    reference = st.encode(inputs, batch_size=32, convert_to_numpy=True)
    assert np.abs(ours - reference).max() <= 1e-5
    assert (ours * reference).sum(axis=1).min() >= 0.999999


def test_parity_with_plain_transformers_mean_pooling(real_model_dir, inputs, ours):
    from transformers import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(real_model_dir))
    model = AutoModel.from_pretrained(str(real_model_dir)).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(inputs), 32):
            # the card's snippet, with the model's 384 limit (the bare tokenizer would allow 512)
            batch = tokenizer(inputs[i:i + 32], padding=True, truncation=True, max_length=384, return_tensors="pt")
            tokens = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
    reference = torch.cat(out).numpy()
    assert np.abs(ours - reference).max() <= 1e-5
    assert (ours * reference).sum(axis=1).min() >= 0.999999


def test_batch_size_invariance(real_encoder, inputs, ours):
    subset = inputs[:40]
    one_at_a_time = real_encoder.encode(subset, batch_size=1)
    assert np.abs(one_at_a_time - ours[:40]).max() <= 1e-5
    assert np.abs(real_encoder.encode(subset, batch_size=64) - ours[:40]).max() <= 1e-5


def test_known_answer_from_the_card(real_encoder):
    a, b = real_encoder.encode(["This is an example sentence", "Each sentence is converted"])
    assert float(a @ b) == pytest.approx(0.4049, abs=1e-4)
    assert a.shape == (768,)


def test_round_trip_through_sentence_transformers(real_encoder, inputs, ours, tmp_path):
    from sentence_transformers import SentenceTransformer
    real_encoder.save(tmp_path / "saved")
    st = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    subset = inputs[:60]
    assert np.abs(st.encode(subset, batch_size=32) - ours[:60]).max() <= 1e-6
