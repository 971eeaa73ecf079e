"""The MPNet network itself: position buckets, position ids, strict loading, both key layouts."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from allmpnet.model import MPNet, MPNetConfig, WeightsError
from allmpnet.model.mpnet import Linear, join_qkv, relative_position_bucket, split_qkv
from allmpnet.testing import TINY


def test_relative_position_buckets_match_hand_computed_values():
    # 32 buckets, max distance 128: 16 per direction, 8 exact, then log-spaced up to 128.
    # Key after the query (positive relative position) lands in the upper half (+16).
    rel = torch.tensor([0, -1, -7, 1, 7, -8, 8, -127, 127, -500, 500])
    got = relative_position_bucket(rel, num_buckets=32, max_distance=128).tolist()
    # distance 8: 8 + floor(log(8/8)/log(16) * 8) = 8; distance 127: 8 + floor(log(127/8)/log(16)*8) = 8 + 7 = 15
    assert got == [0, 1, 7, 17, 23, 8, 24, 15, 31, 15, 31]
    assert 8 + int(math.log(127 / 8) / math.log(16) * 8) == 15


def test_position_ids_skip_padding_and_start_after_pad_index():
    cfg = TINY
    model = MPNet(cfg).eval()
    ids = torch.tensor([[0, 10, 11, 2, 1, 1]])
    # padding must not change the real tokens' vectors: compare against the unpadded sequence
    mask = (ids != cfg.pad_token_id).long()
    padded = model.token_embeddings(ids, mask)[0, :4]
    alone = model.token_embeddings(ids[:, :4], mask[:, :4])[0]
    assert torch.allclose(padded, alone, atol=1e-6)


def test_load_rejects_missing_unexpected_and_misshapen_tensors(tiny_model_dir, tmp_path):
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())

    def save_and_load(t):
        save_file(t, str(tmp_path / "model.safetensors"))
        return MPNet.from_pretrained(tmp_path)

    broken = dict(tensors)
    broken.pop("encoder.layer.1.output.dense.weight")
    with pytest.raises(WeightsError, match="missing tensor encoder.layer.1.output.dense.weight"):
        save_and_load(broken)
    with pytest.raises(WeightsError, match="unexpected tensor encoder.extra"):
        save_and_load({**tensors, "encoder.extra": torch.zeros(3)})
    wrong = {**tensors, "embeddings.word_embeddings.weight": torch.zeros(5, 32)}
    with pytest.raises(WeightsError, match=r"wrong shape embeddings.word_embeddings.weight: checkpoint \(5, 32\)"):
        save_and_load(wrong)


def test_masked_lm_layout_with_prefix_and_lm_head_loads_the_same_encoder(tiny_model_dir, tmp_path):
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    mlm = {f"mpnet.{k}": v for k, v in tensors.items()}
    mlm["lm_head.dense.weight"] = torch.zeros(32, 32)
    mlm["mpnet.embeddings.position_ids"] = torch.arange(66)[None]
    save_file(mlm, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    a, b = MPNet.from_pretrained(tmp_path), MPNet.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[0, 7, 8, 9, 2]])
    assert torch.equal(a.token_embeddings(ids, torch.ones_like(ids)), b.token_embeddings(ids, torch.ones_like(ids)))


def test_truncated_safetensors_is_a_clear_error(tiny_model_dir, tmp_path):
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(WeightsError, match="damaged or truncated"):
        MPNet.from_pretrained(tmp_path)


def test_config_round_trips_through_transformers_config_json(tmp_path):
    cfg = MPNetConfig(hidden_size=64, num_hidden_layers=3)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert MPNetConfig.load(tmp_path) == cfg
    assert cfg.to_hf_dict()["model_type"] == "mpnet"


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    torch.manual_seed(0)
    ids = torch.randint(5, 60, (2, 7))
    mask = torch.ones_like(ids)
    grads = []
    for checkpointing in (False, True):
        model = MPNet.from_pretrained(tiny_model_dir).train()
        for m in model.modules():  # deterministic: compare the math, not dropout draws
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if isinstance(m, Linear):
                m.dropout = 0.0
        for layer in model.encoder.layer:
            layer.attention.attn.dropout_p = 0.0
        model.enable_gradient_checkpointing(checkpointing)
        model.token_embeddings(ids, mask).sum().backward()
        grads.append(model.embeddings.word_embeddings.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_checkpoint_layout_keeps_separate_qkv_and_round_trips(tiny_model_dir, tmp_path):
    published = load_file(str(tiny_model_dir / "model.safetensors"))
    model = MPNet.from_pretrained(tiny_model_dir)
    assert "encoder.layer.0.attention.attn.qkv.weight" in model.state_dict()  # one projection inside
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(published)  # q, k and v apart again, as transformers expects
    assert all(torch.equal(saved[k], published[k]) for k in published)
    joined = join_qkv(published)
    q, k, v = (published[f"encoder.layer.1.attention.attn.{p}.weight"] for p in "qkv")
    assert torch.equal(joined["encoder.layer.1.attention.attn.qkv.weight"], torch.cat([q, k, v]))
    assert split_qkv(joined).keys() == published.keys()
