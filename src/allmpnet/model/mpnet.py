"""The MPNet encoder, in one file.

Module names follow the published checkpoint (``embeddings.word_embeddings``, ``encoder.layer.N.attention.attn.q``
…) so its ``model.safetensors`` loads and saves key for key, and a model we save loads in transformers.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint


class WeightsError(ValueError):
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

    @classmethod
    def from_dict(cls, raw: dict) -> "MPNetConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def load(cls, model_dir: str | Path) -> "MPNetConfig":
        return cls.from_dict(json.loads((Path(model_dir) / "config.json").read_text()))

    def to_hf_dict(self) -> dict:
        """config.json as transformers expects it for an MPNet model."""
        out = asdict(self)
        out.pop("relative_attention_max_distance")  # transformers hard-codes 128
        out.update(model_type="mpnet", architectures=["MPNetModel"], hidden_act="gelu", bos_token_id=0,
                   eos_token_id=2, initializer_range=0.02)
        return out


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5-style bidirectional buckets: exact for small distances, logarithmic up to max_distance."""
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half  # keys after the query get the upper half
    distance = relative_position.abs()
    max_exact = half // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


class Embeddings(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.pad_token_id = cfg.pad_token_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                                padding_idx=cfg.pad_token_id)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # MPNet numbers real tokens from pad_token_id + 1 and gives padding the padding row itself
        is_token = input_ids.ne(self.pad_token_id).long()
        position_ids = torch.cumsum(is_token, dim=1) * is_token + self.pad_token_id  # (B, T)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))  # (B, T, C)


class SelfAttention(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.dropout_p = cfg.attention_probs_dropout_prob
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.o = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class Attention(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dropout(self.attn(x, bias)))


class Intermediate(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as trained


class Output(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class Layer(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, bias)
        return self.output(self.intermediate(a), a)


class LayerStack(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.cfg = cfg
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        # one table for all layers: (bucket -> per-head bias)
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_attention_heads)
        self.gradient_checkpointing = False

    def position_bias(self, T: int, device: torch.device) -> torch.Tensor:
        idx = torch.arange(T, device=device)
        buckets = relative_position_bucket(idx[None, :] - idx[:, None], self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)  # (T, T)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)  # (H, T, T)

    def attention_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype,
                       broadcast_unpadded: bool = False) -> torch.Tensor:
        """The additive attention mask: relative-position bias, and -inf-like at padded keys.

        broadcast_unpadded: a batch without padding gets one (1, H, T, T) bias for all rows. It is a data-dependent
        branch, so only eager inference uses it (traced exports and training keep one code path).
        """
        bias = self.position_bias(attention_mask.shape[1], attention_mask.device).to(dtype)[None]  # (1, H, T, T)
        if not (broadcast_unpadded and bool(attention_mask.all())):
            padding = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
            padding.masked_fill_(attention_mask == 0, torch.finfo(dtype).min)
            bias = bias + padding[:, None, None, :]  # (B, H, T, T)
        # contiguous: the bias would otherwise keep the permuted (H, T, T) layout, and SDPA copies a strided mask
        # on every layer
        return bias.contiguous()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        bias = self.attention_bias(attention_mask, x.dtype)
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, bias, use_reentrant=False)
            else:
                x = layer(x, bias)
        return x


class MPNet(nn.Module):
    """Token embeddings from input ids: (B, T) -> (B, T, C). The pooler of MLM checkpoints is kept, unused."""

    IGNORED_KEYS = ("embeddings.position_ids",)  # a buffer some transformers versions saved; derived, not learned

    def __init__(self, cfg: MPNetConfig, with_pooler: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = LayerStack(cfg)
        self.pooler = nn.ModuleDict({"dense": nn.Linear(cfg.hidden_size, cfg.hidden_size)}) if with_pooler else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids), attention_mask)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "MPNet":
        model_dir = Path(model_dir)
        cfg = MPNetConfig.load(model_dir)
        tensors = read_safetensors(model_dir / "model.safetensors")
        if any(k.startswith("mpnet.") for k in tensors):  # masked-LM layout: keep the encoder, drop the LM head
            tensors = {k[len("mpnet."):]: v for k, v in tensors.items() if k.startswith("mpnet.")}
        tensors = {k: v for k, v in tensors.items() if k not in cls.IGNORED_KEYS}
        model = cls(cfg, with_pooler=any(k.startswith("pooler.") for k in tensors))
        model.load_checked(tensors, source=model_dir / "model.safetensors")
        return model.eval()

    def load_checked(self, tensors: dict[str, torch.Tensor], source: Path | str = "checkpoint") -> None:
        expected = self.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        misshapen = [f"{k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
                     for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
        problems = ([f"missing tensor {k}" for k in missing] + [f"unexpected tensor {k}" for k in unexpected]
                    + [f"wrong shape {m}" for m in misshapen])
        if problems:
            shown = "; ".join(problems[:10]) + (f"; … {len(problems) - 10} more" if len(problems) > 10 else "")
            raise WeightsError(f"{source} does not fit the MPNet config: {shown}")
        self.load_state_dict(tensors, strict=True)

    def save_pretrained(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps(self.cfg.to_hf_dict(), indent=2) + "\n")
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


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
