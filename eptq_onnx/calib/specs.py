"""The model inputs that calibration data must fit: names, element types and declared shapes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence
import numpy as np
import onnx
from eptq_onnx.errors import ModelError


Shape = tuple[int | None, ...]

@dataclass(frozen=True)
class InputSpec:
    """One model input the calibration data must feed."""

    name: str
    dtype: np.dtype  # numpy dtype the model expects
    shape: Shape  # None for dynamic / symbolic dims
    symbols: tuple[str | None, ...] = field(default=(), compare=False)  # dim_param of each dim (None: unnamed)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "symbols", tuple(self.symbols))

    def symbol(self, axis: int) -> str | None:
        """The name the model gives dim ``axis`` (dims named alike are equal), None when unnamed or fixed."""
        return self.symbols[axis] if axis < len(self.symbols) and self.shape[axis] is None else None

def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that are not initializers, in graph order."""
    initializers = {init.name for init in model.graph.initializer}
    return [_input_spec(info) for info in model.graph.input if info.name not in initializers]

def _input_spec(info: onnx.ValueInfoProto) -> InputSpec:
    """The InputSpec of one graph input; ModelError when it is no tensor with a known rank."""
    if info.type.WhichOneof("value") != "tensor_type":
        raise ModelError(f"model input {info.name!r} is not a tensor: only tensor inputs can be calibrated")
    tensor = info.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except Exception as exc:
        raise ModelError(
            f"model input {info.name!r} has element type {tensor.elem_type}, which numpy cannot hold"
        ) from exc
    if not tensor.HasField("shape"):
        raise ModelError(f"model input {info.name!r} declares no shape: re-export the model with input shapes")
    shape = tuple(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None for dim in tensor.shape.dim)
    symbols = tuple(dim.dim_param or None for dim in tensor.shape.dim)
    return InputSpec(info.name, dtype, shape, symbols)

def format_shape(shape: Sequence[int | None], symbols: Sequence[str | None] = ()) -> str:
    """``[?, 3, 224, 224]``: the shape with '?' for dynamic dims (or their names, from ``symbols``)."""
    names = [*symbols, *[None] * (len(shape) - len(symbols))]
    return "[" + ", ".join((name or "?") if dim is None else str(dim) for dim, name in zip(shape, names)) + "]"

def describe_inputs(specs: Sequence[InputSpec]) -> str:
    """``'x' float32 [?, 3, 224, 224], 'ids' int64 [?, 8]``."""
    return ", ".join(f"{spec.name!r} {spec.dtype} {format_shape(spec.shape)}" for spec in specs)
