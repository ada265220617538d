"""The differentiable twin of the QDQ model: a float teacher and a fake-quantized student in torch.

Both come from the same normalized float ONNX graph (``torch_convert.to_torch``). The student
gets, from the same quantization state the QDQ writer reads (weight codes and steps, activation
parameters, the plan), a weight quantizer on every weighted op, an int32 bias quantizer where
the writer stores the bias as int32, and a fake-quant module after every tensor of every
activation group. In hard mode it computes what onnxruntime computes on the written QDQ model:
round half to even, saturation, zero points, float32 arithmetic.

Every intermediate tensor of both is reachable by its ONNX name through taps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, fx, nn

from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.twin.convert import input_names, onnx_names, output_names, to_torch
from eptq_onnx.twin.weighted import WeightedOp
from eptq_onnx.init.weights import WeightQuant
from eptq_onnx.twin.fake_quant import ActFakeQuant, BiasFakeQuant, OnGridFakeQuant, WeightFakeQuant
from eptq_onnx.ops.registry import ON_GRID_OPS
from eptq_onnx.twin.taps import Tap, TapStore, fuse_quantizer, insert_after


class TwinModule(nn.Module):
    """A converted graph with ONNX-named inputs, outputs and taps."""

    def __init__(self, gm: fx.GraphModule, taps: Sequence[str]) -> None:
        super().__init__()
        self.gm = gm
        self.inputs = input_names(gm)
        self.outputs = output_names(gm)
        self.store = TapStore()
        nodes = onnx_names(gm)
        for i, name in enumerate(taps):
            target = f"eptq_tap_{i}"
            gm.add_submodule(target, Tap(name, self.store))
            tap = insert_after(gm, nodes[name], target, keep_outputs=False)
            fuse_quantizer(gm, tap)
        gm.recompile()

    def forward(self, feeds: Dict[str, Tensor], record: Optional[Sequence[str]] = None) -> List[Tensor]:
        """Model outputs (in ONNX output order); tapped tensors named in ``record`` go to ``self.store.values``."""
        self.store.record(record)
        result = self.gm(*[feeds[name] for name in self.inputs])
        return list(result) if isinstance(result, (tuple, list)) else [result]

    def run(self, feeds: Dict[str, Tensor], record: Sequence[str]) -> tuple[List[Tensor], Dict[str, Tensor]]:
        """Outputs and the recorded tensors of one forward pass."""
        outputs = self.forward(feeds, record)
        values, self.store.values = self.store.values, {}
        return outputs, values

    def run_loss(self, feeds: Dict[str, Tensor], targets: Dict[str, tuple], rows: Optional[Tensor] = None) -> tuple[List[Tensor], Dict[str, Tensor]]:
        """One training forward pass with loss ``targets`` (name -> (target, weight), target rows
        ``rows`` of this batch, None: in order): the loss terms the fused taps computed (float64)
        and the tensors of every other target, recorded for the caller's loss."""
        store = self.store
        store.targets, store.rows, store.losses = targets, rows, []
        try:
            self.forward(feeds, list(targets))
        finally:
            store.targets, store.rows = {}, None
        losses, store.losses = store.losses, []
        values, store.values = store.values, {}
        return losses, values


@dataclass
class Twin:
    """Teacher (float) and student (fake-quantized) modules of one model, and the student's quantizers."""

    teacher: TwinModule
    student: TwinModule
    act_quant: Dict[int, ActFakeQuant] = field(default_factory=dict)
    weight_quant: Dict[str, WeightFakeQuant] = field(default_factory=dict)
    bias_quant: Dict[str, BiasFakeQuant] = field(default_factory=dict)

    def quantizers(self) -> List[nn.Module]:
        return [*self.act_quant.values(), *self.weight_quant.values(), *self.bias_quant.values()]


def build_twin(
    model: onnx.ModelProto,
    plan: QuantPlan,
    weights: Dict[str, WeightQuant],
    acts: Dict[int, ActParams],
    *,
    quantize_outputs: bool = False,
    quantize_bias: bool = True,
    taps: Optional[Sequence[str]] = None,
    teacher_model: Optional[onnx.ModelProto] = None,
) -> Twin:
    """Teacher and student of a normalized float model and its quantization state.

    ``taps`` (default: every activation group root) are the tensors both modules can record;
    the student's tap sits before the fake quantizer (the layer's own output). The teacher is
    ``teacher_model`` when given (the float model whose biases a later stage changed in ``model``).
    """
    taps = list(taps) if taps is not None else [g.roots[0] for g in plan.groups]
    teacher_gm = to_torch(teacher_model if teacher_model is not None else model).eval()
    student_gm = to_torch(model).eval()
    twin = Twin(teacher=TwinModule(teacher_gm, taps), student=None)  # type: ignore[arg-type]
    graph_outputs = set(output_names(student_gm))

    nodes = onnx_names(student_gm)
    producers = {out: node for node in model.graph.node for out in node.output}
    for g in plan.groups:
        fq = ActFakeQuant(acts[g.id])
        target = f"eptq_act_{g.id}"
        student_gm.add_submodule(target, fq)
        twin.act_quant[g.id] = fq
        for tensor in g.tensors:
            module = target
            producer = producers.get(tensor)
            if (tensor not in g.roots and producer is not None and producer.op_type in ON_GRID_OPS
                    and producer.input and producer.input[0] in g.tensors):
                module = f"eptq_on_grid_{sum(1 for _ in student_gm.named_children())}"
                student_gm.add_submodule(module, OnGridFakeQuant(fq))
            insert_after(student_gm, nodes[tensor], module, keep_outputs=tensor in graph_outputs and not quantize_outputs)
    group_of = plan.group_of()
    points = {(p.node, p.weight): p for p in plan.weights}  # a node kept float reads a shared weight float
    for module in student_gm.modules():
        if not isinstance(module, WeightedOp) or (module.node, module.weight_name) not in points \
                or module.weight_name not in weights:
            continue
        wfq = twin.weight_quant.setdefault(module.weight_name, WeightFakeQuant(weights[module.weight_name]))
        module.weight_quant = wfq
        point = points[(module.node, module.weight_name)]
        group = group_of.get(point.input) if point.input else None
        if quantize_bias and module.bias is not None and module.bias_name == point.bias and group is not None:
            bfq = BiasFakeQuant(twin.act_quant[group.id], wfq)
            module.bias_quant = bfq
            twin.bias_quant[module.bias_name] = bfq
    student_gm.recompile()
    twin.student = TwinModule(student_gm, taps)
    return twin


def student_biases(twin: Twin) -> Dict[str, np.ndarray]:
    """The float biases of the student's weighted ops, by initializer name (float32)."""
    return {m.bias_name: m.bias.detach().cpu().numpy().astype(np.float32) for m in twin.student.modules()
            if isinstance(m, WeightedOp) and m.bias is not None and m.bias_name}


def model_with_biases(model: onnx.ModelProto, biases: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``biases`` hold those values (in their own shapes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in biases:
            init.CopyFrom(numpy_helper.from_array(biases[init.name].reshape(tuple(init.dims)), init.name))
    return out


def to_tensors(feeds: Dict[str, np.ndarray], device: torch.device | str = "cpu") -> Dict[str, Tensor]:
    """numpy feeds as torch tensors on ``device``."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feeds.items()}
