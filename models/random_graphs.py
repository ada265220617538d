"""Random small ONNX graphs built from the ops eptq-onnx supports, for property-based fuzzing.

A ``GraphSpec`` (what hypothesis draws and shrinks) is a family, an opset, a seed and a list of
layer kinds; ``build(spec)`` turns it into a checked float model with random weights. Two
families: ``seq`` (activations [N, T, D]: MatMul/Gemm-like layers, residual joins, Concat,
Transpose, Reshape, Softmax, LayerNormalization, GELU written with Erf or as the Gelu op,
constants) and ``image`` (NCHW: Conv incl. depthwise, BatchNormalization, pools, residual joins,
Concat, Resize, a Gemm head). Layers that do not fit the current shape are skipped, so every
spec builds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEQ_LAYERS = ("matmul", "matmul_bias", "relu", "sigmoid", "tanh", "gelu_erf", "gelu_op", "softmax", "layernorm",
              "residual", "concat", "transpose", "mul_const", "add_const", "act_matmul", "reshape", "gemm_head")
IMAGE_LAYERS = ("conv1", "conv3", "depthwise", "batchnorm", "relu", "clip", "maxpool", "avgpool", "residual",
                "concat", "resize", "mul_const", "gemm_head")
FAMILIES = {"seq": SEQ_LAYERS, "image": IMAGE_LAYERS}
OPSETS = tuple(range(13, 22))


@dataclass(frozen=True)
class GraphSpec:
    """What a random graph is made of; ``build`` makes the model."""

    family: str
    opset: int
    seed: int
    layers: Tuple[str, ...]
    dims: Tuple[int, int] = (4, 8)  # seq: (T, D); image: (C, H=W)
    dynamic_batch: bool = True


@dataclass
class _Graph:
    rng: np.random.Generator
    opset: int
    nodes: List[onnx.NodeProto] = field(default_factory=list)
    initializers: List[onnx.TensorProto] = field(default_factory=list)
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)  # tensor -> shape without batch
    counter: int = 0

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def const(self, array: np.ndarray, base: str = "c") -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, *shape: int, fan_in: int) -> str:
        return self.const((self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), "w")

    def node(self, op: str, inputs: List[str], shape: Tuple[int, ...], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        self.shapes[out] = shape
        return out

    def earlier(self, x: str, shape: Tuple[int, ...]) -> str | None:
        """An earlier tensor of this shape other than x (for residual joins and Concat)."""
        candidates = [t for t, s in self.shapes.items() if s == shape and t != x]
        return candidates[int(self.rng.integers(len(candidates)))] if candidates else None


def _gelu_erf(g: _Graph, x: str, s: Tuple[int, ...]) -> str:
    scaled = g.node("Div", [x, g.const(np.array(np.sqrt(2.0), np.float32))], s)
    erf = g.node("Erf", [scaled], s)
    one = g.node("Add", [erf, g.const(np.array(1.0, np.float32))], s)
    half = g.node("Mul", [x, g.const(np.array(0.5, np.float32))], s)
    return g.node("Mul", [half, one], s)


def _seq_layer(g: _Graph, kind: str, x: str) -> str:
    s = g.shapes[x]
    if kind in ("matmul", "matmul_bias") and len(s) == 2:
        out = int(g.rng.choice([4, 8, 12]))
        y = g.node("MatMul", [x, g.weight(s[-1], out, fan_in=s[-1])], (s[0], out))
        return g.node("Add", [y, g.const(g.rng.normal(size=out).astype(np.float32) * 0.1)], (s[0], out)) if kind == "matmul_bias" else y
    if kind in ("relu", "sigmoid", "tanh"):
        return g.node({"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}[kind], [x], s)
    if kind == "gelu_erf":
        return _gelu_erf(g, x, s)
    if kind == "gelu_op" and g.opset >= 20:
        return g.node("Gelu", [x], s)
    if kind == "softmax":
        return g.node("Softmax", [x], s, axis=-1)
    if kind == "layernorm" and g.opset >= 17:
        d = s[-1]
        return g.node("LayerNormalization", [x, g.const(np.ones(d, np.float32)), g.const(np.zeros(d, np.float32))], s, axis=-1)
    if kind == "residual" and (other := g.earlier(x, s)):
        return g.node("Add", [x, other], s)
    if kind == "concat" and len(s) == 2 and (other := g.earlier(x, s)):
        return g.node("Concat", [x, other], (s[0], 2 * s[1]), axis=-1)
    if kind == "transpose" and len(s) == 2:
        return g.node("Transpose", [x], (s[1], s[0]), perm=[0, 2, 1])
    if kind in ("mul_const", "add_const"):
        c = g.const(g.rng.normal(size=s[-1]).astype(np.float32) * (0.5 if kind == "mul_const" else 0.1))
        return g.node("Mul" if kind == "mul_const" else "Add", [x, c], s)
    if kind == "act_matmul" and len(s) == 2:
        xt = g.node("Transpose", [x], (s[1], s[0]), perm=[0, 2, 1])
        return g.node("MatMul", [x, xt], (s[0], s[0]))
    if kind == "reshape" and len(s) == 2 and s[1] % 2 == 0:
        return g.node("Reshape", [x, g.const(np.array([0, s[0] * 2, s[1] // 2], np.int64))], (s[0] * 2, s[1] // 2))
    if kind == "gemm_head" and len(s) == 2:
        flat = g.node("Flatten", [x], (s[0] * s[1],), axis=1)
        return g.node("Gemm", [flat, g.weight(4, s[0] * s[1], fan_in=s[0] * s[1]), g.const(np.zeros(4, np.float32))],
                      (4,), transB=1)
    return x


def _conv(g: _Graph, x: str, s: Tuple[int, ...], kernel: int, depthwise: bool) -> str:
    c = s[0]
    out = c if depthwise else int(g.rng.choice([4, 8]))
    groups = c if depthwise else 1
    w = g.weight(out, c // groups, kernel, kernel, fan_in=c // groups * kernel * kernel)
    b = g.const(g.rng.normal(size=out).astype(np.float32) * 0.1)
    pad = kernel // 2
    return g.node("Conv", [x, w, b], (out, s[1], s[2]), kernel_shape=[kernel, kernel], pads=[pad] * 4, group=groups)


def _image_layer(g: _Graph, kind: str, x: str) -> str:
    s = g.shapes[x]
    if len(s) != 3:  # after the Gemm head only elementwise layers apply
        return g.node("Relu", [x], s) if kind == "relu" else x
    c = s[0]
    if kind in ("conv1", "conv3", "depthwise"):
        return _conv(g, x, s, 1 if kind == "conv1" else 3, kind == "depthwise")
    if kind == "batchnorm":
        params = [g.const(v.astype(np.float32)) for v in (1 + 0.1 * g.rng.normal(size=c), 0.1 * g.rng.normal(size=c),
                                                          0.1 * g.rng.normal(size=c), 1 + 0.1 * g.rng.random(c))]
        return g.node("BatchNormalization", [x, *params], s)
    if kind == "relu":
        return g.node("Relu", [x], s)
    if kind == "clip":
        return g.node("Clip", [x, g.const(np.array(0, np.float32)), g.const(np.array(6, np.float32))], s)
    if kind == "maxpool":
        return g.node("MaxPool", [x], s, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    if kind == "avgpool":
        return g.node("AveragePool", [x], s, kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    if kind == "residual" and (other := g.earlier(x, s)):
        return g.node("Add", [x, other], s)
    if kind == "concat" and (other := g.earlier(x, s)):
        return g.node("Concat", [x, other], (2 * c, s[1], s[2]), axis=1)
    if kind == "resize" and s[1] <= 8:
        scales = g.const(np.array([1, 1, 2, 2], np.float32))
        return g.node("Resize", [x, "", scales], (c, 2 * s[1], 2 * s[2]), mode="nearest")
    if kind == "mul_const":
        return g.node("Mul", [x, g.const((1 + 0.2 * g.rng.normal(size=(c, 1, 1))).astype(np.float32))], s)
    if kind == "gemm_head":
        pooled = g.node("GlobalAveragePool", [x], (c, 1, 1))
        flat = g.node("Flatten", [pooled], (c,), axis=1)
        return g.node("Gemm", [flat, g.weight(c, 4, fan_in=c), g.const(np.zeros(4, np.float32))], (4,))
    return x


LAYER_BUILDERS: Dict[str, Callable[[_Graph, str, str], str]] = {"seq": _seq_layer, "image": _image_layer}


def build(spec: GraphSpec) -> onnx.ModelProto:
    """The float model of a spec: input ``x``, one output ``y`` (checked, shapes inferred)."""
    g = _Graph(np.random.default_rng(spec.seed), spec.opset)
    a, b = spec.dims
    g.shapes["x"] = (a, b) if spec.family == "seq" else (a, b, b)
    current = "x"
    for kind in spec.layers:
        current = LAYER_BUILDERS[spec.family](g, kind, current)
    if current == "x":  # nothing applied: one weighted layer so the graph is not empty
        current = LAYER_BUILDERS[spec.family](g, "matmul" if spec.family == "seq" else "conv1", current)
    g.nodes.append(helper.make_node("Identity", [current], ["y"], name="output"))
    batch: List[int | str] = ["N"] if spec.dynamic_batch else [2]
    graph = helper.make_graph(
        g.nodes, "random_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*batch, *g.shapes["x"]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*batch, *g.shapes[current]])],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)], producer_name="random_graphs")
    model.ir_version = 8 if spec.opset <= 18 else 10
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def graph_specs():
    """A hypothesis strategy of GraphSpec (hypothesis is a dev dependency: imported here only)."""
    from hypothesis import strategies as st

    @st.composite
    def specs(draw) -> GraphSpec:
        family = draw(st.sampled_from(sorted(FAMILIES)))
        layers = draw(st.lists(st.sampled_from(FAMILIES[family]), min_size=1, max_size=8))
        dims = (draw(st.sampled_from([3, 4, 8])), draw(st.sampled_from([4, 8]))) if family == "image" else \
            (draw(st.sampled_from([2, 4, 6])), draw(st.sampled_from([4, 8, 16])))
        return GraphSpec(family, draw(st.sampled_from(OPSETS)), draw(st.integers(0, 2**16)), tuple(layers), dims,
                         draw(st.booleans()))

    return specs()
