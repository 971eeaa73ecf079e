"""Property-based parity on the published weights: generated texts (any code point but lone surrogates, special-
token strings, whitespace alone, texts over 384 word pieces) in batches of every size get sentence-transformers'
vectors in fp32 and stay within the quality contract in the fast precisions; the server, the pool, the bulk job
and the exported ONNX model give the Encoder's own vectors. Derandomised (the same examples every run) and
bounded: each property runs a fixed, small number of examples."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.real_weights, pytest.mark.filterwarnings("ignore::allmpnet.TruncationWarning")]

SPECIALS = ["<pad>", "<s>", "</s>", "<mask>", "<unk>", "[UNK]", "[CLS]", "[SEP]"]
WORDS = ("the a model maps sentences to vectors search cluster meaning café naïve 東京 Привет 😀 don't "
         "U.S.A. 3.14 #tag @user http://example.com/x?y=1").split()
WHITESPACE = [" ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\u200b", "\ufeff"]

any_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)  # no lone surrogates
mixed_text = st.lists(st.one_of(st.sampled_from(SPECIALS), st.sampled_from(WORDS), any_text), min_size=1,
                      max_size=25).map(" ".join)
glued_text = st.lists(st.one_of(st.sampled_from(SPECIALS), st.sampled_from(WORDS)), min_size=1,
                      max_size=8).map("".join)  # "<pad><pad>word</s>": specials with no space between
blank_text = st.lists(st.sampled_from(WHITESPACE), max_size=6).map("".join)
long_text = st.tuples(st.sampled_from(WORDS + SPECIALS), st.integers(200, 500)).map(
    lambda pair: " ".join([pair[0], "and a sentence about it"] * (pair[1] // 5)))  # over 384 word pieces
texts = st.one_of(any_text, mixed_text, glued_text, blank_text, long_text)
batches = st.lists(texts, min_size=1, max_size=8)

# no shrinking: a failure reports the example as generated (and its reproduce blob) within the time bound, where
# shrinking one through the bulk job took minutes
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow,
                                                                                HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def st_model(real_model_dir):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(real_model_dir), device="cpu")


def reference(st_model, batch: list[str]) -> np.ndarray:
    return st_model.encode(batch, batch_size=len(batch), convert_to_numpy=True)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(1).min())  # both unit length


@settings(FUZZ, max_examples=20)
@given(batch=batches, batch_size=st.integers(1, 9))
def test_fp32_equals_sentence_transformers(real_encoder, st_model, batch, batch_size):
    expected = reference(st_model, batch)
    got = real_encoder.encode(batch, batch_size=batch_size, show_progress_bar=False)
    assert np.abs(got - expected).max() <= 1e-5
    alone = real_encoder.encode(batch[0])  # the query path
    assert np.abs(alone - expected[0]).max() <= 1e-5


@pytest.fixture(scope="module", params=["bf16", "int8", "auto"])
def fast_encoder(request, real_encoder):
    from allmpnet.encode.precision import plan_precision
    try:
        plan_precision(request.param, "cpu")
    except ValueError as e:
        pytest.skip(str(e))
    return real_encoder.with_precision(request.param)


@settings(FUZZ, max_examples=12)
@given(batch=batches)
def test_fast_precisions_keep_the_quality_contract(fast_encoder, st_model, batch):
    expected = reference(st_model, batch)
    got = fast_encoder.encode(batch, show_progress_bar=False)
    assert min_cosine(got, expected) >= 0.99
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5


# ---- the other ways in: each gives the Encoder's vectors for the same precision ------------------------------

@pytest.fixture(scope="module")
def auto_encoder(real_encoder):
    return real_encoder.with_precision("auto")


@pytest.fixture(scope="module")
def server(auto_encoder):
    import httpx

    from allmpnet.serve import ServeConfig, create_app
    from allmpnet.serve.background import BackgroundServer
    with BackgroundServer(create_app(auto_encoder, ServeConfig(model_name="fuzz"))) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        yield client


@settings(FUZZ, max_examples=8)
@given(batch=batches)
def test_the_server_gives_the_encoders_vectors(server, auto_encoder, batch):
    # auto's vectors do not depend on the batch a text lands in, so the server's batching changes nothing
    response = server.post("/v1/embeddings", json={"input": batch})
    assert response.status_code == 200, response.text
    got = np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, auto_encoder.encode(batch, show_progress_bar=False))


def test_the_server_gives_each_text_its_own_vector_under_concurrency(server, auto_encoder, shared_data):
    # 24 clients at once: the server batches their texts together in whatever way they arrive; every text must
    # come back with the bits it gets alone, and as the Encoder gives it in a batch of its own
    from concurrent.futures import ThreadPoolExecutor
    rows = (shared_data / "STSBenchmark" / "sts.tsv").read_text(encoding="utf-8").splitlines()[1:97]
    sentences = [row.split("\t")[0] for row in rows] + ["<pad> and <s> inside", " ", "a " * 500]
    requests = [sentences[i::24] for i in range(24)]
    alone = {text: auto_encoder.encode(text) for text in sentences}

    def post(batch: list[str]) -> np.ndarray:
        response = server.post("/v1/embeddings", json={"input": batch})
        assert response.status_code == 200, response.text
        return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
    for _ in range(2):
        with ThreadPoolExecutor(24) as threads:
            answers = list(threads.map(post, requests))
        for batch, got in zip(requests, answers):
            np.testing.assert_array_equal(got, np.stack([alone[t] for t in batch]))
    np.testing.assert_array_equal(auto_encoder.encode(sentences, batch_size=64), np.stack([alone[t] for t in sentences]))


@pytest.fixture(scope="module")
def pool(real_model_dir):
    from allmpnet.encode.pool import EncodePool
    with EncodePool(str(real_model_dir), devices=["cpu", "cpu"], precision="auto", threads_per_worker=1) as p:
        yield p


@settings(FUZZ, max_examples=4)
@given(batch=batches)
def test_the_pool_gives_the_encoders_vectors(pool, auto_encoder, batch):
    got = pool.encode(batch, chunk_size=3, show_progress_bar=False)
    np.testing.assert_array_equal(got, auto_encoder.encode(batch, show_progress_bar=False))


@pytest.fixture(scope="module")
def onnx_graph(real_encoder, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from allmpnet.export.onnx import OnnxEncoder, export_onnx
    graph = export_onnx(real_encoder, tmp_path_factory.mktemp("onnx"))
    return OnnxEncoder(graph, real_encoder.tokenizer)


@settings(FUZZ, max_examples=6)
@given(batch=batches)
def test_the_onnx_export_gives_the_encoders_vectors(onnx_graph, real_encoder, batch):
    got = onnx_graph.encode(batch, batch_size=4)
    assert np.abs(got - real_encoder.encode(batch, show_progress_bar=False)).max() <= 1e-5


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@settings(FUZZ, max_examples=3)
@given(batch=batches)
def test_the_bulk_job_gives_the_encoders_vectors(ray_cluster, real_model_dir, auto_encoder, tmp_path_factory,
                                                 batch):
    from allmpnet.bulk import BulkConfig, embed_corpus, read_embeddings
    folder = tmp_path_factory.mktemp("bulk")
    with open(folder / "in.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(batch):
            f.write(json.dumps({"id": str(i), "text": text}) + "\n")
    embed_corpus(str(folder / "in.jsonl"), str(folder / "out"),
                 BulkConfig(model=str(real_model_dir), precision="auto", workers=1, shard_rows=4), progress=False)
    ids, vectors, _ = read_embeddings(str(folder / "out"))
    assert ids == [str(i) for i in range(len(batch))]
    np.testing.assert_array_equal(vectors, auto_encoder.encode(batch, show_progress_bar=False))
