"""docs/cli.md's reference is the one tools/cli_reference.py renders from the click command (it cannot drift)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click

from eptq_onnx.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli.md"


def _check(doc: Path) -> subprocess.CompletedProcess[str]:
    """``tools/cli_reference.py --check doc`` in a fresh process, with this checkout's package first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, str(ROOT / "tools" / "cli_reference.py"), "--check", str(doc)]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_doc_is_the_rendered_reference(tmp_path: Path) -> None:
    done = _check(DOC)
    assert done.returncode == 0, done.stderr
    stale = tmp_path / "cli.md"
    stale.write_text(DOC.read_text().replace("| `--seed` |", "| `--sead` |"))
    done = _check(stale)
    assert done.returncode == 1 and "out of date" in done.stderr


def test_every_option_has_a_row_with_its_default() -> None:
    rows = [line.split(" | ") for line in DOC.read_text().splitlines() if line.startswith("| `-")]
    for option in (p for p in main.params if isinstance(p, click.Option)):
        name = f"`{max(option.opts, key=len)}`"
        cells = next((row for row in rows if name in re.split(r", | / ", row[0].removeprefix("| "))), None)
        assert cells is not None, f"docs/cli.md has no row for {name}"
        if option.required:
            assert cells[2] == "required", cells
        elif option.is_flag and option.secondary_opts:
            default = (option.opts if option.default is True else option.secondary_opts)[0]
            assert cells[2] == f"`{default}`", f"{name}: default {default}, docs/cli.md says {cells[2]}"
        elif not option.is_flag and isinstance(option.default, (int, float, str)) and not isinstance(option.show_default, str):
            assert cells[2] == f"`{option.default}`", f"{name}: default {option.default!r}, docs/cli.md says {cells[2]}"
