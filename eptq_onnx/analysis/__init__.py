"""Sensitivity analysis (``eptq-onnx-analyze``): every quantization point ranked by what it costs."""
from eptq_onnx.analysis.api import analyze
from eptq_onnx.analysis.result import AnalysisResult

__all__ = ["analyze", "AnalysisResult"]
