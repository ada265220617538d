"""Render the command line reference of docs/cli.md from eptq_onnx.cli's click command (so it cannot drift):
the usage line, the command's help, every option with its values, default and help text, and the epilog.

    python tools/cli_reference.py            # print the reference
    python tools/cli_reference.py --write    # replace the reference between the markers in docs/cli.md
    python tools/cli_reference.py --check    # exit 1 when docs/cli.md differs from the command
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

import click

from eptq_onnx.analysis.cli import main as analyze_main
from eptq_onnx.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
BEGIN, END = "<!-- cli:begin -->", "<!-- cli:end -->"
# each command's reference sits between its own markers: (command, name, begin, end)
SECTIONS = (
    (main, "eptq-onnx", BEGIN, END),
    (analyze_main, "eptq-onnx-analyze", "<!-- analyze:begin -->", "<!-- analyze:end -->"),
)


def _cell(text: str) -> str:
    """``text`` on one line, safe inside a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _names(param: click.Option) -> str:
    """``--quiet``, ``-q``; an on/off switch as ``--latency`` / ``--no-latency``."""
    def names(opts: list[str]) -> str:
        return ", ".join(f"`{name}`" for name in sorted(opts, key=len, reverse=True))
    return " / ".join(names(opts) for opts in (param.opts, param.secondary_opts) if opts)


def _values(param: click.Parameter) -> str:
    """What the option takes: its choices, its range, or its type's name; empty for a flag."""
    if isinstance(param, click.Option) and param.is_flag:
        return ""
    kind = param.type
    if isinstance(kind, click.Choice):
        return "\\|".join(f"`{choice}`" for choice in kind.choices)
    if isinstance(kind, click.IntRange):
        low = "" if kind.min is None else f"{kind.min} <= "
        high = "" if kind.max is None else f" <= {kind.max}"
        return f"integer, {low}N{high}"
    if isinstance(kind, click.Path):
        return "path"
    return {"integer": "integer", "float": "number", "text": "text"}.get(kind.name, kind.name)


def _default(param: click.Option) -> str:
    if param.required:
        return "required"
    if param.is_flag and param.secondary_opts:  # an on/off switch: the default is one of its names
        return f"`{(param.opts if param.default is True else param.secondary_opts)[0]}`"
    if param.is_flag:
        return "on" if param.default is True else "off"
    if isinstance(param.show_default, str):
        return param.show_default
    value: Any = param.default
    return f"`{value}`" if isinstance(value, (int, float, str)) else "none"


def _prose(text: str) -> str:
    """Click help text as markdown: paragraphs joined into lines, ``\\b`` (keep as is) paragraphs as text blocks."""
    blocks = []
    for para in inspect.cleandoc(text).split("\n\n"):
        if para.startswith("\b\n"):
            blocks.append("```text\n" + para[2:] + "\n```")
        else:
            blocks.append(" ".join(para.split()))
    return "\n\n".join(blocks)


def reference(command: click.Command = main, name: str = "eptq-onnx") -> str:
    """The markdown reference: usage, the command's help, one table row per option, the epilog."""
    ctx = click.Context(command, info_name=name, **command.context_settings)
    options = [p for p in command.get_params(ctx) if isinstance(p, click.Option)]
    usage = f"{name} {' '.join(command.collect_usage_pieces(ctx))}"
    lines = ["```text", usage, "```", "", _prose(command.help or ""), ""]
    lines += ["| option | values | default | meaning |", "|---|---|---|---|"]
    lines += [f"| {_names(p)} | {_values(p)} | {_default(p)} | {_cell(p.help or '')} |" for p in options]
    if command.epilog:
        lines += ["", " ".join(command.epilog.replace("\b\n", "").split())]
    return "\n".join(lines)


def _split(text: str, begin: str = BEGIN, end: str = END) -> tuple[str, str, str]:
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start], text[start:stop], text[stop:]


def is_current(doc: Path = DOC) -> bool:
    """Whether ``doc`` holds the references the commands render now."""
    text = doc.read_text()
    return all(_split(text, begin, end)[1].strip() == reference(command, name) for command, name, begin, end in SECTIONS)


def write_doc(doc: Path = DOC) -> None:
    """Replace each reference between its markers in ``doc`` with the rendered one."""
    text = doc.read_text()
    for command, name, begin, end in SECTIONS:
        head, _, tail = _split(text, begin, end)
        text = head + "\n" + reference(command, name) + "\n" + tail
    doc.write_text(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("doc", nargs="?", type=Path, default=DOC, help="the markdown file (default: docs/cli.md)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="replace the reference between the markers")
    action.add_argument("--check", action="store_true", help="exit 1 when the file differs from the command")
    args = parser.parse_args()
    if args.write:
        write_doc(args.doc)
    elif args.check:
        if not is_current(args.doc):
            sys.exit(f"{args.doc} is out of date with eptq_onnx.cli: run python tools/cli_reference.py --write")
    else:
        print(reference())
