"""Empirical bias correction: each layer's mean output shift from quantization, taken back into its bias.

Rounding weights and clipping activations shifts the mean of a layer's output per channel, and the
shifts add up along the network (a depthwise Conv's few taps per channel, an MSE range that clips a
long tail). On calibration batches the float teacher and the fake-quant student of the twin (what
the written model computes) run side by side; at every quantized Conv / ConvTranspose / Gemm with a
bias, in graph order, the student's channel means are moved onto the teacher's by shifting its bias.
A layer is corrected in the same forward pass in which the layers before it already were, so each
correction sees its inputs as the corrected model will produce them (sequential correction, one
pass per batch); over batches the shift is a running mean of what each batch asks for.

The corrected biases are kept only when they raise the output SQNR against the float model on the
check samples, measured by onnxruntime on the fake-quant references (export/reference.py) of both;
the report says what was corrected and what it bought.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import onnx
import torch
from torch import Tensor

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.errors import ModelError
from eptq_onnx.export.reference import fake_quant_model
from eptq_onnx.graph.runtime import float_outputs_of, output_sqnr_db
from eptq_onnx.init.quantizers import ActParams
from eptq_onnx.init.weights import WeightQuant
from eptq_onnx.plan.qpoints import QuantPlan
from eptq_onnx.twin.build import Twin, build_twin, model_with_biases, student_biases, to_tensors
from eptq_onnx.twin.weighted import ConvOp, GemmOp, WeightedOp

SAMPLES = 32  # calibration samples the corrections are measured on (a torch forward pass each)
MIN_SAMPLES = 4
# input values the correction passes read in all (32 RGB images of 224 x 224): large inputs (a 736 x 736
# detector page) use fewer samples, so that the stage costs about the same torch time on every model
INPUT_VALUES_BUDGET = 32 * 3 * 224 * 224


@dataclass
class BiasCorrection:
    """What the stage did, for the report."""

    layers: int = 0
    samples: int = 0
    kept: bool = False
    sqnr_before_db: Optional[float] = None
    sqnr_after_db: Optional[float] = None
    skipped: str = ""  # why nothing was tried

    def summary(self) -> str:
        """One line for the log and the report."""
        if self.skipped:
            return f"bias correction skipped: {self.skipped}"
        verdict = "kept" if self.kept else "NOT kept: the output got no better"
        return (f"bias correction of {self.layers} layers on {self.samples} samples: output SQNR "
                f"{self.sqnr_before_db:.2f} -> {self.sqnr_after_db:.2f} dB, {verdict}")


def _channel_axis(module: WeightedOp, out: Tensor) -> Optional[int]:
    """The axis of ``module``'s output that its 1-D bias runs along, or None when it has none."""
    if module.bias is None or module.bias.dim() != 1 or out.dim() < 2:
        return None
    axis = 1 if isinstance(module, ConvOp) else out.dim() - 1
    return axis if out.shape[axis] == module.bias.shape[0] else None


def _channel_mean(out: Tensor, axis: int) -> Tensor:
    """Mean over every axis but ``axis`` (float64)."""
    dims = [d for d in range(out.dim()) if d != axis]
    return out.detach().double().mean(dim=dims)


def _broadcast(values: Tensor, out: Tensor, axis: int) -> Tensor:
    shape = [1] * out.dim()
    shape[axis] = -1
    return values.to(out.dtype).reshape(shape)


class _Corrector:
    """Forward hooks: the teacher records its layers' channel means, the student moves onto them."""

    def __init__(self, twin: Twin, weights: Dict[str, WeightQuant]):
        self.teacher_means: Dict[str, Tensor] = {}
        self.samples_seen = 0
        self.batch_samples = 0
        self.active = False
        self.handles = []
        for module in twin.teacher.modules():
            if isinstance(module, WeightedOp) and module.weight_name in weights:
                self.handles.append(module.register_forward_hook(self._record))
        self.layers: List[WeightedOp] = [
            m for m in twin.student.modules()
            if isinstance(m, WeightedOp) and m.weight_name in weights and m.bias is not None and m.bias.dim() == 1]
        for module in self.layers:
            self.handles.append(module.register_forward_hook(self._correct))

    def _record(self, module: WeightedOp, _inputs: tuple, out: Tensor) -> None:
        axis = _channel_axis(module, out)
        if self.active and axis is not None:
            self.teacher_means[module.weight_name] = _channel_mean(out, axis)

    def _correct(self, module: WeightedOp, _inputs: tuple, out: Tensor) -> Optional[Tensor]:
        axis = _channel_axis(module, out)
        target = self.teacher_means.get(module.weight_name)
        if not self.active or axis is None or target is None:
            return None
        # running mean over batches of what each batch asks for, given the shift so far
        error = (target - _channel_mean(out, axis)) * (self.batch_samples / self.samples_seen)
        scale = module.beta if isinstance(module, GemmOp) and module.beta not in (0.0, 1.0) else 1.0
        with torch.no_grad():
            module.bias.add_((error / scale).to(module.bias.dtype))
        return out + _broadcast(error, out, axis)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def correct_biases(
    model: onnx.ModelProto, plan: QuantPlan, weights: Dict[str, WeightQuant], acts: Dict[int, ActParams],
    calib: CalibrationSet, quantize_outputs: bool = False, quantize_bias: bool = True,
    check_samples: int = 64, samples: int = SAMPLES,
) -> tuple[onnx.ModelProto, BiasCorrection]:
    """``model`` with bias-corrected biases, or ``model`` itself when correction did not help or cannot run."""
    outcome = BiasCorrection()
    try:
        twin = build_twin(model, plan, weights, acts, quantize_outputs=quantize_outputs, quantize_bias=quantize_bias,
                          taps=[])
    except (ModelError, NotImplementedError) as exc:
        outcome.skipped = f"no torch twin of this model ({exc})"
        return model, outcome
    corrector = _Corrector(twin, weights)
    outcome.layers = len(corrector.layers)
    if not corrector.layers:
        corrector.remove()
        outcome.skipped = "no quantized layer with a bias"
        return model, outcome
    check = list(calib.batches(limit=max(1, check_samples)))
    per_sample = sum(v.size for v in check[0].values()) / max(calib.samples_in(check[0]), 1) if check else 1
    samples = max(MIN_SAMPLES, min(samples, int(INPUT_VALUES_BUDGET // max(per_sample, 1))))
    with torch.no_grad():
        for batch in calib.batches(limit=samples):
            feeds = to_tensors(batch)
            corrector.batch_samples = calib.samples_in(batch)
            corrector.samples_seen += corrector.batch_samples
            corrector.active = True
            twin.teacher(feeds)
            twin.student(feeds)
            corrector.active = False
            corrector.teacher_means.clear()
    corrector.remove()
    outcome.samples = corrector.samples_seen
    corrected = model_with_biases(model, student_biases(twin))
    # the decision is onnxruntime's, on the fake-quant references of both (what the written model computes)
    reference = float_outputs_of(model, check)
    outcome.sqnr_before_db = output_sqnr_db(reference, float_outputs_of(
        fake_quant_model(model, plan, weights, acts, quantize_outputs, quantize_bias), check))
    outcome.sqnr_after_db = output_sqnr_db(reference, float_outputs_of(
        fake_quant_model(corrected, plan, weights, acts, quantize_outputs, quantize_bias), check))
    outcome.kept = outcome.sqnr_after_db > outcome.sqnr_before_db
    return (corrected if outcome.kept else model), outcome
