"""The whole forward pass in one C call, on the int8-x86 kernels (every batch) or the fp32 weights (a query).

A query's 9-15 tokens make each of a layer's seven steps (q|k|v, attention, o + residual, LayerNorm, up + GELU,
down + residual, LayerNorm) a few microseconds of arithmetic; run from Python, one module and one ctypes call at
a time, the 12 layers' 48 projections, 12 attentions and 24 LayerNorms cost ~3 ms of calls around ~5 ms of
kernels (2 Zen 4 cores). `allmpnet_x86_encoder` (csrc/encoder.c) runs them all in one team of threads: so a
swapped module, `FusedX86Stack`, takes the place of the inference copy's `LayerStack` and sends batches of at
most `max_tokens` tokens there, larger ones to the stack it wraps.

With int8 layers it takes every batch (max_tokens None): each step is computed per row or per text, and each
projection's small- and large-batch kernels give the same bits, so a text's vector is the same bits alone, in a
batch of 4 or of 4,000 (what caching, deduplication and a served query against an index built in bulk need).
The residual stream is fp32; with `bf16` the wide intermediates (q|k|v, the attention's output, the FFN's hidden
layer) are stored in bf16 and the attention uses bf16 products (`products`, as attention.py's).

For fp32 its projections are the model's own fp32 weights as they lie (kernels "avx512-f32w" / "avx2-f32w": no
copy, exact up to the order of the sums), for a query only, where its ~340 MB of weights are streamed once and
oneDNN's small-batch GEMMs and the per-module calls cost more than that; larger batches go to oneDNN.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from allmpnet.backends.cpu.attention import PRODUCTS
from allmpnet.backends.cpu.int8 import AVX2, AVX512, KERNELS, Kernel, X86Int8Linear, kernel_unavailable, loaded_for
from allmpnet.backends.cpu.library import (KERNEL_IDS, MAX_TEXT, EmbeddingSpec, LayerSpec, LinearSpec, load,
                                           scratch_buffer)
from allmpnet.errors import NonFiniteOutputError
from allmpnet.model.mpnet import Embeddings, LayerStack, Linear
from allmpnet.model.packing import AttentionLayout, GroupedAttention
from allmpnet.model.pooling import Pooling

MAX_TEXT_TOKENS = MAX_TEXT  # longest text the call takes
# fp32-weight kernels (the model's (N, K) weights as they are), in the order preferred
FP32_KERNELS = {"avx512-f32w": Kernel(KERNEL_IDS["avx512-f32w"], AVX512, "fp32"),
                "avx2-f32w": Kernel(KERNEL_IDS["avx2-f32w"], AVX2, "fp32")}


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def projections(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """A layer's q|k|v, attention output, FFN up and FFN down projections."""
    return layer.attention.attn.qkv, layer.attention.attn.o, layer.intermediate.dense, layer.output.dense


def linear_spec(layer: X86Int8Linear) -> LinearSpec:
    """The C description of `layer` and its two kernels (pointers into its buffers)."""
    return LinearSpec(KERNELS[layer.small].id, int(layer.activation == "gelu"), KERNELS[layer.large].id,
                      layer.max_small_rows, layer.packed.data_ptr(),
                      layer.scales.data_ptr(), layer.compensation.data_ptr(), _pointer(layer.bias),
                      _pointer(layer.inverse_smooth), layer.group, layer.out_features, layer.in_features,
                      layer.route)


@functools.lru_cache(maxsize=None)
def fp32_kernel_unavailable(name: str, capabilities: frozenset[str] | None = None) -> str:
    """Why fp32-weight kernel `name` cannot run on a CPU with these flags (this CPU's by default; "" when it can:
    built, supported, and its check against F.linear passed)."""
    why = loaded_for(FP32_KERNELS[name], capabilities)
    if why:
        return why
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(72, 64, generator=generator), torch.randn(72, generator=generator)
    x, residual = torch.randn(13, 64, generator=generator), torch.randn(13, 72, generator=generator)
    got = fp32_linear(name, x, weight, bias, residual, gelu=True)
    expected = F.gelu(F.linear(x, weight, bias)) + residual
    return "" if torch.allclose(got, expected, atol=1e-4, rtol=1e-4) else f"kernel {name} failed its self-test"


def pick_fp32_kernel(capabilities: frozenset[str] | None = None) -> str | None:
    return next((name for name in FP32_KERNELS if not fp32_kernel_unavailable(name, capabilities)), None)


def fp32_linear(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """act(x W^T + b) [+ residual] by fp32-weight kernel `name` (fp32 tensors; its self-test and tests)."""
    (M, K), N = x.shape, weight.shape[0]
    y = torch.empty(M, N)
    kernel = FP32_KERNELS[name].id
    library = load()
    scratch = scratch_buffer(library.allmpnet_x86_scratch_bytes(kernel, M, K, 1))
    status = library.allmpnet_x86_linear(kernel, x.contiguous().data_ptr(), 0, None, weight.contiguous().data_ptr(),
                                         None, None, K, _pointer(bias), _pointer(residual), y.data_ptr(), 0, M, N, K,
                                         int(gelu), 0.0, scratch.data_ptr(), 1)
    if status < 0:
        raise RuntimeError(f"fp32 kernel {name} refused the call (status {status})")
    return y


class FusedX86Stack(nn.Module):
    """`stack` in one C call for batches of at most `max_tokens` packed tokens (None: any number) laid out as
    GroupedAttention with no filler rows, texts of at most MAX_TEXT_TOKENS; any other batch runs `stack` itself.
    Same call as LayerStack: (N, C) tokens and the layout -> (N, C) tokens, in x's dtype (an fp32 residual stream
    inside; `bf16`: bf16 intermediates, their attention on `products`).

    The projections: `stack`'s own when they are all X86Int8Linear; else `fp32_weights`, the fp32 model's stack
    (its Linear layers' tensors, shared, not copied), multiplied by fp32-weight kernel `fp32_kernel`.

    Given the network's `embeddings` (tables in bf16 or fp32) and a `pooling` of the mean alone,
    `sentence_vectors` runs a batch's whole forward pass, token ids to sentence vectors, in the same call."""

    def __init__(self, stack: LayerStack, max_tokens: int | None = None, fp32_weights: LayerStack | None = None,
                 fp32_kernel: str | None = None, embeddings: Embeddings | None = None,
                 pooling: Pooling | None = None, bf16: bool = False, products: str = "fp32"):
        super().__init__()
        if products not in PRODUCTS:
            raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
        self.stack = stack
        self.bf16, self.products = bf16, products
        # the network's own Embeddings (a shared submodule: copies and pickles keep one), when the C call can run
        # them and the pooling is the mean alone
        tables = (None if embeddings is None
                  else (embeddings.word_embeddings.weight, embeddings.position_embeddings.weight))
        takes_ids = (tables is not None and pooling is not None and pooling.modes == ["mean_tokens"]
                     and all(t.dtype in (torch.float32, torch.bfloat16) and t.dtype == tables[0].dtype
                             and t.is_contiguous() for t in tables))
        self.embeddings = embeddings if takes_ids else None
        self.embedding_norm = None if self.embeddings is None else tuple(
            t.detach().float().contiguous() for t in (embeddings.LayerNorm.weight, embeddings.LayerNorm.bias))
        layers = list(stack.layer)
        if fp32_weights is None:
            linears = [projections(layer) for layer in layers]
            if not all(isinstance(linear, X86Int8Linear) for four in linears for linear in four):
                raise TypeError("FusedX86Stack without fp32_weights runs a stack whose linear layers are all "
                                "X86Int8Linear")
            self.max_tokens = max_tokens
            kernels = {kernel for four in linears for linear in four for kernel in (linear.small, linear.large)}
            self.unavailable = "; ".join(filter(None, (kernel_unavailable(k) for k in sorted(kernels))))
            self.fp32 = None
        else:
            if fp32_kernel not in FP32_KERNELS:
                raise ValueError(f"fp32_kernel must be one of {list(FP32_KERNELS)}, got {fp32_kernel!r}")
            self.max_tokens = max_tokens
            self.unavailable = fp32_kernel_unavailable(fp32_kernel)
            masters = [projections(layer) for layer in fp32_weights.layer]
            if len(masters) != len(layers) or not all(isinstance(l, Linear) for four in masters for l in four):
                raise TypeError("fp32_weights must be the fp32 model's layer stack, of as many layers")
            # (weight, bias, GELU) per projection: the model's own fp32 tensors (detached views, no copy)
            self.fp32 = [[(l.weight.detach().contiguous(), _detached(l.bias), l.activation == "gelu") for l in four]
                         for four in masters]
            self.fp32_kernel = fp32_kernel
            step = 16 if fp32_kernel == "avx512-f32w" else 8  # inputs per step; outputs go 4 at a time
            if not self.unavailable and any(w.shape[1] % step or w.shape[0] % 4
                                            for four in self.fp32 for w, _, _ in four):
                self.unavailable = f"{fp32_kernel} takes layers of whole steps of {step} inputs and 4 outputs"
        self.n_head = layers[0].attention.attn.n_head
        self.eps = float(layers[0].attention.LayerNorm.eps)
        norms = [(l.attention.LayerNorm, l.output.LayerNorm) for l in layers]
        # fp32 copies of the LayerNorms (the copy keeps them in its dtype), kept alive with the C description
        self.norms = [tuple(t.detach().float().contiguous() for n in pair for t in (n.weight, n.bias))
                      for pair in norms]
        self._specs = self._embedding = None  # the C descriptions, built on first use (pointers: never copied)
        self.routed = torch.zeros(len(layers), 4, dtype=torch.int64)  # the last fused call's rows routed to int16
        # the relative position bias of every key-minus-query distance, all texts' (fixed at inference)
        with torch.no_grad():
            self.bias_table = stack.relative_attention_bias.by_distance(MAX_TEXT_TOKENS).float().contiguous()

    @property
    def layer(self) -> nn.ModuleList:
        """The wrapped stack's layers (as LayerStack.layer)."""
        return self.stack.layer

    @property
    def specs(self) -> ctypes.Array:
        if self._specs is None:
            layers = list(self.stack.layer)
            if self.fp32 is None:
                linears = [[linear_spec(linear) for linear in projections(layer)] for layer in layers]
            else:
                kernel = FP32_KERNELS[self.fp32_kernel].id
                linears = [[LinearSpec(kernel, int(gelu), kernel, 0, weight.data_ptr(), None, None, _pointer(bias),
                                       None, weight.shape[1], weight.shape[0], weight.shape[1], 0.0)
                            for weight, bias, gelu in four] for four in self.fp32]
            self._specs = (LayerSpec * len(layers))(*[LayerSpec(*four, *(t.data_ptr() for t in norm))
                                                      for four, norm in zip(linears, self.norms)])
        return self._specs

    @property
    def embedding(self) -> EmbeddingSpec | None:
        if self._embedding is None and self.embeddings is not None:
            e = self.embeddings
            word, position = (t.weight.detach() for t in (e.word_embeddings, e.position_embeddings))
            self._embedding = EmbeddingSpec(word.data_ptr(), position.data_ptr(), int(word.dtype == torch.bfloat16),
                                            word.shape[0], position.shape[0], e.pad_token_id + 1, e.pad_token_id,
                                            *(t.data_ptr() for t in self.embedding_norm))
        return self._embedding

    @property
    def embedding_width(self) -> int:
        return self.embeddings.word_embeddings.weight.shape[1]

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_specs": None, "_embedding": None}

    def takes(self, tokens: int, longest: int) -> bool:
        """Whether a batch of `tokens` packed tokens, its longest text `longest`, runs in the C call."""
        return (not self.unavailable and 0 < tokens and (self.max_tokens is None or tokens <= self.max_tokens)
                and longest <= MAX_TEXT_TOKENS)

    def texts(self, x: torch.Tensor, layout: AttentionLayout) -> tuple[list[int], list[int]] | None:
        """(starts, lengths) of the batch's texts when it runs fused, else None."""
        if (not isinstance(layout, GroupedAttention) or x.shape[0] != layout.tokens or x.device.type != "cpu"
                or not self.takes(x.shape[0], max((g.length for g in layout.groups), default=0))):
            return None
        starts, lengths = [], []
        for g in layout.groups:
            for i in range(g.blocks):
                starts.append(g.start + i * g.length)
                lengths.append(g.length)
        return starts, lengths

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        texts = self.texts(x, layout)
        if texts is None:
            return self.stack(x, layout)
        h = x.to(torch.float32, copy=True).contiguous()  # (N, C), layers applied in place
        status = self._call(h, *texts)
        if status < 0:
            raise RuntimeError(f"the fused int8 layer stack refused the call (status {status})")
        return h.to(x.dtype)

    def sentence_vectors(self, ids: Sequence[Sequence[int]], normalize: bool) -> torch.Tensor | None:
        """(B, C) fp32 mean-pooled vectors (unit length when `normalize`) of the texts' token ids through the
        embeddings, the layers and the pooling in one C call: a query's whole forward pass, with no packed batch
        and no torch op around it (each costs ~10-20 us on caches the layers' weights have just swept: ~1 ms of
        a 5 ms query on 2 Zen 4 cores). Raises NonFiniteOutputError for NaN or inf in a vector (checked in the
        call). None when the batch is not one this call takes (too many tokens, an empty
        or over-long text, no embeddings given, a token id or position the tables lack): run the model then."""
        lengths = [len(i) for i in ids]
        M = sum(lengths)
        if self.embedding is None or min(lengths, default=0) < 1 or not self.takes(M, max(lengths)):
            return None
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=M)
        if not 0 <= flat.min() <= flat.max() < self.embedding.vocab:  # also never wrapped into 32 bits
            return None
        C = self.embedding_width
        starts = list(itertools.accumulate(lengths, initial=0))[:-1]
        pooled = torch.empty(len(lengths), C)
        status = self._call(torch.empty(M, C), starts, lengths, flat, pooled, normalize)
        if status > 0:  # texts whose vector holds NaN or inf (counted in C): the same error as the model's path
            bad = (~torch.isfinite(pooled).all(dim=1)).nonzero().flatten().tolist()
            raise NonFiniteOutputError.for_rows(bad, len(lengths))
        return pooled if status == 0 else None

    def _call(self, x: torch.Tensor, starts: list[int], lengths: list[int], ids: np.ndarray | None = None,
              pooled: torch.Tensor | None = None, normalize: bool = False) -> int:
        """allmpnet_x86_encoder on x (M, C) fp32, in place: from `ids` (M,) through the embeddings when given,
        each text's mean row into `pooled` when given. Returns its status."""
        (M, C), n = x.shape, len(starts)
        library = load()
        threads = torch.get_num_threads()
        scratch = scratch_buffer(library.allmpnet_x86_encoder_scratch_bytes(M, C, self.specs[0].up.N,
                                                                             max(lengths), threads))
        ids32 = None if ids is None else np.ascontiguousarray(ids, dtype=np.int32)
        starts32, lengths32 = np.asarray(starts, dtype=np.int32), np.asarray(lengths, dtype=np.int32)
        span = self.bias_table.shape[1] // 2 + 1
        return library.allmpnet_x86_encoder(
            self.specs, len(self.specs), None if ids is None else ctypes.byref(self.embedding),
            None if ids32 is None else ids32.ctypes.data, x.data_ptr(), M, C, self.n_head, n, starts32.ctypes.data,
            lengths32.ctypes.data, self.bias_table.data_ptr(), span, self.eps, int(self.bf16),
            PRODUCTS.index(self.products), None if pooled is None else pooled.data_ptr(), int(normalize),
            self.routed.data_ptr(), scratch.data_ptr(), threads)

    def extra_repr(self) -> str:
        weights = "int8 layers" if self.fp32 is None else f"fp32 weights, {self.fp32_kernel}"
        batches = "every batch" if self.max_tokens is None else f"up to {self.max_tokens} tokens"
        storage = f", bf16 intermediates ({self.products} attention products)" if self.bf16 else ""
        return f"one C call for {batches}, {weights}{storage}" + (f" (off: {self.unavailable})"
                                                                  if self.unavailable else "")
