"""The int8 ONNX graph: our CPU backend's int8 recipe (backends/cpu/int8.py) in standard ONNX ops, which stock
ONNX Runtime runs on any CPU.

Each projection of the fp32 export (a Gemm on the packed (tokens, C) activations, its weight an initializer) is
rewritten as

    x * (1/s)                                 SmoothQuant factors s (alpha 0.5, every projection); for the
                                              attention output they go into v's weights instead (free)
    r = ReduceMax(Abs(x), axis 1) / 127       one scale per row (token): an outlier of one token coarsens no other
    q = QuantizeLinear(x, r, 128, axis=0)     uint8, one fused pass (per-axis scales along the rows)
    MatMulInteger(q, Wq, 128) -> int32        Wq = int8 of W diag(s), one scale w per output channel
    Cast<float> * w * r + bias

Spiky rows (largest |x| above 25x their mean |x|: <s>, </s> and a few others) lose their other entries to a per-row
scale. On the inputs of q|k|v, FFN up and FFN down their rounding residual, quantized again at 1/127 of the row's
scale, goes through the same int8 weights (a second MatMulInteger on those rows alone) and is added back
(ScatterND, reduction "add"): ~14-bit activations for them, the graph's form of our kernels' routing of spiky rows
to int16; the attention output needs none.

Why this form (measured against the fp32 graph, STSBenchmark's 2,552 test sentences and 300 SciFact passages):
- ONNX Runtime's dynamic quantizer takes one activation scale per tensor, which leaves the few residual-stream
  outlier channels every level and the others almost none: min cosine 0.61 / 0.83.
- ONNX's MatMulInteger takes one weight scale per output channel, not our kernels' per group of 128 inputs, so
  the kernels' smoothing (alpha 0.8, which moves the activations' outliers into the weights) coarsened whole weight
  rows: min cosine 0.989. alpha 0.5 on every projection, FFN down included, gives 0.9978 / 0.9990, STSBenchmark
  83.45 against fp32's 83.42. Without the spiky rows' residual pass: ~0.990.
- Speed: each per-row step is an unfused elementwise pass over the activations, comparable in cost to the int8
  matmul on 2 cores, so they are as few as the recipe allows (QuantizeLinear for Div, Round, Add, Cast; the
  attention output's factors folded into v; the spiky test on the Abs already made). The residual pass costs ~20%.
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
SMOOTHING = {"qkv": 0.5, "o": 0.5, "up": 0.5, "down": 0.5}  # SmoothQuant alpha per projection
SPIKY_ROW_RATIO = 25.0  # a row whose largest |x| exceeds this many times its mean |x| is spiky
ROUTED = ("qkv", "up", "down")  # the projections whose spiky rows get a residual pass
ZERO_POINT_FILL = helper.make_tensor("fill", TensorProto.UINT8, [1], [128])  # uint8 activations' zero point, per row


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
    route: float = SPIKY_ROW_RATIO  # spiky rows of the ROUTED projections get a residual pass (0: none)
    routed: tuple[str, ...] = ROUTED


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
    """Collects the initializers and the per-graph values (shared by every projection) of the rewrite."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {i.name: i for i in graph.initializer}
        self.shared: dict[str, str] = {}
        self.preamble: list[onnx.NodeProto] = []  # nodes that compute shared values, placed before first use

    def constant(self, name: str, array: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def shared_constant(self, key: str, array: np.ndarray) -> str:
        if key not in self.shared:
            self.shared[key] = self.constant(f"int8/{key}", array)
        return self.shared[key]

    def zero_points(self, x: str) -> str:
        """128 per row (uint8, (M,)) of the packed (M, C) tokens x: QuantizeLinear's per-row zero points, made once
        (every projection's input has the same rows)."""
        if "zero_points" not in self.shared:
            self.preamble += [helper.make_node("Shape", [x], ["int8/rows"], start=0, end=1),
                              helper.make_node("ConstantOfShape", ["int8/rows"], ["int8/zero_points"],
                                               value=ZERO_POINT_FILL)]
            self.shared["zero_points"] = "int8/zero_points"
        return self.shared["zero_points"]


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 W^T (K, N), scale per output channel (N,)) of an (N, K) weight."""
    scale = (np.maximum(np.abs(weight).max(1), 1e-12) / 127).astype(np.float32)
    wq = np.clip(np.round(weight / scale[:, None]), -127, 127).astype(np.int8).T.copy()
    return wq, scale


def quantized_gemm(editor: GraphEditor, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None,
                   smooth: np.ndarray | None, route: float, scaled_input: bool = False
                   ) -> list[onnx.NodeProto]:
    """The nodes that compute node's Gemm (x W^T + b) with per-row uint8 activations and per-channel int8 weights
    (see the module's docstring). smooth: SmoothQuant factors s, W diag(s) quantized; x is divided by s here,
    unless scaled_input (the producer of x already did). route: the spiky rows get a second, residual pass."""
    p = node.name.rstrip("/") + "/int8"
    x = node.input[0]
    nodes = []
    if smooth is not None:
        weight = weight * smooth[None, :]
        if not scaled_input:
            nodes.append(helper.make_node("Mul", [x, editor.constant(f"{p}/inv_smooth",
                                                                     (1 / smooth).astype(np.float32))], [f"{p}/xs"]))
            x = f"{p}/xs"
    wq, w_scale = quantize_weight(weight)
    wq_name = editor.constant(f"{p}/wq", wq)
    w_scale_name = editor.constant(f"{p}/w_scale", w_scale[None, :])
    eps = editor.shared_constant("eps", np.array(1e-12, dtype=np.float32))
    step = editor.shared_constant("inv127", np.array(1 / 127, dtype=np.float32))
    zero = editor.shared_constant("zero_point", np.array(128, dtype=np.uint8))
    one = editor.shared_constant("one", np.array([1], dtype=np.int64))
    zero_points = editor.zero_points(x)
    out = node.output[0]
    y = f"{p}/y" if bias is not None else out
    nodes += [
        helper.make_node("Abs", [x], [f"{p}/abs"]),
        helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/amax"], axes=[1], keepdims=0),  # (M,)
        helper.make_node("Mul", [f"{p}/amax", step], [f"{p}/step"]),
        helper.make_node("Max", [f"{p}/step", eps], [f"{p}/row_scale"]),
        # per-axis (axis 0: one scale per row) QuantizeLinear: x / scale, rounded half to even, + 128, saturated
        helper.make_node("QuantizeLinear", [x, f"{p}/row_scale", zero_points], [f"{p}/q"], axis=0),
        helper.make_node("MatMulInteger", [f"{p}/q", wq_name, zero], [f"{p}/acc"]),
        helper.make_node("Cast", [f"{p}/acc"], [f"{p}/accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}/accf", w_scale_name], [f"{p}/acc_w"]),
        helper.make_node("Unsqueeze", [f"{p}/row_scale", one], [f"{p}/row_scale_2d"]),
        helper.make_node("Mul", [f"{p}/acc_w", f"{p}/row_scale_2d"], [f"{p}/y_int8" if route else y]),
    ]
    if route:
        # spiky rows (largest |x| above `route` times their mean |x|) lose their other entries to the row's scale:
        # their rounding residual, quantized again at 1/127 of that scale, goes through the same int8 weights and
        # is added back, ~14-bit activations for them (our kernels route them to int16)
        k = editor.initializers[node.input[1]].dims[1]
        limit = editor.shared_constant(f"route_{k}", np.array(route / k, dtype=np.float32))
        spiky, spiky_index, spiky_zero_points = f"{p}/spiky", f"{p}/spiky_index", f"{p}/spiky_zero_points"
        nodes += [
            helper.make_node("ReduceSum", [f"{p}/abs", one], [f"{p}/sum_abs"], keepdims=0),
            helper.make_node("Mul", [f"{p}/sum_abs", limit], [f"{p}/limit"]),
            helper.make_node("Greater", [f"{p}/amax", f"{p}/limit"], [f"{p}/is_spiky"]),
            helper.make_node("NonZero", [f"{p}/is_spiky"], [f"{p}/spiky_at"]),  # (1, R)
            helper.make_node("Squeeze", [f"{p}/spiky_at", editor.shared_constant("axis0", np.array([0]))],
                             [spiky]),
            helper.make_node("Unsqueeze", [spiky, one], [spiky_index]),
            helper.make_node("Shape", [spiky], [f"{p}/spiky_shape"]),
            helper.make_node("ConstantOfShape", [f"{p}/spiky_shape"], [spiky_zero_points], value=ZERO_POINT_FILL),
            helper.make_node("Gather", [x, spiky], [f"{p}/x_spiky"], axis=0),
            helper.make_node("Gather", [f"{p}/q", spiky], [f"{p}/q_spiky"], axis=0),
            helper.make_node("Gather", [f"{p}/row_scale", spiky], [f"{p}/s_spiky"], axis=0),
            helper.make_node("DequantizeLinear", [f"{p}/q_spiky", f"{p}/s_spiky", spiky_zero_points],
                             [f"{p}/x_int8"], axis=0),
            helper.make_node("Sub", [f"{p}/x_spiky", f"{p}/x_int8"], [f"{p}/residual"]),
            helper.make_node("Mul", [f"{p}/s_spiky", step], [f"{p}/s2"]),
            helper.make_node("QuantizeLinear", [f"{p}/residual", f"{p}/s2", spiky_zero_points], [f"{p}/q2"],
                             axis=0),
            helper.make_node("MatMulInteger", [f"{p}/q2", wq_name, zero], [f"{p}/acc2"]),
            helper.make_node("Cast", [f"{p}/acc2"], [f"{p}/acc2f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}/acc2f", w_scale_name], [f"{p}/acc2_w"]),
            helper.make_node("Unsqueeze", [f"{p}/s2", one], [f"{p}/s2_2d"]),
            helper.make_node("Mul", [f"{p}/acc2_w", f"{p}/s2_2d"], [f"{p}/correction"]),
            helper.make_node("ScatterND", [f"{p}/y_int8", spiky_index, f"{p}/correction"], [y], reduction="add"),
        ]
    if bias is not None:
        nodes.append(helper.make_node("Add", [y, editor.constant(f"{p}/bias", bias)], [out]))
    return nodes


def projections(graph: onnx.GraphProto, keep_fp32: frozenset[str]) -> dict[str, onnx.NodeProto]:
    """The encoder's projections to quantize, by name (encoder.layer.N.…): Gemms x W^T (+ b), W an initializer."""
    found = {}
    for node in graph.node:
        match = WEIGHT_NAME.match(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if match is None or match.group(1) in keep_fp32:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB", 0) == 1 and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0:
            found[match.group(1)] = node
    return found


def quantize_graph(fp32_path: str | Path, out_path: str | Path, ranges: dict[str, np.ndarray],
                   recipe: Int8Recipe | None = None) -> Path:
    """Rewrite the fp32 export's projections as int8 (see the module's docstring); returns out_path."""
    recipe = recipe or Int8Recipe()
    model = onnx.load(str(fp32_path))
    graph = model.graph
    editor = GraphEditor(graph)
    chosen = projections(graph, recipe.keep_fp32)
    arrays = {name: [numpy_helper.to_array(editor.initializers[i]).astype(np.float32) for i in node.input[1:]]
              for name, node in chosen.items()}
    smooth = {}
    for name in chosen:
        alpha = recipe.smoothing.get(projection(name))
        smooth[name] = None if alpha is None else smoothing_factors(ranges[name], arrays[name][0], alpha)
    # the attention output's factors go into v's output channels (q|k|v's last third), free: the attention is
    # linear in v, so o's input arrives already divided by them
    prescaled = set()
    for name in chosen:
        o = name[:-len("qkv")] + "o" if projection(name) == "qkv" else None
        if o in chosen and smooth.get(o) is not None:
            inv = 1 / smooth[o]
            weight = arrays[name][0].copy()
            weight[-len(inv):] *= inv[:, None]
            arrays[name][0] = weight
            if len(arrays[name]) > 1:
                bias = arrays[name][1].copy()
                bias[-len(inv):] *= inv
                arrays[name][1] = bias
            prescaled.add(o)
    by_node = {id(node): name for name, node in chosen.items()}
    new_nodes, replaced = [], set()
    for node in graph.node:
        name = by_node.get(id(node))
        if name is None:
            new_nodes.append(node)
            continue
        weight, bias = arrays[name][0], (arrays[name][1] if len(arrays[name]) > 1 else None)
        route = recipe.route if projection(name) in recipe.routed else 0.0
        rewritten = quantized_gemm(editor, node, weight, bias, smooth[name], route, scaled_input=name in prescaled)
        new_nodes += editor.preamble + rewritten
        editor.preamble = []
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
