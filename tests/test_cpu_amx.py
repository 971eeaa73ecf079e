"""Our CPU kernels: int8 quantization and packing, the AMX int8 linear layer and the short-block attention
against plain torch maths, and the encoder's "int8" / "bf16+int8" / "auto" precisions on tiny random models."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from allmpnet import Encoder
from allmpnet.backends.cpu import amx as kernels_module
from allmpnet.encode.inference import RowSwitchedLinear
from allmpnet.encode.precision import Capabilities, limit_isa, max_isa_from_env, plan_precision
from allmpnet.backends.cpu.amx import (Int8Linear, kernels_unavailable, pack_scales, pack_weight, quantize,
                                     short_attention, short_attention_reference)
from allmpnet.testing import TINY, build_random_model
from conftest import side_by_side_bias

TEXTS = ["hello world", "the cat is on the moon", "", "a dog and a car", "x" * 20,
         "this is a test sentence with more words than the others in the list", "sun", "plant search query"]
# a CPU without AMX, or one capped below it (ALLMPNET_MAX_ISA / ONEDNN_MAX_CPU_ISA: the plans then use none),
# skips; one with AMX where the kernel does not build or load fails (that is a defect)
needs_amx = pytest.mark.skipif(
    not (kernels_module.cpu_has_amx() and {"amx_tile", "amx_bf16"} <= limit_isa(kernels_module.cpu_flags(),
                                                                                max_isa_from_env())),
    reason="this CPU has no AMX, or ALLMPNET_MAX_ISA caps it below AMX")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---------------------------------------------------------------- quantization and layout (no kernel needed)


def test_quantize_keeps_each_group_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    weight[3, 5] = 40.0  # an outlier coarsens its own group only
    quantized, scale = quantize(weight, 128)
    assert quantized.dtype == torch.int8 and scale.shape == (64, 2)
    assert quantized.abs().max() == 127
    restored = quantized.float().view(64, 2, 128) * scale[..., None]
    error = (restored - weight.view(64, 2, 128)).abs()
    assert (error <= scale[..., None] / 2 + 1e-6).all()
    assert scale[3, 0] > 10 * scale[3, 1]  # the outlier's group, not the row's other group


def test_packed_layout_is_the_tile_order_the_kernel_reads():
    # element (n, k) of a 64 x 64 matrix lands at [n // 32][k // 32][(n % 32) // 16][(k % 32) // 2][n % 16][k % 2]
    N, K = 64, 64
    values = (torch.arange(N * K) % 251 - 125).to(torch.int8).view(N, K)
    packed = pack_weight(values)
    assert packed.shape == (2, 2, 2, 16, 16, 2)
    for n, k in [(0, 0), (1, 0), (0, 1), (17, 3), (40, 33), (63, 63), (31, 62)]:
        at = (n // 32, k // 32, (n % 32) // 16, (k % 32) // 2, n % 16, k % 2)
        assert packed[at] == values[n, k]
    scales = pack_scales(torch.arange(N * 2, dtype=torch.float32).view(N, 2))
    assert scales.shape == (2, 2, 2, 32)
    # lane j of tile t in block b, group g: output b * 32 + t * 16 + j // 2
    assert scales[1, 0, 1, 5] == (32 + 16 + 2) * 2 + 0
    assert scales[0, 1, 0, 31] == 15 * 2 + 1


def test_int8_layer_rejects_shapes_the_kernel_cannot_tile():
    with pytest.raises(ValueError, match="multiples of 32"):
        Int8Linear(torch.randn(48, 64), None)
    with pytest.raises(ValueError, match="activation"):
        Int8Linear(torch.randn(32, 64), None, activation="relu")


# ---------------------------------------------------------------- the kernel


@needs_amx
def test_kernel_loads_on_an_amx_cpu():
    assert kernels_unavailable() == ""


@needs_amx
@pytest.mark.parametrize("rows", [1, 11, 16, 17, 32, 45, 300])
@pytest.mark.parametrize("form", ["bias", "gelu", "residual", "plain"])
def test_kernel_matches_torch_on_the_dequantized_weight(rows, form):
    torch.manual_seed(rows)
    weight, bias = torch.randn(96, 256) * 0.05, torch.randn(96)
    layer = Int8Linear(weight, None if form == "plain" else bias, activation="gelu" if form == "gelu" else "none")
    x = torch.randn(rows, 256).bfloat16()
    residual = torch.randn(rows, 96).bfloat16() if form == "residual" else None
    # the kernel widens each int8 value x its scale to bf16, and sums in fp32
    expected = F.linear(x.float(), layer.dequantized().bfloat16().float(), layer.bias)
    if form == "gelu":
        expected = F.gelu(expected)
    if residual is not None:
        expected = expected + residual.float()
    got = layer(x, residual=residual)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    # only the bf16 rounding of the output differs (8 significant bits)
    torch.testing.assert_close(got.float(), expected, rtol=1 / 128, atol=1e-3)
    # and the quantized weight is the real one to within int8 resolution
    assert (layer.dequantized() - weight).abs().max() < weight.abs().max() / 127


@needs_amx
def test_each_row_is_computed_independently_of_the_others():
    torch.manual_seed(1)
    layer = Int8Linear(torch.randn(64, 128), torch.randn(64))
    x = torch.randn(70, 128).bfloat16()
    together = layer(x)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(70)])
    assert torch.equal(together, alone)


@needs_amx
def test_kernel_rejects_wrong_inputs():
    layer = Int8Linear(torch.randn(32, 64), None)
    with pytest.raises(ValueError, match="bf16"):
        layer(torch.randn(4, 64))
    with pytest.raises(ValueError, match="64"):
        layer(torch.randn(4, 32).bfloat16())
    with pytest.raises(ValueError, match="residual"):
        layer(torch.randn(4, 64).bfloat16(), residual=torch.randn(3, 32).bfloat16())
    assert layer(torch.empty(0, 64, dtype=torch.bfloat16)).shape == (0, 32)


# ---------------------------------------------------------------- short-block attention


@needs_amx
@pytest.mark.parametrize("blocks, length, rows_per_block, n_head, head_dim",
                         [(1, 11, 1, 12, 64), (3, 7, 4, 12, 64), (2, 32, 1, 2, 64), (5, 3, 10, 4, 16),
                          (1, 1, 1, 2, 128), (4, 16, 2, 3, 32)])
def test_short_attention_matches_sdpa(blocks, length, rows_per_block, n_head, head_dim):
    torch.manual_seed(length)
    T, C = length * rows_per_block, n_head * head_dim
    bias = side_by_side_bias(torch.randn(n_head, length, length), rows_per_block)  # (H, T, T)
    qkv = torch.randn(3 + blocks * T + 2, 3 * C).bfloat16()  # the group sits between other rows
    out = torch.full((qkv.shape[0], C), 7.0, dtype=torch.bfloat16)
    short_attention(qkv, out, bias, 3, blocks, T, n_head)
    expected = short_attention_reference(qkv, bias, 3, blocks, T, n_head)
    torch.testing.assert_close(out[3:3 + blocks * T].float(), expected, rtol=1 / 64, atol=2e-3)
    assert (out[:3] == 7).all() and (out[3 + blocks * T:] == 7).all()  # rows outside the group untouched


@needs_amx
def test_short_attention_rejects_what_it_cannot_do():
    qkv, out = torch.randn(40, 3 * 64).bfloat16(), torch.empty(40, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="short_attention"):
        short_attention(qkv, out, torch.zeros(1, 33, 33), 0, 1, 33, 1)  # longer than a block
    with pytest.raises(ValueError, match="short_attention"):
        short_attention(qkv, out, torch.zeros(8, 4, 4), 0, 1, 4, 8)  # head size 8
    with pytest.raises(ValueError, match="short_attention"):
        short_attention(qkv, out, torch.zeros(1, 4, 4), 38, 1, 4, 1)  # past the last row
    with pytest.raises(ValueError, match="short_attention"):
        short_attention(qkv.float(), out, torch.zeros(1, 4, 4), 0, 1, 4, 1)


@needs_amx
def test_bf16_copy_uses_short_attention_and_matches_sdpa(tmp_path):
    # heads of 16 (the shared tiny model's are 8, which the kernel does not take)
    model_dir = build_random_model(tmp_path / "m", cfg=dataclasses.replace(TINY, hidden_size=64, intermediate_size=128))
    enc = Encoder(model_dir, device="cpu", precision="bf16")
    assert enc.plan.short_attention_kernel
    texts = ["the cat is on the moon", "sun", "a dog and a car", "hello world", "x " * 40]  # short and long texts
    ids = sorted(enc.tokenize(texts).ids, key=len, reverse=True)
    layout = enc.pack(ids).attention
    assert {layout.on_short_kernel(g) for g in layout.groups} == {True, False}  # short blocks ours, the long SDPA's
    sdpa_only = enc.with_precision(dataclasses.replace(enc.plan, short_attention_kernel=False))
    exact = enc.with_precision("fp32")
    got = enc.encode(texts)
    np.testing.assert_allclose(got, sdpa_only.encode(texts), atol=0.02)
    assert cosines(got, exact.encode(texts)).min() > 0.999


# ---------------------------------------------------------------- encoder precisions


def weight_only_int8_plan():
    """The AMX "int8" plan (int8 weights widened to bf16 on the tiles) even where our W8A8 AMX-int8 kernel runs,
    which "int8" then means."""
    caps = Capabilities.detect("cpu")
    plan = plan_precision("int8", "cpu", dataclasses.replace(caps, x86_kernels=caps.x86_kernels - {"amx-a8"}))
    assert plan.linear == "int8-amx"
    return plan


@needs_amx
def test_int8_precision_stays_close_to_fp32(tiny_model_dir):
    exact = Encoder(tiny_model_dir, device="cpu").encode(TEXTS)
    enc = Encoder(tiny_model_dir, device="cpu", precision=weight_only_int8_plan())
    got = enc.encode(TEXTS)
    layers = enc.inference_model().network.encoder.layer
    assert all(isinstance(linear, Int8Linear) for linear in (layers[0].attention.attn.qkv, layers[1].output.dense))
    assert cosines(got, exact).min() > 0.99
    assert not np.allclose(got, Encoder(tiny_model_dir, device="cpu", precision="bf16").encode(TEXTS), atol=1e-6)


@needs_amx
def test_bf16_int8_switches_on_batch_size(tiny_model_dir):
    plan = dataclasses.replace(plan_precision("bf16+int8", "cpu"), small_batch_tokens=16)  # one tiny text <= 16
    mixed = Encoder(tiny_model_dir, device="cpu", precision=plan)
    int8 = mixed.with_precision(weight_only_int8_plan())
    bf16 = mixed.with_precision("bf16")
    assert isinstance(mixed.inference_model().network.encoder.layer[0].attention.attn.qkv, RowSwitchedLinear)
    one = ["the cat is on the moon"]
    np.testing.assert_array_equal(mixed.encode(one), int8.encode(one))  # small: int8 weights
    many = TEXTS * 4  # far more than 16 packed tokens in one batch
    np.testing.assert_array_equal(mixed.encode(many, batch_size=64), bf16.encode(many, batch_size=64))


def test_int8_precisions_say_why_they_cannot_run(tiny_model_dir):
    with pytest.raises(ValueError, match="CPUs only"):
        Encoder(tiny_model_dir, device="cuda", precision="int8")
    no_kernels = Capabilities("cpu", frozenset({"avx512_bf16"}), frozenset({"bf16"}),
                              "this CPU has no AMX bf16 units")
    for precision in ("int8", "bf16+int8"):
        with pytest.raises(ValueError, match="no AMX"):
            plan_precision(precision, "cpu", no_kernels)
    assert plan_precision("auto", "cpu", no_kernels).name == "bf16"  # auto never fails
