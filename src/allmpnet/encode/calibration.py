"""Calibration for the x86 int8 path, and its quality guard.

W8A8 keeps this model's quality only with SmoothQuant factors taken from the largest |x| each linear layer's input
channels see (docs/design/cpu-backend.md). They come from one fp32 pass over `calibration_texts.txt` (written for this
repository: captions, news, questions, science, instructions, dialogue; no evaluation data). The same pass gives
the fp32 vectors the int8 copy is then checked against: the guard. Both are cached per weights and recipe, so
only the first start with a given model pays the fp32 pass (seconds on 2 cores).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from allmpnet.model import PackedBatch, SentenceModel
from allmpnet.model.mpnet import Linear
from allmpnet.weights import cache_root

CALIBRATION_TEXTS = Path(__file__).with_name("calibration_texts.txt")
RECIPE_VERSION = "1"  # bump when the recipe or the texts change: cached calibrations are then rebuilt
log = logging.getLogger(__name__)


def calibration_texts() -> list[str]:
    return [line for line in CALIBRATION_TEXTS.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Calibration:
    """Per linear layer (its name in the network), the largest |x| of each input channel over the calibration
    tokens; the calibration texts' fp32 vectors (normalized); min cosine of each int8 kernel's copy checked."""
    input_absmax: dict[str, torch.Tensor]
    reference: torch.Tensor  # (texts, dim)
    guard_results: dict[str, float] = field(default_factory=dict)
    cache_path: Path | None = field(default=None, compare=False)

    def record_guard(self, kernel: str, cosine: float) -> None:
        self.guard_results[kernel] = cosine
        if self.cache_path is not None:
            save_calibration(self, self.cache_path)


def calibration_batches(ids: Sequence[Sequence[int]], device: torch.device, texts_per_batch: int = 32
                        ) -> list[PackedBatch]:
    """The calibration texts' ids packed without filler rows (filler would enter the ranges)."""
    return [PackedBatch.from_ids(ids[i:i + texts_per_batch], device) for i in range(0, len(ids), texts_per_batch)]


@torch.inference_mode()
def calibrate(model: SentenceModel, batches: list[PackedBatch]) -> Calibration:
    """One fp32 pass of `model` over `batches`: its layers' input ranges and its vectors."""
    absmax: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def record(module: torch.nn.Module, args: tuple) -> None:
            seen = args[0].detach().float().abs().amax(0).cpu()
            absmax[name] = seen if name not in absmax else torch.maximum(absmax[name], seen)
        return record

    hooks = [module.register_forward_pre_hook(recorder(name)) for name, module in model.network.named_modules()
             if isinstance(module, Linear)]
    try:
        reference = torch.cat([model(batch, normalize=True).float().cpu() for batch in batches])
    finally:
        for hook in hooks:
            hook.remove()
    return Calibration(absmax, reference)


@torch.inference_mode()
def min_cosine(model: SentenceModel, batches: list[PackedBatch], reference: torch.Tensor) -> float:
    """The smallest cosine between `model`'s vectors of the batches and `reference` (one row per text)."""
    vectors = torch.cat([model(batch, normalize=True).float().cpu() for batch in batches])
    return float((F.normalize(vectors, dim=1) * reference).sum(1).min())


def weights_fingerprint(model: SentenceModel) -> str:
    """A content key for the model's weights: every tensor's shape and sum and a strided sample of its values
    (milliseconds, where hashing all 438 MB would take a second)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}{float(flat.double().sum()):.10e}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:20]


def cached_calibration(model: SentenceModel, ids: Sequence[Sequence[int]], device: torch.device) -> Calibration:
    """The model's calibration, from the cache when these weights were calibrated before."""
    path = cache_root() / "calibration" / f"{weights_fingerprint(model)}-{len(ids)}-v{RECIPE_VERSION}.pt"
    if path.is_file():
        try:
            return Calibration(**torch.load(path, weights_only=True), cache_path=path)
        except Exception as error:  # a damaged cache file is rebuilt, never trusted
            log.warning("ignoring unreadable calibration cache %s (%s)", path, error)
    calibration = calibrate(model, calibration_batches(ids, device))
    calibration.cache_path = path
    save_calibration(calibration, path)
    return calibration


def save_calibration(calibration: Calibration, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{id(calibration)}.partial")
        torch.save({"input_absmax": calibration.input_absmax, "reference": calibration.reference,
                    "guard_results": calibration.guard_results}, partial)
        partial.replace(path)
    except OSError as error:  # a read-only cache costs the next start a pass, nothing more
        log.warning("could not cache the int8 calibration at %s (%s)", path, error)
