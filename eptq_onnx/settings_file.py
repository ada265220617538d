"""Reading a settings file (``--config``, ``--overrides``): one JSON or YAML object."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import yaml

from eptq_onnx.errors import UsageError

YAML_SUFFIXES = (".yaml", ".yml")


def read_object(path: Path, option: str, example: str) -> Dict[str, Any]:
    """The object (mapping) that ``path`` holds, read as YAML for a .yaml/.yml name and as JSON otherwise;
    a UsageError (one line, naming ``option`` and showing ``example``) when it cannot be read or is no object."""
    is_yaml = path.suffix.lower() in YAML_SUFFIXES
    kind = "YAML" if is_yaml else "JSON"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option} {path}: cannot read ({exc})") from None
    try:
        data = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise UsageError(f"{option} {path}: not valid {kind} ({reason})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{option} {path}: holds a {kind} {type(data).__name__}, not an object such as {example}")
    return data
