"""The MPNet encoder, in one file, on packed tokens (model/packing.py): (N, C) real tokens through every layer.

Module names follow the published checkpoint (``embeddings.word_embeddings``, ``encoder.layer.N.attention.attn.o``
…) so its ``model.safetensors`` loads and saves key for key (q, k and v joined into one projection on load and
split on save), and a model we save loads in transformers.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from allmpnet.errors import InvalidInput
from allmpnet.model.files import ModelFileError, read_json
from allmpnet.model.packing import AttentionLayout, BoundAttention, PackedBatch


class WeightsError(ModelFileError):
    """A checkpoint that cannot be loaded as-is: missing, unexpected, misshapen or damaged tensors."""


@dataclass
class MPNetConfig:
    vocab_size: int = 30527
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-5
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "relative_attention_num_buckets", "relative_attention_max_distance")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise InvalidInput(f"pad_token_id must be a token id below vocab_size ({self.vocab_size}), "
                               f"got {self.pad_token_id!r}")
        if self.max_position_embeddings < self.pad_token_id + 3:  # room for the padding slots and one token
            raise InvalidInput(f"max_position_embeddings ({self.max_position_embeddings}) leaves no room for text "
                               f"after the {self.pad_token_id + 1} padding slot(s)")
        for name in ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise InvalidInput(f"{name} must be a number in [0, 1), got {value!r}")

    @classmethod
    def from_dict(cls, raw: dict) -> "MPNetConfig":
        """From config.json's fields as transformers writes them (others, such as architectures, are ignored).

        ValueError for a dict that is not an MPNet config: one whose model_type names another architecture, or
        that lacks any of the sizes every saved MPNet config lists (REQUIRED_FIELDS: transformers and
        `to_hf_dict` always write them; a file without them, such as {"x": 1}, describes no saved model). The
        other fields may be absent, as in older or hand-written configs, and are read as transformers reads them.
        """
        model_type = raw.get("model_type", "mpnet")  # a config that does not name its type may still be MPNet's
        if model_type != "mpnet":
            raise InvalidInput(f"model_type is {model_type!r}, not 'mpnet': this is not an MPNet model's config")
        missing = [name for name in REQUIRED_FIELDS if name not in raw]
        if missing:
            raise InvalidInput(f"not an MPNet config: lacks {', '.join(missing)} (every MPNet config.json lists "
                               f"the model's sizes)")
        known = {f.name for f in fields(cls)}
        return cls(**{**ABSENT_FIELDS, **{k: v for k, v in raw.items() if k in known}})

    @classmethod
    def load(cls, model_dir: str | Path) -> "MPNetConfig":
        path = Path(model_dir) / "config.json"
        try:
            cfg = cls.from_dict(read_json(path))
        except ModelFileError:
            raise
        except (ValueError, TypeError) as e:
            raise ModelFileError(f"{path}: {e}") from None
        return cfg

    def to_hf_dict(self) -> dict:
        """config.json as transformers expects it for an MPNet model."""
        out = asdict(self)
        out.pop("relative_attention_max_distance")  # transformers hard-codes 128
        out.update(model_type="mpnet", architectures=["MPNetModel"], hidden_act="gelu", bos_token_id=0,
                   eos_token_id=2, initializer_range=0.02)
        return out


# the sizes without which a config.json is no MPNet config; the other fields may be absent
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "max_position_embeddings")
# absent fields that transformers' MPNetConfig reads otherwise than our defaults (which are the published model's)
ABSENT_FIELDS = {"layer_norm_eps": 1e-12}


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5-style bidirectional buckets: exact for small distances, logarithmic up to max_distance."""
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half  # keys after the query get the upper half
    distance = relative_position.abs()
    max_exact = half // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


class Linear(nn.Linear):
    """y = act(x W^T + b), dropped out and added to `residual` when given.

    The unit the inference copies swap (oneDNN prepacked, int8): they keep this call, `forward(x, residual)`, and
    fuse the activation and the residual add into the matmul."""

    def __init__(self, in_features: int, out_features: int, activation: str = "none", dropout: float = 0.0):
        super().__init__(in_features, out_features)
        if activation not in ("none", "gelu"):
            raise InvalidInput(f"activation must be 'none' or 'gelu', got {activation!r}")
        self.activation, self.dropout = activation, dropout

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.activation == "gelu":
            y = F.gelu(y)  # exact (erf) GELU, as trained
        y = F.dropout(y, self.dropout, self.training)
        return y if residual is None else residual + y


class RelativePositionBias(nn.Module):
    """One table for all layers: bucket of (key - query) -> per-head additive attention bias."""

    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        self.weight = nn.Parameter(torch.zeros(cfg.relative_attention_num_buckets, cfg.num_attention_heads))

    def forward(self, length: int) -> torch.Tensor:
        idx = torch.arange(length, device=self.weight.device)
        buckets = relative_position_bucket(idx[None, :] - idx[:, None], self.num_buckets, self.max_distance)
        return F.embedding(buckets, self.weight).permute(2, 0, 1)  # (H, T, T)

    def by_distance(self, span: int) -> torch.Tensor:
        """(H, 2 span - 1): the bias of each key-minus-query distance from -(span - 1) to span - 1, which is all
        forward(length) depends on: its [h, i, j] is this [h, span - 1 + j - i], for lengths up to span."""
        distance = torch.arange(1 - span, span, device=self.weight.device)
        return F.embedding(relative_position_bucket(distance, self.num_buckets, self.max_distance), self.weight).t()


class Embeddings(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.pad_token_id = cfg.pad_token_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                                padding_idx=cfg.pad_token_id)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # MPNet numbers real tokens from pad_token_id + 1; filler rows (position -1) get the padding row itself
        positions = skip_pad_positions(ids, positions, self.pad_token_id)
        x = self.word_embeddings(ids) + self.position_embeddings(positions + self.pad_token_id + 1)
        return self.dropout(self.LayerNorm(x))  # (N, C)


def skip_pad_positions(ids: torch.Tensor, positions: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The absolute positions MPNet was trained with (fairseq's `make_positions`, transformers'
    `create_position_ids_from_input_ids`): a token whose id is the pad id, even one the text itself holds (the
    string "<pad>"), takes the padding slot (-1 here) and is not counted; the tokens after it move up one. The
    token is still attended to and pooled: only its absolute position changes.

    ids, positions: (N',) packed, positions counting every token of its text from 0 (-1 for filler rows)."""
    is_pad = ids == pad_token_id
    if not torch.jit.is_tracing() and not bool(is_pad.any()):  # almost every batch: nothing to move
        return positions
    index = torch.arange(ids.shape[0], device=ids.device)
    start = (index - positions).clamp(max=ids.shape[0] - 1)  # each token's text's first row (filler: masked below)
    pads = is_pad.long().cumsum(0)  # pads up to and including each row
    pads_in_text_before = pads - is_pad.long() - (pads[start] - is_pad[start].long())
    return torch.where(is_pad | (positions < 0), torch.full_like(positions, -1), positions - pads_in_text_before)


class SelfAttention(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.dropout_p = cfg.attention_probs_dropout_prob
        # q, k and v as one projection; the checkpoint's separate q/k/v tensors are joined on load, split on save
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.o = Linear(cfg.hidden_size, cfg.hidden_size, dropout=cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, attention: BoundAttention) -> torch.Tensor:
        y = attention(self.qkv(x), self.n_head, self.dropout_p if self.training else 0.0)  # (N, C)
        return self.o(y, residual=x)


class Attention(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, attention: BoundAttention) -> torch.Tensor:
        return self.LayerNorm(self.attn(x, attention))


class Intermediate(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, activation="gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class Output(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.dense = Linear(cfg.intermediate_size, cfg.hidden_size, dropout=cfg.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h, residual=residual))


class Layer(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(self, x: torch.Tensor, attention: BoundAttention) -> torch.Tensor:
        a = self.attention(x, attention)  # (N, C)
        return self.output(self.intermediate(a), a)


class LayerStack(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.relative_attention_bias = RelativePositionBias(cfg)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        attention = layout.bind(self.relative_attention_bias, x.dtype)  # position biases once for all layers
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, attention, use_reentrant=False)
            else:
                x = layer(x, attention)
        return x


class MPNet(nn.Module):
    """Token vectors of a packed batch: (N',) ids -> (N', C). The pooler of MLM checkpoints is kept, unused."""

    IGNORED_KEYS = ("embeddings.position_ids",)  # a buffer some transformers versions saved; derived, not learned

    def __init__(self, cfg: MPNetConfig, with_pooler: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = LayerStack(cfg)
        self.pooler = nn.ModuleDict({"dense": nn.Linear(cfg.hidden_size, cfg.hidden_size)}) if with_pooler else None

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.encoder(self.embeddings(batch.ids, batch.positions), batch.attention)  # (N', C)

    def token_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The padded view: (B, T) ids and mask -> (B, T, C), zeros at padding, right-padded."""
        batch = PackedBatch.from_padded(input_ids, attention_mask)
        return batch.unpack(self(batch), input_ids.shape[1])

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer's activations in the backward pass: less memory for a third more compute."""
        self.encoder.gradient_checkpointing = enabled

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "MPNet":
        model_dir = Path(model_dir)
        cfg = MPNetConfig.load(model_dir)
        if cfg.hidden_size % cfg.num_attention_heads:  # no network can be built from it
            raise ModelFileError(f"{model_dir / 'config.json'}: hidden_size ({cfg.hidden_size}) must be a multiple of "
                                 f"num_attention_heads ({cfg.num_attention_heads})")
        tensors = read_safetensors(model_dir / "model.safetensors")
        if any(k.startswith("mpnet.") for k in tensors):  # masked-LM layout: keep the encoder, drop the LM head
            tensors = {k[len("mpnet."):]: v for k, v in tensors.items() if k.startswith("mpnet.")}
        tensors = {k: v for k, v in tensors.items() if k not in cls.IGNORED_KEYS}
        with weights_left_uninitialised():
            model = cls(cfg, with_pooler=any(k.startswith("pooler.") for k in tensors))
        model.load_checked(tensors, source=model_dir / "model.safetensors")
        return model.eval()

    def load_checked(self, tensors: dict[str, torch.Tensor], source: Path | str = "checkpoint") -> None:
        """Load tensors in the checkpoint layout (separate q/k/v), refusing any that do not fit."""
        expected = self.checkpoint_state()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        misshapen = [f"{k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
                     for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
        problems = ([f"missing tensor {k}" for k in missing] + [f"unexpected tensor {k}" for k in unexpected]
                    + [f"wrong shape {m}" for m in misshapen])
        if problems:
            shown = "; ".join(problems[:10]) + (f"; … {len(problems) - 10} more" if len(problems) > 10 else "")
            raise WeightsError(f"{source} does not fit the MPNet config: {shown}")
        self.load_state_dict(join_qkv(tensors), strict=True)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The state dict in the published layout (separate q/k/v): what model.safetensors holds."""
        return split_qkv(self.state_dict())

    def save_pretrained(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps(self.cfg.to_hf_dict(), indent=2) + "\n")
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.checkpoint_state().items()}
        save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def join_qkv(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint layout -> ours: each layer's attn.q/k/v weights and biases become one attn.qkv."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".attn.q.weight") or k.endswith(".attn.q.bias")]:
        prefix, kind = key.rsplit(".q.", 1)
        out[f"{prefix}.qkv.{kind}"] = torch.cat([out.pop(f"{prefix}.{p}.{kind}") for p in "qkv"])
    return out


def split_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> checkpoint layout (the inverse of join_qkv)."""
    out = dict(state)
    for key in [k for k in state if ".attn.qkv." in k]:
        prefix, kind = key.rsplit(".qkv.", 1)
        for name, part in zip("qkv", out.pop(key).chunk(3)):
            out[f"{prefix}.{name}.{kind}"] = part
    return out


@contextmanager
def weights_left_uninitialised() -> Iterator[None]:
    """Modules built inside keep their weights as allocated (nn.Linear, nn.Embedding and nn.LayerNorm skip their
    random or constant fills): for a model whose every weight is loaded next, the fills were 0.4 s of each load.
    load_checked's strict load is what guarantees that no weight is left as allocated. nn.init's functions are
    swapped for the block's few milliseconds, process-wide (as transformers' no_init_weights does): build no other
    model in another thread meanwhile."""
    names = ("kaiming_uniform_", "uniform_", "normal_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or malformed file raises WeightsError."""
    if not path.is_file():
        raise WeightsError(f"{path} not found: the model directory has no model.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise WeightsError(f"{path} is damaged or truncated and was not loaded ({e}); "
                           "re-create it, e.g. with `allmpnet download --force`") from e
