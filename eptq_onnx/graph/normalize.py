"""Bring any exported float ONNX model into one canonical form before quantization.

Topologically sorted (any valid order is accepted), checked, float16 computed in float32
(float16.py), opset >= 13, constants folded (Constant nodes become initializers, static shape
subgraphs fold away), Identity nodes removed, sorted again, shapes inferred, SAME_* auto_pad written as
explicit pads where the input shape fixes them (explicit_pads.py).
Graph input and output names, their order and their dynamic dimensions are kept (a declared output
shape of the wrong rank, which onnxruntime runs with a warning, takes the inferred shape).
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter
from onnx_graphsurgeon.logger import G_LOGGER

from eptq_onnx.graph import model_io
from eptq_onnx.errors import ModelError
from eptq_onnx.graph.explicit_pads import make_pads_explicit
from eptq_onnx.graph.float16 import has_float16, to_float32
from eptq_onnx.graph.tensor_store import store_of
from eptq_onnx.graph.toposort import toposort_graph

MIN_OPSET = 11
QDQ_MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
_DEFAULT_DOMAINS = ("", "ai.onnx")


def normalize_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Check, upgrade, fold and clean a model; returns a new model (the argument is not changed)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    toposort_graph(copy.graph)  # onnxruntime runs any node order; the checker and every stage need this one
    _repair_output_shapes(copy)
    _check(copy)
    if has_float16(copy):
        to_float32(copy)
    opset = model_io.default_opset(copy)
    if opset < MIN_OPSET:
        raise ModelError(f"opset {opset} is older than {MIN_OPSET}: re-export with opset >= {QDQ_MIN_OPSET}")
    model = upgrade_opset(copy, QDQ_MIN_OPSET)
    model.ir_version = model_io.ir_version_for(model_io.default_opset(model))
    _drop_initializer_inputs(model.graph)
    model = _infer_shapes(model)
    model = _simplify(model)
    model = _infer_shapes(model)
    make_pads_explicit(model.graph)
    return model


def constant_only_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes (other than Constant) that compute from constants only: what constant
    folding would have removed (nodes in topological order)."""
    known = {init.name for init in model.graph.initializer} | {""}
    found = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            known.update(node.output)
        elif node.input and all(name in known for name in node.input):
            known.update(node.output)
            found.append(node.name or node.output[0])
    return found


def _repair_output_shapes(model: onnx.ModelProto) -> None:
    """Declared graph-output shapes whose rank contradicts what the graph computes take the inferred
    shape: onnxruntime only warns about them, the checker's strict inference refuses the model."""
    with model_io.large_tensors_detached(model):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
    for output in probe.graph.output:
        output.type.tensor_type.ClearField("shape")
    del probe.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True).graph.output
    except Exception:  # noqa: BLE001 - inference is best effort; the checker reports real problems
        return
    for declared, found in zip(model.graph.output, inferred):
        have, got = declared.type.tensor_type, found.type.tensor_type
        if have.HasField("shape") and got.HasField("shape") and len(have.shape.dim) != len(got.shape.dim):
            have.shape.CopyFrom(got.shape)


def _check(model: onnx.ModelProto) -> None:
    """onnx.checker (with shape inference where the model fits in one protobuf)."""
    try:
        if model_io.serialized_size(model) > model_io.EXTERNAL_DATA_THRESHOLD or store_of(model):
            _check_large(model)
        else:
            onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # noqa: BLE001 - ValidationError, InferenceError, ValueError, ...
        raise ModelError(f"the model fails onnx.checker: {_one_line(err)}") from err


def _check_large(model: onnx.ModelProto) -> None:
    """Models over 2 GB (or in a tensor store) are checked from a file with external data, without full check."""
    with model_io.model_path(model) as path:
        onnx.checker.check_model(str(path), full_check=False)


def _one_line(err: Exception, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The model converted to default-domain ``opset``; returned as is when already there or newer."""
    current = model_io.default_opset(model)
    if current >= opset:
        return model
    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as err:  # noqa: BLE001 - the converter raises bare RuntimeError/IndexError/...
        raise ModelError(
            f"cannot upgrade opset {current} to {opset}: {_one_line(err)}; re-export with opset >= {opset}"
        ) from err
    converted.ir_version = model_io.ir_version_for(opset)
    return converted


def raise_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """A prepared model converted to ``opset`` with its shapes inferred again, every tensor it had still
    there under its name (a ModelError otherwise: the stages after it refer to them by name)."""
    if model_io.default_opset(model) >= opset:
        return model
    raised = _infer_shapes(upgrade_opset(model, opset))
    before = {o for n in model.graph.node for o in n.output} | {t.name for t in model.graph.initializer}
    after = {o for n in raised.graph.node for o in n.output} | {t.name for t in raised.graph.initializer}
    lost = sorted(before - after)
    if lost:
        raise ModelError(f"the opset {opset} converter renamed or removed {len(lost)} tensor(s), e.g. {lost[0]!r}")
    return raised


def _drop_initializer_inputs(graph: onnx.GraphProto) -> None:
    """Initializers listed as graph inputs (old exporters) become plain constants."""
    initializers = {init.name for init in graph.initializer}
    inputs = [inp for inp in graph.input if inp.name not in initializers]
    if len(inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(inputs)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that never fails: unknown (custom) ops just leave shapes unknown.

    Models too large for one protobuf are inferred with their large tensors detached (shapes
    need no weight values), and the inferred value_info is copied back.
    """
    try:
        if model_io.serialized_size(model) <= model_io.EXTERNAL_DATA_THRESHOLD:
            return onnx.shape_inference.infer_shapes(model, data_prop=True)
        with model_io.large_tensors_detached(model):
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort
        return model
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    for output, typed in zip(model.graph.output, inferred.graph.output):
        output.CopyFrom(typed)
    return model


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, Identity removal and topological sort with onnx-graphsurgeon."""
    graph = gs.import_onnx(model)
    with G_LOGGER.suppress(G_LOGGER.ERROR):
        _fold_constants(graph)
        _remove_identities(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        result = gs.export_onnx(graph, do_type_check=False, opset_imports=list(model.opset_import))
    _copy_model_fields(model, result)
    return result


def _fold_constants(graph: gs.Graph) -> None:
    graph.toposort()
    kwargs = {"should_exclude_node": lambda node: node.domain not in (*_DEFAULT_DOMAINS, None)}
    try:
        graph.fold_constants(error_ok=False, **kwargs)
    except Exception:  # noqa: BLE001 - onnxruntime failed on some part: fold part by part
        graph.fold_constants(partitioning="recursive", error_ok=True, **kwargs)
    graph.cleanup(remove_unused_graph_inputs=False)


def _remove_identities(graph: gs.Graph) -> None:
    """Rewire around Identity nodes, in subgraphs too, keeping graph input/output names."""
    for node in list(graph.nodes):
        for subgraph in node.subgraphs():
            _remove_identities(subgraph)
        if node.op == "Identity" and node.domain in (*_DEFAULT_DOMAINS, None):
            _bypass_identity(graph, node)


def _bypass_identity(graph: gs.Graph, node: gs.Node) -> None:
    src, dst = node.inputs[0], node.outputs[0]
    if dst not in graph.outputs:
        _replace_uses(dst, src)
    elif _is_renamable(graph, src):
        # dst is a graph output: the producer of src writes dst directly.
        _replace_uses(src, dst, skip=node)
        producer = src.inputs[0]
        index = producer.outputs.index(src)
        node.outputs.clear()
        producer.outputs[index] = dst
    else:
        return
    node.inputs.clear()
    node.outputs.clear()


def _is_renamable(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """An output of a node of this graph (not an outer scope) that is no graph input or output."""
    return (
        isinstance(tensor, gs.Variable)
        and len(tensor.inputs) == 1
        and any(node is tensor.inputs[0] for node in graph.nodes)
        and tensor not in graph.inputs
        and tensor not in graph.outputs
    )


def _replace_uses(old: gs.Tensor, new: gs.Tensor, skip: gs.Node | None = None) -> None:
    for consumer in list(old.outputs):
        if consumer is skip:
            continue
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new


def _copy_model_fields(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Keep what onnx-graphsurgeon does not carry over."""
    target.ir_version = source.ir_version
    target.doc_string = source.doc_string
    target.domain = source.domain
    target.model_version = source.model_version
    target.metadata_props.extend(source.metadata_props)
