"""Samples of what each weighted layer multiplies its weight with, for output-aware step sizes.

For a Conv these are im2col patches (split by group), for a Gemm or a MatMul with a constant
B the rows of its activation input. A few hundred rows per layer, a uniform random sample of
every row of the first calibration samples, are enough to rank clipping ratios by the error of
the layer's output. The rows are streamed batch by batch into a fixed-size reservoir per layer
(``RowReservoir``): memory does not grow with the number of samples, and a Conv's patches are
gathered at the sampled positions only (never the whole im2col matrix). Layers of other kinds
(ConvTranspose, 3-D convs, MatMul with a constant A, embeddings) get no samples and fall back to
the weight's own squared error.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np
import onnx
from onnx import helper

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.plan.qpoints import QuantPlan, WeightPoint
from eptq_onnx.graph.runtime import make_session, run, tapped_batch_size, with_outputs

DEFAULT_ROWS = 512
DEFAULT_SAMPLES = 64

Gather = Callable[[np.ndarray], np.ndarray]  # flat row indices -> rows [n, groups, K]


class RowReservoir:
    """A uniform random sample, without replacement, of at most ``capacity`` rows of a stream of batches.

    Each batch offers its row count and a function that gathers rows by index; the rows kept are
    distributed as a uniform sample of every row offered so far (the share taken from the new batch
    is hypergeometric), so only ``capacity`` rows are ever gathered per batch and held in all.
    """

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rng = rng
        self.seen = 0
        self.rows: Optional[np.ndarray] = None

    def offer(self, count: int, gather: Gather) -> None:
        """Offer ``count`` new rows; ``gather(indices)`` returns those rows (in that order)."""
        if count <= 0:
            return
        kept = 0 if self.rows is None else len(self.rows)
        if self.seen + count <= self.capacity:  # everything fits: keep it all
            take_new, keep_old = count, kept
        else:
            room = min(self.capacity, self.seen + count)
            take_new = int(self.rng.hypergeometric(count, self.seen, room)) if self.seen else room
            keep_old = room - take_new
        new = gather(np.sort(self.rng.choice(count, size=take_new, replace=False))).astype(np.float32, copy=False)
        if self.rows is None:
            self.rows = new
        else:
            old = self.rows[np.sort(self.rng.choice(kept, size=keep_old, replace=False))]
            self.rows = np.concatenate([old, new])
        self.seen += count


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _conv_rows(x: np.ndarray, node: onnx.NodeProto, kernel: List[int]) -> Optional[tuple[int, Gather]]:
    """(row count, gather) of the im2col patches [positions, groups, Cin/g * prod(kernel)] of a 1-D or
    2-D Conv input, rows ordered image by image, then output row, then output column, each patch
    ordered channel, kernel row, kernel column (as torch's unfold)."""
    attrs = _attrs(node)
    if len(kernel) not in (1, 2) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return None
    if len(kernel) == 1:  # treat as 2-D with height 1
        x, kernel = x[:, :, None, :], [1, kernel[0]]
        pads = attrs.get("pads", [0, 0])
        pads = [0, pads[0], 0, pads[1]]
        strides, dilations = [1] + list(attrs.get("strides", [1])), [1] + list(attrs.get("dilations", [1]))
    else:
        pads = attrs.get("pads", [0, 0, 0, 0])
        strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
    n, c, h, w = x.shape
    out_h = (h + pads[0] + pads[2] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    out_w = (w + pads[1] + pads[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    if out_h <= 0 or out_w <= 0:
        return 0, lambda idx: np.zeros((0, 1, 0), np.float32)
    groups = int(attrs.get("group", 1))
    ky = np.arange(kernel[0]) * dilations[0]
    kx = np.arange(kernel[1]) * dilations[1]

    def gather(idx: np.ndarray) -> np.ndarray:
        image, pos = np.divmod(idx, out_h * out_w)
        oy, ox = np.divmod(pos, out_w)
        # padded coordinates of every tap [rows, kh, kw], shifted back into x (outside it: zero padding)
        ys = (oy * strides[0] - pads[0])[:, None, None] + ky[None, :, None]
        xs = (ox * strides[1] - pads[1])[:, None, None] + kx[None, None, :]
        ys, xs = np.broadcast_arrays(ys, xs)
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        taps = x[image[:, None, None], :, ys.clip(0, h - 1), xs.clip(0, w - 1)]  # [rows, kh, kw, C]
        taps = np.where(inside[..., None], taps, 0).astype(np.float32, copy=False)
        return np.ascontiguousarray(taps.transpose(0, 3, 1, 2)).reshape(len(idx), groups, -1)

    return n * out_h * out_w, gather


def _layer_rows(point: WeightPoint, node: onnx.NodeProto, x: np.ndarray, weight_shape: List[int]) -> Optional[tuple[int, Gather]]:
    """(row count, gather) of the layer's input as rows [rows, groups, K], or None when the layer kind is not supported."""
    if point.op_type == "Conv":
        return _conv_rows(x, node, weight_shape[2:])
    if point.op_type == "Gemm":
        a = x.T if _attrs(node).get("transA", 0) else x
        a = a.reshape(a.shape[0], 1, -1)
    elif point.op_type == "MatMul" and len(weight_shape) == 2 and node.input[1] == point.weight:
        a = x.reshape(-1, 1, x.shape[-1])
    else:
        return None
    return len(a), lambda idx: a[idx]


class LayerRowSampler:
    """Streams the input rows of every supported weighted layer of ``plan`` into a reservoir each (at most
    ``rows`` per layer, over the first ``samples`` calibration samples): a pass over the calibration data
    that runs the model with ``names`` tapped (the range pass, calib/calibrate.py) offers each batch."""

    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, samples: int = DEFAULT_SAMPLES,
                 rows: int = DEFAULT_ROWS, seed: int = 0) -> None:
        self._nodes = {(n.name or n.output[0]): n for n in model.graph.node}
        self._shapes = {t.name: list(t.dims) for t in model.graph.initializer}
        self._points: Dict[str, WeightPoint] = {}
        self._others: Dict[str, WeightPoint] = {}  # by node: the other layers that read a shared weight
        for p in plan.weights:
            if p.input and p.weight not in self._points:
                self._points[p.weight] = p
            elif p.input:
                self._others[p.node] = p
        self.names = sorted({p.input for p in (*self._points.values(), *self._others.values())})
        self.samples = samples
        self.seen = 0
        rng = np.random.default_rng(seed)
        self._reservoirs: Dict[str, Optional[RowReservoir]] = {w: RowReservoir(rows, rng) for w in self._points}
        # a generator of their own, so that the first readers' samples do not depend on the others
        others_rng = np.random.default_rng(seed + 1)
        self._other_reservoirs: Dict[str, Optional[RowReservoir]] = {
            n: RowReservoir(rows, others_rng) for n in self._others}

    @property
    def wanted(self) -> bool:
        """Whether the next batch is still among the first ``samples``."""
        return bool(self.names) and self.seen < self.samples

    def offer(self, values: Dict[str, np.ndarray], batch_samples: int) -> None:
        """One batch of the tapped tensors (``names``), ``batch_samples`` samples; only the first
        ``samples`` samples of the stream are used."""
        keep = min(batch_samples, self.samples - self.seen)
        if keep <= 0:
            return
        self.seen += keep
        for reservoirs, points in ((self._reservoirs, self._points), (self._other_reservoirs, self._others)):
            for key, p in points.items():
                reservoir = reservoirs[key]
                if reservoir is None:
                    continue
                x = values[p.input]
                offered = _layer_rows(p, self._nodes[p.node], x[:keep] if keep < batch_samples else x,
                                      self._shapes[p.weight])
                if offered is None:
                    reservoirs[key] = None
                    continue
                reservoir.offer(*offered)

    def rows(self) -> Dict[str, np.ndarray]:
        """The sampled rows [n, groups, K] per weight name, of the weight's first reader (layers of
        unsupported kinds left out)."""
        return _filled(self._reservoirs)

    def reader_rows(self) -> Dict[str, np.ndarray]:
        """The sampled rows per node: of every reader of a weight, shared weights' other readers included."""
        first = {p.node: self._reservoirs[w] for w, p in self._points.items()}
        return _filled({**first, **self._other_reservoirs})


def _filled(reservoirs: Dict[str, Optional[RowReservoir]]) -> Dict[str, np.ndarray]:
    """The rows of the reservoirs that hold any."""
    return {k: r.rows for k, r in reservoirs.items() if r is not None and r.rows is not None and len(r.rows)}


def layer_product(rows: np.ndarray, weight: np.ndarray, axis: int) -> Optional[np.ndarray]:
    """A layer's output [n, groups, out/groups] on its input rows [n, groups, K] with ``weight`` (its output
    channels on ``axis``); None when the weight's layout does not match the rows."""
    groups, k = rows.shape[1], rows.shape[2]
    moved = np.moveaxis(weight, axis, 0)
    if moved.size != moved.shape[0] * k or moved.shape[0] % groups:
        return None
    w = moved.reshape(groups, moved.shape[0] // groups, k).astype(np.float32)
    return np.einsum("ngk,gok->ngo", rows, w)


def collect_layer_inputs(
    model: onnx.ModelProto,
    plan: QuantPlan,
    calib: CalibrationSet,
    samples: int = DEFAULT_SAMPLES,
    rows: int = DEFAULT_ROWS,
    seed: int = 0,
) -> Dict[str, np.ndarray]:
    """A uniform random sample of at most ``rows`` input rows of every supported weighted layer, over the
    first ``samples`` calibration samples, keyed by weight name (a pass of its own; the pipeline's
    range pass feeds a ``LayerRowSampler`` instead)."""
    sampler = LayerRowSampler(model, plan, samples, rows, seed)
    if not sampler.names:
        return {}
    session = make_session(with_outputs(model, sampler.names))
    for feeds in calib.batches(tapped_batch_size(session, calib, calib.batch_size), limit=samples):
        sampler.offer(run(session, feeds, sampler.names), calib.samples_in(feeds))
    return sampler.rows()
