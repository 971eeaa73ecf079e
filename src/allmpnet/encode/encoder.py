"""`Encoder`: texts in, sentence vectors out — a tokenizer, a SentenceModel and a precision plan.

The pipeline of one call: texts -> tokenizer (ragged ids, truncation counted) -> batch planner (length-sorted
batches within a token budget) -> `embed_ids` (pack the batch's tokens, run the plan's inference copy, pool per
text) -> vectors back in the caller's order. Options such as `normalize` are per call, so one Encoder serves
concurrent threads.
"""
from __future__ import annotations

import os
import threading
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from allmpnet.backends import cpu as cpu_backend
from allmpnet.encode.batching import (SORT_WINDOW, TokenBudget, check_finite, default_batch_tokens, embed_in_batches,
                                     prefetched, windows)
from allmpnet.encode.calibration import calibration_texts
from allmpnet.encode.documents import ChunkSettings, DocumentChunks, chunk_token_ranges
from allmpnet.encode.inference import build_inference
from allmpnet.encode.precision import Capabilities, PrecisionPlan, plan_precision
from allmpnet.encode.quantize import Quantizer, resolve as resolve_quantizer
from allmpnet.encode.tokenizer import TextTokenizer, Tokenized
from allmpnet.errors import InvalidInput, InvalidInputType
from allmpnet.model import PackedBatch, Pooling, SentenceModel
from allmpnet.settings import precision_or_default
from allmpnet.weights import DEFAULT_MODEL, resolve, verify_weights

DEFAULT = object()  # max_batch_tokens not given: the device's default budget


class TruncationWarning(UserWarning):
    pass


class Encoder:
    """all-mpnet-base-v2 (or any MPNet sentence-embedding directory): MPNet -> pooling -> optional L2 normalize."""

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device | None = None,
                 precision: str | PrecisionPlan | None = None, max_seq_length: int | None = None,
                 max_batch_tokens: int | None = DEFAULT):  # type: ignore[assignment]
        """precision: "fp32" (exact: the vectors of sentence-transformers), "bf16", "fp16", "int8", "bf16+int8",
        or "auto" (the fastest path this hardware has whose quality passes), or a PrecisionPlan; see
        encode/precision.py. None: $ALLMPNET_PRECISION if set, else "fp32" (settings.default_precision).
        max_batch_tokens caps the padded tokens of one encode() batch (default: 4096 on CPU, 16384 on GPU;
        None: batch_size alone decides, 32 if unset)."""
        self.device = resolve_device(device)
        # first: a precision this device lacks (or a bad $ALLMPNET_PRECISION) fails before loading
        self.plan = as_plan(precision_or_default(precision), self.device)
        require_device(self.device)
        self.model_dir = resolve(model)
        self.name = str(model)
        verify_weights(self.model_dir)
        self.model = SentenceModel.load(self.model_dir).to(self.device)
        limit = self.model.max_positions
        self.tokenizer = TextTokenizer.from_dir(self.model_dir, min(max_seq_length or self.model.max_seq_length or limit,
                                                                    limit), self.model.network.cfg.pad_token_id)
        if max_batch_tokens is DEFAULT:
            max_batch_tokens = default_batch_tokens(self.device.type)
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise InvalidInput(f"max_batch_tokens must be at least 1 or None, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        self._inference: SentenceModel | None = None
        self._exact: tuple[cpu_backend.FusedX86Stack | None] | None = None  # (_exact_stack's,) once built
        self._lock = threading.Lock()
        self.sort_window = SORT_WINDOW  # texts tokenized and length-sorted together

    def with_precision(self, precision: str | PrecisionPlan) -> "Encoder":
        """Another Encoder on the same model and tokenizer (no reload), running `precision`."""
        other = object.__new__(Encoder)
        other.__dict__.update(self.__dict__)
        other.plan = as_plan(precision, self.device)
        other._inference, other._exact, other._lock = None, None, threading.Lock()
        return other

    # ---------------------------------------------------------------- what the model is

    @property
    def precision(self) -> str:
        return self.plan.name

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def normalize(self) -> bool:
        return self.model.normalize

    @property
    def pooling(self) -> Pooling:
        return self.model.pooling

    @property
    def max_seq_length(self) -> int:
        return self.tokenizer.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.tokenizer.max_seq_length = value

    # ---------------------------------------------------------------- the inference copy

    def inference_model(self) -> SentenceModel:
        """The model encode() runs: the plan's frozen copy (in exact fp32, the model itself), built on first use."""
        model = self._inference
        if model is None:
            with self._lock:
                if self._inference is None:
                    self._inference = self._build_inference()
                model = self._inference
        return model

    def _build_inference(self) -> SentenceModel:
        model, self.plan = build_inference(self.model, self.plan, self.device,
                                           lambda: self.tokenizer(calibration_texts()).ids, self.pack)
        return model

    def refresh(self) -> None:
        """Rebuild the inference copy from the model's current weights on next use: call it after changing them
        (training does, whenever the model returns to eval mode)."""
        with self._lock:
            self._inference = self._exact = None

    def train(self, mode: bool = True) -> "Encoder":
        """Put the model in training mode, or back in eval mode; either way the inference copy is rebuilt from the
        weights on next use (and takes no memory while training)."""
        self.model.train(mode)
        self.refresh()
        return self

    def eval(self) -> "Encoder":
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.model.training

    # ---------------------------------------------------------------- texts -> vectors

    def tokenize(self, texts: Sequence[str]) -> Tokenized:
        """Ids truncated at max_seq_length; a ValueError names a text that is not valid Unicode."""
        return self.tokenizer(check_texts(texts))

    def truncated_indices(self, texts: Sequence[str]) -> list[int]:
        """Positions of the texts longer than max_seq_length word pieces (their tails are not embedded)."""
        return [i for i, t in enumerate(self.tokenize(texts).truncated) if t]

    def pack(self, ids: Sequence[Sequence[int]], for_training: bool = False) -> PackedBatch:
        """Ragged token ids -> a packed batch on this encoder's device, laid out as the plan says (training: the
        plain layout, with no kernel of ours, which have no backward pass)."""
        plan = self.plan
        cfg = self.model.network.cfg
        # rows are bucketed for oneDNN's per-shape caches; a batch the fused stack takes needs no filler
        bucket = (plan.bucket_rows and not for_training and plan.fused_stack_tokens is not None
                  and sum(map(len, ids)) > plan.fused_stack_tokens)
        kernels = {} if for_training or self.device.type != "cpu" else cpu_backend.attention_options(
            plan.short_attention_kernel, plan.block_attention_kernel, cfg.hidden_size, cfg.num_attention_heads)
        return PackedBatch.from_ids(ids, self.device, plan.attention, bucket_rows=bucket, **kernels)

    @torch.inference_mode()
    def embed_ids(self, ids: Sequence[Sequence[int]], normalize: bool | None = None) -> torch.Tensor:
        """One batch of ragged token ids -> (B, dim) float32 vectors on the CPU (no sorting or splitting).

        Under a reduced precision, a text that holds a special token inside (a "<s>" or "</s>" it wrote itself)
        runs in fp32 on its own: such tokens drive the model's activations to extremes that bf16 and int8 do not
        survive ("to <s>" under int8: cosine 0.28 to fp32; "<s> to" with int16 activations: 0.89), while no text
        without them fell below 0.99 (2,000 generated texts of any code point, tests/test_parity_fuzz.py)."""
        if len(ids) == 0:
            return torch.empty((0, self.dim), dtype=torch.float32)
        if self.plan.runs_the_model_itself and self.model.training:  # dropout would be on
            raise RuntimeError("the model is in training mode: call encoder.eval() before encoding")
        if not self.plan.exact:
            special = self.tokenizer.inner_special_ids
            exact_rows = [i for i, row in enumerate(ids) if len(row) > 2 and not special.isdisjoint(row[1:-1])]
            if exact_rows:
                return self._embed_apart(ids, exact_rows, normalize)
        return self._embed_planned(ids, normalize)

    def _embed_apart(self, ids: Sequence[Sequence[int]], exact_rows: list[int],
                     normalize: bool | None) -> torch.Tensor:
        """embed_ids with rows `exact_rows` through the fp32 model, one at a time (the same bits in any batch)."""
        if self.model.training:  # dropout would be on in the master model
            raise RuntimeError("the model is in training mode: call encoder.eval() before encoding")
        vectors = torch.empty((len(ids), self.dim), dtype=torch.float32)
        exact = set(exact_rows)
        rest = [i for i in range(len(ids)) if i not in exact]
        if rest:
            vectors[rest] = self._embed_planned([ids[i] for i in rest], normalize)
        stack = self._exact_stack()
        unit = self.model.normalize if normalize is None else normalize
        for i in exact_rows:
            # on x86 the fp32 model's weights through the fused call (its bits depend on no batch or thread
            # count); elsewhere the model itself (F.linear and SDPA in fp32); no copy of the weights either way
            vector = None if stack is None else stack.sentence_vectors([ids[i]], unit)
            if vector is None:
                vector = self.model(PackedBatch.from_ids([ids[i]], self.device), normalize).float().cpu()
            vectors[i] = vector[0]
        check_finite(vectors[exact_rows])
        return vectors

    def _exact_stack(self) -> cpu_backend.FusedX86Stack | None:
        """The fused call on the fp32 model's own weights, for texts that run in fp32 apart (None where no
        fp32-weight kernel runs); built on first use."""
        if self._exact is None:
            with self._lock:
                if self._exact is None:
                    kernel = (Capabilities.detect(self.device, "fp32").fp32_fused_kernel
                              if self.device.type == "cpu" else None)
                    self._exact = (cpu_backend.exact_stack(self.model, kernel),)
        return self._exact[0]

    def _embed_planned(self, ids: Sequence[Sequence[int]], normalize: bool | None) -> torch.Tensor:
        model = self.inference_model()
        # token ids straight into the fused forward pass's one C call where the copy has it (which also checks the
        # vectors are finite): no packed batch
        vectors = cpu_backend.sentence_vectors(model, ids, model.normalize if normalize is None else normalize)
        if vectors is None:
            vectors = model(self.pack(ids), normalize).float().cpu()
            check_finite(vectors)
        return vectors

    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None, normalize: bool | None = None,
                   progress=None) -> torch.Tensor:
        """Ragged token ids -> (n, dim) float32, in length-sorted batches within the budget, in the given order."""
        out = torch.empty((len(ids), self.dim), dtype=torch.float32)
        embed_in_batches(ids, lambda batch: self.embed_ids(batch, normalize), self.budget(batch_size), out,
                         progress=progress)
        return out

    def budget(self, batch_size: int | None = None) -> TokenBudget:
        # no budget and no count: sentence-transformers' 32 rather than one batch of a whole window
        max_texts = batch_size if batch_size is not None or self.max_batch_tokens is not None else 32
        return TokenBudget(self.max_batch_tokens, max_texts)

    def encode(self, texts: str | Sequence[str], batch_size: int | None = None, normalize: bool | None = None,
               convert_to: Literal["numpy", "torch"] = "numpy", show_progress_bar: bool | None = None,
               quantize: str | Quantizer | None = None) -> np.ndarray | torch.Tensor:
        """Embed texts in length-sorted batches; the result keeps the caller's order.

        batch_size caps the texts per batch; None leaves it to the token budget (max_batch_tokens), which gives
        short texts large batches and long texts small ones.

        A single string gives a 1-D vector. normalize=None follows the model directory (True for all-mpnet-base-v2);
        normalize=False returns the raw pooled vectors of a model that normalizes.

        quantize: "int8", "uint8", "binary" or "ubinary" returns quantized vectors (encode/quantize.py); int8/uint8
        then take their calibration ranges from these vectors, so pass a `Quantizer.calibrate(...)` to cut every
        call's vectors into the same buckets.
        """
        quantizer = resolve_quantizer(quantize)
        single = isinstance(texts, str)
        texts = check_texts([texts] if single else texts)
        if convert_to not in ("numpy", "torch"):
            raise InvalidInput(f"convert_to must be 'numpy' or 'torch', got {convert_to!r}")
        budget = self.budget(batch_size)
        show = len(texts) > 256 if show_progress_bar is None else show_progress_bar
        if len(texts) == 1 and not show:
            # a query: one batch, nothing to sort or to place; each step skipped is ~10-50 us of a few ms
            tokenized = self.tokenizer(texts)
            truncated = sum(tokenized.truncated)
            out = self.embed_ids(tokenized.ids, normalize)
        else:
            out, truncated = self._encode_in_windows(texts, budget, normalize, show)
        if truncated:
            warnings.warn(f"{truncated} of {len(texts)} texts were longer than {self.max_seq_length} word pieces and "
                          "were truncated; Encoder.truncated_indices(texts) lists them", TruncationWarning,
                          stacklevel=2)
        if quantizer is not None:
            out = torch.from_numpy(quantizer(out.numpy()))
        result = out[0] if single else out
        return result.numpy() if convert_to == "numpy" else result

    def _encode_in_windows(self, texts: Sequence[str], budget: TokenBudget, normalize: bool | None,
                           show: bool) -> tuple[torch.Tensor, int]:
        """(len(texts), dim) vectors in the texts' order, and how many texts were truncated."""
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        truncated = 0
        # no bar at all when none is shown: a disabled one still costs a query ~50 us
        with tqdm(total=len(texts), desc="encoding", unit="text") if show else nullcontext() as bar:
            # the next window is tokenized on a background thread while this one runs through the model
            for (start, _), window in prefetched(windows(len(texts), self.sort_window),
                                                    lambda span: self.tokenizer(texts[span[0]:span[1]])):
                truncated += sum(window.truncated)
                embed_in_batches(window.ids, lambda batch: self.embed_ids(batch, normalize), budget, out, start,
                                 bar.update if show else None)
        return out, truncated

    def encode_documents(self, docs: str | Sequence[str], chunk_tokens: int | None = None,
                         overlap: int | None = None, batch_size: int | None = None,
                         show_progress_bar: bool | None = None) -> DocumentChunks:
        """Embed whole documents as chunks of at most `chunk_tokens` model tokens (nothing is truncated).

        Chunks follow the tokenizer's word pieces and end at paragraph or sentence ends where they can; each
        repeats up to `overlap` word pieces of the one before (encode/documents.py). Returns every chunk's vector
        with its document's position in `docs` and its [start, end) character span in that document.
        Defaults: 128 tokens, 16 of overlap (measured: benchmarks/results/long_documents/), scaled down for a
        model whose max_seq_length is shorter.
        """
        settings = ChunkSettings.for_model(self.max_seq_length, chunk_tokens, overlap)
        docs = check_texts([docs] if isinstance(docs, str) else docs)
        vectors, documents, spans = [], [], []
        show = sum(map(len, docs)) > 200_000 if show_progress_bar is None else show_progress_bar
        with tqdm(total=len(docs), desc="encoding documents", unit="doc", disable=not show) as bar:
            for start, stop in document_windows(docs):
                ids, positions, window_spans = chunk_token_ranges(self.tokenizer, docs[start:stop], settings)
                vectors.append(self.encode_ids(ids, batch_size).numpy())
                documents.extend(p + start for p in positions)
                spans.extend(window_spans)
                bar.update(stop - start)
        return DocumentChunks(np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32),
                              np.asarray(documents, dtype=np.int64).reshape(-1),
                              np.asarray(spans, dtype=np.int64).reshape(-1, 2))

    def save(self, out_dir: str | os.PathLike, max_seq_length: int | None = None) -> Path:
        """Write the sentence-transformers layout: a directory both libraries load with the same vectors. It lists
        this encoder's max_seq_length unless max_seq_length says otherwise."""
        return self.model.save(out_dir, max_seq_length or self.max_seq_length)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device for a name (None: cuda if available, else cpu); a ValueError for a name allmpnet cannot run."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidInput(f"unknown device {str(device)!r}: expected cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda", "mps", "xpu"):
        raise InvalidInput(f"device {str(device)!r}: allmpnet runs on cpu or cuda, not {resolved.type}")
    return resolved


def require_device(device: torch.device) -> None:
    """A ValueError saying what this machine has, when it lacks `device`."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise InvalidInput(f"device {str(device)!r}: CUDA is not available on this machine; use --device cpu")
    if device.index is not None and device.index >= count:
        raise InvalidInput(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to "
                           f"cuda:{count - 1}")


def as_plan(precision: str | PrecisionPlan, device: torch.device) -> PrecisionPlan:
    return precision if isinstance(precision, PrecisionPlan) else plan_precision(precision, device)


def document_windows(docs: Sequence[str], max_chars: int = 2_000_000) -> list[tuple[int, int]]:
    """Consecutive groups of documents of about max_chars characters (a longer document is a group alone):
    chunked and embedded together, so memory stays bounded while batches stay full."""
    groups, start, size = [], 0, 0
    for i, doc in enumerate(docs):
        if i > start and size + len(doc) > max_chars:
            groups.append((start, i))
            start, size = i, 0
        size += len(doc)
    if start < len(docs):
        groups.append((start, len(docs)))
    return groups


def check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)) or not hasattr(texts, "__iter__"):
        raise InvalidInputType(f"texts must be a string or a sequence of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputType(f"texts[{i}] is {type(text).__name__}, expected str")
    return texts
