"""A fake-quant reference of a QDQ model, built from the quantizers rather than from the written file.

Weights and int32 biases are replaced by their dequantized values (codes x step, in numpy) and every quantized
activation tensor t by ``(clip(round(t / s) + z, qmin, qmax) - z) * s`` written with plain
Div/Round/Add/Clip/Sub/Mul. It computes what the QDQ model should compute, by a different route than
the QDQ writer, so validation can find where a written model goes wrong (the first tensor where
the two diverge).
"""
from __future__ import annotations

from typing import Dict, Set, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from eptq_onnx.export.writer import quantize_biases, rewire, weight_readers
from eptq_onnx.plan.exclusions import node_id
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.graph.tensor_store import store_of
from eptq_onnx.init.weights import WeightQuant

SUFFIX = "_fake_quant"


def fake_quant_name(tensor: str) -> str:
    """The reference model's name of the quantized values of ``tensor``."""
    return tensor + SUFFIX


def _elem_np_types(graph: onnx.GraphProto) -> Dict[str, np.dtype]:
    types = {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    return types


def _float_read(graph: onnx.GraphProto, readers: Set[Tuple[str, str]], weights: Dict[str, WeightQuant]) -> Set[str]:
    """The quantized weights that a node outside ``readers`` (one kept float) also reads: their dequantized
    values go into initializers of their own, the float ones stay for that node."""
    return {inp for node in graph.node for inp in node.input if inp in weights and (node_id(node), inp) not in readers}


def fake_quant_model(model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant], acts: Dict[int, ActParams],
                     quantize_outputs: bool = False, quantize_bias: bool = True) -> onnx.ModelProto:
    """The float ``model`` with dequantized weights and fake-quantized activations (see module doc).

    Every quantized tensor t is also available as ``fake_quant_name(t)``; graph outputs that are
    quantized (``quantize_outputs``) keep their name and carry the quantized values.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    store = store_of(out)
    readers = weight_readers(plan)
    shared = _float_read(graph, readers, weights)
    for tensor in list(graph.initializer):
        if tensor.name in weights:
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            name = fake_quant_name(tensor.name) if tensor.name in shared else tensor.name
            dequantized = numpy_helper.from_array(weights[tensor.name].dequantized().astype(dtype), name)
            if store is not None:  # one dequantized weight in memory at a time
                store.keep(dequantized)
            if tensor.name in shared:
                graph.initializer.append(dequantized)
            else:
                tensor.CopyFrom(dequantized)
    if shared:
        for node in graph.node:
            for i, inp in enumerate(node.input):
                if inp in shared and (node_id(node), inp) in readers:
                    node.input[i] = fake_quant_name(inp)
    if quantize_bias:
        _dequantized_biases(out, plan, weights, acts)
    types = _elem_np_types(graph)
    outputs = {o.name for o in graph.output}
    fq_nodes: Dict[str, list] = {}
    rename: Dict[str, str] = {}
    producer_rename: Dict[str, str] = {}
    for g in plan.groups:
        p = acts[g.id]
        qmin, qmax = p.qrange
        for t in g.tensors:
            dtype = types.get(t, np.dtype(np.float32))
            source, result = t, fake_quant_name(t)
            if t in outputs and quantize_outputs:
                source = f"{t}_float{SUFFIX}"
                producer_rename[t] = source
                result = t
            else:
                rename[t] = result
            consts = {k: numpy_helper.from_array(np.array(v, dtype=dtype), f"{t}{SUFFIX}_{k}")
                      for k, v in (("scale", p.scale), ("zero", p.zero_point), ("qmin", qmin), ("qmax", qmax))}
            graph.initializer.extend(consts.values())
            c = {k: v.name for k, v in consts.items()}
            names = [f"{t}{SUFFIX}_{step}" for step in ("div", "round", "shift", "clip", "unshift")]
            fq_nodes[t] = [
                helper.make_node("Div", [source, c["scale"]], [names[0]]),
                helper.make_node("Round", [names[0]], [names[1]]),
                helper.make_node("Add", [names[1], c["zero"]], [names[2]]),
                helper.make_node("Clip", [names[2], c["qmin"], c["qmax"]], [names[3]]),
                helper.make_node("Sub", [names[3], c["zero"]], [names[4]]),
                helper.make_node("Mul", [names[4], c["scale"]], [result]),
            ]
    rewire(graph, after=fq_nodes, rename=rename, producer_rename=producer_rename)
    return out


def _dequantized_biases(model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant], acts: Dict[int, ActParams]) -> None:
    """Each weighted op with an int32 bias reads its dequantized copy (one per op: scales differ)."""
    nodes = {(n.name or n.output[0]): n for n in model.graph.node}
    for bq in quantize_biases(model, plan, weights, acts)[0]:
        name = f"{bq.bias}__{bq.node}{SUFFIX}"
        model.graph.initializer.append(numpy_helper.from_array(bq.dequantized(), name))
        node = nodes[bq.node]
        node.input[list(node.input).index(bq.bias)] = name
