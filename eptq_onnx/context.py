"""The run context: what every stage of one quantization run shares, resolved once at its start."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, FrozenSet, Iterator, Optional

from tqdm import tqdm

from eptq_onnx.calib.data import CalibrationSet
from eptq_onnx.config import QuantConfig
from eptq_onnx.graph.tensor_store import TensorStore
from eptq_onnx.plan.targets import Target, get_target, with_reduce_range
from eptq_onnx.report import Report


def stage_logger(progress: bool) -> Callable[[str], None]:
    """Stage messages go to stderr (through tqdm, so progress bars stay intact); none when quiet."""
    return (lambda message: tqdm.write(message, file=sys.stderr)) if progress else (lambda message: None)


@dataclass
class RunContext:
    """One run's settings and shared state.

    ``config`` may be replaced by a stage that falls back (e.g. INT8 weight containers when an opset
    upgrade fails); ``target`` always follows it. ``started_at`` (``time.perf_counter()``) is where
    ``--time-budget`` counts from. ``store`` holds the tensors of a large model (empty otherwise).
    ``held_out`` is the calibration part that no stage sees, kept for the fidelity target (``--min-sqnr``).
    """

    config: QuantConfig
    report: Report
    progress: bool = True
    started_at: float = field(default_factory=time.perf_counter)
    store: TensorStore = field(default_factory=TensorStore)
    held_out: Optional[CalibrationSet] = None
    # tensors that depthwise input equalization rescaled per channel (graph/equalize.Equalized.rescaled):
    # EPTQ's loss does not tap them
    rescaled: FrozenSet[str] = frozenset()

    @property
    def target(self) -> Target:
        return with_reduce_range(get_target(self.config.target), self.config.reduce_range)

    @property
    def log(self) -> Callable[[str], None]:
        return stage_logger(self.progress)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the stage into the report: ``timings_s`` when it completes, ``stages`` whatever happens."""
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.report.stages.append({"name": name, "seconds": round(time.perf_counter() - start, 3), "status": "failed"})
            raise
        seconds = round(time.perf_counter() - start, 3)
        self.report.timings_s[name] = seconds
        self.report.stages.append({"name": name, "seconds": seconds, "status": "ok"})
