"""Per-channel ranges (max |x| over every axis but the channel axis 1) of activation tensors, from a
float pass over the first calibration samples."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import onnx
from tqdm import tqdm

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.graph.runtime import make_session, run, tapped_batch_size, with_outputs


def channel_ranges(model: onnx.ModelProto, tensors: Sequence[str], calib: CalibrationSet, samples: int,
                   progress: bool = False) -> Dict[str, np.ndarray]:
    """max |x_c| of each tensor over the first ``samples`` calibration samples (NaN or inf where a value was not finite)."""
    names = list(dict.fromkeys(tensors))
    session = make_session(with_outputs(model, names))
    batch_size = tapped_batch_size(session, calib, calib.batch_size)
    ranges: Dict[str, np.ndarray] = {}
    batches = tqdm(calib.batches(batch_size, limit=samples), desc="equalization: channel ranges",
                   total=calib.num_batches(batch_size, limit=samples), disable=not progress, unit="batch", leave=False)
    for feeds in batches:
        for name, value in run(session, feeds, names).items():
            value = np.abs(np.asarray(value, dtype=np.float32))
            top = value.max(axis=tuple(a for a in range(value.ndim) if a != 1))  # NaN and inf stay: no factors
            ranges[name] = top if name not in ranges else np.maximum(ranges[name], top)
    return ranges
