"""ONNX export of the sentence model (tiny random model): the folder's layout, the graph's vectors against PyTorch
and sentence-transformers, the loaders that read it (ONNX Runtime + tokenizers here; sentence-transformers'
backend="onnx" and fastembed in the peers' venv, where it exists), OnnxEncoder, and the export command."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from allmpnet import Encoder

pytest.importorskip("onnxruntime")

TEXTS = ["hello world", "the cat is on the moon", "", "   ", "a dog and a car", "x" * 40,
         "this is a test sentence with more words than the others in the list", "sun", "plant search query",
         " ".join(["the dog and the car"] * 30)]  # past the tiny model's 64 word pieces: truncated

ROOT = Path(__file__).resolve().parents[1]
# sentence-transformers' ONNX backend needs Optimum, and fastembed an older huggingface-hub, neither of which
# installs beside the main venv's transformers 5 (optimum-onnx 0.1 pins transformers < 4.58, fastembed 0.9
# huggingface-hub < 2): they run in a venv of their own, which `make test` builds (`make peers`)
PEERS_ONNX = Path(os.environ.get("ALLMPNET_PEERS_ONNX", ROOT / ".venv-peers-onnx"))

# what a user of each tool pastes (docs/speed.md's ONNX section): vectors of texts.json into out.npz
PEER_LOADERS = """
import json, sys
import numpy as np
folder, texts, out = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
from sentence_transformers import SentenceTransformer
st = SentenceTransformer(folder, backend="onnx", device="cpu")
from fastembed import TextEmbedding
from fastembed.common.model_description import ModelSource, PoolingType
TextEmbedding.add_custom_model(model="local/all-mpnet-base-v2-onnx", pooling=PoolingType.MEAN, normalization=True,
                               sources=ModelSource(hf="local/all-mpnet-base-v2-onnx"), dim=st.get_sentence_embedding_dimension(),
                               model_file="onnx/model.onnx")
fe = TextEmbedding(model_name="local/all-mpnet-base-v2-onnx", specific_model_path=folder)
np.savez(out, st=st.encode(texts, batch_size=4), fastembed=np.stack(list(fe.embed(texts, batch_size=4))),
         st_max_seq_length=st.max_seq_length)
"""


def ort_and_tokenizers(folder: Path, texts: list[str], graph: str = "onnx/model.onnx") -> tuple[np.ndarray, np.ndarray]:
    """Plain ONNX Runtime + tokenizers on the folder, as the docs show: (sentence_embedding, mean-pooled and
    normalised last_hidden_state)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    session = ort.InferenceSession(str(folder / graph), providers=["CPUExecutionProvider"])
    out_a, out_b = [], []
    for start in range(0, len(texts), 4):
        encodings = tokenizer.encode_batch(texts[start:start + 4])
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        tokens, pooled = session.run(["last_hidden_state", "sentence_embedding"],
                                     {"input_ids": ids, "attention_mask": mask})
        mean = (tokens * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
        out_a.append(pooled)
        out_b.append(mean / np.linalg.norm(mean, axis=1, keepdims=True))
    return np.concatenate(out_a), np.concatenate(out_b)


def peer_vectors(folder: Path, texts: list[str], tmp_path: Path) -> dict[str, np.ndarray]:
    """sentence-transformers backend="onnx" and fastembed on the folder, run in the peers' venv."""
    python = PEERS_ONNX / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"{PEERS_ONNX} missing (sentence-transformers[onnx] and fastembed: "
                    f"`make peers`, or set ALLMPNET_PEERS_ONNX)")
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([str(python), "-c", PEER_LOADERS, str(folder), str(tmp_path / "texts.json"),
                           str(tmp_path / "peers.npz")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(tmp_path / "peers.npz"))


@pytest.fixture(scope="module")
def tiny_export(tiny_model_dir, tmp_path_factory) -> Path:
    from allmpnet.export.onnx import export_onnx
    folder = tmp_path_factory.mktemp("onnx") / "export"
    export_onnx(Encoder(tiny_model_dir, device="cpu"), folder)
    return folder


def test_the_export_folder_has_sentence_transformers_layout(tiny_model_dir, tiny_export):
    import onnx
    enc = Encoder(tiny_model_dir, device="cpu")
    config = json.loads((tiny_export / "config.json").read_text())
    assert config["model_type"] == "mpnet" and config["hidden_size"] == enc.model.network.cfg.hidden_size
    modules = json.loads((tiny_export / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((tiny_export / "sentence_bert_config.json").read_text())["max_seq_length"] == enc.max_seq_length
    assert json.loads((tiny_export / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    assert (tiny_export / "2_Normalize").is_dir()
    tokenizer = json.loads((tiny_export / "tokenizer.json").read_text())
    assert tokenizer["truncation"]["max_length"] == enc.max_seq_length
    assert tokenizer["padding"]["strategy"] == "BatchLongest"  # no fixed length
    assert json.loads((tiny_export / "tokenizer_config.json").read_text())["model_max_length"] == enc.max_seq_length
    graph = onnx.load(str(tiny_export / "onnx" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["last_hidden_state", "sentence_embedding"]
    for value in list(graph.input) + [graph.output[0]]:  # batch and sequence both symbolic
        assert all(d.dim_param and not d.dim_value for d in value.type.tensor_type.shape.dim)


def test_onnx_export_matches_pytorch(tiny_model_dir, tiny_export):
    from allmpnet.export.onnx import OnnxEncoder, check_parity
    enc = Encoder(tiny_model_dir, device="cpu")
    parity = check_parity(enc, tiny_export, TEXTS)  # lengths other than the traced example's: dynamic axes hold
    assert parity.max_abs_diff < 1e-5 and parity.min_cosine > 0.99999
    with pytest.warns(UserWarning, match="truncated"):  # the last text: each side truncates it
        expected = enc.encode(TEXTS, show_progress_bar=False)
    for path in (tiny_export, tiny_export / "onnx" / "model.onnx", str(tiny_export)):
        got = OnnxEncoder(path, max_batch_tokens=16).encode(TEXTS, batch_size=2)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert OnnxEncoder(tiny_export).encode([]).shape == (0, enc.dim)


def test_onnx_runtime_and_tokenizers_give_sentence_transformers_vectors(tiny_model_dir, tiny_export):
    from special_texts import sentence_transformers_vectors
    reference = sentence_transformers_vectors(tiny_model_dir, TEXTS)
    pooled, mean_pooled = ort_and_tokenizers(tiny_export, TEXTS)
    np.testing.assert_allclose(pooled, reference, atol=1e-5)
    np.testing.assert_allclose(mean_pooled, reference, atol=1e-5)


def test_sentence_transformers_onnx_backend_and_fastembed_load_the_folder(tiny_model_dir, tiny_export, tmp_path):
    from special_texts import sentence_transformers_vectors
    peers = peer_vectors(tiny_export, TEXTS, tmp_path)
    reference = sentence_transformers_vectors(tiny_model_dir, TEXTS)
    assert int(peers["st_max_seq_length"]) == Encoder(tiny_model_dir, device="cpu").max_seq_length
    np.testing.assert_allclose(peers["st"], reference, atol=1e-5)
    np.testing.assert_allclose(peers["fastembed"], reference, atol=1e-5)


def test_onnx_export_gives_texts_holding_special_tokens_the_reference_vectors(tiny_model_dir, tiny_export):
    from allmpnet.export.onnx import OnnxEncoder
    from special_texts import SPECIAL_TEXTS, sentence_transformers_vectors
    # traced on texts without a pad id: the graph must still skip it in the absolute positions
    got = OnnxEncoder(tiny_export).encode(SPECIAL_TEXTS, batch_size=4)
    np.testing.assert_allclose(got, sentence_transformers_vectors(tiny_model_dir), atol=1e-5)
    np.testing.assert_allclose(ort_and_tokenizers(tiny_export, SPECIAL_TEXTS)[0],
                               sentence_transformers_vectors(tiny_model_dir), atol=1e-5)


def test_onnx_encoder_takes_the_export_path_and_says_so_otherwise(tiny_export, tmp_path):
    from allmpnet.errors import AllmpnetError
    from allmpnet.export.onnx import OnnxEncoder
    with pytest.raises(TypeError, match="export folder"):
        OnnxEncoder(tiny_export / "onnx" / "model.onnx", "onnx-model")  # the call the issue reported
    with pytest.raises(AllmpnetError, match="not an ONNX export folder"):
        OnnxEncoder(tmp_path)
    with pytest.raises(AllmpnetError, match="neither"):
        OnnxEncoder(tiny_export / "config.json")


def test_parity_check_runs_fp32_whatever_the_encoders_precision(tiny_model_dir, tiny_export):
    from allmpnet.export.onnx import check_parity
    enc = Encoder(tiny_model_dir, device="cpu", precision="bf16")
    parity = check_parity(enc, tiny_export, TEXTS)
    assert parity.max_abs_diff < 1e-5
    assert enc.precision == "bf16"  # and the encoder it was given is left as it was


def test_export_onnx_cli_writes_an_int8_graph_that_stock_onnx_runtime_runs(tiny_model_dir, tmp_path, capsys):
    import onnx

    from allmpnet.cli import main
    from special_texts import sentence_transformers_vectors
    out = tmp_path / "out"
    assert main(["export", "onnx", str(out), "--model", str(tiny_model_dir), "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "onnx/model.onnx" in printed and "onnx/model_int8.onnx" in printed and "max |diff|" in printed
    int8, fp32 = out / "onnx" / "model_int8.onnx", out / "onnx" / "model.onnx"
    graph = onnx.load(str(int8)).graph
    assert fp32.is_file() and "Gemm" not in {n.op_type for n in graph.node}  # every projection int8 by default
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)  # standard ops only
    initializers = {i.name: i for i in graph.initializer}
    weights = [initializers[n.input[1]] for n in graph.node if n.op_type == "MatMulInteger"]
    assert weights and all(w.data_type == onnx.TensorProto.INT8 for w in weights)
    assert not [name for name in initializers if name.startswith("model.network.encoder.layer.")]  # no fp32 copy
    pooled, mean_pooled = ort_and_tokenizers(out, TEXTS, graph="onnx/model_int8.onnx")
    reference = sentence_transformers_vectors(tiny_model_dir, TEXTS)
    assert (pooled * reference).sum(1).min() > 0.99
    np.testing.assert_allclose(pooled, mean_pooled, atol=1e-5)
