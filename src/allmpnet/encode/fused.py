"""A fast inference copy of the MPNet network: unpadded tokens, fused projections, oneDNN-prepacked linears.

Each swap was measured on the encoder's shapes (see docs/speed.md):

- Tokens travel *packed*: every position-wise step (the four projections, GELU, residual adds, LayerNorms: ~95%
  of the FLOPs) runs on the batch's real tokens only, as one (N, C) matrix, so a batch of sentences of mixed
  length costs its real tokens, not rows x longest, and big batches stop paying for padding.
- Attention on CPU runs per group of equal-length rows (no padding mask; short rows side by side in blocks);
  on GPUs as one call over the padded batch.
- The packed row count is rounded to few distinct values (see row_bucket).
- q, k and v are one (3C x C) projection.
- On CPU in bf16, linear layers use oneDNN's prepacked op (the one torch.compile's CPU backend emits): the
  weight is reordered once into the AMX tile layout, and bias, GELU or the residual add are applied while the
  output is still in cache instead of in separate passes over memory.
- On CPUs with AMX (kernels.py): optionally, int8 weights for small batches (memory-bound: half the bytes of
  bf16) or for all; in bf16, attention over a lone short block (a single query) in our kernel.

The maths is the network's own; the fp32 training network is never touched: this is a separate frozen copy.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from allmpnet.encode.kernels import MAX_BLOCK_TOKENS, Int8Linear, short_attention, short_attention_supported
from allmpnet.model.mpnet import MPNet


def onednn_linear_available() -> bool:
    """True where this torch build has oneDNN's prepacked linear op and it runs on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4, dtype=torch.bfloat16), 2)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4, dtype=torch.bfloat16), w, None, "none", [], "")
        return bool(torch.allclose(y.float(), torch.full((2, 4), 4.0)))
    except (RuntimeError, AttributeError):
        return False


class Linear(nn.Module):
    """y = act(x W^T + b) [+ residual], inference only; act is "none" or "gelu" (exact erf GELU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"):
        super().__init__()
        self.activation = activation
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.activation == "gelu":
            y = F.gelu(y)
        return y if residual is None else y.add_(residual)


class PackedLinear(Linear):
    """Linear with W prepacked by oneDNN and the bias, GELU or residual add fused into the matmul."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none",
                 batch_hint: int = 1024):
        super().__init__(torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint), bias, activation)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], "none")


class RowSwitchedLinear(nn.Module):
    """Batches of at most `max_small_rows` rows go to `small`, larger ones to `large` (two forms of one layer)."""

    def __init__(self, small: nn.Module, large: nn.Module, max_small_rows: int):
        super().__init__()
        self.small, self.large, self.max_small_rows = small, large, max_small_rows

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return (self.small if x.shape[0] <= self.max_small_rows else self.large)(x, residual)


def right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is real tokens followed by padding (what our tokenizer emits): the fast copy's layout."""
    lengths = attention_mask.sum(1, keepdim=True)  # (B, 1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return bool(((positions < lengths) == attention_mask.bool()).all())


def row_bucket(n: int) -> int:
    """Rows the packed (N, C) matrix is padded to. oneDNN builds and caches a kernel, with buffers, per matrix
    shape: every distinct N costs a few MB for good (measured ~20 MB per N for a layer's four projections), so
    100k sentences in batches of ever-different N grew RSS past 3 GB. Rounding N up keeps the shapes few for
    ~1-3% extra rows; small N (single queries) round finely, since their cost is reading the weights anyway."""
    step = 16 if n <= 256 else 128 if n <= 4096 else 512
    return -(-n // step) * step


# attention on very short rows is all per-row overhead in SDPA's kernel: rows shorter than this are laid side by
# side into blocks of about this many tokens, with a block-diagonal bias keeping each row to itself
ATTENTION_BLOCK_TOKENS = 32


@dataclass(frozen=True)
class AttentionGroup:
    """`blocks` consecutive blocks of `rows_per_block` rows of `length` tokens, from packed token `start` on."""
    start: int
    blocks: int
    rows_per_block: int
    length: int

    @property
    def block_tokens(self) -> int:
        return self.rows_per_block * self.length

    @property
    def end(self) -> int:
        return self.start + self.blocks * self.block_tokens


def attention_groups(lengths: list[int], block_tokens: int = ATTENTION_BLOCK_TOKENS) -> list[AttentionGroup]:
    """Cut rows (in packed order) into groups SDPA can run as one (blocks, H, rows x length, D) call: rows of one
    length need no padding, and short ones go side by side. Length-sorted batches give few groups."""
    groups, token, row = [], 0, 0
    while row < len(lengths):
        length, end = lengths[row], row
        while end < len(lengths) and lengths[end] == length:
            end += 1
        rows = end - row
        if length > 0:
            per_block = max(1, min(rows, block_tokens // length))
            for blocks, per in ((rows // per_block, per_block), (1, rows % per_block)):
                if blocks and per:
                    groups.append(AttentionGroup(token, blocks, per, length))
                    token += blocks * per * length
        row = end
    return groups


def block_bias(position_bias: torch.Tensor, rows: int) -> torch.Tensor:
    """(H, L, L) -> (1, H, rows*L, rows*L): the position bias on the diagonal blocks, -inf-like elsewhere."""
    H, L, _ = position_bias.shape
    if rows == 1:
        return position_bias[None].contiguous()
    row_of = torch.arange(rows * L, device=position_bias.device) // L
    same_row = row_of[:, None] == row_of[None, :]
    tiled = position_bias.repeat(1, rows, rows)  # (H, rows*L, rows*L), relative positions right within a block
    return tiled.masked_fill(~same_row, torch.finfo(tiled.dtype).min)[None].contiguous()


class GroupedAttention:
    """Attention per group of equal-length rows, short rows side by side in blocks (the CPU choice: SDPA's CPU
    kernel gains nothing from one big padded call, and padding would cost it (B, H, T, T) mask traffic).

    In bf16 where our kernels run, a group that is one block of at most 32 tokens (a single query, a batch's
    last short rows) uses kernels.short_attention: SDPA is all fixed cost there (62 vs 18 us for an 11-token
    query's layer). Many blocks stay on SDPA, which is faster per 32-token block (2.7 vs 3.7 us a head)."""

    def __init__(self, lengths: list[int], positions: nn.Module, dtype: torch.dtype, device: torch.device):
        self.groups = attention_groups(lengths)
        self.tokens = sum(lengths)
        cfg = positions.cfg
        short_kernel = (device.type == "cpu" and dtype == torch.bfloat16
                        and short_attention_supported(cfg.hidden_size // cfg.num_attention_heads))
        self.biases = []  # per group: (1, H, T, T) in dtype for SDPA, or (H, T, T) fp32 for our kernel
        cache = {}
        for g in self.groups:
            ours = short_kernel and g.blocks == 1 and g.block_tokens <= MAX_BLOCK_TOKENS
            key = (g.length, g.rows_per_block, ours)
            if key not in cache:
                position = positions.position_bias(g.length, device).to(torch.float32 if ours else dtype)
                bias = block_bias(position, g.rows_per_block)  # (1, H, T, T)
                cache[key] = bias[0] if ours else bias
            self.biases.append(cache[key])

    def __call__(self, qkv: torch.Tensor, out: torch.Tensor, n_head: int) -> None:
        """qkv (N', 3C) packed -> attention output written into out (N', C)."""
        C = out.shape[1]
        for g, bias in zip(self.groups, self.biases):
            if bias.dim() == 3:  # (H, T, T): ours
                short_attention(qkv, out, bias, g.start, g.blocks, g.block_tokens, n_head)
                continue
            rows = qkv[g.start:g.end].view(g.blocks, g.block_tokens, 3, n_head, C // n_head)
            q, k, v = rows.permute(2, 0, 3, 1, 4)  # each (blocks, H, T, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            out[g.start:g.end].view(g.blocks, g.block_tokens, n_head, C // n_head).copy_(y.transpose(1, 2))


class PaddedAttention:
    """One SDPA call over the padded (B, T) batch (the GPU choice: one big kernel instead of a launch per group);
    the projections around it still run on packed tokens only."""

    def __init__(self, attention_mask: torch.Tensor, positions: nn.Module, dtype: torch.dtype):
        self.batch, self.length = attention_mask.shape
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat position of each real token
        self.tokens = self.index.numel()
        self.bias = positions.attention_bias(attention_mask, dtype, broadcast_unpadded=True)  # (B or 1, H, T, T)

    def __call__(self, qkv: torch.Tensor, out: torch.Tensor, n_head: int) -> None:
        B, T, N, C = self.batch, self.length, self.tokens, out.shape[1]
        padded = qkv.new_zeros(B * T, 3 * C).index_copy_(0, self.index, qkv[:N])
        q, k, v = padded.view(B, T, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)  # (B, H, T, D)
        out[:N] = y.transpose(1, 2).reshape(B * T, C).index_select(0, self.index)


class FastLayer(nn.Module):
    """One encoder layer on packed tokens: (N, C) -> (N, C)."""

    def __init__(self, layer: nn.Module, make_linear):
        super().__init__()
        attn = layer.attention.attn
        self.n_head = attn.n_head
        self.qkv = make_linear(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]),
                               torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        self.o = make_linear(attn.o.weight, attn.o.bias)
        self.attention_norm = layer.attention.LayerNorm
        self.up = make_linear(layer.intermediate.dense.weight, layer.intermediate.dense.bias, activation="gelu")
        self.down = make_linear(layer.output.dense.weight, layer.output.dense.bias)
        self.output_norm = layer.output.LayerNorm

    def forward(self, x: torch.Tensor, attention: GroupedAttention | PaddedAttention) -> torch.Tensor:
        qkv = self.qkv(x)  # (N', 3C)
        y = torch.empty_like(x)  # (N', C)
        y[attention.tokens:].zero_()  # the bucket's padding rows: finite, never attended to
        attention(qkv, y, self.n_head)
        a = self.attention_norm(self.o(y, residual=x))
        return self.output_norm(self.down(self.up(a), residual=a))


class FastMPNet(nn.Module):
    """Inference-only MPNet with the same interface: (B, T) ids and right-padded mask -> (B, T, C), zeros at
    padding. Tokens are packed (real tokens only) through every layer; attention is "grouped" (per group of
    equal-length rows: batches sorted by length, as encode() makes them, cost their real tokens and nothing
    more) or "padded" (one call over the padded batch)."""

    def __init__(self, network: MPNet, make_linear, attention: str = "grouped"):
        super().__init__()
        if attention not in ("grouped", "padded"):
            raise ValueError(f"attention must be 'grouped' or 'padded', got {attention!r}")
        self.attention = attention
        self.embeddings = network.embeddings
        self.layers = nn.ModuleList(FastLayer(layer, make_linear) for layer in network.encoder.layer)
        self.positions = network.encoder  # for its position bias; its own layers are emptied, never run
        self.positions.layer = nn.ModuleList()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        keep = attention_mask.reshape(-1).bool()
        x = self.embeddings(input_ids).reshape(B * T, -1)[keep]  # (N, C), row after row
        N = x.shape[0]
        x = torch.cat([x, x.new_zeros(row_bucket(N) - N, x.shape[1])])  # (N', C): a cached kernel shape
        attention = (GroupedAttention(attention_mask.sum(1).tolist(), self.positions, x.dtype, x.device)
                     if self.attention == "grouped" else PaddedAttention(attention_mask, self.positions, x.dtype))
        for layer in self.layers:
            x = layer(x, attention)
        out = x.new_zeros(B * T, x.shape[1])
        out[keep] = x[:N]
        return out.view(B, T, -1)


def inference_network(network: MPNet, dtype: torch.dtype, device: torch.device,
                      int8_max_rows: int = 0) -> FastMPNet:
    """A frozen copy of `network` in `dtype` on `device`, with oneDNN layers where they apply (CPU, bf16).

    In the network's own dtype and device the copy shares its weight tensors (only q|k|v is new).
    int8_max_rows (CPU, bf16): batches of at most this many packed tokens use int8 weights (kernels.py);
    sys.maxsize keeps int8 weights only."""
    # deepcopy with every tensor pre-cast in the memo: the copy never holds a second full fp32 set of weights
    memo = {id(t): (nn.Parameter(t.detach().to(device=device, dtype=dtype), requires_grad=False)
                    if isinstance(t, nn.Parameter) else t.to(device=device, dtype=dtype if t.is_floating_point()
                                                                    else t.dtype))
            for t in list(network.parameters()) + list(network.buffers())}
    cast = copy.deepcopy(network, memo).eval()
    prepack = device.type == "cpu" and dtype == torch.bfloat16 and onednn_linear_available()
    attention = "grouped" if device.type == "cpu" else "padded"
    if int8_max_rows and (device.type != "cpu" or dtype != torch.bfloat16):
        raise ValueError("int8 weights run on CPUs, with bf16 activations")

    def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none") -> nn.Module:
        if int8_max_rows == sys.maxsize:
            return Int8Linear(weight, bias, activation)
        large = (PackedLinear if prepack else Linear)(weight, bias, activation)
        if not int8_max_rows:
            return large
        return RowSwitchedLinear(Int8Linear(weight, bias, activation), large, int8_max_rows)
    return FastMPNet(cast, make_linear, attention).eval()
