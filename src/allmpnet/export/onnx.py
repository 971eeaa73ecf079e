"""ONNX export of the encoder in sentence-transformers' layout (export/layout.py), the encoder that runs it, and
a parity check against PyTorch.

The graph is MPNet in fp32 from the master weights, batch and sequence length dynamic, with two outputs:
`last_hidden_state` (B, T, 768), first, which sentence-transformers' ONNX backend (Optimum's
ORTModelForFeatureExtraction) and fastembed read and pool themselves, and `sentence_embedding` (B, 768), the
pooled and normalised vector, for plain ONNX Runtime users. Tokenization stays outside.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from allmpnet.encode.batching import TokenBudget, embed_in_batches
from allmpnet.encode.encoder import Encoder
from allmpnet.encode.tokenizer import TextTokenizer
from allmpnet.errors import InvalidInputType
from allmpnet.export.layout import GRAPH_NAME, ONNX_SUBDIR, export_dir_of, export_settings, write_layout
from allmpnet.model import PackedBatch, SentenceModel

PARITY_TEXTS = ["This is an example sentence", "Each sentence is converted", "", "A man is playing a guitar.",
                "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon.",
                " ".join(["a long text that runs past the 128 word pieces the published tokenizer file keeps"] * 40)]
INPUTS = ["input_ids", "attention_mask"]
OUTPUTS = ["last_hidden_state", "sentence_embedding"]


class SentenceGraph(nn.Module):
    """What gets traced: the fp32 sentence model on a padded batch (the interface ONNX runtimes expect), packed
    inside the graph with padded attention; token vectors are zero at padding."""

    def __init__(self, model: SentenceModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = PackedBatch.from_padded(input_ids, attention_mask)
        tokens = self.model.network(batch)  # (N, C)
        pooled = self.model.pooling(tokens, batch)
        if self.model.normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return batch.unpack(tokens, input_ids.shape[1]), pooled


def export_onnx(encoder: Encoder, out_dir: str | Path, opset: int = 17) -> Path:
    """Write the export folder (sentence-transformers' layout, fp32 graph at onnx/model.onnx); returns the graph."""
    out = Path(out_dir)
    write_layout(encoder.model, encoder.model_dir, out, encoder.max_seq_length)
    path = out / ONNX_SUBDIR / GRAPH_NAME
    path.parent.mkdir(exist_ok=True)
    graph = SentenceGraph(encoder.model).float().eval()
    # a padded row in the example keeps the mask arithmetic in the traced graph general
    ids, mask = encoder.tokenizer.pad([[0, 100, 200, 300, 2], [0, 100, 2]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; it needs no onnxscript
        torch.onnx.export(graph, (ids, mask), str(path), dynamo=False, opset_version=opset,
                          input_names=INPUTS, output_names=OUTPUTS,
                          dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                                        "attention_mask": {0: "batch_size", 1: "sequence_length"},
                                        "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
                                        "sentence_embedding": {0: "batch_size"}})
    return path


class OnnxEncoder:
    """Runs an export with ONNX Runtime: texts -> vectors, with Encoder.encode's batch planner.

    path: the export folder, or a .onnx file inside it (onnx/model.onnx, onnx/model_int8.onnx); the tokenizer,
    max_seq_length and normalisation come from the folder. tokenizer: an Encoder's own, to tokenize as it does
    (the same ids where its max_seq_length is the folder's)."""

    def __init__(self, path: str | Path, tokenizer: TextTokenizer | None = None, *, threads: int | None = None,
                 max_batch_tokens: int | None = 16384):
        if not isinstance(path, (str, Path)):
            raise InvalidInputType(f"OnnxEncoder takes the export folder's path (or its .onnx file), got "
                                   f"{type(path).__name__}")
        if tokenizer is not None and not isinstance(tokenizer, TextTokenizer):
            raise InvalidInputType(f"OnnxEncoder's second argument is an optional TextTokenizer (the folder's own "
                                   f"is used without it), got {type(tokenizer).__name__} {tokenizer!r}: pass the "
                                   f"export folder, or its .onnx file, alone")
        import onnxruntime as ort
        self.folder, self.graph_path = export_dir_of(path)
        max_seq_length, pad_id, self.normalize = export_settings(self.folder)
        self.tokenizer = tokenizer or TextTokenizer.from_dir(self.folder, max_seq_length, pad_id)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.graph_path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in self.session.get_outputs()]
        # graphs from other exporters (sentence-transformers' own) give token vectors alone: pooled here
        self.pooled_output = "sentence_embedding" in names
        self.output = "sentence_embedding" if self.pooled_output else names[0]
        self.max_batch_tokens = max_batch_tokens
        self.dim = int(self.embed_ids(self.tokenizer([""]).ids).shape[1])  # the graph leaves it symbolic

    def embed_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        input_ids, mask = self.tokenizer.pad(ids)
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}
        out = self.session.run([self.output], feeds)[0]
        if self.pooled_output:
            return out
        weights = feeds["attention_mask"][:, :, None].astype(np.float32)
        pooled = (out * weights).sum(1) / np.maximum(weights.sum(1), 1.0)
        if self.normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled

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
    """Compare an export's vectors (folder or .onnx inside it) with the fp32 PyTorch encoder's on the same texts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that long texts were truncated: both sides truncate them
        expected = encoder.with_precision("fp32").encode(list(texts), show_progress_bar=False)
    got = OnnxEncoder(graph_path).encode(texts)
    return compare(got, expected)


def compare(got: np.ndarray, expected: np.ndarray) -> Parity:
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1) + 1e-12)
    return Parity(float(np.abs(got - expected).max()) if len(got) else 0.0, float(cosine.min(initial=1.0)))
