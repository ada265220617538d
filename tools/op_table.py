"""Generate the op-coverage table of docs/ops.md from the code's own registries (so it cannot drift):
eptq_onnx.ops.registry.OP_TABLE (how each op is quantized) and eptq_onnx.twin.convert's converter
registry (how each op is converted to the torch twin, per ONNX version).

    python tools/op_table.py            # print the table
    python tools/op_table.py --write    # replace the table between the markers in docs/ops.md
"""
from __future__ import annotations

import sys
from pathlib import Path

from eptq_onnx.ops.registry import OP_TABLE, RECURRENT
from eptq_onnx.twin.convert import converter_versions

DOC = Path(__file__).resolve().parents[1] / "docs" / "ops.md"
BEGIN, END = "<!-- op-table:begin -->", "<!-- op-table:end -->"
ROLE_TEXT = {
    "weighted": "weights per channel; output is an activation point (after a fused non-linearity)",
    "act_matmul": "both inputs and the output quantized",
    "join": "output is an activation point",
    "normalize": "output is an activation point",
    "activation": "output is a point; fused with the op before it",
    "elementwise": "float math; inside composite activations (GELU, SiLU, ...) no point of its own",
    "data": "shares its input's scale and zero point (no new error)",
    "float": "stays float; its output is quantized only where a weighted op reads it",
}
WEIGHTED_CONVERTERS = frozenset(("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"))  # twin.weighted.WeightedOp
SOURCE_TEXT = {"ours": "ours", "alias": "onnx2torch's, re-registered", "onnx2torch": "onnx2torch"}


def _versions(versions: list[int]) -> str:
    return ", ".join(str(v) for v in versions)


def torch_text(op: str) -> str:
    """How the torch twin converts ``op``: which converter serves which ONNX versions."""
    parts = [f"{SOURCE_TEXT[src]} (v{_versions(vs)})" for src, vs in converter_versions(op).items() if vs]
    if op in WEIGHTED_CONVERTERS and parts:
        parts[0] += ": a quantizable module, the weight an nn.Parameter in ONNX layout"
    return "; ".join(parts) if parts else "no converter: the twin is unavailable, EPTQ falls back to the MSE init"


def table() -> str:
    """The markdown table: one row per op, with its role, how it is quantized and converted."""
    lines = ["| op | role | quantized how | converted to torch how (ONNX versions) |", "|---|---|---|---|"]
    rows = [(op, info.role, info.note) for op, info in OP_TABLE.items()]
    rows += [(op, "float", "recurrent: weights and state stay float, listed in the report") for op in RECURRENT]
    for op, role, note in sorted(rows, key=lambda r: (list(ROLE_TEXT).index(r[1]), r[0])):
        how = f"{ROLE_TEXT[role]}; {note}" if note and "shares its input" not in note else ROLE_TEXT[role]
        lines.append(f"| {op} | {role} | {how} | {torch_text(op)} |")
    lines.append("| (any other op, custom domains, If/Loop) | float | stays float, listed in the report | "
                 "onnx2torch where it has a converter |")
    return "\n".join(lines)


def write_doc() -> None:
    """Replace the table between BEGIN and END in docs/ops.md with the generated one."""
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + table() + "\n" + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_doc()
    else:
        print(table())
