"""docs/ops.md's op table is the one tools/op_table.py generates from the registries (it cannot drift)."""
from __future__ import annotations

from tools import op_table


def test_doc_table_is_generated() -> None:
    text = op_table.DOC.read_text()
    start, end = text.index(op_table.BEGIN) + len(op_table.BEGIN), text.index(op_table.END)
    assert text[start:end].strip() == op_table.table()


def test_torch_column_reads_the_converter_registry() -> None:
    assert op_table.torch_text("LSTM").startswith("ours (v7, 14, 22)")
    assert "onnx2torch (v" in op_table.torch_text("Relu")
    assert "re-registered (v22)" in op_table.torch_text("HardSwish")
    assert op_table.torch_text("Conv").startswith("ours (v1, 11, 22): a quantizable module")
