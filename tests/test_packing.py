"""Packed batches and the model on them: layout, attention groups, and the token vectors against an independent
implementation (transformers' MPNetModel) for both attention layouts, mixed lengths included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from allmpnet import Encoder
from allmpnet.model import MPNet, PackedBatch
from allmpnet.model.packing import AttentionGroup, GroupedAttention, attention_groups, row_bucket

TEXTS = ["cat", "dog", "sun", "moon", "a dog and a car", "the cat is on the moon", "hello world", "x" * 60,
         "this is a test sentence with more words than the others in the list"]


def test_from_ids_numbers_tokens_within_each_text():
    batch = PackedBatch.from_ids([[5, 6, 7], [8], [9, 10]], bucket_rows=True)
    assert batch.ids[:6].tolist() == [5, 6, 7, 8, 9, 10] and batch.ids.shape == (8,)  # rows bucketed to 8
    assert batch.positions[:6].tolist() == [0, 1, 2, 0, 0, 1] and set(batch.positions[6:].tolist()) == {-1}
    assert batch.segments[:6].tolist() == [0, 0, 0, 1, 2, 2] and set(batch.segments[6:].tolist()) == {3}
    assert batch.lengths.tolist() == [3, 1, 2] and batch.size == 3
    assert PackedBatch.from_ids([[5, 6]]).ids.shape == (2,)  # no bucketing unless asked


def test_row_buckets_are_few_and_never_smaller():
    for n in (1, 9, 15, 16, 17, 33, 255, 257, 4095, 4097, 9000):
        step = 4 if n <= 32 else 16 if n <= 256 else 128 if n <= 4096 else 512
        assert row_bucket(n) >= n and row_bucket(n) - n < step and row_bucket(n) % step == 0
    assert len({row_bucket(n) for n in range(1, 4097)}) < 80  # few shapes: oneDNN keeps buffers per shape


def test_from_padded_reads_right_and_left_padding():
    ids = torch.tensor([[5, 6, 7], [1, 8, 9], [10, 1, 1]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 0]])  # right, left, right padded
    batch = PackedBatch.from_padded(ids, mask)
    assert batch.ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert batch.positions.tolist() == [0, 1, 2, 0, 1, 0]
    assert batch.segments.tolist() == [0, 0, 0, 1, 1, 2]
    tokens = torch.arange(6, dtype=torch.float32)[:, None]
    assert batch.unpack(tokens, 3)[..., 0].tolist() == [[0, 1, 2], [3, 4, 0], [5, 0, 0]]


def test_attention_groups_cover_each_token_once_a_text_per_block():
    lengths = [5] * 7 + [3, 3, 40, 0, 6]
    groups = attention_groups(lengths)
    assert groups == [AttentionGroup(start=0, blocks=7, length=5), AttentionGroup(start=35, blocks=2, length=3),
                      AttentionGroup(start=41, blocks=1, length=40),
                      AttentionGroup(start=81, blocks=1, length=6)]  # the empty text is skipped
    assert groups[-1].end == sum(lengths)


def test_short_groups_go_to_the_short_kernel_alone_or_in_a_batch():
    layout = GroupedAttention([5] * 14 + [40], short_kernel=lambda *args: None, short_kernel_max_tokens=32)
    assert [(g.blocks, g.length) for g in layout.groups] == [(14, 5), (1, 40)]
    assert [layout.on_short_kernel(g) for g in layout.groups] == [True, False]  # the 40-token text is too long
    assert all(GroupedAttention([5]).kernel_for(g) is None for g in GroupedAttention([5]).groups)  # no kernel


def test_groups_go_to_the_short_kernel_then_the_block_kernel_then_sdpa():
    def short(*args):
        return None

    def block(*args):
        return None
    layout = GroupedAttention([5] * 14 + [40] + [300], short_kernel=short, short_kernel_max_tokens=32,
                              block_kernel=block, block_kernel_max_tokens=256)
    assert [layout.kernel_for(g) for g in layout.groups] == [short, block, None]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """transformers' own MPNet on the same weights: an implementation that shares no code with ours."""
    transformers = pytest.importorskip("transformers")
    return transformers.MPNetModel.from_pretrained(str(tiny_model_dir), add_pooling_layer=False).eval()


@pytest.mark.parametrize("attention", ["grouped", "padded"])
@pytest.mark.parametrize("bucket_rows", [False, True])
def test_token_vectors_match_transformers(tiny_model_dir, reference, attention, bucket_rows):
    enc = Encoder(tiny_model_dir, device="cpu")
    ids = sorted(enc.tokenize(TEXTS).ids, key=len, reverse=True)  # equal lengths side by side, and padding
    padded_ids, mask = enc.tokenizer.pad(ids)
    with torch.inference_mode():
        expected = reference(input_ids=padded_ids, attention_mask=mask).last_hidden_state
        batch = PackedBatch.from_ids(ids, attention=attention, bucket_rows=bucket_rows)
        got = batch.unpack(enc.model.network(batch), padded_ids.shape[1])
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert got[~real].abs().max() == 0


def test_padded_view_matches_transformers_on_left_padding(tiny_model_dir, reference):
    enc = Encoder(tiny_model_dir, device="cpu")
    ids, mask = enc.tokenizer.pad(enc.tokenize(["the cat is on the moon", "sun"]).ids)
    shift = int((mask[1] == 0).sum())
    ids[1], mask[1] = torch.roll(ids[1], shift), torch.roll(mask[1], shift)
    with torch.inference_mode():
        ours = enc.model.network.token_embeddings(ids, mask)  # right-padded out
        theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[1, : int(mask[1].sum())], theirs[1, shift:], atol=1e-5, rtol=1e-5)


def test_unknown_attention_layout_is_rejected():
    with pytest.raises(ValueError, match="attention"):
        PackedBatch.from_ids([[1, 2]], attention="flash")


def test_sentence_vectors_do_not_depend_on_batch_mates(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu")
    alone = np.stack([enc.encode(t) for t in TEXTS])
    np.testing.assert_allclose(enc.encode(TEXTS), alone, atol=1e-6)
    assert isinstance(enc.model.network, MPNet)
