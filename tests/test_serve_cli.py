"""`allmpnet serve` as users start it: a real process on a loopback port, stopped with SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

ALLMPNET = [sys.executable, "-c", "import sys; from allmpnet.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    pytest.fail("server did not come up")


def test_serve_command_with_key_from_environment(tiny_model_dir):
    port = free_port()
    env = {**os.environ, "ALLMPNET_API_KEY": "from-env"}
    process = subprocess.Popen([*ALLMPNET, "serve", "--model", str(tiny_model_dir), "--port", str(port),
                                "--device", "cpu", "--max-items", "4", "--served-model-name", "tiny",
                                "--no-access-log"], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "x"}).status_code == 401
        key = {"Authorization": "Bearer from-env"}
        r = httpx.post(f"{url}/v1/embeddings", json={"input": ["a", "b"], "model": "tiny"}, headers=key)
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        assert httpx.post(f"{url}/v1/embeddings", json={"input": ["a"] * 5}, headers=key).status_code == 413
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert f"serving tiny (32-d, cpu) on {url}" in stderr and "API key required" in stderr


def test_serve_refuses_inconsistent_limits_before_loading(tiny_model_dir):
    result = subprocess.run([*ALLMPNET, "serve", "--model", str(tiny_model_dir), "--max-items", "100",
                             "--max-queue", "10"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "max_queue (10) must be at least max_items (100)" in result.stderr


def test_serve_with_an_index_and_refusing_one_from_another_model(tiny_model_dir, tmp_path):
    from allmpnet import Encoder
    from allmpnet.search import Index
    from allmpnet.testing import build_random_model

    index_dir = tmp_path / "idx"
    Index.build(index_dir, texts=["the cat sat on the mat", "the sun and the moon", "hello world"],
                ids=["cat", "sun", "hello"], encoder=Encoder(tiny_model_dir, device="cpu"))
    port = free_port()
    process = subprocess.Popen([*ALLMPNET, "serve", "--model", str(tiny_model_dir), "--port", str(port),
                                "--device", "cpu", "--index", str(index_dir), "--no-access-log"],
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        r = httpx.post(f"{url}/search", json={"query": "hello world", "k": 2})
        assert r.status_code == 200, r.text
        hits = r.json()["results"][0]["hits"]
        assert hits[0]["id"] == "hello" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and len(hits) == 2
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)

    other_model = build_random_model(tmp_path / "other", seed=1)  # same shape, other weights
    result = subprocess.run([*ALLMPNET, "serve", "--model", str(other_model), "--device", "cpu", "--index",
                             str(index_dir), "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "different model" in result.stderr
