"""The fused layer stack (backends/cpu/fused.py, allmpnet_x86_encoder in csrc/encoder.c): the same layers as the
module-by-module stack, in one C call: every batch with int8 layers (a text's vector the same bits in any batch),
small ones with the fp32 model's own weights; everything else still runs the modules."""
from __future__ import annotations

import copy
import dataclasses
import ctypes
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from allmpnet.backends.cpu.library import library_unavailable, load as load_library
from allmpnet.backends.cpu.fused import (FP32_KERNELS, MAX_TEXT_TOKENS, EmbeddingSpec, FusedX86Stack,
                                       fp32_kernel_unavailable, fp32_linear)
from allmpnet.encode.precision import FUSED_STACK_TOKENS
from allmpnet.backends.cpu.int8 import KERNELS
from allmpnet.backends.cpu.library import cpu_flags
from allmpnet.model.packing import PackedBatch
from allmpnet.model.pooling import Pooling
from conftest import int8_plan

CPU = frozenset(cpu_flags())
KERNEL_PARAMS = [pytest.param(k, marks=pytest.mark.skipif(bool(KERNELS[k].flags - CPU), reason=f"this CPU lacks "
                                                           f"{', '.join(sorted(KERNELS[k].flags - CPU))} for {k}"))
                 for k in ("vnni-a8", "vnni256-a8", "avxvnni-a8", "vnni-a16", "avx512-a16", "avx2-a16")]
TEXTS = ["the cat sat on the mat", "a dog and a car", "this is a test sentence with a few more words in it", "sun"]
#          45 tokens together with the tiny model's tokenizer: one fused call


def int8_encoder(model_dir, kernel: str):
    from allmpnet import Encoder
    return Encoder(model_dir, device="cpu", precision=int8_plan(kernel))


def runnable_kernel() -> str:
    """The first int8 kernel this CPU runs (the test is skipped where none does)."""
    kernel = next((p.values[0] for p in KERNEL_PARAMS if not p.marks[0].args[0]), None)
    if kernel is None:
        pytest.skip("no int8 kernel runs on this CPU")
    return kernel


def stack_inputs(enc, texts):
    """The inference copy's fused stack, and a batch's layer-stack input (fp32) and layout."""
    copy_ = enc.inference_model()
    batch = enc.pack(enc.tokenize(texts).ids)
    with torch.inference_mode():
        x = copy_.network.embeddings(batch.ids, batch.positions).float()
    return copy_.network.encoder, x.clone(), batch  # a clone: an ordinary tensor, changeable outside inference


def assert_close_but_for_int8_rounding(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                                       kernel: str) -> None:
    """got == expected within atol and rtol, except, for kernels with int8 activations, where a value the next
    projection quantizes lay half-way between two of its row's 255 steps: two computations of the same layers that
    differ in the last bits upstream (another attention kernel, another order of sums) may round it either way,
    which moves the outputs it feeds by a step's worth (~1e-4 here). Such elements are rare (at most 0.5%), and
    none moves by more than 1e-2; a wrong kernel moves most of them."""
    if KERNELS[kernel].activations != "int8":
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
        return
    far = ~torch.isclose(got, expected, atol=atol, rtol=rtol)
    assert far.float().mean().item() <= 0.005, f"{int(far.sum())} of {far.numel()} values differ"
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=0)


def rounding_like_bf16_intermediates(modules: torch.nn.Module) -> torch.nn.Module:
    """`modules` (an fp32 layer stack) with its q|k|v, attention output and FFN hidden layer rounded to bf16, as
    the fused call stores them with bf16=True."""
    def rounded(module, inputs, output):
        return output.bfloat16().float()

    def round_input(module, args, kwargs):
        return (args[0].bfloat16().float(), *args[1:]), kwargs
    for layer in modules.layer:
        layer.attention.attn.qkv.register_forward_hook(rounded)
        layer.attention.attn.o.register_forward_pre_hook(round_input, with_kwargs=True)
        layer.intermediate.dense.register_forward_hook(rounded)
    return modules


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("route", [3.0, 1.0])
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_stack_computes_what_the_modules_compute(tiny_model_dir, kernel, route, bf16, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    enc = int8_encoder(tiny_model_dir, kernel)
    planned, x, batch = stack_inputs(enc, TEXTS)
    assert isinstance(planned, FusedX86Stack) and enc.plan.fused_stack_tokens is None
    assert planned.bf16 == (enc.plan.dtype == torch.bfloat16)
    stack = FusedX86Stack(planned.stack, bf16=bf16)
    # a spiky first token, and a threshold a 32-wide row can exceed (its max/RMS is at most sqrt(32)): in the
    # first q|k|v projection the int8 kernel keeps that row's one huge entry aside; at route 1 nearly every row
    # has more than MAX_SPLIT entries above 0.6 RMS and runs with int16 activations
    x[0, 3] = 60.0
    w8a8 = KERNELS[kernel].activations == "int8"
    stack.stack.layer[0].attention.attn.qkv.route = route if w8a8 else 0.0
    modules = copy.deepcopy(stack.stack).float()  # the same int8 layers, module by module, fp32 between them
    if bf16:
        modules = rounding_like_bf16_intermediates(modules)
    with torch.inference_mode():
        assert stack.texts(x, batch.attention) is not None
        expected = modules(x, batch.attention)
        got = stack(x, batch.attention)
    # bf16: the attention's bf16 products and a last-bit difference in a value the next projection quantizes
    # to int8 (one step of its row's 255) move a value by up to ~1e-3
    assert_close_but_for_int8_rounding(got, expected, 2e-3 if bf16 else 2e-5, 1e-4, kernel)
    assert (stack.routed[0, 0] >= 1) == (w8a8 and route == 1.0)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_a_text_gets_the_same_bits_alone_and_in_any_batch(tiny_model_dir, kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    enc = int8_encoder(tiny_model_dir, kernel)
    long_texts = [" ".join(["this is a test sentence with a few more words in it"] * 2) + f" {i}" for i in range(3)]
    many = [f"sentence number {i} about {TEXTS[i % 4]}" for i in range(120)]  # > 64 rows: the large kernels
    texts = TEXTS + ["what is the capital of france?", "<pad> a <pad>", "<s></s><mask>"]
    alone = np.stack([enc.encode(t) for t in texts])
    for batch in (texts, texts + long_texts, long_texts + many + texts, texts[::-1]):
        got = enc.encode(batch, batch_size=len(batch))
        order = [batch.index(t) for t in texts]
        np.testing.assert_array_equal(got[order], alone)
    assert enc.encode(texts, batch_size=2).tobytes() == alone.tobytes()


@pytest.mark.parametrize("kernel", KERNEL_PARAMS[:1] + KERNEL_PARAMS[3:])
def test_batches_the_fused_call_does_not_take_run_the_modules(tiny_model_dir, kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    enc = int8_encoder(tiny_model_dir, kernel)
    stack, x, batch = stack_inputs(enc, TEXTS)
    x = x.to(enc.plan.dtype)  # the modules' own dtype
    ids = enc.tokenize(TEXTS).ids
    padded = PackedBatch.from_ids(ids, attention="padded")
    bucketed = PackedBatch.from_ids(ids, bucket_rows=True)
    assert bucketed.ids.shape[0] > x.shape[0]  # filler rows
    small = FusedX86Stack(stack.stack, max_tokens=x.shape[0] - 1)
    with torch.inference_mode():
        filler_x = torch.cat([x, x[:bucketed.ids.shape[0] - x.shape[0]]])
        for s, inputs, layout in ((stack, x, padded.attention), (stack, filler_x, bucketed.attention),
                                  (small, x, batch.attention)):
            assert s.texts(inputs, layout) is None
            torch.testing.assert_close(s(inputs, layout), stack.stack(inputs, layout), atol=0, rtol=0)


def test_fused_stack_copies_and_pickles_without_its_pointers(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    enc = int8_encoder(tiny_model_dir, runnable_kernel())
    stack, x, batch = stack_inputs(enc, TEXTS)
    with torch.inference_mode():
        expected = stack(x, batch.attention)
        for other in (copy.deepcopy(stack), pickle.loads(pickle.dumps(stack))):
            torch.testing.assert_close(other(x, batch.attention), expected, atol=0, rtol=0)
            assert other.specs[0].qkv.packed == other.stack.layer[0].attention.attn.qkv.packed.data_ptr()


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("normalize", [True, False])
def test_sentence_vectors_are_the_models_forward_pass(tiny_model_dir, kernel, normalize, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    enc = int8_encoder(tiny_model_dir, kernel)
    fast = copy.deepcopy(enc.inference_model()).float()  # fp32 tables: the C embeddings and torch's agree to 1e-5
    stack, ids = fast.network.encoder, enc.tokenize(TEXTS).ids
    assert isinstance(stack, FusedX86Stack) and stack.embeddings is fast.network.embeddings
    got = stack.sentence_vectors(ids, normalize)
    with torch.inference_mode():
        expected = fast(enc.pack(ids), normalize)  # torch's embeddings and pooling around the same layers
    assert got is not None and got.shape == (len(TEXTS), 32)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert torch.allclose(got.norm(dim=1), torch.ones(len(TEXTS))) == normalize
    # and in the plan's own dtype (bf16 tables on AVX512-VNNI), through Encoder.embed_ids
    np.testing.assert_allclose(enc.embed_ids(ids).numpy(), F.normalize(expected, dim=1).numpy(), atol=2e-2)


def test_sentence_vectors_leave_batches_they_do_not_take_to_the_model(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    enc = int8_encoder(tiny_model_dir, runnable_kernel())
    stack = enc.inference_model().network.encoder
    ids = enc.tokenize(TEXTS).ids
    vocab = enc.model.network.cfg.vocab_size
    assert stack.sentence_vectors(ids, True) is not None
    assert stack.sentence_vectors(ids * 40, True) is not None  # any number of tokens
    assert FusedX86Stack(stack.stack, max_tokens=40).sentence_vectors(ids, True) is None  # 45 tokens: over it
    for refused in ([[5] * (MAX_TEXT_TOKENS + 1)],  # one text over MPNet's longest
                    [ids[0], []],  # an empty text
                    [],
                    [ids[0], [0, vocab, 2]],  # a token id the table lacks
                    [[0, 2 ** 32 + 5, 2]]):  # one that 32 bits would wrap into the table
        assert stack.sentence_vectors(refused, True) is None
    with pytest.raises(IndexError):  # the model then says what is wrong, as it does for any batch
        enc.embed_ids([ids[0], [0, vocab, 2]])
    cls_only = FusedX86Stack(stack.stack, embeddings=enc.inference_model().network.embeddings,
                             pooling=Pooling(32, pooling_mode_cls_token=True, pooling_mode_mean_tokens=False))
    assert cls_only.embeddings is None and cls_only.sentence_vectors(ids, True) is None


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_a_vector_with_nan_or_inf_is_an_error_from_the_one_call(tiny_model_dir, precision, tmp_path, monkeypatch):
    from allmpnet import Encoder, NonFiniteOutputError
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    enc = int8_encoder(tiny_model_dir, runnable_kernel()) if precision == "int8" else Encoder(tiny_model_dir)
    stack = enc.inference_model().network.encoder
    if not isinstance(stack, FusedX86Stack) or stack.unavailable or stack.embedding is None:
        pytest.skip("no fused stack on this CPU")
    ids = enc.tokenize(["the cat sat", "a dog"]).ids
    assert stack.sentence_vectors(ids, True) is not None
    with torch.no_grad():  # a damaged row of the table the call reads (after any calibration saw it whole)
        stack.embeddings.word_embeddings.weight[ids[1][2]] = float("inf")
    with pytest.raises(NonFiniteOutputError, match="for 1 of 2 texts"):  # the text with that token only
        stack.sentence_vectors(ids, True)
    assert torch.isfinite(stack.sentence_vectors(ids[:1], True)).all()
    with pytest.raises(NonFiniteOutputError):
        enc.encode("a dog")


def test_the_library_refuses_bad_texts_and_shapes():
    why = library_unavailable()
    if why:
        pytest.skip(why)
    library = load_library()
    from allmpnet.backends.cpu.fused import LayerSpec
    specs = (LayerSpec * 1)()
    x = torch.zeros(70, 32)
    scratch = torch.empty(library.allmpnet_x86_encoder_scratch_bytes(70, 32, 64, 70, 1), dtype=torch.uint8)
    span = 70
    table = torch.zeros(4, 2 * span - 1)

    def call(start: int, length: int, layers: int = 0, span: int = span) -> int:
        return library.allmpnet_x86_encoder(specs, layers, None, None, x.data_ptr(), 70, 32, 4, 1,
                                            (ctypes.c_int32 * 1)(start), (ctypes.c_int32 * 1)(length),
                                            table.data_ptr(), span, 1e-5, 0, 0, None, 0, None, scratch.data_ptr(), 1)
    assert call(0, 10) == 0  # no layers: nothing to do
    assert call(0, span + 1, span=span) == -3 and call(65, 10) == -3 and call(0, 0) == -3
    assert call(0, 10, span=MAX_TEXT_TOKENS + 1) == -3  # a bias table longer than any text may be
    assert call(0, 10, layers=1) == -1  # a layer of empty (zero) shapes
    tables = torch.arange(100, dtype=torch.float32)[:, None].repeat(1, 32)  # row r: r everywhere
    norm_weight, norm_bias = torch.zeros(32), torch.zeros(32)  # LayerNorm to 0 x ... + 0: the mean check only
    # 100 words, 40 positions of which a text's first token takes the third (pad id 1: its slot the second)
    embedding = EmbeddingSpec(tables.data_ptr(), tables.data_ptr(), 0, 100, 40, 2, 1, norm_weight.data_ptr(),
                              norm_bias.data_ptr())
    pooled = torch.zeros(1, 32)

    def embed(ids: list[int]) -> int:
        return library.allmpnet_x86_encoder(specs, 0, ctypes.byref(embedding), (ctypes.c_int32 * len(ids))(*ids),
                                            x.data_ptr(), len(ids), 32, 4, 1, (ctypes.c_int32 * 1)(0),
                                            (ctypes.c_int32 * 1)(len(ids)), table.data_ptr(), span, 1e-5, 0, 0,
                                            pooled.data_ptr(), 1, None, scratch.data_ptr(), 1)
    assert embed([1, 99, 3]) == 0
    assert embed([1, 100, 3]) == -4 and embed([-1]) == -4  # ids outside the word table
    assert embed([5] * 38) == 0 and embed([5] * 39) == -4  # the 39th token's position is outside the table


def test_the_embeddings_skip_the_pad_id_in_positions_as_mpnet_does():
    # word row r and position row r hold r: a token's row is word id + position row, before the LayerNorm
    why = library_unavailable()
    if why:
        pytest.skip(why)
    library = load_library()
    from allmpnet.backends.cpu.fused import LayerSpec
    ids = [0, 7, 1, 9, 1, 1, 8, 2]  # <s> w <pad> w <pad> <pad> w </s>, pad id 1
    M, C, span = len(ids), 16, 8
    tables = torch.arange(100, dtype=torch.float32)[:, None].repeat(1, C)
    tables[:, 0] = 0.0  # column 0 zero: the LayerNorm then has a spread to scale
    ones, zeros = torch.ones(C), torch.zeros(C)
    embedding = EmbeddingSpec(tables.data_ptr(), tables.data_ptr(), 0, 100, 40, 2, 1, ones.data_ptr(),
                              zeros.data_ptr())
    x = torch.zeros(M, C)
    scratch = torch.empty(library.allmpnet_x86_encoder_scratch_bytes(M, C, 64, M, 1), dtype=torch.uint8)
    table = torch.zeros(2, 2 * span - 1)
    status = library.allmpnet_x86_encoder((LayerSpec * 1)(), 0, ctypes.byref(embedding),
                                          (ctypes.c_int32 * M)(*ids), x.data_ptr(), M, C, 2, 1,
                                          (ctypes.c_int32 * 1)(0), (ctypes.c_int32 * 1)(M), table.data_ptr(), span,
                                          1e-5, 0, 0, None, 0, None, scratch.data_ptr(), 1)
    assert status == 0
    # positions as transformers' create_position_ids_from_input_ids: pad id -> slot 1, others 2, 3, ... skipping pads
    position = torch.tensor([2, 3, 1, 4, 1, 1, 5, 6])
    row = (torch.tensor(ids) + position).float()[:, None] * torch.ones(C)
    row[:, 0] = 0.0
    torch.testing.assert_close(x, F.layer_norm(row, (C,), eps=1e-5), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- fp32: the model's own weights

FP32_PARAMS = [pytest.param(k, marks=pytest.mark.skipif(bool(FP32_KERNELS[k].flags - CPU), reason=f"this CPU lacks "
                                                        f"{', '.join(sorted(FP32_KERNELS[k].flags - CPU))} for {k}"))
               for k in FP32_KERNELS]


@pytest.mark.parametrize("name", FP32_PARAMS)
@pytest.mark.parametrize("M,N,K", [(1, 64, 32), (9, 200, 96), (13, 96, 64), (70, 72, 48)])
def test_fp32_weight_kernel_matches_torch(name, M, N, K):
    assert fp32_kernel_unavailable(name) == ""
    generator = torch.Generator().manual_seed(M)
    x, weight, bias = torch.randn(M, K, generator=generator), torch.randn(N, K, generator=generator), torch.randn(N)
    residual = torch.randn(M, N, generator=generator)
    load_library()
    torch.testing.assert_close(fp32_linear(name, x, weight, bias), F.linear(x, weight, bias),
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fp32_linear(name, x, weight, bias, residual, gelu=True),
                               F.gelu(F.linear(x, weight, bias)) + residual, atol=1e-4, rtol=1e-5)


def test_fp32_weight_kernels_refuse_shapes_they_do_not_step_over():
    why = library_unavailable()
    if why:
        pytest.skip(why)
    load_library()
    x, weight = torch.randn(3, 36), torch.randn(8, 36)  # 36 inputs: not whole steps of 16 (AVX512) or 8 (AVX2)
    for name in FP32_KERNELS:
        if not fp32_kernel_unavailable(name):
            with pytest.raises(RuntimeError, match="refused"):
                fp32_linear(name, x, weight, None)


@pytest.mark.parametrize("name", FP32_PARAMS)
def test_fp32_fused_stack_gives_the_exact_vectors(tiny_model_dir, name):
    import dataclasses

    from allmpnet import Encoder
    from allmpnet.encode.precision import Capabilities, plan_precision
    caps = dataclasses.replace(Capabilities.detect("cpu"), fp32_fused_kernel=name)
    plan = plan_precision("fp32", "cpu", caps)
    assert plan.exact and plan.fused_fp32_kernel == name and plan.fused_stack_tokens == FUSED_STACK_TOKENS
    enc = Encoder(tiny_model_dir, device="cpu", precision=plan)
    stack, x, batch = stack_inputs(enc, TEXTS)
    assert stack.fp32 is not None and stack.texts(x, batch.attention) is not None
    # the model's own weights, not a copy
    assert stack.specs[0].qkv.packed == enc.model.network.encoder.layer[0].attention.attn.qkv.weight.data_ptr()
    with torch.inference_mode():
        torch.testing.assert_close(stack(x, batch.attention), enc.model.network.encoder(x, batch.attention),
                                   atol=2e-5, rtol=1e-5)
    unfused = enc.with_precision(dataclasses.replace(plan, fused_stack_tokens=0, fused_fp32_kernel=None))
    assert not isinstance(unfused.inference_model().network.encoder, FusedX86Stack)
    for text in TEXTS:  # one at a time: the fused call, with no filler rows
        np.testing.assert_allclose(enc.encode([text]), unfused.encode([text]), atol=1e-6)


def test_fp32_stack_of_shapes_its_kernel_does_not_step_over_runs_the_modules(tmp_path):
    from allmpnet import Encoder
    from allmpnet.model import MPNetConfig
    from allmpnet.testing import build_random_model
    name = next((k for k in FP32_KERNELS if not fp32_kernel_unavailable(k)), None)
    if name is None:
        pytest.skip("no fp32-weight kernel runs on this CPU")
    cfg = MPNetConfig(hidden_size=36, num_hidden_layers=1, num_attention_heads=2, intermediate_size=72,
                      max_position_embeddings=66)  # 36 inputs: no whole steps of 8 or 16
    model_dir = build_random_model(tmp_path / "m", cfg)
    enc = Encoder(model_dir, device="cpu")
    stack = enc.inference_model().network.encoder
    if isinstance(stack, FusedX86Stack):  # planned where an fp32-weight kernel runs, but refused for these shapes
        assert "whole steps" in stack.unavailable and stack.texts(torch.zeros(3, 36), None) is None
    exact = enc.with_precision(dataclasses.replace(enc.plan, fused_stack_tokens=0, fused_fp32_kernel=None))
    np.testing.assert_allclose(enc.encode(["a short text"]), exact.encode(["a short text"]), atol=1e-6)


HEADS_OF_64_PARAMS = [pytest.param(p.values[0], bf16, marks=p.marks) for p in KERNEL_PARAMS for bf16 in (False, True)]
HEADS_OF_64_PARAMS += [pytest.param(p.values[0], False, marks=p.marks) for p in FP32_PARAMS]


@pytest.mark.parametrize("kernel,bf16", HEADS_OF_64_PARAMS)
def test_fused_stack_with_heads_of_64_computes_what_the_modules_compute(kernel, bf16, tmp_path, monkeypatch):
    # heads of 64 (the published model's): with AVX512 layer kernels the fused call's attention is the x86 block
    # kernel's head function (with bf16 intermediates its bf16 products: two bf16 parts of each weight under 64
    # tokens, one from there), with AVX2 ones its portable loop; each text's own length and position bias
    from allmpnet import Encoder
    from allmpnet.encode.precision import Capabilities, attention_products, plan_precision
    from allmpnet.model import MPNetConfig
    from allmpnet.testing import build_random_model
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    cfg = MPNetConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                      max_position_embeddings=130)
    model_dir = build_random_model(tmp_path / "m", cfg)
    fp32 = kernel in FP32_KERNELS
    caps = dataclasses.replace(Capabilities.detect("cpu"), fp32_fused_kernel=kernel)
    enc = Encoder(model_dir, device="cpu", precision=plan_precision("fp32", "cpu", caps)) if fp32 else \
        int8_encoder(model_dir, kernel)
    # int8: ~40 and ~80 tokens beside the short ones; fp32 takes 64 tokens at most
    texts = TEXTS if fp32 else TEXTS + [" ".join(TEXTS * 3), " ".join(TEXTS * 6)]
    planned, x, batch = stack_inputs(enc, texts)
    stack = planned if fp32 else FusedX86Stack(planned.stack, bf16=bf16, products=attention_products(caps))
    assert isinstance(stack, FusedX86Stack) and not stack.unavailable
    assert stack.texts(x, batch.attention) is not None
    # the same layers module by module in fp32: the model itself, or the copy's int8 layers
    modules = enc.model.network.encoder if fp32 else copy.deepcopy(stack.stack).float()
    if bf16:
        modules = rounding_like_bf16_intermediates(modules)
    with torch.inference_mode():
        got, expected = stack(x, batch.attention), modules(x, batch.attention)
    if fp32:
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    else:
        assert_close_but_for_int8_rounding(got, expected, 2e-3 if bf16 else 2e-5, 1e-4, kernel)
