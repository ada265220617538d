"""README's Python API example runs as written (with fewer EPTQ steps) and does what its comments say."""
from __future__ import annotations

import ast
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, FEW_STEPS = "iters=200", "iters=2"


def readme_python() -> str:
    """The README's one ```python block."""
    blocks = (ROOT / "README.md").read_text().split("```python\n")
    assert len(blocks) == 2, "README.md should have exactly one ```python block (the API example)"
    return blocks[1].split("```")[0]


def test_readme_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code = readme_python()
    assert code.count(STEPS) == 1, f"the example's step count ({STEPS}) is what this test shortens: update both"
    (tmp_path / "models").symlink_to(ROOT / "models", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace(STEPS, FEW_STEPS), "README.md", "exec"), namespace)
    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    written = onnx.load(tmp_path / "demo_w4a8.onnx")
    assert set(printed) == {o.name for o in written.graph.output} and all(v > 10 for v in printed.values())
    assert namespace["qdq_model"].SerializeToString() == written.SerializeToString()
    assert (tmp_path / "demo_report.json").is_file()
