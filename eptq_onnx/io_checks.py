"""Checks before any work: where the model and report go, and whether onnxruntime loads the model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import onnx

from eptq_onnx.errors import ModelError, UsageError
from eptq_onnx.graph.runtime import make_session


def check_output_path(input_path: Optional[Path], output: Path, force: bool) -> None:
    """Refuse to overwrite the input or an existing file (without force), or to write nowhere."""
    if input_path is not None and output.resolve() == input_path.resolve():
        raise UsageError(f"output {output} is the input model: choose another output path")
    if output.is_dir():
        raise UsageError(f"output {output} is a directory: give a file path such as {output / 'model_qdq.onnx'}")
    if output.exists() and not force:
        raise UsageError(f"output {output} exists: pass --force to overwrite it")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist: create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output folder {parent} is not writable: choose another output path")


def check_onnxruntime_loads(model: onnx.ModelProto) -> None:
    """Calibration runs the float model in onnxruntime: refuse a model it cannot load, in one line."""
    try:
        make_session(model, optimize=False)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/... types
        first = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"onnxruntime cannot load the model ({first}): ops of custom domains need their onnxruntime library"
        ) from exc


def check_report_path(report_path: Path) -> None:
    """Refuse a report path that cannot be written, before any work (the model is written first)."""
    parent = report_path.parent if str(report_path.parent) else Path(".")
    if report_path.is_dir():
        raise UsageError(f"report {report_path} is a directory: give a file path such as {report_path / 'report.json'}")
    if not parent.is_dir():
        raise UsageError(f"report folder {parent} does not exist: create it first")

