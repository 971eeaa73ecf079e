"""Random-initialised models of any shape, for fast tests and for speed checks where the real weights cannot go."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from allmpnet.model import MPNet, MPNetConfig

SPECIAL = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]  # ids 0..4, as in the MPNet vocabulary's first slots
TINY = MPNetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=66)


def small_vocab() -> list[str]:
    """Specials, whole words for common English, and single characters with and without the ## prefix."""
    words = ("the a an is are was of to and in on for with this that it sentence example each converted "
             "hello world test text search query cat dog car plant sun moon").split()
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return SPECIAL + words + chars + ["##" + c for c in string.ascii_lowercase + string.digits]


def build_tokenizer(vocab: list[str]) -> Tokenizer:
    """The same pipeline as all-mpnet-base-v2's tokenizer.json: BERT normalizer, word pieces, <s> … </s>."""
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIAL)
    return tok


def build_random_model(out_dir: str | Path, cfg: MPNetConfig = TINY, seed: int = 0,
                       max_seq_length: int | None = None) -> Path:
    """A complete sentence-transformers directory (mean pooling + normalize) with random weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = small_vocab()
    if cfg.vocab_size < len(vocab):
        raise ValueError(f"vocab_size must be at least {len(vocab)}")
    vocab += [f"[unused{i}]" for i in range(cfg.vocab_size - len(vocab))]
    torch.manual_seed(seed)
    model = MPNet(cfg, with_pooler=False)
    for name, p in model.named_parameters():
        if "LayerNorm" not in name:
            torch.nn.init.normal_(p, std=0.02 if p.dim() > 1 else 0.01)
    model.save_pretrained(out)
    build_tokenizer(vocab).save(str(out / "tokenizer.json"))
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    files = {
        "tokenizer_config.json": {"tokenizer_class": "MPNetTokenizer", "do_lower_case": True, "bos_token": "<s>",
                                  "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "[UNK]",
                                  "pad_token": "<pad>", "mask_token": "<mask>",
                                  "model_max_length": cfg.max_position_embeddings - 2},
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                         {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                         {"idx": 2, "name": "2", "path": "2_Normalize",
                          "type": "sentence_transformers.models.Normalize"}],
        "sentence_bert_config.json": {"max_seq_length": max_seq_length or cfg.max_position_embeddings - 2,
                                      "do_lower_case": False},
        "1_Pooling/config.json": {"word_embedding_dimension": cfg.hidden_size, "pooling_mode_mean_tokens": True},
    }
    for name, value in files.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(json.dumps(value, indent=2) + "\n")
    (out / "2_Normalize").mkdir(exist_ok=True)
    return out
