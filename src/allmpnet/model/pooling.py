"""Pooling token embeddings into one sentence vector; reads and writes sentence-transformers' 1_Pooling/config.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")


@dataclass
class Pooling:
    word_embedding_dimension: int = 768
    pooling_mode_cls_token: bool = False
    pooling_mode_mean_tokens: bool = True
    pooling_mode_max_tokens: bool = False
    pooling_mode_mean_sqrt_len_tokens: bool = False

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValueError(f"pooling config enables no mode; expected one of {MODES}")

    @property
    def modes(self) -> list[str]:
        return [m for m in MODES if getattr(self, f"pooling_mode_{m}")]

    @property
    def output_dim(self) -> int:
        return self.word_embedding_dimension * len(self.modes)

    def __call__(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, C) token embeddings, (B, T) mask -> (B, C * number of modes)."""
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
        counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
        summed = (tokens * mask).sum(dim=1)  # (B, C)
        out = []
        for mode in self.modes:
            if mode == "cls_token":
                out.append(tokens[:, 0])
            elif mode == "mean_tokens":
                out.append(summed / counts)
            elif mode == "max_tokens":
                out.append(tokens.masked_fill(mask == 0, torch.finfo(tokens.dtype).min).amax(dim=1))
            else:
                out.append(summed / counts.sqrt())
        return torch.cat(out, dim=1)

    @classmethod
    def load(cls, pooling_dir: str | Path) -> "Pooling":
        raw = json.loads((Path(pooling_dir) / "config.json").read_text())
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        unsupported = [k for k, v in raw.items() if k.startswith("pooling_mode") and v and k not in known]
        if unsupported:
            raise ValueError(f"{pooling_dir}/config.json asks for pooling modes we do not support: {unsupported}")
        return cls(**known)

    def save(self, pooling_dir: str | Path) -> None:
        Path(pooling_dir).mkdir(parents=True, exist_ok=True)
        (Path(pooling_dir) / "config.json").write_text(json.dumps(asdict(self), indent=2) + "\n")
