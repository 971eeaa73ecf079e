"""Quantized output embeddings: int8 / uint8 (per-dimension scalar buckets) and binary / ubinary (sign bits).

The encodings are the ones sentence-transformers' `quantize_embeddings` produces, so vectors quantized here and
there are interchangeable (tests/test_quantize.py checks equality on the same vectors and ranges):

- uint8: each dimension's calibration range [low, high] is cut into 255 equal steps; a value becomes
  floor((value - low) / step), clipped to 0..255 (a dimension whose range is empty uses a step of 1).
- int8: the uint8 code minus 128 (-128..127).
- ubinary: one bit per dimension, set where the value is > 0, packed 8 to a byte, first dimension in the highest
  bit (numpy's packbits); a 768-d vector becomes 96 bytes.
- binary: the ubinary bytes minus 128, as int8.

Ranges are a (2, dim) array of per-dimension minima and maxima. They should come from a representative sample of
embeddings (`calibration_ranges`), not from the vectors being quantized: a single vector, or a handful, gives
ranges that fit only themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from allmpnet.errors import InvalidInput, InvalidInputType

QuantizedType = Literal["int8", "uint8", "binary", "ubinary"]
QUANTIZED_TYPES: tuple[str, ...] = ("int8", "uint8", "binary", "ubinary")
EMBEDDING_TYPES: tuple[str, ...] = ("float",) + QUANTIZED_TYPES  # what an output vector may be
SCALAR_TYPES = ("int8", "uint8")  # the ones that need calibration ranges
BUCKETS = 255  # steps between a dimension's minimum and maximum


def check_type(precision: str) -> str:
    if precision not in QUANTIZED_TYPES:
        raise InvalidInput(f"quantization must be one of {', '.join(QUANTIZED_TYPES)}, got {precision!r}")
    return precision


def as_float_matrix(embeddings: np.ndarray | torch.Tensor, name: str = "embeddings") -> np.ndarray:
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().float().cpu().numpy()
    array = np.asarray(embeddings)
    if array.dtype.kind not in "f":
        raise InvalidInputType(f"{name} must be float vectors to quantize, got dtype {array.dtype}")
    if array.ndim not in (1, 2):
        raise InvalidInput(f"{name} must be a vector or a (n, dim) matrix, got shape {array.shape}")
    return array.astype(np.float32, copy=False)


def calibration_ranges(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    """(2, dim) per-dimension minimum and maximum of a sample of embeddings (at least 2 rows)."""
    sample = as_float_matrix(embeddings, "calibration embeddings")
    if sample.ndim != 2 or len(sample) < 2:
        raise InvalidInput("calibration needs at least 2 embeddings (a (n, dim) matrix); one vector has no spread")
    if not np.isfinite(sample).all():
        raise InvalidInput("calibration embeddings hold NaN or infinite values")
    return np.vstack((sample.min(axis=0), sample.max(axis=0)))


def check_ranges(ranges: np.ndarray | torch.Tensor, dim: int) -> np.ndarray:
    ranges = as_float_matrix(ranges, "ranges")
    if ranges.shape != (2, dim):
        raise InvalidInput(f"ranges must have shape (2, {dim}) (per-dimension minima, then maxima), got {ranges.shape}")
    if not np.isfinite(ranges).all():
        raise InvalidInput("ranges hold NaN or infinite values")
    if (ranges[1] < ranges[0]).any():
        raise InvalidInput("ranges: a maximum is below its minimum (row 0 holds the minima, row 1 the maxima)")
    return ranges


def quantize_embeddings(embeddings: np.ndarray | torch.Tensor, precision: QuantizedType,
                        ranges: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """Quantize float embeddings ((n, dim) or one (dim,) vector) to `precision`.

    int8/uint8 need `ranges` ((2, dim), see `calibration_ranges`); without them the ranges of the given embeddings
    themselves are used, which needs at least 2 rows. binary/ubinary need no ranges. Returns int8 or uint8 arrays:
    (n, dim) for int8/uint8, (n, ceil(dim / 8)) for binary/ubinary.
    """
    check_type(precision)
    vectors = as_float_matrix(embeddings)
    if precision in SCALAR_TYPES:
        if ranges is None:
            if vectors.ndim == 1 or len(vectors) < 2:
                raise InvalidInput(f"{precision} quantization needs calibration ranges: pass ranges= (see "
                                   "calibration_ranges), or quantize at least 2 embeddings together")
            ranges = calibration_ranges(vectors)
        ranges = check_ranges(ranges, vectors.shape[-1])
        low = ranges[0]
        step = (ranges[1] - low) / BUCKETS
        step = np.where(step == 0, 1, step)
        codes = np.clip(np.floor((vectors - low) / step), 0, BUCKETS)
        return codes.astype(np.uint8) if precision == "uint8" else (codes - 128).astype(np.int8)
    bits = np.packbits(vectors > 0, axis=-1)
    return bits if precision == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)


@dataclass(frozen=True)
class Quantizer:
    """A quantization type with its calibration ranges, fixed once and applied to every later batch.

    `Encoder.encode(texts, quantize=Quantizer(...))` and the server's `--calibration` use one, so every vector of
    a collection is cut into the same buckets, whatever batch it came in.
    """
    precision: QuantizedType
    ranges: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_type(self.precision)
        if self.ranges is not None:
            object.__setattr__(self, "ranges", check_ranges(self.ranges, np.asarray(self.ranges).shape[-1]))

    @classmethod
    def calibrate(cls, precision: QuantizedType, embeddings: np.ndarray | torch.Tensor) -> "Quantizer":
        """Ranges from a representative sample of float embeddings (for int8/uint8; ignored by the binary types)."""
        check_type(precision)
        return cls(precision, calibration_ranges(embeddings) if precision in SCALAR_TYPES else None)

    def __call__(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        if self.ranges is not None and as_float_matrix(embeddings).shape[-1] != self.ranges.shape[1]:
            raise InvalidInput(f"the calibration ranges are {self.ranges.shape[1]}-d; the embeddings are "
                               f"{as_float_matrix(embeddings).shape[-1]}-d")
        return quantize_embeddings(embeddings, self.precision, self.ranges)


def load_calibration(path: str | Path) -> np.ndarray:
    """Ranges from a .npy file: either (2, dim) ranges as saved by `allmpnet encode --save-ranges`, or (n, dim)
    float embeddings to calibrate on (n > 2)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such calibration file")
    array = np.load(path)
    if array.ndim != 2 or array.dtype.kind != "f":
        raise InvalidInput(f"{path}: expected (2, dim) float ranges or (n, dim) float embeddings, got "
                           f"{array.dtype} {array.shape}")
    return check_ranges(array, array.shape[1]) if len(array) == 2 else calibration_ranges(array)


def resolve(quantize: str | Quantizer | None) -> Quantizer | None:
    """`quantize=` as given to encode(): None, a type name (ranges from the batch itself), or a Quantizer."""
    if quantize is None or isinstance(quantize, Quantizer):
        return quantize
    if quantize == "float":
        return None
    if isinstance(quantize, str):
        return Quantizer(check_type(quantize))
    raise InvalidInputType(f"quantize must be None, one of {QUANTIZED_TYPES} or a Quantizer, got "
                           f"{type(quantize).__name__}")
