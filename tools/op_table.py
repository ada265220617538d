"""Generate README's op-coverage table from eptq_onnx.ops.OP_TABLE (so it cannot drift).

    python tools/op_table.py            # print the table
    python tools/op_table.py --write    # replace the table between the markers in README.md
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from eptq_onnx.ops import OP_TABLE

README = Path(__file__).resolve().parents[1] / "README.md"
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


def table() -> str:
    """The markdown table: one row per role, with its ops and per-op notes."""
    by_role: dict[str, list[str]] = defaultdict(list)
    for op, info in sorted(OP_TABLE.items()):
        by_role[info.role].append(f"{op} ({info.note})" if info.note and "shares its input" not in info.note else op)
    lines = ["| role | ops | how they are quantized |", "|---|---|---|"]
    for role, text in ROLE_TEXT.items():
        if by_role.get(role):
            lines.append(f"| {role} | {', '.join(by_role[role])} | {text} |")
    lines.append("| (any other op, custom domains, If/Loop) | | stays float, listed in the report |")
    return "\n".join(lines)


def write_readme() -> None:
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + table() + "\n" + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_readme()
    else:
        print(table())
