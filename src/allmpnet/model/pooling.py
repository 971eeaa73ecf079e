"""Pooling token embeddings into one sentence vector; reads and writes sentence-transformers' 1_Pooling/config.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from allmpnet.errors import InvalidInput
from allmpnet.model.files import ModelFileError, read_json
from allmpnet.model.packing import PackedBatch

MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
# the keys of sentence-transformers' Pooling config, in either layout (it refuses any other)
POOLING_KEYS = frozenset({"word_embedding_dimension", "embedding_dimension", "pooling_mode", "include_prompt"})
LEGACY_MODE_KEYS = frozenset({f"pooling_mode_{m}" for m in MODES} | {"pooling_mode_weightedmean_tokens",
                                                                       "pooling_mode_lasttoken"})


@dataclass
class Pooling:
    word_embedding_dimension: int = 768
    pooling_mode_cls_token: bool = False
    pooling_mode_mean_tokens: bool = True
    pooling_mode_max_tokens: bool = False
    pooling_mode_mean_sqrt_len_tokens: bool = False

    def __post_init__(self) -> None:
        if not self.modes:
            raise InvalidInput(f"pooling config enables no mode; expected one of {MODES}")

    @property
    def modes(self) -> list[str]:
        return [m for m in MODES if getattr(self, f"pooling_mode_{m}")]

    @property
    def output_dim(self) -> int:
        return self.word_embedding_dimension * len(self.modes)

    def __call__(self, tokens: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """(N', C) packed token vectors -> (B, C * number of modes), in fp32."""
        tokens = tokens.float()
        B = batch.size
        # a (B, N') one-hot matmul rather than index_add: the same sums, and it exports to ONNX (index_add with
        # repeated indices does not); filler rows (segment B) match no text. Its cost is ~0.1% of the model's.
        membership = (batch.segments[None, :] == torch.arange(B, device=tokens.device)[:, None]).to(tokens.dtype)
        counts = batch.lengths.to(tokens.dtype).clamp(min=1)[:, None]  # (B, 1)
        summed = membership @ tokens  # (B, C)
        out = []
        for mode in self.modes:
            if mode == "cls_token":
                out.append(tokens.index_select(0, batch.lengths.cumsum(0) - batch.lengths))
            elif mode == "mean_tokens":
                out.append(summed / counts)
            elif mode == "max_tokens":
                padded = batch.unpack(tokens, fill=torch.finfo(tokens.dtype).min)  # (B, T, C)
                out.append(padded.amax(dim=1))
            else:
                out.append(summed / counts.sqrt())
        return torch.cat(out, dim=1)

    @classmethod
    def load(cls, pooling_dir: str | Path) -> "Pooling":
        """Either layout: legacy ``pooling_mode_*`` booleans, or sentence-transformers 6's ``pooling_mode`` name(s).

        The file must hold word_embedding_dimension (or embedding_dimension) and enable at least one mode; a key
        sentence-transformers' Pooling does not take (it refuses those too), a mode flag that is not a boolean,
        or a pooling_mode that is neither a name nor a list of names is a ModelFileError naming the file."""
        path = Path(pooling_dir) / "config.json"
        raw = read_json(path)
        unknown = sorted(k for k in raw if k not in POOLING_KEYS and k not in LEGACY_MODE_KEYS)
        if unknown:
            listed = ", ".join(repr(k) for k in unknown)
            raise ModelFileError(f"{path}: {listed} {'is' if len(unknown) == 1 else 'are'} not a setting of "
                                 f"sentence-transformers' Pooling (it takes word_embedding_dimension and "
                                 f"pooling_mode_* flags, or embedding_dimension and pooling_mode)")
        for key in raw:
            if (key in LEGACY_MODE_KEYS or key == "include_prompt") and not isinstance(raw[key], bool):
                raise ModelFileError(f"{path}: {key} must be true or false, got {raw[key]!r}")
        dim = raw.get("word_embedding_dimension", raw.get("embedding_dimension"))
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ModelFileError(f"{path}: word_embedding_dimension must be a positive integer, got {dim!r}")
        if "pooling_mode" in raw:
            names = raw["pooling_mode"]
            names = [names] if isinstance(names, str) else names
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ModelFileError(f"{path}: pooling_mode must be a mode name or a list of them, "
                                     f"got {raw['pooling_mode']!r}")
            by_name = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens",
                       "mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}
            unsupported = [n for n in names if n not in by_name]
            enabled = {by_name[n] for n in names if n in by_name}
        else:
            unsupported = [k for k, v in raw.items() if k in LEGACY_MODE_KEYS and v
                           and k.removeprefix("pooling_mode_") not in MODES]
            enabled = {m for m in MODES if raw.get(f"pooling_mode_{m}")}
        if unsupported:
            raise ModelFileError(f"{path} asks for pooling modes allmpnet does not support: {unsupported}")
        if not enabled:
            raise ModelFileError(f"{path} enables no pooling mode; expected one of {MODES}")
        return cls(word_embedding_dimension=dim, **{f"pooling_mode_{m}": m in enabled for m in MODES})

    def save(self, pooling_dir: str | Path) -> None:
        Path(pooling_dir).mkdir(parents=True, exist_ok=True)
        (Path(pooling_dir) / "config.json").write_text(json.dumps(asdict(self), indent=2) + "\n")
