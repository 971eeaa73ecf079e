"""Model files that are not what they claim (a config.json of no MPNet, a sentence_bert_config.json or pooling
config of nothing sentence-transformers knows) are refused with one ModelFileError naming the file; real files,
including the forms transformers and sentence-transformers write, keep loading."""
from __future__ import annotations

import json
import shutil

import pytest

from allmpnet import Encoder, ModelFileError
from allmpnet.cli import main
from allmpnet.model import MPNetConfig
from allmpnet.testing import TINY

REAL_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings")


def without(key: str):
    def damage(p):
        p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != key}))
    return damage


def with_values(**values):
    def damage(p):
        p.write_text(json.dumps({**json.loads(p.read_text()), **values}))
    return damage


def writes(value):
    return lambda p: p.write_text(json.dumps(value))


BAD = [
    # config.json: no MPNet sizes at all, one of them missing, or another architecture's config
    ("config.json", writes({"x": 1}), "lacks vocab_size, hidden_size, num_hidden_layers"),
    *[("config.json", without(key), f"lacks {key}") for key in REAL_CONFIG_KEYS],
    ("config.json", with_values(model_type="bert"), "model_type is 'bert', not 'mpnet'"),
    ("config.json", with_values(model_type=None), "model_type is None, not 'mpnet'"),
    # sentence_bert_config.json: keys sentence-transformers does not know, a max_seq_length that is no length
    ("sentence_bert_config.json", writes({"x": 1}), "'x' is not a setting of sentence-transformers"),
    ("sentence_bert_config.json", writes({"max_seq_length": 20, "maxseqlength": 10}), "'maxseqlength' is not"),
    ("sentence_bert_config.json", writes({"max_seq_length": "384"}), "max_seq_length must be a positive integer"),
    ("sentence_bert_config.json", writes({"max_seq_length": 12.5}), "max_seq_length must be a positive integer"),
    ("sentence_bert_config.json", writes({"max_seq_length": True}), "max_seq_length must be a positive integer"),
    ("sentence_bert_config.json", writes({"max_seq_length": -3}), "max_seq_length must be a positive integer"),
    ("sentence_bert_config.json", writes([384]), "holds a JSON list, expected a JSON object"),
    # 1_Pooling/config.json: nothing of a pooling config, or its settings of the wrong kind
    ("1_Pooling/config.json", writes({"x": 1}), "'x' is not a setting of sentence-transformers' Pooling"),
    ("1_Pooling/config.json", writes({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": "false"}),
     "pooling_mode_mean_tokens must be true or false, got 'false'"),
    ("1_Pooling/config.json", writes({"embedding_dimension": 32, "pooling_mode": 5}),
     "pooling_mode must be a mode name or a list of them, got 5"),
    ("1_Pooling/config.json", writes({"embedding_dimension": 32, "pooling_mode": None}),
     "pooling_mode must be a mode name or a list of them, got None"),
    ("1_Pooling/config.json", writes({"embedding_dimension": 32, "pooling_mode": [["mean"]]}),
     "pooling_mode must be a mode name or a list of them"),
    ("1_Pooling/config.json", writes({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True,
                                      "include_prompt": "yes"}), "include_prompt must be true or false"),
]


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


@pytest.mark.parametrize("name, damage, says", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_a_file_that_is_not_what_it_claims_is_refused_naming_it(model_copy, capsys, name, damage, says):
    damage(model_copy / name)
    with pytest.raises(ModelFileError) as caught:
        Encoder(model_copy, device="cpu")
    message = str(caught.value)
    assert str(model_copy / name) in message and says in message, message
    assert main(["info", "--model", str(model_copy), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(model_copy / name) in lines[0] and says in lines[0]


def test_the_published_config_json_loads_as_it_is(real_model_dir):
    cfg = MPNetConfig.load(real_model_dir)
    sizes = (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.max_position_embeddings)
    assert sizes == (30527, 768, 12, 514)
    assert cfg.layer_norm_eps == 1e-5 and cfg.pad_token_id == 1


def test_configs_written_by_transformers_and_by_us_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.MPNetConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=66, layer_norm_eps=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    cfg = MPNetConfig.load(tmp_path / "theirs")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.max_position_embeddings, cfg.layer_norm_eps) == (200, 32, 2, 4, 64, 66, 1e-5)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    assert MPNetConfig.load(tmp_path / "ours") == TINY


def test_optional_fields_may_be_absent_and_mean_what_transformers_reads(tmp_path):
    """Only the sizes are required; an absent field is read as transformers reads it (layer_norm_eps: 1e-12)."""
    transformers = pytest.importorskip("transformers")
    minimal = {"model_type": "mpnet", "vocab_size": 200, "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 66}
    (tmp_path / "config.json").write_text(json.dumps(minimal))
    cfg = MPNetConfig.load(tmp_path)
    reference = transformers.MPNetConfig.from_dict(minimal)
    for name in ("layer_norm_eps", "relative_attention_num_buckets", "pad_token_id", "hidden_dropout_prob",
                 "attention_probs_dropout_prob"):
        assert getattr(cfg, name) == getattr(reference, name), name
    del minimal["model_type"]  # an MPNet config that does not name its type is still one
    (tmp_path / "config.json").write_text(json.dumps(minimal))
    assert MPNetConfig.load(tmp_path).hidden_size == 32


@pytest.mark.parametrize("settings, expected", [
    ({"max_seq_length": 20, "do_lower_case": False}, 20),
    ({}, 64),  # sentence-transformers reads an empty file as no settings: the tokenizer's limit applies
    ({"max_seq_length": None, "do_lower_case": False}, 64),  # what older releases wrote when no limit was set
    ({"transformer_task": "feature-extraction", "modality_config": {"text": {"method": "forward",
      "method_output_name": "last_hidden_state"}}, "module_output_name": "token_embeddings"}, 64),  # v5+ layout
    ({"max_seq_length": 20, "model_args": {}, "tokenizer_args": {}, "config_args": {}, "cache_dir": None}, 20),
])
def test_sentence_bert_configs_sentence_transformers_writes_load(model_copy, settings, expected):
    (model_copy / "sentence_bert_config.json").write_text(json.dumps(settings))
    assert Encoder(model_copy, device="cpu").max_seq_length == expected


@pytest.mark.parametrize("settings, modes", [
    ({"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
      "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
      "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True},
     ["mean_tokens"]),
    ({"embedding_dimension": 32, "pooling_mode": "cls", "include_prompt": True}, ["cls_token"]),
    ({"embedding_dimension": 32, "pooling_mode": ["mean", "max"]}, ["mean_tokens", "max_tokens"]),
])
def test_pooling_configs_sentence_transformers_writes_load(model_copy, settings, modes):
    (model_copy / "1_Pooling" / "config.json").write_text(json.dumps(settings))
    assert Encoder(model_copy, device="cpu").pooling.modes == modes


def test_loading_takes_every_weight_from_the_file_and_leaves_torch_init_working(model_copy):
    """Weights are built without their random fills when a checkpoint is loaded: every one must come from the
    file, and nn.init must work again afterwards."""
    import torch
    from safetensors.torch import load_file

    from allmpnet.model.mpnet import MPNet, split_qkv
    model = MPNet.from_pretrained(model_copy)
    stored = load_file(str(model_copy / "model.safetensors"))
    state = split_qkv(model.state_dict())
    assert set(state) <= set(stored)
    for name, tensor in state.items():
        assert torch.equal(tensor, stored[name]), name
    assert torch.nn.Linear(64, 64).weight.std() > 0.01  # kaiming-uniform again, not left as allocated
    assert torch.nn.LayerNorm(8).weight.eq(1).all()
