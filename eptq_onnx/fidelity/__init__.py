"""The fidelity target (``--min-sqnr``): nodes left float until the held-out output SQNR reaches it."""
from eptq_onnx.fidelity.target import FidelityOutcome, FloatedNode, meet_target

__all__ = ["FidelityOutcome", "FloatedNode", "meet_target"]
