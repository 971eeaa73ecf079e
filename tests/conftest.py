"""Shared fixtures: a tiny random model (fast tests) and the published weights (real-weights tests)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from allmpnet.testing import build_random_model
from allmpnet.weights import STAMP, published_dir

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
SEED_CARD = SHARED / "seed" / "all-mpnet-base-v2-model-card.md"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The verified published weights; in CI their absence is a failure, elsewhere a skip."""
    path = published_dir()
    if not (path / STAMP).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"published weights missing at {path}: `make test` runs `allmpnet download` first")
        pytest.skip("published weights not downloaded (run `allmpnet download`)")
    return path


@pytest.fixture(scope="session")
def real_encoder(real_model_dir):
    from allmpnet import Encoder
    return Encoder(real_model_dir, device="cpu")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{DATA} missing")
        pytest.skip(f"{DATA} missing (the evaluation data lies in ../shared beside the repository, as in CI)")
    return DATA


@pytest.fixture(scope="session")
def seed_card() -> Path:
    """The published model card (with its model-index), beside the repository like ../shared/data."""
    if not SEED_CARD.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{SEED_CARD} missing")
        pytest.skip(f"{SEED_CARD} missing (it lies in ../shared beside the repository, as in CI)")
    return SEED_CARD


def int8_plan(kernel: str, **changes):
    """The "int8" plan of this CPU with its x86 int8 kernel pinned to `kernel` (and any other fields changed)."""
    import dataclasses

    from allmpnet.encode.precision import Capabilities, plan_precision
    caps = dataclasses.replace(Capabilities.detect("cpu"), x86_kernels=frozenset({kernel}), amx_kernels="not used")
    return dataclasses.replace(plan_precision("int8", "cpu", caps), **changes)


def side_by_side_bias(position_bias, rows: int):
    """(H, L, L) -> (H, rows*L, rows*L): `rows` texts of L tokens laid side by side in one block for an attention
    kernel (which takes any bias): each text's position bias on the diagonal, -inf-like between texts."""
    import torch
    H, L, _ = position_bias.shape
    row_of = torch.arange(rows * L) // L
    tiled = position_bias.repeat(1, rows, rows)
    return tiled.masked_fill(row_of[:, None] != row_of[None, :], torch.finfo(tiled.dtype).min).contiguous()


def kill_9_while_writing(cli: list[str], root: Path) -> None:
    """Start `cli` (an `allmpnet index build`), and kill -9 it once its writer has opened a staging folder."""
    import signal
    import subprocess
    import time
    proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if list(root.glob(".staging-*/vectors.f32")):  # the writer is open and encoding
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the build finished before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    """The tiny model's tokenizer.json through the `tokenizers` library itself, untruncated: the reference ids."""
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
