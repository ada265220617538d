"""Taps: modules inserted after named tensors of the converted graph that record them, or compute a loss term against a target in place (fused with the fake quantizer that follows)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence
from torch import Tensor, fx, nn
from eptq_onnx.eptq.kernels import (
    quant_tap_loss,
)
from eptq_onnx.twin.fake_quant import ActFakeQuant


class TapStore:
    """Where taps put the tensors they see during one forward pass, and, while training, the loss
    targets of the taps that compute their loss term themselves (``QuantTap``)."""

    def __init__(self) -> None:
        self.values: Dict[str, Tensor] = {}
        self.active: Optional[set] = None  # names to record; None records nothing
        self.targets: Dict[str, tuple] = {}  # name -> (target, weight) while training
        self.rows: Optional[Tensor] = None  # the targets' rows of this batch (None: the targets are the batch's)
        self.losses: List[Tensor] = []  # float64 loss terms the fused taps computed in this pass

    def record(self, names: Optional[Sequence[str]]) -> None:
        self.values = {}
        self.active = set(names) if names is not None else None

class Tap(nn.Module):
    """Identity that records its input under an ONNX tensor name."""

    def __init__(self, name: str, store: TapStore) -> None:
        super().__init__()
        self.tensor_name = name
        self._store = (store,)

    def forward(self, x: Tensor) -> Tensor:
        store = self._store[0]
        if store.active is not None and self.tensor_name in store.active:
            store.values[self.tensor_name] = x
        return x

class QuantTap(Tap):
    """A tap and the fake quantizer that reads it, as one module: ``quantizer(tap(x))``.

    While training with a fixed step, a tap with a loss target in the store computes the fake
    quantization and its loss term in one fused node (``quant_tap_loss``) and adds the term to
    ``store.losses`` instead of recording ``x``; the two are one pass over ``x`` forward and one
    backward, where separately they are three ops each way.
    """

    def __init__(self, name: str, store: TapStore, quantizer: ActFakeQuant) -> None:
        super().__init__(name, store)
        self._quantizer = (quantizer,)  # a plain reference: the module belongs to the graph already

    def forward(self, x: Tensor) -> Tensor:
        store, quantizer = self._store[0], self._quantizer[0]
        target = store.targets.get(self.tensor_name)
        if target is None or not quantizer.trains_fixed(x):
            return quantizer(super().forward(x))
        y, loss = quant_tap_loss(x, *quantizer.fixed_step, quantizer.qmin, quantizer.qmax, target[0], target[1], store.rows)
        store.losses.append(loss)
        return y

def insert_after(gm: fx.GraphModule, node: fx.Node, target: str, keep_outputs: bool) -> fx.Node:
    """Insert ``call_module(target)`` after ``node`` and let every user read it.

    With ``keep_outputs`` the graph's output keeps reading ``node`` itself.
    """
    anchor = node
    if node.op == "placeholder":  # insert after the last placeholder, inputs stay first
        anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(anchor):
        new = gm.graph.call_module(target, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and not (keep_outputs and user.op == "output"))
    return new

def fuse_quantizer(gm: fx.GraphModule, tap: fx.Node) -> None:
    """Where the tap's one reader is a fake quantizer, make the two one ``QuantTap`` (same node name)."""
    users = list(tap.users)
    if len(users) != 1 or users[0].op != "call_module":
        return
    quantizer = gm.get_submodule(users[0].target)
    if not isinstance(quantizer, ActFakeQuant):
        return
    old = gm.get_submodule(tap.target)
    gm.add_submodule(tap.target, QuantTap(old.tensor_name, old._store[0], quantizer))
    users[0].replace_all_uses_with(tap)
    gm.graph.erase_node(users[0])
