"""Where the quantization points of a plan sit: for each point the node that makes it (what ``--exclude``
names to keep it float), and the float outputs that points are measured at."""
from __future__ import annotations

from typing import Dict, List

import onnx

from eptq_onnx.plan.exclusions import node_id
from eptq_onnx.plan.qpoints import QuantPlan

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def float_outputs(model: onnx.ModelProto) -> List[str]:
    """The model outputs the analysis compares (the float ones)."""
    return [o.name for o in model.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]


def describe_points(model: onnx.ModelProto, plan: QuantPlan) -> Dict[str, tuple]:
    """point -> (kind, node, op type, tensor along the graph, exclude pattern)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    info: Dict[str, tuple] = {}
    for p in plan.weights:
        node = next(n for n in model.graph.node if node_id(n) == p.node)
        info.setdefault(p.weight, ("weight", p.node, p.op_type, node.output[0], p.node))
    for g in plan.groups:
        made_by = producer.get(g.roots[0])
        if made_by is None:
            info[g.roots[0]] = ("activation", "", "input", g.roots[0], None)
        else:
            info[g.roots[0]] = ("activation", node_id(made_by), made_by.op_type, g.roots[0], node_id(made_by))
    return info
