"""onnxruntime's quantize_static on a corpus model, as a baseline (run as a child process by the runner).

Usage: ``python -m tools.corpuslib.ort_quant MODEL OUT CALIB_DIR {MinMax,Percentile}``: QDQ format, per-channel
int8 weights, uint8 activations, the same calibration files as eptq_onnx reads (one feed per file), after
onnxruntime's recommended quant_pre_process (shape inference and graph optimization; skipped with a
warning where it fails).
"""
from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import onnx
import onnx.version_converter
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
from onnxruntime.quantization import quant_pre_process, quantize_static

from eptq_onnx.plan.u8s8_probe import u8s8_saturates


def load_feed(path: Path, input_names: List[str]) -> Dict[str, np.ndarray]:
    """One calibration file as a feed: an .npy for the single input, an .npz keyed by input name."""
    if path.suffix == ".npy":
        return {input_names[0]: np.load(path)}
    with np.load(path) as z:
        return {k: z[k] for k in input_names}


class FolderReader(CalibrationDataReader):
    """The calibration folder's files in name order, one feed each."""

    def __init__(self, folder: Path, input_names: List[str]) -> None:
        self.files = sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".npz"))
        self.names = input_names
        self.rewind()

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        path = next(self._iter, None)
        return None if path is None else load_feed(path, self.names)

    def rewind(self) -> None:
        self._iter: Iterator[Path] = iter(self.files)


PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis attribute (per-channel weights) needs opset 13


def _opset13(path: Path, proto: onnx.ModelProto, out: Path) -> Path:
    """The model converted to opset 13 when it is older (quantize_static writes per-channel DequantizeLinear
    with an axis attribute whatever the opset, which onnxruntime refuses below 13); else the model as is."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
    if opset >= PER_CHANNEL_OPSET:
        return path
    try:
        converted = onnx.version_converter.convert_version(onnx.load(path), PER_CHANNEL_OPSET)
        converted.ir_version = max(converted.ir_version, 7)
        onnx.save(converted, out)
    except Exception as exc:  # noqa: BLE001 - the baseline then runs on the model as it is
        print(f"WARNING: opset {opset} -> {PER_CHANNEL_OPSET} conversion failed ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return path
    print(f"note: converted opset {opset} -> {PER_CHANNEL_OPSET} for per-channel weights", file=sys.stderr)
    return out


def main() -> None:
    model, out, calib, method = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    proto = onnx.load(model, load_external_data=False)
    init = {i.name for i in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in init]
    with tempfile.TemporaryDirectory() as tmp:
        model = _opset13(model, proto, Path(tmp) / "opset13.onnx")
        prepared = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(model), str(prepared))
        except Exception as exc:  # noqa: BLE001 - the baseline then runs on the model as it is
            print(f"WARNING: quant_pre_process failed ({type(exc).__name__}: {exc}); quantizing the model as is",
                  file=sys.stderr)
            prepared = model
        with contextlib.redirect_stdout(io.StringIO()):  # histogram calibrators print their progress
            quantize_static(str(prepared), str(out), FolderReader(calib, names), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod[method],
                            # 7-bit weights (its remedy for U8S8 int16 saturation on x86 without VNNI) where
                            # this machine needs them, as our ort-cpu default decides (plan/u8s8_probe.py)
                            reduce_range=u8s8_saturates())


if __name__ == "__main__":
    main()
