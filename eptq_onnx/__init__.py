"""eptq-onnx: Hessian-guided post-training quantization (EPTQ) of FP32 ONNX models into QDQ ONNX.

Python API::

    from eptq_onnx import quantize, QuantConfig
    result = quantize("model.onnx", "calib_dir/", QuantConfig(weight_bits=4), output="model_w4a8.onnx")
    print(result.report.validation["output_sqnr_db"])

    from eptq_onnx import analyze
    analysis = analyze("model.onnx", "calib_dir/", QuantConfig(weight_bits=8))  # no model written
    print(analysis.points[0])  # the costliest quantization point
"""
from eptq_onnx.config import CalibOptions, ImageOptions, QuantConfig
from eptq_onnx.errors import CalibrationError, EptqError, ModelError, UsageError, ValidationError
from eptq_onnx.pipeline import QuantizeResult, quantize
from eptq_onnx.analysis import AnalysisResult, analyze

__version__ = "0.1.0"
__all__ = [
    "quantize",
    "QuantizeResult",
    "analyze",
    "AnalysisResult",
    "QuantConfig",
    "CalibOptions",
    "ImageOptions",
    "EptqError",
    "UsageError",
    "ModelError",
    "CalibrationError",
    "ValidationError",
]
