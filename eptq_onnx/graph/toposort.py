"""Topological sort of an ONNX graph's nodes, in place (onnx.checker needs it; onnxruntime does not).

Kahn's algorithm, stable: of the nodes whose inputs are all available, the one earliest in the
original order comes first, so a sorted graph keeps its order. A node holding subgraphs (If,
Loop, Scan) also waits for the outer-scope names its subgraphs read; each subgraph is sorted
the same way. Names no node of the graph produces (graph inputs, initializers, outer scope, or
undefined) count as available; nodes left in a cycle keep their order at the end, where
onnx.checker names the problem.
"""
from __future__ import annotations

import heapq
from typing import Dict, Iterator, List, Set

import onnx


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def outer_names(graph: onnx.GraphProto) -> Set[str]:
    """Names a graph (and its subgraphs) reads without defining them: its outer-scope references."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {o for n in graph.node for o in n.output}
    read: Set[str] = set()
    for node in graph.node:
        read.update(node.input)
        for sub in subgraphs(node):
            read |= outer_names(sub)
    return read - defined - {""}


def node_reads(node: onnx.NodeProto) -> Set[str]:
    """Every name a node needs before it runs: its inputs and its subgraphs' outer-scope names."""
    names = set(node.input) - {""}
    for sub in subgraphs(node):
        names |= outer_names(sub)
    return names


def toposort_graph(graph: onnx.GraphProto) -> bool:
    """Sort ``graph.node`` (and every subgraph's) topologically, stably; True if any order changed."""
    changed = False
    for node in graph.node:
        for sub in subgraphs(node):
            changed |= toposort_graph(sub)
    nodes = list(graph.node)
    producer: Dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.output:
            if name:
                producer.setdefault(name, index)
    waiting: List[int] = []  # per node: how many of its producers have not run yet
    readers: Dict[int, List[int]] = {}
    for index, node in enumerate(nodes):
        deps = {producer[n] for n in node_reads(node) if n in producer and producer[n] != index}
        waiting.append(len(deps))
        for dep in deps:
            readers.setdefault(dep, []).append(index)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: List[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for reader in readers.get(index, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    placed = set(order)
    order += [i for i in range(len(nodes)) if i not in placed]  # a cycle: left for the checker to name
    if order == list(range(len(nodes))):
        return changed
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    return True
