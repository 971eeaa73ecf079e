"""Our x86 attention kernel (backends/cpu/attention.py; allmpnet_x86_attention, csrc/attention*.c) against
torch's SDPA in fp32, with each kind of products the CPU has, alone and inside an encoder, and where the plan uses
it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from allmpnet.backends.cpu.attention import HEAD_DIM, attention_unavailable, block_attention, reference
from allmpnet.backends.cpu.library import cpu_flags
from allmpnet.encode.precision import Capabilities, limit_isa, plan_precision
from allmpnet.model import MPNetConfig
from allmpnet.testing import build_random_model
from conftest import side_by_side_bias

needs_kernel = pytest.mark.skipif(bool(attention_unavailable()), reason=attention_unavailable() or "runs")


def expected_products(asked: str, dtype: torch.dtype, tokens: int) -> str:
    """What the kernel should use on this CPU: fp32 blocks FMAs; bf16 ones the most asked for that the CPU has,
    with blocks under a tile of keys (32) on FMAs where the CPU has AMX."""
    flags = cpu_flags()
    if dtype == torch.float32 or asked == "fp32" or "avx512_bf16" not in flags:
        return "fp32"
    if asked == "amx" and {"amx_tile", "amx_bf16"} <= flags:
        return "amx" if tokens >= 32 else "fp32"
    return "bf16"


@needs_kernel
@pytest.mark.parametrize("dtype,products", [(torch.float32, "amx"), (torch.bfloat16, "amx"), (torch.bfloat16, "bf16"),
                                            (torch.bfloat16, "fp32")])
# key counts: 1-4 vectors of 16 in the last tile (13, 40, 63, 64, 100, 130), odd and even, a lone token; on the
# tiles: keys padded to 32 (40, 63, 65, 100, 130), a partial last tile of 16 queries, one and several of them
@pytest.mark.parametrize("blocks,tokens,heads", [(1, 1, 1), (3, 13, 2), (2, 32, 1), (2, 40, 2), (2, 63, 3),
                                                 (1, 64, 2), (2, 65, 1), (1, 100, 2), (1, 130, 1), (4, 256, 2)])
def test_kernel_matches_sdpa(dtype, products, blocks, tokens, heads):
    generator = torch.Generator().manual_seed(tokens)
    start = 3  # the group starts inside the packed rows; rows around it stay untouched
    qkv = torch.randn(start + blocks * tokens + 2, 3 * heads * HEAD_DIM, generator=generator).to(dtype)
    bias = torch.randn(heads, tokens, tokens, generator=generator)
    out = torch.full((qkv.shape[0], heads * HEAD_DIM), 7.0, dtype=dtype)
    used = block_attention(qkv, out, bias, start, blocks, tokens, heads, products)  # "bf16": as on CPUs without AMX
    assert used == expected_products(products, dtype, tokens)
    expected = reference(qkv, bias, start, blocks, tokens, heads)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: its own rounding of inputs and outputs
    torch.testing.assert_close(out[start:start + blocks * tokens].float(), expected, atol=tolerance, rtol=tolerance)
    assert (out[:start] == 7).all() and (out[start + blocks * tokens:] == 7).all()


@needs_kernel
# Under 64 tokens (side-by-side sentences) each probability is two bf16 parts: rounded to one, they cost auto's worst
# STSBenchmark sentence 0.99637 -> 0.99562 min cosine to fp32 (their mean error here: ~9% above the fp32 path's).
# From 64 tokens they are one part, from a shorter exp polynomial whose error must stay far below that rounding:
# 1.11x the fp32 path's error, as with the full polynomial (a polynomial one term short: 1.28-1.35x).
# On the tiles each probability is two bf16 parts at every length (one part cost SciFact's nDCG@10 0.26).
@pytest.mark.parametrize("products", ["amx", "bf16"])
@pytest.mark.parametrize("tokens,bound", [(13, 1.01), (40, 1.01), (63, 1.01), (64, 1.2), (100, 1.2), (256, 1.2)])
def test_bf16_products_weight_the_values_about_as_precisely_as_fp32(products, tokens, bound):
    bound = 1.01 if products == "amx" else bound
    generator = torch.Generator().manual_seed(tokens)
    qkv = (2 * torch.randn(4 * tokens, 3 * 2 * HEAD_DIM, generator=generator)).bfloat16()
    bias = torch.randn(2, tokens, tokens, generator=generator)
    expected = reference(qkv, bias, 0, 4, tokens, 2)
    errors = []
    for asked in (products, "fp32"):
        out = torch.zeros(4 * tokens, 2 * HEAD_DIM, dtype=torch.bfloat16)
        if block_attention(qkv, out, bias, 0, 4, tokens, 2, asked) != asked:
            pytest.skip(f"this CPU lacks the {asked} products")
        errors.append((out.float() - expected).abs().mean().item())
    assert errors[0] <= bound * errors[1]


@needs_kernel
def test_texts_side_by_side_do_not_attend_to_each_other():
    generator = torch.Generator().manual_seed(0)
    position = torch.randn(2, 5, 5, generator=generator)
    bias = side_by_side_bias(position, 3).float()  # 3 texts of 5 tokens in one 15-token block
    qkv = torch.randn(15, 3 * 2 * HEAD_DIM, generator=generator)
    out = torch.zeros(15, 2 * HEAD_DIM)
    block_attention(qkv, out, bias, 0, 1, 15, 2)
    alone = torch.zeros(15, 2 * HEAD_DIM)
    block_attention(qkv, alone, position.contiguous(), 0, 3, 5, 2)  # the same texts as 3 blocks of their own
    torch.testing.assert_close(out, alone, atol=1e-6, rtol=1e-5)


def test_kernel_refuses_what_it_was_not_written_for():
    qkv, out = torch.zeros(4, 3 * 32), torch.zeros(4, 32)  # heads of 32
    with pytest.raises(ValueError, match="wrong dtype, layout or shape"):
        block_attention(qkv, out, torch.zeros(1, 4, 4), 0, 1, 4, 1)
    with pytest.raises(ValueError, match="products must be one of"):
        block_attention(qkv, out, torch.zeros(1, 4, 4), 0, 1, 4, 1, "int8")
    assert "lacks avx512bw, avx512dq, avx512f" in attention_unavailable(frozenset({"avx2", "fma"}))


def test_plan_uses_it_for_bf16_activations():
    zen4 = Capabilities("cpu", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}), frozenset({"fp32", "bf16"}),
                        amx_kernels="no AMX", x86_kernels=frozenset({"vnni-a8"}), x86_attention=True)
    assert plan_precision("auto", "cpu", zen4).block_attention_kernel == "bf16"  # int8 with bf16 activations
    assert plan_precision("bf16", "cpu", zen4).block_attention_kernel == "bf16"  # pair products
    assert "our x86 kernel (bf16 products) for blocks" in plan_precision("bf16", "cpu", zen4).describe()
    assert not plan_precision("fp32", "cpu", zen4).block_attention_kernel  # the exact path keeps SDPA
    cascade_lake = dataclasses.replace(zen4, cpu_flags=zen4.cpu_flags - {"avx512_bf16"})  # no native bf16
    assert plan_precision("auto", "cpu", cascade_lake).dtype == torch.bfloat16  # stored in bf16 for our kernels
    assert plan_precision("auto", "cpu", cascade_lake).block_attention_kernel == "fp32"  # FMAs
    without_kernel = dataclasses.replace(cascade_lake, x86_attention=False)
    assert not plan_precision("bf16", "cpu", without_kernel).block_attention_kernel
    assert not plan_precision("bf16", "cpu", dataclasses.replace(zen4, x86_attention=False)).block_attention_kernel
    amx = dataclasses.replace(zen4, cpu_flags=zen4.cpu_flags | {"amx_tile", "amx_bf16"}, amx_kernels="")
    assert plan_precision("bf16", "cpu", amx).block_attention_kernel == "amx"  # on the tiles there
    # a user limiting the instruction set below AMX (ONEDNN_MAX_CPU_ISA) limits our kernel too
    limited = dataclasses.replace(amx, cpu_flags=limit_isa(amx.cpu_flags, "avx512_core_bf16"))
    assert plan_precision("bf16", "cpu", limited).block_attention_kernel == "bf16"


@needs_kernel
def test_encoder_with_the_kernel_matches_sdpa(tmp_path):
    from allmpnet import Encoder
    cfg = MPNetConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                      max_position_embeddings=130)  # heads of 64
    model_dir = build_random_model(tmp_path / "m", cfg)
    # planned as on a CPU without AMX's kernels: the attention kernel needs AVX-512 only
    caps = dataclasses.replace(Capabilities.detect("cpu"), x86_attention=True, amx_kernels="not used here")
    enc = Encoder(model_dir, device="cpu", precision=plan_precision("bf16", "cpu", caps))
    texts = ["a short one", "the cat sat on the mat", "x " * 50, "another text of a few words", "y " * 90]
    batch = enc.pack(enc.tokenize(texts).ids)
    ours = [batch.attention.kernel_for(g) for g in batch.attention.groups]
    assert any(k is not None and k.func is block_attention for k in ours)
    assert all(k.keywords["products"] == enc.plan.block_attention_kernel for k in ours if k is not None)
    sdpa = enc.with_precision(dataclasses.replace(enc.plan, block_attention_kernel=None))
    assert all(sdpa.pack(enc.tokenize(texts).ids).attention.kernel_for(g) is None
               for g in batch.attention.groups)
    got, expected = enc.encode(texts), sdpa.encode(texts)
    assert (got * expected).sum(1).min() > 0.9995
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("products", ["amx", "bf16", "fp32"])
def test_kernel_leaves_the_callers_denormals_alone(products):
    # it flushes denormals to zero while it runs (texts side by side make them), and must restore the mode after
    generator = torch.Generator().manual_seed(0)
    position = torch.randn(2, 12, 12, generator=generator)
    bias = side_by_side_bias(position, 3).float()  # 3 texts of 12 tokens: -3.4e38 between them
    qkv = torch.randn(36, 3 * 2 * HEAD_DIM, generator=generator).bfloat16()
    out = torch.zeros(36, 2 * HEAD_DIM, dtype=torch.bfloat16)
    block_attention(qkv, out, bias, 0, 1, 36, 2, products)
    torch.testing.assert_close(out.float(), reference(qkv, bias, 0, 1, 36, 2), atol=2e-2, rtol=2e-2)
    tiny = torch.tensor([1e-38]) / 1000  # a denormal, unless this thread now flushes them
    assert tiny.item() > 0
