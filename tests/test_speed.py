"""Fast paths on the tiny random model: token-budget batching, tokenization prefetch, bf16 inference copy, ONNX."""
from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from allmpnet import Encoder
from allmpnet.encode import encoder as encoder_module
from allmpnet.encode.batching import prefetched, token_budget_batches, windows
from allmpnet.encode.fused import (AttentionGroup, FastMPNet, Linear, PackedLinear, attention_groups, block_bias,
                                   inference_network, onednn_linear_available, right_padded)

TEXTS = ["hello world", "the cat is on the moon", "", "   ", "a dog and a car", "x" * 80,
         "this is a test sentence with more words than the others in the list", "sun", "plant search query"]
needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="no oneDNN bf16 linear on this CPU/build")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---------------------------------------------------------------- batching


def test_token_budget_batches_cover_every_row_once_within_limits():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    batches = list(token_budget_batches(lengths, max_texts=64, max_tokens=2048))
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(500))
    for batch in batches:
        assert len(batch) <= 64
        padded = len(batch) * lengths[batch].max()
        assert padded <= 2048 or len(batch) == 1
        assert lengths[batch[0]] == lengths[batch].max()  # longest first: the batch pads to its first row
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)


def test_token_budget_gives_short_texts_full_batches_and_long_texts_small_ones():
    lengths = np.array([10] * 100 + [400] * 10)
    sizes = [len(b) for b in token_budget_batches(lengths, max_texts=32, max_tokens=1000)]
    assert sizes == [2, 2, 2, 2, 2, 32, 32, 32, 4]  # 2 x 400 tokens fit, 3 do not; then the count cap binds


def test_token_budget_single_text_over_budget_still_gets_a_batch():
    assert [b.tolist() for b in token_budget_batches(np.array([500, 3]), max_texts=8, max_tokens=100)] == [[0], [1]]


def test_token_budget_none_means_fixed_count():
    sizes = [len(b) for b in token_budget_batches(np.array([300] * 70), max_texts=32, max_tokens=None)]
    assert sizes == [32, 32, 6]


def test_no_count_cap_lets_the_budget_alone_decide():
    lengths = np.array([10] * 1000 + [250] * 20)
    sizes = [len(b) for b in token_budget_batches(lengths, max_texts=None, max_tokens=1000)]
    assert sizes == [4] * 5 + [100] * 10  # 4 x 250 and 100 x 10 tokens per batch
    assert [len(b) for b in token_budget_batches(np.array([5, 6, 7]), None, None)] == [3]


def test_encode_default_batches_by_token_budget(tiny_model_dir, monkeypatch):
    enc = Encoder(tiny_model_dir, device="cpu", max_batch_tokens=64)
    seen = []
    original = enc.embed
    monkeypatch.setattr(enc, "embed", lambda ids, mask, normalize=None: seen.append(ids.shape) or original(ids, mask))
    texts = ["cat"] * 100  # 3 tokens each with <s> and </s>
    vectors = enc.encode(texts)
    assert [s[0] for s in seen] == [21] * 4 + [16]  # 64 // 3 texts per batch, not a fixed 32
    np.testing.assert_allclose(vectors, enc.encode(texts, batch_size=7), atol=1e-6)


@pytest.mark.parametrize("texts,tokens", [(0, 10), (4, 0)])
def test_token_budget_rejects_bad_limits(texts, tokens):
    with pytest.raises(ValueError):
        list(token_budget_batches(np.array([3, 4]), texts, tokens))


def test_windows_split_exactly():
    assert windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert windows(0, 4) == []


def test_prefetched_keeps_order_and_prepares_next_item_while_caller_works():
    events: list[str] = []
    threads: set[str] = set()

    def prepare(i: int) -> int:
        threads.add(threading.current_thread().name)
        events.append(f"prepared {i}")
        return i * 10

    got = []
    for item, ready in prefetched([0, 1, 2], prepare):
        time.sleep(0.05)  # the caller's "model" work; item+1 is prepared meanwhile
        events.append(f"used {item}")
        got.append((item, ready))
    assert got == [(0, 0), (1, 10), (2, 20)]
    assert events.index("prepared 1") < events.index("used 0")
    assert threads and all(t.startswith("allmpnet-tokenize") for t in threads)
    assert list(prefetched([], prepare)) == []


def test_prefetched_single_item_runs_inline():
    threads = []
    got = list(prefetched(["only"], lambda item: threads.append(threading.current_thread().name) or item.upper()))
    assert got == [("only", "ONLY")]
    assert threads == [threading.current_thread().name]  # a lone query pays no thread start-up


# ---------------------------------------------------------------- the fast inference copy


def test_attention_groups_cover_each_token_once_in_blocks():
    lengths = [5] * 7 + [3, 3, 40, 0, 6]
    groups = attention_groups(lengths, block_tokens=16)
    assert groups == [AttentionGroup(start=0, blocks=2, rows_per_block=3, length=5),  # 3 x 5 = 15 <= 16 tokens
                      AttentionGroup(start=30, blocks=1, rows_per_block=1, length=5),  # the 7th row of 5
                      AttentionGroup(start=35, blocks=1, rows_per_block=2, length=3),
                      AttentionGroup(start=41, blocks=1, rows_per_block=1, length=40),  # longer than a block
                      AttentionGroup(start=81, blocks=1, rows_per_block=1, length=6)]  # the empty row is skipped
    assert groups[-1].end == sum(lengths)


def test_block_bias_keeps_each_row_to_itself():
    position = torch.arange(8, dtype=torch.float32).view(2, 2, 2)  # (H=2, L=2, L=2)
    bias = block_bias(position, rows=2)
    assert bias.shape == (1, 2, 4, 4) and bias.is_contiguous()
    low = torch.finfo(torch.float32).min
    expected_head0 = torch.tensor([[0, 1, low, low], [2, 3, low, low], [low, low, 0, 1], [low, low, 2, 3]])
    torch.testing.assert_close(bias[0, 0], expected_head0)
    torch.testing.assert_close(bias[0, 1, 2:, 2:], position[1])


def test_right_padded_detects_layout():
    assert right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding
    assert not right_padded(torch.tensor([[1, 0, 1]]))  # a hole


def mixed_batch(enc: Encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of equal lengths (grouped side by side), distinct lengths and padding, sorted as encode() sorts."""
    texts = ["cat", "dog", "sun", "moon", "a dog and a car", "the cat is on the moon", "hello world",
             "x" * 60, "this is a test sentence with more words than the others in the list"]
    tokenized = enc.tokenize(texts)
    order = sorted(range(len(texts)), key=lambda i: -tokenized.lengths[i])
    return enc.tokenizer.pad([tokenized.ids[i] for i in order])


def test_fast_copy_matches_the_network_on_real_tokens(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu")
    ids, mask = mixed_batch(enc)
    assert not bool(mask.all())  # padding present
    with torch.inference_mode():
        expected = enc.network(ids, mask)
        got = inference_network(enc.network, torch.float32, torch.device("cpu"))(ids, mask)
        fast_bf16 = inference_network(enc.network, torch.bfloat16, torch.device("cpu"))(ids, mask).float()
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert got[~real].abs().max() == 0  # padding positions are zeros
    torch.testing.assert_close(fast_bf16[real], expected[real], atol=0.1, rtol=0.05)


def test_padded_attention_variant_matches_too(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu")
    ids, mask = mixed_batch(enc)
    padded = FastMPNet(copy.deepcopy(enc.network), Linear, attention="padded")  # CUDA's: one SDPA call per layer
    with torch.inference_mode():
        expected = enc.network(ids, mask)
        got = padded(ids, mask)
        unpadded = ids[:1, : int(mask[0].sum())]  # a batch without padding takes the broadcast-bias branch
        ones = torch.ones_like(unpadded)
        torch.testing.assert_close(padded(unpadded, ones), enc.network(unpadded, ones), atol=1e-5, rtol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert got[~real].abs().max() == 0
    with pytest.raises(ValueError, match="attention"):
        FastMPNet(copy.deepcopy(enc.network), Linear, attention="flash")


def test_fp32_fast_copy_shares_the_weights(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu")
    fast = enc.inference_network()
    dense = enc.network.encoder.layer[1].output.dense.weight
    assert fast.layers[1].down.weight.data_ptr() == dense.data_ptr()  # no second fp32 copy of the weights


def test_left_padded_input_falls_back_to_the_network(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu", precision="bf16")
    ids, mask = enc.tokenizer.pad(enc.tokenize(["the cat is on the moon", "sun"]).ids)
    shift = int((mask[1] == 0).sum())
    left_ids, left_mask = ids.clone(), mask.clone()
    left_ids[1] = torch.roll(ids[1], shift)
    left_mask[1] = torch.roll(mask[1], shift)
    with torch.inference_mode():
        got = enc(left_ids, left_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = enc.network(left_ids, left_mask)
        expected = F.normalize(enc.pooling(tokens.float(), left_mask), dim=1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- encoder precision and fast copy


def test_max_batch_tokens_does_not_change_vectors(tiny_model_dir):
    free = Encoder(tiny_model_dir, device="cpu", max_batch_tokens=None).encode(TEXTS)
    tight = Encoder(tiny_model_dir, device="cpu", max_batch_tokens=20).encode(TEXTS, batch_size=3)
    np.testing.assert_allclose(tight, free, atol=1e-6)


def test_encode_windows_restore_order(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(encoder_module, "SORT_WINDOW", 4)  # several prefetched windows on a small input
    enc = Encoder(tiny_model_dir, device="cpu")
    windowed = enc.encode(TEXTS * 3)
    one_by_one = np.stack([enc.encode(t) for t in TEXTS * 3])
    np.testing.assert_allclose(windowed, one_by_one, atol=1e-5)


def test_bad_precision_and_budget_are_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="precision"):
        Encoder(tiny_model_dir, device="cpu", precision="int4")
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Encoder(tiny_model_dir, device="cpu", max_batch_tokens=0)


def test_auto_precision_follows_cpu_flags(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(encoder_module, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(encoder_module, "kernels_unavailable", lambda: "no AMX")  # an AVX512-BF16 CPU (test_kernels.py)
    assert Encoder(tiny_model_dir, device="cpu", precision="auto").precision == "bf16"
    monkeypatch.setattr(encoder_module, "cpu_has_native_bf16", lambda: False)
    assert Encoder(tiny_model_dir, device="cpu", precision="auto").precision == "fp32"


def test_bf16_matches_fp32_closely(tiny_model_dir):
    exact = Encoder(tiny_model_dir, device="cpu").encode(TEXTS)
    fast = Encoder(tiny_model_dir, device="cpu", precision="bf16").encode(TEXTS)
    assert fast.dtype == np.float32 and fast.shape == exact.shape
    assert cosines(fast, exact).min() > 0.999
    assert not np.array_equal(fast, exact)  # it really ran in bf16


@needs_onednn
def test_bf16_cpu_runs_fused_layers_and_leaves_fp32_weights_alone(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu", precision="bf16")
    enc.encode(TEXTS)
    fast = enc.inference_network()
    assert all(isinstance(linear, PackedLinear) for linear in (fast.layers[0].qkv, fast.layers[0].up))
    assert all(p.dtype == torch.float32 for p in enc.network.parameters())  # training/saving see fp32 masters
    # the copy is not a registered submodule: state_dict, parameters() and save() stay the fp32 model's
    assert list(enc.state_dict()) == ["network." + k for k in enc.network.state_dict()]


def test_bf16_copy_follows_weight_updates(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu", precision="bf16")
    before = enc.encode(TEXTS)
    with torch.no_grad():
        enc.network.encoder.layer[0].intermediate.dense.weight.mul_(3.0)  # as an optimizer step would, in place
    after = enc.encode(TEXTS)
    enc.precision = "fp32"
    exact_after = enc.encode(TEXTS)
    assert np.abs(after - before).max() > 1e-3
    assert cosines(after, exact_after).min() > 0.999


def test_training_forward_uses_fp32_masters_with_gradients(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu", precision="bf16")
    enc.encode(TEXTS)  # builds the inference copy first
    enc.train()
    ids, mask = enc.tokenizer.pad(enc.tokenize(TEXTS[:4]).ids)
    enc(ids, mask).sum().backward()
    grad = enc.network.encoder.layer[0].attention.attn.q.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@needs_onednn
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_packed_linear_matches_linear(activation):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 80)
    x = torch.randn(3, 7, 48)
    packed = PackedLinear(lin.weight.bfloat16(), lin.bias.bfloat16(), activation=activation)
    expected = lin(x)
    expected = F.gelu(expected) if activation == "gelu" else expected
    got = packed(x.bfloat16()).float()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)
    residual = torch.randn(3, 7, 80)
    if activation == "none":
        torch.testing.assert_close(packed(x.bfloat16(), residual=residual.bfloat16()).float(),
                                   lin(x) + residual, atol=0.05, rtol=0.02)


# ---------------------------------------------------------------- ONNX export


def test_onnx_export_matches_pytorch(tiny_model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from allmpnet.export.onnx import OnnxEncoder, check_parity, export_onnx
    enc = Encoder(tiny_model_dir, device="cpu")
    graph = export_onnx(enc, tmp_path / "onnx")
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
    parity = check_parity(enc, graph, TEXTS)  # lengths other than the traced example's: dynamic axes hold
    assert parity.max_abs_diff < 1e-5
    got = OnnxEncoder(graph, enc.tokenizer, max_batch_tokens=16).encode(TEXTS, batch_size=2)
    np.testing.assert_allclose(got, enc.encode(TEXTS), atol=1e-5)


def test_export_onnx_cli(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from allmpnet.cli import main
    assert main(["export", "onnx", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "model.onnx" in printed and "model.int8.onnx" in printed and "max |diff|" in printed
    assert (tmp_path / "out" / "model.int8.onnx").stat().st_size < (tmp_path / "out" / "model.onnx").stat().st_size
