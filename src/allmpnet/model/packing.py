"""Packed token batches: the texts' real tokens as one (N, C) matrix, and how attention runs over them.

Every position-wise step of the encoder (the projections, GELU, residual adds, LayerNorms: ~95% of the FLOPs)
works on real tokens only, so a batch of mixed lengths costs its tokens, not rows x longest. Only attention
needs to know where each text starts; a batch carries one of two layouts for it:

- `GroupedAttention` (CPU): one SDPA call per group of equal-length texts, with no padding mask; length-sorted
  batches make few groups. SDPA's CPU kernel gains nothing from one big padded call, which would cost it
  (B, H, T, T) mask traffic. Short groups may go to a kernel of ours instead (`short_kernel`, AMX), or every
  group up to some length (`block_kernel`, x86 CPUs). Each text is attended on its own (never laid side by side
  with others in one block), so its result does not depend on which texts share its batch: laying short ones
  side by side in 32-token blocks saved nothing measurable (1,000 sentences, bf16 and fp32, 2 Zen 5 cores) and
  made a text's last bits depend on its neighbours.
- `PaddedAttention` (GPUs, ONNX export): the tokens are scattered into a padded (B, T) batch for one SDPA call.
  One big kernel beats a launch per group, and it is built from tensors alone, so it traces.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# kernel(qkv, out, bias (H, T, T) fp32, start, blocks, block_tokens, n_head): attention over a group's blocks
AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int, int], None]
# position_bias(length) -> (H, length, length): the model's relative-position bias
PositionBias = Callable[[int], torch.Tensor]


class BoundAttention(Protocol):
    def __call__(self, qkv: torch.Tensor, n_head: int, dropout_p: float) -> torch.Tensor:
        """Packed (N', 3C) q|k|v -> (N', C) attention output (filler rows zero)."""


class AttentionLayout(Protocol):
    def bind(self, position_bias: PositionBias, dtype: torch.dtype) -> BoundAttention:
        """The per-batch attention, with its biases computed once for all layers."""


@dataclass(frozen=True)
class AttentionGroup:
    """`blocks` consecutive texts of `length` tokens (a block each), from packed token `start` on."""
    start: int
    blocks: int
    length: int

    @property
    def block_tokens(self) -> int:
        return self.length

    @property
    def end(self) -> int:
        return self.start + self.blocks * self.length


def attention_groups(lengths: Sequence[int]) -> list[AttentionGroup]:
    """Cut texts (in packed order) into runs of equal length, each one (texts, H, length, D) SDPA call."""
    groups, token = [], 0
    for length, run in itertools.groupby(lengths):
        texts = len(list(run))
        if length > 0:
            groups.append(AttentionGroup(token, texts, length))
            token += texts * length
    return groups


class GroupedAttention:
    def __init__(self, lengths: Sequence[int], short_kernel: AttentionKernel | None = None,
                 short_kernel_max_tokens: int = 0, block_kernel: AttentionKernel | None = None,
                 block_kernel_max_tokens: int = 0):
        self.groups = attention_groups(lengths)
        self.tokens = sum(lengths)
        self.short_kernel = short_kernel
        self.short_kernel_max_tokens = short_kernel_max_tokens
        self.block_kernel = block_kernel
        self.block_kernel_max_tokens = block_kernel_max_tokens

    def on_short_kernel(self, group: AttentionGroup) -> bool:
        """Whether `group` runs on the short-block kernel: texts of at most short_kernel_max_tokens (a query's
        call would be all fixed cost elsewhere; its neighbours in a batch take the same kernel, so the same bits)."""
        return self.short_kernel is not None and group.length <= self.short_kernel_max_tokens

    def kernel_for(self, group: AttentionGroup) -> AttentionKernel | None:
        """Our kernel that runs `group`, or None for SDPA."""
        if self.on_short_kernel(group):
            return self.short_kernel
        if self.block_kernel is not None and group.block_tokens <= self.block_kernel_max_tokens:
            return self.block_kernel
        return None

    def bind(self, position_bias: PositionBias, dtype: torch.dtype) -> BoundAttention:
        biases, kernels, cache = [], [], {}
        for g in self.groups:
            kernel = self.kernel_for(g)
            kernels.append(kernel)
            ours = kernel is not None
            key = (g.length, ours)
            if key not in cache:
                bias = position_bias(g.length).to(torch.float32 if ours else dtype).contiguous()
                cache[key] = bias if ours else bias[None]  # ours: (H, T, T) fp32; SDPA: (1, H, T, T)
            biases.append(cache[key])

        def attend(qkv: torch.Tensor, n_head: int, dropout_p: float) -> torch.Tensor:
            C = qkv.shape[1] // 3
            out = qkv.new_empty(qkv.shape[0], C)
            out[self.tokens:].zero_()  # filler rows: finite, never attended to
            for g, bias, kernel in zip(self.groups, biases, kernels):
                if kernel is not None:
                    kernel(qkv, out, bias, g.start, g.blocks, g.block_tokens, n_head)
                    continue
                rows = qkv[g.start:g.end].view(g.blocks, g.block_tokens, 3, n_head, C // n_head)
                q, k, v = rows.permute(2, 0, 3, 1, 4)  # each (blocks, H, T, D)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
                out[g.start:g.end].view(g.blocks, g.block_tokens, n_head, C // n_head).copy_(y.transpose(1, 2))
            return out
        return attend


class PaddedAttention:
    def __init__(self, index: torch.Tensor, mask: torch.Tensor):
        self.index = index  # (N,) flat position in the padded (B, T) batch of each real token
        self.mask = mask  # (B, T) 1 at real tokens
        # (B * T,) the packed row each padded position reads: its token's, or row 0 at padding (finite, masked).
        # Gathering rows rather than scattering them (index_copy) keeps the ONNX export's ScatterElements, whose
        # per-element indices cost ONNX Runtime ~20% of a batch, out of the graph
        self.gather = (mask.reshape(-1).cumsum(0) - 1).clamp(min=0)

    def bind(self, position_bias: PositionBias, dtype: torch.dtype) -> BoundAttention:
        B, T = self.mask.shape
        bias = position_bias(T).to(dtype)[None]  # (1, H, T, T)
        padding = torch.zeros((B, T), dtype=dtype, device=self.mask.device)
        padding = padding.masked_fill(self.mask == 0, torch.finfo(dtype).min)
        # contiguous: SDPA copies a strided mask on every layer
        bias = (bias + padding[:, None, None, :]).contiguous()  # (B, H, T, T)

        def attend(qkv: torch.Tensor, n_head: int, dropout_p: float) -> torch.Tensor:
            N, C = self.index.shape[0], qkv.shape[1] // 3
            padded = qkv.index_select(0, self.gather)
            q, k, v = padded.view(B, T, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)  # (B, H, T, D)
            real = y.transpose(1, 2).reshape(B * T, C).index_select(0, self.index)  # (N, C)
            return torch.cat([real, real.new_zeros(qkv.shape[0] - N, C)])
        return attend


def row_bucket(n: int) -> int:
    """Rows a packed batch is padded to on CPU. oneDNN builds and caches a kernel, with buffers, per matrix shape:
    every distinct N costs a few MB for good (~20 MB per N for a layer's four projections measured), so 100k
    sentences in batches of ever-different N grew RSS past 3 GB. Rounding N up keeps the shapes few for ~1-3%
    extra rows. Single queries round to 4: in fp32 their cost is the arithmetic too (a 9-token query padded to 16
    took 26.6 ms against 21.8 ms unpadded, 2 Zen 4 cores), and 8 more shapes cost ~18 MB."""
    step = 4 if n <= 32 else 16 if n <= 256 else 128 if n <= 4096 else 512
    return -(-n // step) * step


@dataclass
class PackedBatch:
    """B texts as N real tokens (plus filler rows up to N' when rows are bucketed).

    ids, positions, segments: (N',) each; positions count from 0 within a text (-1 for filler); segments give
    each token's text (B for filler). lengths: (B,) tokens per text."""
    ids: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    lengths: torch.Tensor
    attention: AttentionLayout

    @property
    def size(self) -> int:
        return self.lengths.shape[0]

    @classmethod
    def from_ids(cls, ids: Sequence[Sequence[int]], device: torch.device | str = "cpu", attention: str = "grouped",
                 bucket_rows: bool = False, short_kernel: AttentionKernel | None = None,
                 short_kernel_max_tokens: int = 0, block_kernel: AttentionKernel | None = None,
                 block_kernel_max_tokens: int = 0) -> "PackedBatch":
        """Pack ragged token ids; attention "grouped" or "padded" (grouped: with our kernels where given, see
        GroupedAttention). bucket_rows pads N to row_bucket(N)."""
        lengths = [len(i) for i in ids]
        n = sum(lengths)
        filler = (row_bucket(n) if bucket_rows else n) - n
        length_t = torch.tensor(lengths, dtype=torch.long)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=n)
        segments = torch.repeat_interleave(torch.arange(len(ids)), length_t)  # (N,)
        starts = length_t.cumsum(0) - length_t  # (B,)
        positions = torch.arange(n) - starts[segments]
        flat = torch.cat([torch.from_numpy(flat), torch.zeros(filler, dtype=torch.long)])
        segments = torch.cat([segments, torch.full((filler,), len(ids), dtype=torch.long)])
        positions = torch.cat([positions, torch.full((filler,), -1, dtype=torch.long)])
        device = torch.device(device)
        if attention == "grouped":
            layout = GroupedAttention(lengths, short_kernel, short_kernel_max_tokens, block_kernel,
                                      block_kernel_max_tokens)
        elif attention == "padded":
            width = max(lengths, default=0)
            mask = (torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]).long()
            index = mask.reshape(-1).nonzero().squeeze(1)
            layout = PaddedAttention(index.to(device), mask.to(device))
        else:
            raise ValueError(f"attention must be 'grouped' or 'padded', got {attention!r}")
        return cls(flat.to(device), positions.to(device), segments.to(device), length_t.to(device), layout)

    @classmethod
    def from_padded(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> "PackedBatch":
        """From a right- or left-padded (B, T) batch, with tensor ops only (traceable for export)."""
        B, T = input_ids.shape
        keep = attention_mask.reshape(-1) != 0
        index = keep.nonzero().squeeze(1)  # (N,)
        positions = (attention_mask.cumsum(1) - 1).reshape(-1).index_select(0, index)
        segments = torch.arange(B, device=input_ids.device)[:, None].expand(B, T).reshape(-1).index_select(0, index)
        return cls(input_ids.reshape(-1).index_select(0, index), positions, segments, attention_mask.sum(1),
                   PaddedAttention(index, attention_mask))

    def unpack(self, tokens: torch.Tensor, width: int | None = None, fill: float = 0.0) -> torch.Tensor:
        """(N', C) token vectors -> right-padded (B, T, C), `fill` at padding."""
        T = width if width is not None else int(self.lengths.max())
        if tokens.shape[0] == 0:
            return tokens.new_full((self.size, T, tokens.shape[1]), fill)
        # gathered rather than scattered (index_copy), as PaddedAttention, for the ONNX export's sake
        steps = torch.arange(T, device=tokens.device)
        valid = steps[None, :] < self.lengths[:, None]  # (B, T)
        starts = self.lengths.cumsum(0) - self.lengths
        rows = (starts[:, None] + steps[None, :]).masked_fill(~valid, 0)
        out = tokens.index_select(0, rows.reshape(-1)).view(self.size, T, -1)
        return out.masked_fill(~valid[:, :, None], fill)
