"""The encode paths benchmarks/encode_speed.py compares: ours, and the tools a speed-seeking user picks instead.

Each path is built in its own process by `load_path(name, …)` and gives `encode(texts) -> (N, 768) float32`.
Peers that cannot share our venv run in their own, made by `python benchmarks/encode_speed.py --setup-peers`
from the pinned lists in benchmarks/peers/*.txt:

    .venv-peers-onnx       sentence-transformers[onnx] 5.7.0 (ONNX Runtime), fastembed 0.9.1
    .venv-peers-openvino   sentence-transformers 5.7.0, optimum-intel[openvino] 2.1.0, nncf 3.4.0, datasets

Exports (ONNX, ONNX dynamic int8, OpenVINO IR, OpenVINO static int8) are made once per model by `prepare(venv, …)`
in that venv and kept under ~/.cache/allmpnet/benchmark-peers/. Static int8 is calibrated on the same shipped
texts our own int8 path uses (src/allmpnet/encode/calibration_texts.txt), since nothing here reaches a dataset hub.

This file imports only numpy, torch and the path's own library, so it runs in every venv.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "src" / "allmpnet" / "encode" / "calibration_texts.txt"

# path -> (venv it runs in, what it is)
PATHS: dict[str, tuple[str, str]] = {
    "st-fp32": ("main", "sentence-transformers, PyTorch fp32 (the reference)"),
    "st-bf16": ("main", "sentence-transformers, PyTorch bf16 cast"),
    "st-onnx": ("onnx", "sentence-transformers backend='onnx' (ONNX Runtime fp32)"),
    "st-onnx-int8": ("onnx", "sentence-transformers ONNX dynamic int8 (export_dynamic_quantized_onnx_model)"),
    "st-openvino": ("openvino", "sentence-transformers backend='openvino', OpenVINO's default precision"),
    "st-openvino-fp32": ("openvino", "sentence-transformers backend='openvino', INFERENCE_PRECISION_HINT f32"),
    "st-openvino-int8": ("openvino", "OpenVINO static int8 (export_static_quantized_openvino_model, NNCF)"),
    "fastembed": ("onnx", "fastembed (ONNX Runtime fp32) on the exported ONNX file"),
    "ours-fp32": ("main", "allmpnet fp32 (exact)"),
    "ours-bf16": ("main", "allmpnet bf16"),
    "ours-int8": ("main", "allmpnet int8 (the int8 plan this CPU has)"),
    "ours-auto": ("main", "allmpnet precision='auto'"),
    "ours-onnx": ("main", "allmpnet's ONNX export (`allmpnet export onnx`), ONNX Runtime fp32"),
    "ours-onnx-int8": ("main", "allmpnet's int8 ONNX graph (`export onnx --int8`: smoothed, per-token int8), ONNX Runtime"),
}


def venv_python(venv: str) -> Path:
    return Path(sys.executable) if venv == "main" else ROOT / f".venv-peers-{venv}" / "bin" / "python"


def setup_peers() -> None:
    """Create the peer venvs: torch pinned to the local CPU build first (a bare torch would pull CUDA)."""
    for venv in ("onnx", "openvino"):
        path = ROOT / f".venv-peers-{venv}"
        if not (path / "bin" / "python").is_file():
            subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["-r", str(ROOT / "benchmarks" / "peers" / f"{venv}.txt")], check=True)
        freeze = subprocess.run([str(path / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True)
        (path / "versions.txt").write_text(freeze.stdout)
        print(f"{path.name}: ready")


def peer_versions(venv: str) -> str:
    names = {"onnx": ("sentence-transformers", "onnxruntime", "optimum-onnx", "fastembed", "transformers"),
             "openvino": ("sentence-transformers", "openvino", "optimum-intel", "nncf", "transformers")}[venv]
    path = ROOT / f".venv-peers-{venv}" / "versions.txt"
    if not path.is_file():
        return "not set up"
    pins = dict(line.split("==", 1) for line in path.read_text().splitlines() if "==" in line)
    return ", ".join(f"{n} {pins.get(n, '?')}" for n in names)


def exports_dir(model_dir: str) -> Path:
    """Per model weights: the exports are slow to make, and identical for the same weights."""
    stamp = Path(model_dir) / ".allmpnet-verified.json"
    key = json.loads(stamp.read_text())["sha256"][:12] if stamp.is_file() else Path(model_dir).resolve().name
    home = Path(os.environ.get("ALLMPNET_HOME", Path.home() / ".cache" / "allmpnet"))
    return home / "benchmark-peers" / key


def calibration_texts() -> list[str]:
    return [line for line in CALIBRATION.read_text(encoding="utf-8").splitlines() if line.strip()]


def cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def prepare(venv: str, model_dir: str) -> None:
    """Make this venv's exports (in its own process): a no-op where they exist."""
    out = exports_dir(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    from sentence_transformers import SentenceTransformer
    def export_backend(backend: str, graph: str) -> Path:
        """The model saved with `backend` under out/<backend>-model (staged, renamed when whole)."""
        target = out / f"{backend}-model"
        if not (target / backend / graph).is_file():
            staging = out / f"{backend}-model.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            SentenceTransformer(model_dir, device="cpu", backend=backend).save_pretrained(str(staging))
            staging.rename(target)
        return target

    if venv == "onnx":
        target = export_backend("onnx", "model.onnx")
        config = onnx_int8_config()
        if not (target / "onnx" / f"model_qint8_{config}.onnx").is_file():
            from sentence_transformers import export_dynamic_quantized_onnx_model
            model = SentenceTransformer(str(target), device="cpu", backend="onnx")
            export_dynamic_quantized_onnx_model(model, config, str(target))
    elif venv == "openvino":
        target = export_backend("openvino", "openvino_model.xml")
        if not (target / "openvino" / "openvino_model_qint8_quantized.xml").is_file():
            from optimum.intel import OVQuantizationConfig
            from sentence_transformers import export_static_quantized_openvino_model
            calib = out / "calibration"  # a local dataset folder: datasets reads train.jsonl as the train split
            calib.mkdir(exist_ok=True)
            (calib / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in calibration_texts()))
            model = SentenceTransformer(str(target), device="cpu", backend="openvino")
            export_static_quantized_openvino_model(
                model, OVQuantizationConfig(num_samples=len(calibration_texts())), str(target),
                dataset_name=str(calib), dataset_config_name="default", dataset_split="train", column_name="text")
    else:
        raise ValueError(f"no exports for venv {venv!r}")


def onnx_int8_config() -> str:
    """sentence-transformers' dynamic int8 presets, the best this CPU runs."""
    flags = cpu_flags()
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"


def unavailable(name: str) -> str:
    """Why a path cannot run on this machine ("" when it can)."""
    venv = PATHS[name][0]
    if not venv_python(venv).is_file():
        return f"its venv .venv-peers-{venv} is missing (python benchmarks/encode_speed.py --setup-peers)"
    if name == "ours-int8":
        from allmpnet.encode.precision import plan_precision
        try:
            plan_precision("int8", "cpu")
        except ValueError as error:
            return str(error)
    return ""


class Runner:
    def __init__(self, encode):
        self.encode = encode


def load_path(name: str, model_dir: str, max_len: int) -> Runner:
    """The named path, cutting texts at max_len word pieces."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    max_len = min(max_len, config["max_position_embeddings"] - config["pad_token_id"] - 1)  # small test models
    if name.startswith("ours-onnx"):
        from allmpnet.export.onnx import OnnxEncoder
        folder = allmpnet_onnx_export(model_dir)
        enc = OnnxEncoder(folder / "onnx" / ("model_int8.onnx" if name == "ours-onnx-int8" else "model.onnx"))
        enc.tokenizer.max_seq_length = max_len
        return Runner(enc.encode)  # our token-budget batching, as Encoder.encode
    if name.startswith("ours-"):
        from allmpnet import Encoder
        precision = name.removeprefix("ours-")
        enc = Encoder(model_dir, device="cpu", precision=precision, max_seq_length=max_len)
        return Runner(lambda texts: enc.encode(texts, show_progress_bar=False))  # our default batching
    if name == "fastembed":
        return fastembed_runner(model_dir, max_len, config["hidden_size"])
    from sentence_transformers import SentenceTransformer
    exports = exports_dir(model_dir)
    kwargs: dict = {}
    if name in ("st-fp32", "st-bf16"):
        st = SentenceTransformer(model_dir, device="cpu")
        if name == "st-bf16":
            import torch
            st.to(torch.bfloat16)
    elif name.startswith("st-onnx"):
        if name == "st-onnx-int8":
            kwargs["model_kwargs"] = {"file_name": f"onnx/model_qint8_{onnx_int8_config()}.onnx"}
        st = SentenceTransformer(str(exports / "onnx-model"), device="cpu", backend="onnx", **kwargs)
    else:
        if name == "st-openvino-fp32":
            kwargs["model_kwargs"] = {"ov_config": {"INFERENCE_PRECISION_HINT": "f32"}}
        elif name == "st-openvino-int8":
            kwargs["model_kwargs"] = {"file_name": "openvino/openvino_model_qint8_quantized.xml"}
        st = SentenceTransformer(str(exports / "openvino-model"), device="cpu", backend="openvino", **kwargs)
    st.max_seq_length = max_len

    def encode(texts: list[str]) -> np.ndarray:  # each tool's own default batching (32 texts)
        out = st.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)
    return Runner(encode)


def allmpnet_onnx_export(model_dir: str) -> Path:
    """Our export folder (fp32 and int8 graphs) of these weights, made once per version of the code that writes
    it (the model and the exporters: a changed recipe makes a new folder, never a stale graph) and staged, renamed
    when whole."""
    import allmpnet
    package = Path(allmpnet.__file__).parent
    code = hashlib.sha256()
    for source in sorted([*package.glob("export/*.py"), *package.glob("model/*.py")]):
        code.update(source.read_bytes())
    target = exports_dir(model_dir) / f"allmpnet-onnx-{code.hexdigest()[:12]}"
    if not (target / "onnx" / "model_int8.onnx").is_file():
        from allmpnet import Encoder
        from allmpnet.export.int8 import export_int8
        from allmpnet.export.onnx import export_onnx
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        enc = Encoder(model_dir, device="cpu", precision="fp32")
        export_int8(enc, export_onnx(enc, staging))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def fastembed_runner(model_dir: str, max_len: int, dim: int) -> Runner:
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType
    source = exports_dir(model_dir) / "onnx-model"
    local = exports_dir(model_dir) / f"fastembed-{max_len}"  # fastembed reads its length limit from the config
    if not local.is_dir():
        staging = local.with_name(local.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("model_qint8_*"))
        tokenizer_config = json.loads((staging / "tokenizer_config.json").read_text())
        tokenizer_config["model_max_length"] = tokenizer_config["max_length"] = max_len  # fastembed takes the min
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        staging.rename(local)
    name = f"allmpnet-benchmark/all-mpnet-base-v2-{max_len}"
    TextEmbedding.add_custom_model(model=name, pooling=PoolingType.MEAN, normalization=True,
                                   sources=ModelSource(hf=name), dim=dim, model_file="onnx/model.onnx")
    model = TextEmbedding(name, specific_model_path=str(local), local_files_only=True)
    return Runner(lambda texts: np.stack(list(model.embed(texts))).astype(np.float32))
