"""Texts holding special-token strings ("<pad>", "<s>", "</s>", "<mask>", "[UNK]") get sentence-transformers'
vectors on every path of the Encoder (fp32 alone and batched, the fused fp32 query path, bf16, each int8 kernel,
auto, the padded layout GPUs and ONNX use, document chunks, training's forward pass). The text's own "<pad>"
becomes the pad id: transformers gives it the padding position and does not count it in the positions after it,
yet attends to it and pools it; a path that numbered it as an ordinary token moved such vectors to cosine 0.84."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from allmpnet import Encoder
from allmpnet.backends.cpu.int8 import KERNELS
from allmpnet.backends.cpu.library import cpu_flags
from allmpnet.encode.precision import plan_precision
from allmpnet.model.packing import PackedBatch
from conftest import int8_plan
from special_texts import SPECIAL_TEXTS, sentence_transformers_vectors

CPU = frozenset(cpu_flags())


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> np.ndarray:
    return sentence_transformers_vectors(tiny_model_dir)


@pytest.fixture(scope="module")
def fp32(tiny_model_dir) -> Encoder:
    return Encoder(tiny_model_dir, device="cpu")


def test_the_texts_hold_the_special_ids(fp32):
    ids = fp32.tokenize(SPECIAL_TEXTS).ids
    assert ids[0] == [0, 1, 2] and ids[3] == [0, 0, 2]  # "<pad>" -> the pad id; "<s>" -> <s>
    assert {1, 2, 3, 4} <= {i for row in ids for i in row[1:-1]}  # <pad>, </s>, [UNK], <mask> inside texts


def test_fp32_alone_and_in_batches_of_every_size(fp32, reference):
    alone = np.stack([fp32.encode(t) for t in SPECIAL_TEXTS])  # a query: the fused fp32 call where it runs
    np.testing.assert_allclose(alone, reference, atol=1e-5)
    for batch_size in (2, 5, len(SPECIAL_TEXTS)):
        np.testing.assert_allclose(fp32.encode(SPECIAL_TEXTS, batch_size=batch_size), reference, atol=1e-5)
    mixed = SPECIAL_TEXTS + ["the cat is on the moon"] * 30  # a large batch: oneDNN's layers, not the fused call
    np.testing.assert_allclose(fp32.encode(mixed, batch_size=64)[:len(SPECIAL_TEXTS)], reference, atol=1e-5)


@pytest.mark.parametrize("attention", ["grouped", "padded"])
def test_the_model_on_both_layouts(fp32, reference, attention):
    ids = fp32.tokenize(SPECIAL_TEXTS).ids
    with torch.inference_mode():
        got = fp32.model(PackedBatch.from_ids(ids, attention=attention)).numpy()
    np.testing.assert_allclose(got, reference, atol=1e-5)


def test_the_padded_view_right_and_left_padded(fp32, tiny_model_dir):
    # the form an ONNX graph or a GPU batch takes: (B, T) ids with the tokenizer's padding, mask from lengths
    from transformers import AutoModel
    ids, mask = fp32.tokenizer.pad(fp32.tokenize(SPECIAL_TEXTS).ids)
    hf = AutoModel.from_pretrained(str(tiny_model_dir)).eval()
    with torch.inference_mode():
        ours = fp32.model.network.token_embeddings(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
        left = torch.stack([torch.roll(row, int((m == 0).sum())) for row, m in zip(ids, mask)])
        left_mask = torch.stack([torch.roll(m, int((m == 0).sum())) for m in mask])
        ours_left = fp32.model.network.token_embeddings(left, left_mask)  # right-padded out
    torch.testing.assert_close(ours_left[real], theirs[real], atol=1e-5, rtol=1e-5)


def fast_precisions() -> list:
    params = []
    for name in ("bf16", "auto", "int8"):
        try:
            plan_precision(name, "cpu")
            params.append(name)
        except ValueError as e:
            params.append(pytest.param(name, marks=pytest.mark.skip(reason=str(e))))
    return params + [pytest.param(f"kernel:{k}", marks=m) for k, m in KERNEL_MARKS]


KERNEL_MARKS = [(k, pytest.mark.skipif(bool(KERNELS[k].flags - CPU), reason=f"this CPU lacks "
                                       f"{', '.join(sorted(KERNELS[k].flags - CPU))} for {k}"))
                for k in ("vnni-a8", "vnni256-a8", "avxvnni-a8", "vnni-a16", "avx512-a16", "avx2-a16")]


def fast_encoder(model_dir, precision: str) -> Encoder:
    plan = int8_plan(precision.split(":")[1]) if precision.startswith("kernel:") else precision
    return Encoder(model_dir, device="cpu", precision=plan)


@pytest.mark.parametrize("precision", fast_precisions())
def test_fast_precisions_run_texts_holding_special_tokens_in_fp32(tiny_model_dir, reference, precision, tmp_path,
                                                                  monkeypatch):
    # int8's calibration is cached under ALLMPNET_HOME: a fresh one per kernel
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    enc = fast_encoder(tiny_model_dir, precision)
    inner = [i for i, row in enumerate(enc.tokenize(SPECIAL_TEXTS).ids)
             if set(row[1:-1]) & enc.tokenizer.inner_special_ids]
    others = [i for i in range(len(SPECIAL_TEXTS)) if i not in inner]
    assert len(inner) >= 6 and others
    alone = np.stack([enc.encode(t) for t in SPECIAL_TEXTS])
    together = enc.encode(SPECIAL_TEXTS + ["the cat is on the moon"] * 30, batch_size=64)[:len(SPECIAL_TEXTS)]
    np.testing.assert_array_equal(alone, together)  # alone or in a batch, the same bits
    np.testing.assert_allclose(alone[inner], reference[inner], atol=1e-5)  # fp32: the reference's vectors
    assert np.abs(alone[others] - reference[others]).max() < 1e-2
    assert (alone[others] * reference[others]).sum(1).min() > 0.9995


@pytest.mark.parametrize("kernel", [pytest.param(k, marks=m) for k, m in KERNEL_MARKS])
def test_the_fused_call_numbers_positions_as_the_reference(tiny_model_dir, reference, kernel, tmp_path, monkeypatch):
    # the int8 layers' one C call, embeddings included, on the special texts themselves (which the Encoder sends
    # to fp32): its own positions must skip the pad id as the reference's do
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    enc = fast_encoder(tiny_model_dir, f"kernel:{kernel}")
    stack = enc.inference_model().network.encoder
    got = stack.sentence_vectors(enc.tokenize(SPECIAL_TEXTS).ids, True).numpy()
    # int8 moves these vectors by < 3e-3; numbering a text's <pad> as a token moved them by 0.24
    assert np.abs(got - reference).max() < 1e-2
    assert (got * reference).sum(1).min() > 0.9995


def test_document_chunks(fp32, reference):
    docs = fp32.encode_documents(SPECIAL_TEXTS)  # each short enough to be one chunk
    assert docs.documents.tolist() == list(range(len(SPECIAL_TEXTS)))
    np.testing.assert_allclose(docs.vectors, reference, atol=1e-5)


def test_the_training_forward_pass(tiny_model_dir, reference):
    from allmpnet.train.gradcache import embed_for_training
    enc = Encoder(tiny_model_dir, device="cpu")
    got = embed_for_training(enc, enc.tokenize(SPECIAL_TEXTS).ids)  # the trainer's own call, with autograd
    assert got.requires_grad
    np.testing.assert_allclose(got.detach().numpy(), reference, atol=1e-5)
