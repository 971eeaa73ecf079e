"""`Encoder`: texts in, sentence vectors out, from a sentence-transformers model directory."""
from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from allmpnet.encode.batching import prefetched, token_budget_batches, windows
from allmpnet.encode.fused import FastMPNet, inference_network, right_padded
from allmpnet.encode.kernels import cpu_flags, kernels_unavailable
from allmpnet.encode.tokenizer import TextTokenizer, Tokenized
from allmpnet.model import MPNet, Pooling
from allmpnet.weights import DEFAULT_MODEL, resolve, verify_weights

# precision -> the dtype activations (and, except for int8, weights) are computed in
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16,
              "bf16+int8": torch.bfloat16}
# batches of at most this many packed tokens use int8 weights in "bf16+int8": they are memory-bound, and int8
# weights are half the bytes (measured on 2 AMX cores: ~4 ms vs ~9 ms for the 48 projections at 11 rows, still
# 20% faster at 512; oneDNN's bf16 wins from ~1k rows, where the maths dominates)
INT8_MAX_ROWS = {"int8": sys.maxsize, "bf16+int8": 512}
# texts tokenized and length-sorted together: bounds memory for huge inputs while keeping padding low
SORT_WINDOW = 16384
# padded tokens per batch: enough rows that each weight matrix, streamed from memory once per batch, is used for
# a full-speed matmul, yet few enough that the batch's activations stay in cache. Measured on 2 Sapphire Rapids
# cores (bf16): 2048-4096 is best on both sentences and 256-token passages; 1024 and 8192 are ~10-25% slower
DEFAULT_BATCH_TOKENS = 4096


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": on CPUs with AMX "bf16+int8", on other CPUs that compute bf16 natively (AVX512-BF16) and on bf16
    GPUs "bf16", fp16 on older GPUs, else fp32. Explicit choices are returned as given after validation."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type != "cpu" or not cpu_has_native_bf16():
            return "fp32"
        return "bf16" if kernels_unavailable() else "bf16+int8"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision in INT8_MAX_ROWS:
        why = "it runs on CPUs only" if device.type != "cpu" else kernels_unavailable()
        if why:
            raise ValueError(f"precision {precision!r} is not available: {why}")
    return precision


def cpu_has_native_bf16() -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def tensor_versions(tensors: list[torch.Tensor]) -> list[int]:
    # in-place updates (optimizer steps, load_state_dict) bump a tensor's version: a cheap staleness check
    return [t._version for t in tensors]


class TruncationWarning(UserWarning):
    pass


class Encoder(torch.nn.Module):
    """all-mpnet-base-v2 (or any MPNet sentence-embedding directory): MPNet -> pooling -> optional L2 normalize."""

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device | None = None,
                 precision: str = "fp32", max_seq_length: int | None = None,
                 max_batch_tokens: int | None = DEFAULT_BATCH_TOKENS):
        """precision: "fp32" (exact, matches sentence-transformers), "bf16", "fp16", "int8" (CPUs with AMX: int8
        weights, bf16 maths), "bf16+int8" (bf16, but batches of at most 512 tokens, such as single queries, use
        int8 weights), or "auto" (the fastest the hardware computes natively). Inference runs a frozen copy of
        the network on packed (unpadded) tokens, in the chosen precision (in fp32 it shares the weights; on CPU
        in bf16 with oneDNN layers); training and gradients always go through the fp32 weights, under autocast
        for bf16/fp16 (bf16 for the int8 choices).
        max_batch_tokens caps the padded tokens of one encode() batch (None: batch_size alone decides, 32 if unset)."""
        super().__init__()
        self.model_dir = resolve(model)
        self.name = str(model)
        verify_weights(self.model_dir)
        modules = read_modules(self.model_dir)
        self.network = MPNet.from_pretrained(self.model_dir)
        pooling_dir = modules.get("Pooling")
        self.pooling = (Pooling.load(self.model_dir / pooling_dir) if pooling_dir is not None
                        else Pooling(word_embedding_dimension=self.network.cfg.hidden_size))
        self.normalize = "Normalize" in modules
        configured = configured_max_seq_length(self.model_dir)
        limit = self.network.cfg.max_position_embeddings - self.network.cfg.pad_token_id - 1
        self.tokenizer = TextTokenizer.from_dir(self.model_dir, min(max_seq_length or configured or limit, limit),
                                                self.network.cfg.pad_token_id)
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1 or None, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._fast = None  # (network, its parameters, their versions, inference copy), built on first use
        self.precision = resolve_precision(precision, self.device)
        self.to(self.device)
        self.eval()

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = resolve_precision(value, self.device)
        self._fast = None

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half() …: the fast copy no longer matches
        self._fast = None
        return super()._apply(fn, *args, **kwargs)

    def inference_network(self) -> FastMPNet:
        """The network encode() runs: a frozen copy in the chosen precision (in fp32 it shares the weights)."""
        if self._fast is not None:
            network, parameters, versions, fast = self._fast
            # walking the module tree costs ~0.3 ms, a lot for a 9 ms query: only a swapped network triggers it
            if network is self.network and tensor_versions(parameters) == versions:
                return fast
        self._fast = None  # free the stale copy before building the new one
        parameters = list(self.network.parameters())
        fast = inference_network(self.network, PRECISIONS[self.precision], self.device,
                                 INT8_MAX_ROWS.get(self.precision, 0))
        self._fast = (self.network, parameters, tensor_versions(parameters), fast)
        return fast

    @property
    def dim(self) -> int:
        return self.pooling.output_dim

    @property
    def max_seq_length(self) -> int:
        return self.tokenizer.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.tokenizer.max_seq_length = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, dim) sentence vectors, normalized if the model lists Normalize."""
        if not self.training and not torch.is_grad_enabled() and right_padded(attention_mask):
            tokens = self.inference_network()(input_ids, attention_mask)  # (B, T, C)
        else:  # training, or gradients wanted: fp32 master weights, autocast for low precision
            with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision],
                                enabled=self.precision != "fp32"):
                tokens = self.network(input_ids, attention_mask)  # (B, T, C)
        pooled = self.pooling(tokens.float(), attention_mask)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def tokenize(self, texts: Sequence[str]) -> Tokenized:
        return self.tokenizer(check_texts(texts))

    def truncated_indices(self, texts: Sequence[str]) -> list[int]:
        """Positions of the texts longer than max_seq_length word pieces (their tails are not embedded)."""
        return [i for i, t in enumerate(self.tokenize(texts).truncated) if t]

    @torch.inference_mode()
    def encode(self, texts: str | Sequence[str], batch_size: int | None = None, normalize: bool | None = None,
               convert_to: Literal["numpy", "torch"] = "numpy",
               show_progress_bar: bool | None = None) -> np.ndarray | torch.Tensor:
        """Embed texts in length-sorted batches; the result keeps the caller's order.

        batch_size caps the texts per batch; None leaves it to the token budget (max_batch_tokens), which gives
        short texts large batches and long texts small ones.

        A single string gives a 1-D vector. normalize=None follows the model directory (True for all-mpnet-base-v2);
        normalize=False returns the raw pooled vectors of a model that normalizes.
        """
        single = isinstance(texts, str)
        texts = check_texts([texts] if single else texts)
        if convert_to not in ("numpy", "torch"):
            raise ValueError(f"convert_to must be 'numpy' or 'torch', got {convert_to!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        # no budget and no count: sentence-transformers' 32 rather than one batch of a whole window
        max_texts = batch_size if batch_size is not None or self.max_batch_tokens is not None else 32
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        truncated = 0
        show = len(texts) > 256 if show_progress_bar is None else show_progress_bar
        with tqdm(total=len(texts), desc="encoding", unit="text", disable=not show) as bar:
            # the next window is tokenized on a background thread while this one runs through the model
            for (start, _), window in prefetched(windows(len(texts), SORT_WINDOW),
                                                    lambda span: self.tokenizer(texts[span[0]:span[1]])):
                truncated += sum(window.truncated)
                for rows in token_budget_batches(window.lengths, max_texts, self.max_batch_tokens):
                    ids, mask = self.tokenizer.pad([window.ids[r] for r in rows])
                    vectors = self.embed(ids.to(self.device), mask.to(self.device), normalize)
                    out[torch.from_numpy(rows + start)] = vectors.float().cpu()
                    bar.update(len(rows))
        if truncated:
            warnings.warn(f"{truncated} of {len(texts)} texts were longer than {self.max_seq_length} word pieces and "
                          "were truncated; Encoder.truncated_indices(texts) lists them", TruncationWarning,
                          stacklevel=3)  # past the inference_mode wrapper, to the caller
        result = out[0] if single else out
        return result.numpy() if convert_to == "numpy" else result

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              normalize: bool | None = None) -> torch.Tensor:
        if normalize is None or normalize == self.normalize:
            return self(input_ids, attention_mask)
        saved, self.normalize = self.normalize, normalize
        try:
            return self(input_ids, attention_mask)
        finally:
            self.normalize = saved

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the sentence-transformers layout: a directory both libraries load with the same vectors."""
        out = Path(out_dir)
        self.network.save_pretrained(out)
        for name in TextTokenizer.FILES + ("README.md",):
            if (self.model_dir / name).is_file() and self.model_dir.resolve() != out.resolve():
                shutil.copyfile(self.model_dir / name, out / name)
        self.pooling.save(out / "1_Pooling")
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.normalize:
            (out / "2_Normalize").mkdir(exist_ok=True)
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        write_json(out / "modules.json", modules)
        write_json(out / "sentence_bert_config.json", {"max_seq_length": self.max_seq_length, "do_lower_case": False})
        write_json(out / "config_sentence_transformers.json",
                   {"__version__": {"allmpnet": "0.1.0", "pytorch": torch.__version__},
                    "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})
        return out


def read_modules(model_dir: Path) -> dict[str, str]:
    """modules.json as {module kind: its sub-directory}; a plain transformers directory means mean pooling alone.

    Kinds are the class names (Transformer, Pooling, Normalize): sentence-transformers moved the classes between
    releases (``sentence_transformers.models.Pooling`` became ``…modules.pooling.Pooling``) but kept the names.
    """
    path = model_dir / "modules.json"
    if not path.is_file():
        return {}
    modules = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in json.loads(path.read_text())}
    unknown = sorted(set(modules) - {"Transformer", "Pooling", "Normalize"})
    if unknown:
        raise ValueError(f"{path} lists modules allmpnet does not implement: {unknown}")
    return modules


def configured_max_seq_length(model_dir: Path) -> int | None:
    """sentence_bert_config.json's max_seq_length; newer sentence-transformers keep it as the tokenizer's limit."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        path = model_dir / name
        if path.is_file() and isinstance(value := json.loads(path.read_text()).get(key), int):
            return value
    return None


def check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)) or not hasattr(texts, "__iter__"):
        raise TypeError(f"texts must be a string or a sequence of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    return texts


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
