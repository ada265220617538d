"""The network-wise objective of EPTQ: the Hessian-weighted distance of the student's tapped tensors to the teacher's, plus the soft-rounding regularizer."""
from __future__ import annotations

from typing import Dict, Optional, Tuple
import torch
from torch import Tensor
from eptq_onnx.config import OptimizeOptions
from eptq_onnx.eptq.kernels import sum_terms, weighted_mse
from eptq_onnx.twin.build import Twin
from eptq_onnx.eptq.banks import BiasBank, RoundingBank
from eptq_onnx.eptq.batches import TeacherCache


class Objective:
    """Eq. 6 on one batch.

    With the teacher cache a step reads (or gathers) the teacher's rows of every loss tensor;
    the rounding bank makes h(V), the soft weights and the regularizer one op chain over every
    weight, the bias bank the biases' rounding one op over every bias.
    """

    def __init__(self, twin: Twin, weights: Dict[str, float], options: OptimizeOptions, bank: RoundingBank,
                 cache: Optional[TeacherCache] = None, biases: Optional[BiasBank] = None) -> None:
        self.twin = twin
        self.names = [n for n, w in weights.items() if w > 0]
        self.weights = weights
        self.weight_list = [float(weights[n]) for n in self.names]
        self.options = options
        self.cache = cache
        self.bank = bank
        self.biases = biases

    def losses(self, batch: Tuple[Optional[Tensor], Dict[str, Tensor]], beta: Optional[float]) -> Tuple[Tensor, Tensor]:
        """Eq. 6's two terms on one batch: the weighted reconstruction error and the rounding
        regularizer, a mean over layers of per-layer means (zero during the warm-up, beta None).
        Starts a step: the soft weights and the regularizer are computed once, together."""
        reg = self.bank.refresh(beta)
        if self.biases is not None:
            self.biases.refresh()
        index, feeds = batch
        if self.cache is not None and index is not None:
            assert self.cache.names == self.names
            targets, rows = self.cache.targets(index)
        else:
            with torch.no_grad():
                _, teacher = self.twin.teacher.run(feeds, self.names)
            targets, rows = [teacher[n] for n in self.names], None
        losses, values = self.twin.student.run_loss(feeds, dict(zip(self.names, zip(targets, self.weight_list))), rows)
        rest = [i for i, n in enumerate(self.names) if n in values]
        assert len(losses) + len(rest) == len(self.names), "a loss tensor was not computed"
        if rest:
            losses.append(weighted_mse([values[self.names[i]] for i in rest], [targets[i] for i in rest],
                                       [self.weight_list[i] for i in rest], rows, torch.float64))
        return sum_terms(losses), reg

    def reconstruction(self, batch: Tuple[Optional[Tensor], Dict[str, Tensor]]) -> Tensor:
        """The weighted reconstruction error of one batch (``losses`` without the regularizer)."""
        return self.losses(batch, None)[0]
