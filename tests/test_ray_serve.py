"""The server as Ray Serve replicas (serve/ray_serve.py) on one local Ray instance, loopback only: the same answers
as the single-process server, bit for bit, and a replica killed under load costs retries, never an answer."""
from __future__ import annotations

import base64
import os
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from allmpnet import Encoder
from allmpnet.serve import ServeConfig, create_app
from allmpnet.serve.background import BackgroundServer

serve = pytest.importorskip("ray.serve")

CONFIG = ServeConfig(model_name="tiny-test", max_items=16, max_queue=256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def replicas(tiny_model_dir):
    """Two replicas behind Serve's proxy on a loopback port; one Ray instance for the module (it is slow to start)."""
    import ray

    from allmpnet.bulk.cluster import ray_session
    from allmpnet.serve import ray_serve
    port = free_port()
    with ray_session(num_cpus=4) as owns:
        assert owns, "a Ray instance was already running in this process"
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        except Exception as e:  # noqa: BLE001 - Serve itself (controller, proxy) cannot run on this machine
            pytest.skip(f"Ray Serve could not start here: {type(e).__name__}: {e}")
        # from here on a failure is ours: the replicas must deploy
        ray_serve.start(ray_serve.ReplicaSettings(model=str(tiny_model_dir), device="cpu", config=CONFIG),
                        replicas=2, port=port, cpus_per_replica=1)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.delete(ray_serve.APP_NAME)  # ray_session then stops the instance
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def single(tiny_model_dir):
    """The single-process server on the same model and settings."""
    with BackgroundServer(create_app(Encoder(tiny_model_dir, device="cpu"), CONFIG)) as url:
        yield url


def bits(response: httpx.Response) -> np.ndarray:
    """The vectors of a base64 answer: float32 exactly as the server computed them."""
    assert response.status_code == 200, response.text
    return np.stack([np.frombuffer(base64.b64decode(row["embedding"]), np.float32)
                     for row in response.json()["data"]])


def texts_for(n: int) -> list[str]:
    words = "the cat sat on a mat while a dog ran to the car in the sun".split()
    return [" ".join(words[(n + k) % len(words): (n + k) % len(words) + 1 + (n * 7 + k) % 9]) + f" {n}"
            for k in range(1 + n % 5)]


def running_replicas() -> int:
    from allmpnet.serve.ray_serve import APP_NAME
    app = serve.status().applications[APP_NAME]
    return app.deployments["EmbeddingReplica"].replica_states.get("RUNNING", 0)


def test_replicas_answer_as_the_single_process_server(replicas, single):
    assert running_replicas() == 2
    with httpx.Client(timeout=30) as client:
        for n in range(12):  # spread over both replicas by Serve's router
            body = {"input": texts_for(n), "model": "tiny-test", "encoding_format": "base64"}
            got = bits(client.post(f"{replicas}/v1/embeddings", json=body))
            want = bits(client.post(f"{single}/v1/embeddings", json=body))
            assert got.tobytes() == want.tobytes()
        for url in (replicas, single):  # the app's own checks, unchanged behind the proxy
            r = client.post(f"{url}/v1/embeddings", json={"input": ["x"] * 17})
            assert r.status_code == 413, r.text
        info = client.get(f"{replicas}/v1/models").json()
        assert info == client.get(f"{single}/v1/models").json()


def post_with_retries(client: httpx.Client, url: str, body: dict, retries: list[str]) -> httpx.Response:
    """What a careful client does (the OpenAI client by default): a 5xx or a dropped connection is tried again,
    since an embedding request changes nothing."""
    for attempt in range(20):
        try:
            r = client.post(url, json=body)
            if r.status_code < 500:
                return r
            retries.append(f"{r.status_code}")
        except httpx.TransportError as e:
            retries.append(type(e).__name__)
        time.sleep(0.05 * (attempt + 1))
    raise AssertionError(f"no answer after 20 tries: {retries[-3:]}")


def test_a_replica_killed_under_load_costs_retries_not_answers(replicas, tiny_model_dir):
    from allmpnet.serve.ray_serve import replica_pids
    reference = Encoder(tiny_model_dir, device="cpu")
    pids = replica_pids()
    assert len(pids) == 2
    answers: dict[int, np.ndarray] = {}
    retries: list[str] = []
    failures: list[BaseException] = []
    done = threading.Event()
    per_client, clients = 60, 6

    def client_loop(c: int) -> None:
        try:
            with httpx.Client(timeout=30) as client:
                for i in range(per_client):
                    n = c * per_client + i
                    body = {"input": texts_for(n), "encoding_format": "base64"}
                    answers[n] = bits(post_with_retries(client, f"{replicas}/v1/embeddings", body, retries))
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    while len(answers) < clients * per_client // 4 and not failures:  # well under way
        time.sleep(0.01)
    os.kill(pids[0], signal.SIGKILL)
    killed_at = len(answers)
    for t in threads:
        t.join(timeout=180)
    done.set()
    assert not failures, failures[0]
    assert killed_at < clients * per_client, "the kill came after the load"
    assert sorted(answers) == list(range(clients * per_client))  # none lost
    for n, got in answers.items():  # none wrong: each is the reference's answer to its own texts
        np.testing.assert_allclose(got, reference.encode(texts_for(n)), atol=1e-6)
    # requests the dead replica held, or was handed before Serve saw it die, failed and were tried again
    assert retries, "no request met the killed replica"
    print(f"\n{len(retries)} retried attempts after the kill: {sorted(set(retries))}")
    deadline = time.monotonic() + 120  # Serve's controller replaces the dead replica
    while running_replicas() < 2 or len(replica_pids()) < 2:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    assert pids[0] not in replica_pids()


def test_serve_run_import_path_builds_the_same_settings(tiny_model_dir):
    """`serve run allmpnet.serve.ray_serve:app_builder key=value …`: text arguments become the replica settings."""
    from allmpnet.errors import InvalidInput
    from allmpnet.serve.ray_serve import app_builder
    app = app_builder({"model": str(tiny_model_dir), "replicas": "3", "cpus_per_replica": "2", "precision": "bf16",
                       "max_items": "64", "truncate": "false", "max_batch_tokens": "none", "api_key": "k"})
    deployment = app._bound_deployment
    settings, threads = deployment.init_args
    assert (deployment.num_replicas, deployment.ray_actor_options["num_cpus"], threads) == (3, 2.0, 2)
    assert (settings.model, settings.precision) == (str(tiny_model_dir), "bf16")
    assert settings.config == ServeConfig(max_items=64, truncate=False, max_batch_tokens=None, api_key="k")
    with pytest.raises(InvalidInput, match="unknown argument"):
        app_builder({"max_itmes": "64"})


def test_serve_command_refuses_zero_replicas(capsys):
    from allmpnet.cli import main
    assert main(["serve", "--replicas", "0"]) == 2
    assert "--replicas must be at least 1" in capsys.readouterr().err


def test_a_replica_whose_worker_stopped_fails_its_health_check(tiny_model_dir):
    """Serve replaces a replica whose check_health raises: the one whose embedding worker is gone."""
    import torch

    from allmpnet.serve.ray_serve import EmbeddingReplica, ReplicaSettings
    threads = torch.get_num_threads()
    replica = EmbeddingReplica(ReplicaSettings(model=str(tiny_model_dir), device="cpu", config=CONFIG), threads=1)
    torch.set_num_threads(threads)  # the replica set this process's count: the next tests keep theirs
    app = replica.__serve_build_asgi_app__()
    assert replica.embedding_app is app
    batcher = app.state.service.batcher
    replica.check_health()  # not started yet: Serve is still bringing it up
    batcher.start()
    batcher.ready.result(timeout=30)
    replica.check_health()
    batcher.close()
    with pytest.raises(RuntimeError, match="embedding worker is not running"):
        replica.check_health()
