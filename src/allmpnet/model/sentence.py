"""`SentenceModel`: MPNet -> pooling -> optional L2 normalisation, read from and written to the
sentence-transformers directory layout (modules.json, 1_Pooling/config.json, 2_Normalize, …).

It is what a checkpoint is: training updates it, export traces it, saving writes it, and the encoder runs it
(or a swapped inference copy of it). The tokenizer stays outside; the directory's tokenizer files are copied
along when the model is saved elsewhere.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from allmpnet.model.files import ModelFileError, read_json
from allmpnet.model.mpnet import MPNet
from allmpnet.model.packing import PackedBatch
from allmpnet.model.pooling import Pooling

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class SentenceModel(nn.Module):
    def __init__(self, network: MPNet, pooling: Pooling, normalize: bool = True, max_seq_length: int | None = None,
                 source: Path | None = None):
        super().__init__()
        self.network = network
        self.pooling = pooling
        self.normalize = normalize  # the model's own choice (its modules.json lists Normalize)
        self.max_seq_length = max_seq_length  # the inference limit it lists (sentence_bert_config.json)
        self.source = source  # the directory it was read from: where its tokenizer files live

    @property
    def dim(self) -> int:
        return self.pooling.output_dim

    @property
    def max_positions(self) -> int:
        """The most tokens a text can have: the position table's size less the padding slots."""
        cfg = self.network.cfg
        return cfg.max_position_embeddings - cfg.pad_token_id - 1

    def forward(self, batch: PackedBatch, normalize: bool | None = None) -> torch.Tensor:
        """A packed batch of B texts -> (B, dim) fp32 sentence vectors; normalize=None follows the model."""
        pooled = self.pooling(self.network(batch), batch)
        return F.normalize(pooled, p=2, dim=1) if (self.normalize if normalize is None else normalize) else pooled

    @classmethod
    def load(cls, model_dir: str | Path) -> "SentenceModel":
        model_dir = Path(model_dir)
        modules = read_modules(model_dir)
        network = MPNet.from_pretrained(model_dir / modules.get("Transformer", ""))
        pooling_dir = modules.get("Pooling")
        pooling = (Pooling.load(model_dir / pooling_dir) if pooling_dir is not None
                   else Pooling(word_embedding_dimension=network.cfg.hidden_size))
        if pooling.word_embedding_dimension != network.cfg.hidden_size:
            raise ModelFileError(f"{model_dir / pooling_dir / 'config.json'} pools {pooling.word_embedding_dimension}-d "
                                 f"token vectors, but the network's hidden_size is {network.cfg.hidden_size}")
        return cls(network, pooling, "Normalize" in modules, configured_max_seq_length(model_dir),
                   source=model_dir).eval()

    def write_modules(self, out: Path) -> None:
        """modules.json and the Pooling (and Normalize) folders, as sentence-transformers writes them."""
        self.pooling.save(out / "1_Pooling")
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.normalize:
            (out / "2_Normalize").mkdir(exist_ok=True)
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        write_json(out / "modules.json", modules)

    def save(self, out_dir: str | Path, max_seq_length: int | None = None) -> Path:
        """Write the sentence-transformers layout (both libraries load it with the same vectors); max_seq_length
        overrides the limit it lists (training truncates shorter than the model is used)."""
        out = Path(out_dir)
        self.network.save_pretrained(out)
        if self.source is not None and self.source.resolve() != out.resolve():
            for name in TOKENIZER_FILES + ("README.md",):
                if (self.source / name).is_file():
                    shutil.copyfile(self.source / name, out / name)
        self.write_modules(out)
        limit = max_seq_length or self.max_seq_length or self.max_positions
        write_json(out / "sentence_bert_config.json", {"max_seq_length": limit, "do_lower_case": False})
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
    entries = read_json(path, list)
    if not all(isinstance(m, dict) and isinstance(m.get("type"), str) and isinstance(m.get("path", ""), str)
               for m in entries):
        raise ModelFileError(f"{path} must list objects with a 'type' string (and a 'path' string)")
    modules = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in entries}
    unknown = sorted(set(modules) - {"Transformer", "Pooling", "Normalize"})
    if unknown:
        raise ModelFileError(f"{path} lists modules allmpnet does not implement: {unknown}")
    if "Transformer" not in modules:
        raise ModelFileError(f"{path} lists no Transformer module")
    return modules


# The settings sentence-transformers' Transformer module reads from sentence_bert_config.json, in any release
# (v2's model_args, tokenizer_args, config_args and cache_dir included): it refuses a file with any other key
# (Transformer.__init__ raises a TypeError), and so do we.
SENTENCE_BERT_KEYS = frozenset({
    "max_seq_length", "do_lower_case", "tokenizer_name_or_path", "backend", "model_args", "tokenizer_args",
    "config_args", "cache_dir", "model_kwargs", "processor_kwargs", "config_kwargs", "transformer_task",
    "modality_config", "module_output_name", "processing_kwargs", "unpad_inputs", "query_length", "document_length",
    "query_expansion"})


def configured_max_seq_length(model_dir: Path) -> int | None:
    """sentence_bert_config.json's max_seq_length; newer sentence-transformers keep it as the tokenizer's limit."""
    path = model_dir / "sentence_bert_config.json"
    if path.is_file():
        value = sentence_bert_max_seq_length(path)
        if value is not None:
            return value
    path = model_dir / "tokenizer_config.json"
    if path.is_file():
        value = read_json(path).get("model_max_length")
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 2:
                raise ModelFileError(f"{path}: model_max_length must leave room for the two special tokens, "
                                     f"got {value}")
            return value
    return None


def sentence_bert_max_seq_length(path: Path) -> int | None:
    """The max_seq_length a sentence_bert_config.json sets, None where it sets none.

    The file must be a JSON object of sentence-transformers' Transformer settings (SENTENCE_BERT_KEYS): any other
    key, as in {"x": 1}, is refused as sentence-transformers itself refuses it. max_seq_length, when given, must
    be an integer of at least 2 (room for <s> and </s>); null, which older releases wrote when no limit was set,
    and an absent key leave the limit to the tokenizer, as does an empty object (sentence-transformers reads one
    as no settings at all)."""
    settings = read_json(path)
    unknown = sorted(set(settings) - SENTENCE_BERT_KEYS)
    if unknown:
        listed = ", ".join(repr(k) for k in unknown)
        raise ModelFileError(f"{path}: {listed} {'is' if len(unknown) == 1 else 'are'} not a setting of "
                             f"sentence-transformers' Transformer module (which takes max_seq_length, do_lower_case "
                             f"and the like, and refuses other keys)")
    value = settings.get("max_seq_length")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ModelFileError(f"{path}: max_seq_length must be a positive integer that leaves room for the two "
                             f"special tokens (at least 2), got {value!r}")
    return value


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
