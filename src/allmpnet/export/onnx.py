"""ONNX export of the encoder (ids + mask -> sentence vectors), an ONNX Runtime int8 variant, and a parity check.

The graph holds the whole sentence model: MPNet, pooling and normalisation, in fp32 from the master weights,
with batch and sequence length dynamic. Tokenization stays outside (tokenizer.json is copied beside the graph).
"""
from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from allmpnet.encode.batching import TokenBudget, embed_in_batches
from allmpnet.encode.encoder import Encoder
from allmpnet.encode.tokenizer import TextTokenizer
from allmpnet.model import PackedBatch, SentenceModel

PARITY_TEXTS = ["This is an example sentence", "Each sentence is converted", "", "A man is playing a guitar.",
                "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon."]


class SentenceGraph(nn.Module):
    """What gets traced: the fp32 sentence model on a padded batch (the interface ONNX runtimes expect), packed
    inside the graph with padded attention."""

    def __init__(self, model: SentenceModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(PackedBatch.from_padded(input_ids, attention_mask))  # (B, dim)


def export_onnx(encoder: Encoder, out_dir: str | Path, opset: int = 17) -> Path:
    """Write out_dir/model.onnx (fp32) plus the tokenizer files; returns the graph's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    graph = SentenceGraph(encoder.model).eval()
    # a padded row in the example keeps the mask arithmetic in the traced graph general
    ids, mask = encoder.tokenizer.pad([[0, 100, 200, 300, 2], [0, 100, 2]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; it needs no onnxscript
        torch.onnx.export(graph, (ids, mask), str(path), dynamo=False, opset_version=opset,
                          input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "sentence_embedding": {0: "batch"}})
    for name in TextTokenizer.FILES:
        if (encoder.model_dir / name).is_file():
            shutil.copyfile(encoder.model_dir / name, out / name)
    return path


def quantize_int8(fp32_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Dynamic int8 (per-channel int8 weights, int8 activations scaled per batch) with ONNX Runtime's quantizer."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    fp32_path = Path(fp32_path)
    out_path = Path(out_path) if out_path else fp32_path.with_name("model.int8.onnx")
    import logging
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint we do not need
    quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True)
    return out_path


class OnnxEncoder:
    """Runs an exported graph with ONNX Runtime: texts -> vectors, with Encoder.encode's batch planner."""

    def __init__(self, graph_path: str | Path, tokenizer: TextTokenizer, threads: int | None = None,
                 max_batch_tokens: int | None = 16384):
        import onnxruntime as ort
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens

        self.dim = int(self.embed_ids(tokenizer([""]).ids).shape[1])  # the graph leaves it symbolic

    def embed_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        input_ids, mask = self.tokenizer.pad(ids)
        return self.session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})[0]

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        tokenized = self.tokenizer(list(texts))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        embed_in_batches(tokenized.ids, self.embed_ids, TokenBudget(self.max_batch_tokens, batch_size), out)
        return out


@dataclass
class Parity:
    max_abs_diff: float  # largest element-wise difference to fp32 PyTorch
    min_cosine: float  # worst row's cosine to fp32 PyTorch


def check_parity(encoder: Encoder, graph_path: str | Path, texts: Sequence[str] = PARITY_TEXTS) -> Parity:
    """Compare the graph's vectors with the fp32 PyTorch encoder's on the same texts."""
    expected = encoder.with_precision("fp32").encode(list(texts), show_progress_bar=False)
    got = OnnxEncoder(graph_path, encoder.tokenizer).encode(texts)
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1) + 1e-12)
    return Parity(float(np.abs(got - expected).max()), float(cosine.min()))
