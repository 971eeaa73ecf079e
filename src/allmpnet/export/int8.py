"""The int8 ONNX graph: our CPU backend's int8 recipe (backends/cpu/int8.py) in standard ONNX ops, which stock
ONNX Runtime runs on any CPU.

Each projection of the fp32 export (a Gemm on the packed (tokens, C) activations, its weight an initializer) is
rewritten as

    x * (1/s)                                   SmoothQuant factors s (q|k|v, attention output, FFN up)
    r = ReduceMax(Abs(.), axis 1) / 127         one scale per row (token): no outlier channel of one token
    q = Cast<uint8>(Round(x / r) + 128)         coarsens the others
    MatMulInteger(q, Wq, 128) -> int32          Wq = int8 of W diag(s), one scale w per output channel
    Cast<float> * r * w + bias

Rows whose largest |x| exceeds 20x their RMS (the <s> and </s> tokens above all, ~8% of rows) lose every other entry
to a per-row scale. Their rounding residual, quantized again at 1/127 of the row's scale, goes through the same int8
weights (a second MatMulInteger on those rows alone) and is added back (ScatterND, reduction "add"): ~14-bit
activations for them, the graph's form of our kernels' routing of spiky rows to int16.

ONNX Runtime's dynamic quantizer instead takes one activation scale per tensor, which leaves the few residual-stream
outlier channels of this model every level and the other channels almost none (min cosine 0.61-0.83 to fp32).
Measured on 300 STSBenchmark sentences, one projection kind at a time in int8 (per-channel weights, per-row
activations, smoothed): q|k|v 0.9996, o 0.9999, FFN up 0.9976, FFN down 0.9979; all together 0.9957, and an empty
text (<s></s> alone) 0.985 until the spiky rows were routed (0.996). Our kernels' weight scales per group of 128
inputs would gain more (0.9991 on those sentences with the routing, emulated) but need a batched MatMulInteger and a sum over groups.
`Int8Recipe.keep_fp32` leaves chosen projections in fp32.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from allmpnet.encode.calibration import calibrate, calibration_batches, calibration_texts
from allmpnet.encode.encoder import Encoder

INT8_GRAPH_NAME = "model_int8.onnx"
WEIGHT_NAME = re.compile(r"^model\.network\.(encoder\.layer\.(\d+)\.(.+))\.weight$")
SMOOTHING = {"qkv": 0.8, "o": 0.8, "up": 0.8}  # alpha per projection, as our CPU kernels' recipe (FFN down: none)
SPIKY_ROW_RATIO = 20.0  # as our CPU kernels' recipe (backends/cpu/int8.py)


def projection(layer_name: str) -> str:
    """"qkv", "o", "up" or "down" for a projection's name (encoder.layer.3.intermediate.dense)."""
    if layer_name.endswith(".qkv"):
        return "qkv"
    if layer_name.endswith(".o"):
        return "o"
    return "up" if ".intermediate." in layer_name else "down"


@dataclass
class Int8Recipe:
    smoothing: dict[str, float] = field(default_factory=lambda: dict(SMOOTHING))
    keep_fp32: frozenset[str] = frozenset()  # projections (encoder.layer.N.…) left in fp32
    route: float = SPIKY_ROW_RATIO  # rows whose max |x| exceeds this many times their RMS run fp32 (0: none)


def smoothing_factors(absmax: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel s = max|x_k|^alpha / max|W_:,k|^(1 - alpha) (as backends/cpu/int8.py)."""
    a = np.maximum(absmax.astype(np.float64), 1e-5)
    w = np.maximum(np.abs(weight.astype(np.float64)).max(0), 1e-5)
    return np.clip(a ** alpha / w ** (1 - alpha), 1e-2, 1e2).astype(np.float32)


def input_ranges(encoder: Encoder) -> dict[str, np.ndarray]:
    """Per projection, the largest |x| of each input channel over the shipped calibration texts (fp32 pass)."""
    ids = encoder.tokenize(calibration_texts()).ids
    calibration = calibrate(encoder.model.eval(), calibration_batches(ids, torch.device("cpu")))
    return {name: t.numpy() for name, t in calibration.input_absmax.items()}


class GraphEditor:
    """Collects the nodes and initializers that replace one Gemm."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {i.name: i for i in graph.initializer}
        self.shared: dict[str, str] = {}

    def constant(self, name: str, array: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def shared_constant(self, key: str, array: np.ndarray) -> str:
        if key not in self.shared:
            self.shared[key] = self.constant(f"int8/{key}", array)
        return self.shared[key]


def quantized_gemm(editor: GraphEditor, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None,
                   smooth: np.ndarray | None, route: float) -> list[onnx.NodeProto]:
    """The nodes that compute node's Gemm (x W^T + b) with per-row int8 activations and per-channel int8 weights;
    rows whose largest |x| exceeds `route` times their RMS (0: none) take fp32 activations instead."""
    p = node.name.rstrip("/") + "/int8"
    x = node.input[0]
    nodes = []
    if smooth is not None:
        weight = weight * smooth[None, :]
        nodes.append(helper.make_node("Mul", [x, editor.constant(f"{p}/inv_smooth", (1 / smooth).astype(np.float32))],
                                      [f"{p}/xs"]))
        x = f"{p}/xs"
    w_scale = (np.maximum(np.abs(weight).max(1), 1e-12) / 127).astype(np.float32)  # (N,)
    wq = np.clip(np.round(weight / w_scale[:, None]), -127, 127).astype(np.int8).T.copy()  # (K, N)
    wq_name = editor.constant(f"{p}/wq", wq)
    eps = editor.shared_constant("eps", np.array(1e-12, dtype=np.float32))
    step = editor.shared_constant("inv127", np.array(1 / 127, dtype=np.float32))
    zero = editor.shared_constant("zero_point", np.array(128, dtype=np.uint8))
    offset = editor.shared_constant("offset", np.array(128, dtype=np.float32))
    out = node.output[0]
    int8_out = f"{p}/y_int8" if route > 0 else (f"{p}/y" if bias is not None else out)
    nodes += [
        helper.make_node("Abs", [x], [f"{p}/abs"]),
        helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/amax"], axes=[1], keepdims=1),
        helper.make_node("Max", [f"{p}/amax", eps], [f"{p}/amax_safe"]),
        helper.make_node("Mul", [f"{p}/amax_safe", step], [f"{p}/row_scale"]),  # (M, 1)
        helper.make_node("Div", [x, f"{p}/row_scale"], [f"{p}/scaled"]),
        helper.make_node("Round", [f"{p}/scaled"], [f"{p}/rounded"]),
        helper.make_node("Add", [f"{p}/rounded", offset], [f"{p}/shifted"]),
        helper.make_node("Cast", [f"{p}/shifted"], [f"{p}/q"], to=TensorProto.UINT8),
        helper.make_node("MatMulInteger", [f"{p}/q", wq_name, zero], [f"{p}/acc"]),
        helper.make_node("Cast", [f"{p}/acc"], [f"{p}/accf"], to=TensorProto.FLOAT),
        # the weight scales first: ONNX Runtime fuses MatMulInteger -> Cast -> Mul into MatMulIntegerToFloat,
        # which takes a per-column scale but would read a (rows, columns) product of scales as one number
        helper.make_node("Mul", [f"{p}/accf", editor.constant(f"{p}/w_scale", w_scale[None, :])], [f"{p}/acc_w"]),
        helper.make_node("Mul", [f"{p}/acc_w", f"{p}/row_scale"], [int8_out]),
    ]
    if route > 0:
        # spiky rows (the <s> and </s> tokens above all: one entry far above the rest) lose their other entries to
        # a per-row int8 scale. They are few (~8% of rows): their rounding residual, quantized again at 1/127 of
        # the row's scale, goes through the same int8 weights and is added back, which gives them ~14-bit
        # activations (our kernels route them to int16) without an fp32 copy of the weights
        ratio = editor.shared_constant("route_sq", np.array(route * route, dtype=np.float32))
        axis0 = editor.shared_constant("axis0", np.array([0], dtype=np.int64))
        axis1 = editor.shared_constant("axis1", np.array([1], dtype=np.int64))
        nodes += [
            helper.make_node("Mul", [x, x], [f"{p}/sq"]),
            helper.make_node("ReduceMean", [f"{p}/sq"], [f"{p}/ms"], axes=[1], keepdims=0),  # (M,)
            helper.make_node("Squeeze", [f"{p}/amax", axis1], [f"{p}/amax_row"]),
            helper.make_node("Mul", [f"{p}/amax_row", f"{p}/amax_row"], [f"{p}/amax_sq"]),
            helper.make_node("Mul", [f"{p}/ms", ratio], [f"{p}/limit"]),
            helper.make_node("Greater", [f"{p}/amax_sq", f"{p}/limit"], [f"{p}/spiky"]),
            helper.make_node("NonZero", [f"{p}/spiky"], [f"{p}/spiky_at"]),  # (1, R)
            helper.make_node("Transpose", [f"{p}/spiky_at"], [f"{p}/spiky_index"], perm=[1, 0]),  # (R, 1)
            helper.make_node("Squeeze", [f"{p}/spiky_at", axis0], [f"{p}/spiky_rows"]),  # (R,)
            helper.make_node("Gather", [x, f"{p}/spiky_rows"], [f"{p}/x_spiky"], axis=0),
            helper.make_node("Gather", [f"{p}/rounded", f"{p}/spiky_rows"], [f"{p}/r_spiky"], axis=0),
            helper.make_node("Gather", [f"{p}/row_scale", f"{p}/spiky_rows"], [f"{p}/s_spiky"], axis=0),
            helper.make_node("Mul", [f"{p}/r_spiky", f"{p}/s_spiky"], [f"{p}/x_int8"]),
            helper.make_node("Sub", [f"{p}/x_spiky", f"{p}/x_int8"], [f"{p}/residual"]),
            helper.make_node("Mul", [f"{p}/s_spiky", step], [f"{p}/s2"]),
            helper.make_node("Div", [f"{p}/residual", f"{p}/s2"], [f"{p}/scaled2"]),
            helper.make_node("Round", [f"{p}/scaled2"], [f"{p}/rounded2"]),
            helper.make_node("Add", [f"{p}/rounded2", offset], [f"{p}/shifted2"]),
            helper.make_node("Cast", [f"{p}/shifted2"], [f"{p}/q2"], to=TensorProto.UINT8),
            helper.make_node("MatMulInteger", [f"{p}/q2", wq_name, zero], [f"{p}/acc2"]),
            helper.make_node("Cast", [f"{p}/acc2"], [f"{p}/acc2f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}/acc2f", f"{p}/w_scale"], [f"{p}/acc2_w"]),
            helper.make_node("Mul", [f"{p}/acc2_w", f"{p}/s2"], [f"{p}/correction"]),
            helper.make_node("ScatterND", [int8_out, f"{p}/spiky_index", f"{p}/correction"],
                             [f"{p}/y" if bias is not None else out], reduction="add"),
        ]
    if bias is not None:
        nodes.append(helper.make_node("Add", [f"{p}/y", editor.constant(f"{p}/bias", bias)], [out]))
    return nodes


def quantize_graph(fp32_path: str | Path, out_path: str | Path, ranges: dict[str, np.ndarray],
                   recipe: Int8Recipe | None = None) -> Path:
    """Rewrite the fp32 export's projections as int8 (see the module's docstring); returns out_path."""
    recipe = recipe or Int8Recipe()
    model = onnx.load(str(fp32_path))
    graph = model.graph
    editor = GraphEditor(graph)
    new_nodes, replaced = [], set()
    for node in graph.node:
        match = WEIGHT_NAME.match(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if match is None or match.group(1) in recipe.keep_fp32:
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            new_nodes.append(node)
            continue
        name = match.group(1)
        weight = numpy_helper.to_array(editor.initializers[node.input[1]]).astype(np.float32)
        bias = numpy_helper.to_array(editor.initializers[node.input[2]]).astype(np.float32) if len(node.input) > 2 \
            else None
        alpha = recipe.smoothing.get(projection(name))
        smooth = None if alpha is None else smoothing_factors(ranges[name], weight, alpha)
        new_nodes += quantized_gemm(editor, node, weight, bias, smooth, recipe.route)
        replaced.update(node.input[1:])
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [i for i in graph.initializer if i.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    out_path = Path(out_path)
    onnx.save(model, str(out_path))
    return out_path


def export_int8(encoder: Encoder, fp32_path: str | Path, recipe: Int8Recipe | None = None) -> Path:
    """The int8 graph of an fp32 export (`export_onnx`), beside it as onnx/model_int8.onnx, calibrated on the
    shipped calibration texts with `encoder`'s weights (those the fp32 graph was traced from)."""
    fp32_path = Path(fp32_path)
    return quantize_graph(fp32_path, fp32_path.with_name(INT8_GRAPH_NAME), input_ranges(encoder), recipe)
