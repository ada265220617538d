"""A read-only index of a graph: producers, consumers, initializers and value infos by tensor name."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Set
import onnx


FLOAT_TYPES = frozenset((onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE))


def unique_name(base: str, taken: set) -> str:
    """``base``, or ``base_2``, ``base_3``, ... when taken; the name returned is added to ``taken``."""
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name

def drop_unread_initializers(graph: onnx.GraphProto, names: set) -> None:
    """Remove the initializers in ``names`` that no node reads and no graph output names any more."""
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name not in names or t.name in read]
    if len(kept) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


class GraphIndex:
    """Producers, consumers, constants and element types of a graph's tensors."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes = list(graph.node)
        self.constants = {t.name: t for t in graph.initializer}
        self.producer: Dict[str, onnx.NodeProto] = {}
        self.consumers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.outputs = {o.name for o in graph.output}
        self.inputs = [i.name for i in graph.input if i.name not in self.constants]
        self.elem_type: Dict[str, int] = {}
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type"):
                self.elem_type[vi.name] = vi.type.tensor_type.elem_type

    def is_activation(self, name: str) -> bool:
        """A float tensor computed at run time (not a constant)."""
        return bool(name) and name not in self.constants and self.elem_type.get(name) in FLOAT_TYPES

    def untyped(self, name: str) -> bool:
        """A tensor computed at run time whose element type shape inference could not tell."""
        return bool(name) and name not in self.constants and name not in self.elem_type

    def is_float_constant(self, name: str) -> bool:
        return name in self.constants and self.constants[name].data_type in FLOAT_TYPES

    def act_inputs(self, node: onnx.NodeProto) -> List[str]:
        return [i for i in node.input if self.is_activation(i)]

    def downstream(self, tensors: Iterable[str]) -> Set[str]:
        """``tensors`` and every tensor computed from one of them. A node holding a subgraph (If, Loop,
        Scan) may read any outer tensor implicitly: its outputs always count as downstream."""
        reached = set(tensors)
        for node in self.nodes:  # topologically sorted (as ONNX requires of a graph)
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute) or \
                    any(i in reached for i in node.input if i):
                reached.update(o for o in node.output if o)
        return reached
