"""The folder an ONNX export lives in: sentence-transformers' own layout, as `SentenceTransformer.save` writes it
for `backend="onnx"`, so that sentence-transformers, fastembed and plain ONNX Runtime all read it as it is.

    config.json                      model_type mpnet (sentence-transformers and Optimum pick the model class by it)
    modules.json                     Transformer -> 1_Pooling (mean) -> 2_Normalize
    sentence_bert_config.json        max_seq_length (384)
    config_sentence_transformers.json
    1_Pooling/config.json, 2_Normalize/
    tokenizer.json                   truncation at max_seq_length, padding to the batch's longest (never fixed)
    tokenizer_config.json            model_max_length = max_seq_length (fastembed truncates at it)
    special_tokens_map.json, vocab.txt
    onnx/model.onnx                  input_ids, attention_mask -> last_hidden_state, sentence_embedding

The published tokenizer.json carries training's fixed 128-token truncation and padding: a tool that takes it as it
is (fastembed, a plain `tokenizers` user) would embed only the first 128 word pieces of a long text.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from allmpnet.model.files import ModelFileError, read_json
from allmpnet.model.sentence import SentenceModel, sentence_bert_max_seq_length, write_json

ONNX_SUBDIR = "onnx"
GRAPH_NAME = "model.onnx"
COPIED_FILES = ("special_tokens_map.json", "vocab.txt")


class NotAnExportError(ModelFileError):
    """A path that is no ONNX export folder (or no .onnx file inside one)."""


def write_layout(model: SentenceModel, tokenizer_dir: Path, out: Path, max_seq_length: int) -> None:
    """Everything but the graph: the sentence-transformers files and the tokenizer files set for inference."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.network.cfg
    write_json(out / "config.json", cfg.to_hf_dict())
    model.write_modules(out)
    write_json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    write_json(out / "config_sentence_transformers.json",
               {"__version__": {"allmpnet": "0.1.0"}, "prompts": {}, "default_prompt_name": None,
                "similarity_fn_name": "cosine"})

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_seq_length)
    pad_token = tokenizer.id_to_token(cfg.pad_token_id)
    tokenizer.enable_padding(pad_id=cfg.pad_token_id, pad_token=pad_token)  # to the batch's longest text
    tokenizer.save(str(out / "tokenizer.json"))
    config_path = tokenizer_dir / "tokenizer_config.json"
    tokenizer_config = read_json(config_path) if config_path.is_file() else {}
    tokenizer_config.update(model_max_length=max_seq_length, pad_token=pad_token)
    write_json(out / "tokenizer_config.json", tokenizer_config)
    for name in COPIED_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)


def export_dir_of(path: str | Path) -> tuple[Path, Path]:
    """(export folder, graph) for a folder (its onnx/model.onnx) or for a .onnx file inside one (in the folder or
    its onnx/); NotAnExportError where either is missing."""
    path = Path(path)
    if path.is_dir():
        folder, graph = path, path / ONNX_SUBDIR / GRAPH_NAME
        if not graph.is_file() and (path / GRAPH_NAME).is_file():  # a folder written by allmpnet before the layout
            graph = path / GRAPH_NAME
    elif path.suffix == ".onnx":
        graph = path
        folder = path.parent.parent if path.parent.name == ONNX_SUBDIR else path.parent
    else:
        raise NotAnExportError(f"{path} is neither an ONNX export folder nor a .onnx file "
                               f"(make one with `allmpnet export onnx DIR`)")
    if not graph.is_file():
        raise NotAnExportError(f"{graph} not found: {folder} is not an ONNX export folder "
                               f"(make one with `allmpnet export onnx DIR`)")
    if not (folder / "tokenizer.json").is_file():
        raise NotAnExportError(f"{folder / 'tokenizer.json'} not found: the graph's export folder must hold its "
                               f"tokenizer files")
    return folder, graph


def export_settings(folder: Path) -> tuple[int, int, bool]:
    """(max_seq_length, pad token id, normalize) the export folder lists."""
    limit = None
    if (folder / "sentence_bert_config.json").is_file():
        limit = sentence_bert_max_seq_length(folder / "sentence_bert_config.json")
    if limit is None and (folder / "tokenizer_config.json").is_file():
        limit = read_json(folder / "tokenizer_config.json").get("model_max_length")
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    pad_id = config.get("pad_token_id", 1)
    normalize = True
    if (folder / "modules.json").is_file():
        normalize = any(str(m.get("type", "")).endswith("Normalize")
                        for m in json.loads((folder / "modules.json").read_text()))
    return int(limit or 512), int(pad_id), normalize
