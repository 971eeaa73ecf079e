"""The inference copy: module swaps per precision plan, fp32 masters untouched, explicit refresh after weight
changes, and training through the same model with gradients."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from allmpnet import Encoder
from allmpnet.encode.inference import PackedLinear, RowSwitchedLinear, swap_linears
from allmpnet.encode.precision import Capabilities, PrecisionPlan, onednn_linear_available, plan_precision
from allmpnet.model.mpnet import Linear
from allmpnet.train.gradcache import embed_for_training

TEXTS = ["hello world", "the cat is on the moon", "", "   ", "a dog and a car", "x" * 40,
         "this is a test sentence with more words than the others in the list", "sun", "plant search query"]
needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="no oneDNN bf16 linear on this CPU/build")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def plain_fp32() -> PrecisionPlan:
    """fp32 on this CPU as if oneDNN had no prepacked layers."""
    return plan_precision("fp32", "cpu", dataclasses.replace(Capabilities.detect("cpu"), onednn_dtypes=frozenset()))


def test_plain_fp32_runs_the_model_itself(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu", precision=plain_fp32())
    assert enc.inference_model() is enc.model  # no second copy of the weights


@pytest.mark.skipif(not onednn_linear_available(torch.float32), reason="no oneDNN fp32 linear on this CPU/build")
def test_prepacked_fp32_copy_keeps_the_exact_vectors_and_shares_the_rest(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu")
    assert enc.plan.linear == "onednn" and enc.plan.exact
    copy = enc.inference_model()
    assert copy is not enc.model and isinstance(copy.network.encoder.layer[0].output.dense, PackedLinear)
    shared = copy.network.embeddings.word_embeddings.weight
    assert shared.data_ptr() == enc.model.network.embeddings.word_embeddings.weight.data_ptr()  # not duplicated
    np.testing.assert_allclose(enc.encode(TEXTS), enc.with_precision(plain_fp32()).encode(TEXTS), atol=1e-6)


def test_bf16_matches_fp32_closely(tiny_model_dir):
    exact = Encoder(tiny_model_dir, device="cpu").encode(TEXTS)
    fast = Encoder(tiny_model_dir, device="cpu", precision="bf16").encode(TEXTS)
    assert fast.dtype == np.float32 and fast.shape == exact.shape
    assert cosines(fast, exact).min() > 0.999
    assert not np.array_equal(fast, exact)  # it really ran in bf16


@needs_onednn
def test_bf16_copy_swaps_every_linear_and_leaves_the_fp32_masters(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu", precision="bf16")
    enc.encode(TEXTS)
    copy = enc.inference_model()
    layer = copy.network.encoder.layer[0]
    swapped = [layer.attention.attn.qkv, layer.attention.attn.o, layer.intermediate.dense, layer.output.dense]
    assert all(isinstance(linear, PackedLinear) for linear in swapped)
    assert not any(isinstance(m, Linear) for m in copy.modules())
    assert copy.network.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in enc.model.parameters())  # training and saving see fp32
    assert isinstance(enc.model.network.encoder.layer[0].attention.attn.qkv, Linear)


def test_swap_replaces_only_the_models_linears(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu")
    seen = []
    network = enc.model.network
    swap_linears(network, lambda name, linear: seen.append((name, linear.activation)) or linear)
    assert len(seen) == 4 * network.cfg.num_hidden_layers
    assert [a for _, a in seen].count("gelu") == network.cfg.num_hidden_layers  # the feed-forward up projections
    names = [n for n, _ in seen]
    assert names[:4] == ["encoder.layer.0.attention.attn.qkv", "encoder.layer.0.attention.attn.o",
                         "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]
    assert all(network.get_submodule(n) is not None for n in names)


def test_copy_follows_weight_updates_on_refresh(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu", precision="bf16")
    before = enc.encode(TEXTS)
    with torch.no_grad():
        enc.model.network.encoder.layer[0].intermediate.dense.weight.mul_(3.0)  # as an optimizer step would
    np.testing.assert_array_equal(enc.encode(TEXTS), before)  # the copy is frozen until refreshed
    enc.refresh()
    after = enc.encode(TEXTS)
    assert np.abs(after - before).max() > 1e-3
    assert cosines(after, enc.with_precision("fp32").encode(TEXTS)).min() > 0.999


def test_training_goes_through_fp32_masters_with_gradients(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu", precision="bf16")
    before = enc.encode(TEXTS)  # builds the inference copy first
    enc.train()
    embed_for_training(enc, enc.tokenize(TEXTS[:4]).ids).sum().backward()
    grad = enc.model.network.encoder.layer[0].attention.attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with torch.no_grad():
        for p in enc.model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    enc.eval()  # back from training: the copy is rebuilt from the updated weights
    assert np.abs(enc.encode(TEXTS) - before).max() > 1e-4


def test_encoder_running_the_model_itself_refuses_to_encode_in_training_mode(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu", precision=plain_fp32()).train()
    with pytest.raises(RuntimeError, match="training mode"):
        enc.encode(TEXTS)
    enc.eval()
    assert enc.encode(TEXTS).shape == (len(TEXTS), enc.dim)


@needs_onednn
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_packed_linear_matches_linear(activation):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 80)
    x = torch.randn(21, 48)
    packed = PackedLinear(lin.weight.bfloat16(), lin.bias.bfloat16(), activation=activation)
    expected = lin(x)
    expected = F.gelu(expected) if activation == "gelu" else expected
    got = packed(x.bfloat16()).float()
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)
    residual = torch.randn(21, 80)
    if activation == "none":
        torch.testing.assert_close(packed(x.bfloat16(), residual=residual.bfloat16()).float(),
                                   lin(x) + residual, atol=0.05, rtol=0.02)


def test_row_switched_linear_picks_by_rows():
    calls = []

    def form(name):
        return lambda x, residual=None: calls.append((name, x.shape[0])) or x

    switched = RowSwitchedLinear(form("small"), form("large"), max_small_rows=16)
    switched(torch.zeros(16, 4))
    switched(torch.zeros(17, 4))
    assert calls == [("small", 16), ("large", 17)]
