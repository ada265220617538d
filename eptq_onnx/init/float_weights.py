"""Float weights where 8 bits lose what a layer computes (``--float-weights-below DB``).

Learned weights round well at 8 bits: a layer's output keeps 35-50 dB SQNR with only its weight on
the MSE-initialized 8-bit grid. Fixed signal-processing filters exported as Conv weights do not: the
taps of a long lowpass FIR filter (a constant-Q transform's decimation filter, basic_pitch's front
end) are tiny outside the main lobe, 8 bits lose its stopband, and every octave after it aliases.
Such a weight is found on the layer-input rows that the range pass samples (``calib.layer_inputs``),
for every layer that reads it (a shared filter is read once per octave, and the later octaves lose
most): the SQNR of the layer's output with only the weight on its 8-bit codes. A weight whose worst
reader falls below ``below_db`` stays float, and so does every layer that reads it (``--exclude``
semantics, plan/exclusions.py): a shared weight is one initializer, quantized for all its readers or
for none.

Each layer is judged alone: the floating is kept only when it raises the model's output SQNR
against the float model on a few calibration samples (``OutputCheck``), and the report names each
weight, its readers and what it bought.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import numpy as np
import onnx

from eptq_onnx.calib.layer_inputs import layer_product
from eptq_onnx.graph.index import GraphIndex
from eptq_onnx.graph.tensor_store import tensor_array
from eptq_onnx.init.quantizers import sqnr_db
from eptq_onnx.init.weights import WeightQuant
from eptq_onnx.plan.qpoints import QuantPlan

FLOAT_WEIGHT_BITS = 8  # the width judged: a weight that 8 bits lose, fewer bits lose too


@dataclass
class FloatWeight:
    """A weight left float, the layers that read it, and the reader that its 8-bit codes lost most."""

    weight: str
    nodes: List[str]
    layer: str
    db_8: float  # that reader's output SQNR with only the weight on its 8-bit codes


def weight_output_sqnr(rows: np.ndarray, weight: np.ndarray, quantized: np.ndarray, axis: int) -> Optional[float]:
    """SQNR (dB) of a layer's output on its input rows [n, groups, K] when only its weight is ``quantized``
    (None when the weight's layout does not match the rows)."""
    exact = layer_product(rows, weight, axis)
    return None if exact is None else sqnr_db(exact, layer_product(rows, quantized, axis))


def choose_float_weights(model: onnx.ModelProto, plan: QuantPlan, weights: Mapping[str, WeightQuant],
                         rows: Mapping[str, np.ndarray], below_db: float,
                         keep: frozenset = frozenset()) -> List[FloatWeight]:
    """The 8-bit weights of ``plan`` whose codes leave a reading layer's output below ``below_db`` on its
    sampled rows (``rows``: per node, calib.layer_inputs.LayerRowSampler.reader_rows), worst first;
    ``keep``: weights whose width the user set (left as they are)."""
    index = GraphIndex(model.graph)
    readers: Dict[str, list] = {}
    for p in plan.weights:
        readers.setdefault(p.weight, []).append(p)
    chosen: List[FloatWeight] = []
    for name, points in readers.items():
        quant = weights.get(name)
        if quant is None or quant.bits != FLOAT_WEIGHT_BITS or name in keep:
            continue
        exact = tensor_array(index.constants[name]).astype(np.float32)
        rounded = quant.dequantized().astype(np.float32)
        scores = [(db, p.node) for p in points if p.node in rows
                  and (db := weight_output_sqnr(rows[p.node], exact, rounded, p.axis)) is not None]
        if scores and min(scores)[0] < below_db:
            db, layer = min(scores)
            chosen.append(FloatWeight(name, [p.node for p in points], layer, round(float(db), 2)))
    return sorted(chosen, key=lambda f: f.db_8)
