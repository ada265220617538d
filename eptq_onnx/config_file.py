"""``--config FILE``: the command's options kept in a JSON or YAML file, so that a run can be repeated.

The file holds one object whose keys are the long option names of ``eptq-onnx --help`` (with or
without the leading ``--``; ``_`` may stand for ``-``) and whose values are what the option takes:
``{"calib": "calib_dir/", "weight-bits": 8, "exclude": ["head", "op:Softmax"], "latency": false}``.
A flag takes true or false (``"no-latency": true`` is ``"latency": false``), a repeatable option a list,
null leaves the option at its default. The values become the command's defaults (click's
``default_map``), so an option given on the command line wins, and a repeatable one given there
replaces the file's list. Paths are read as on the command line, from the current directory.
A ``.yaml``/``.yml`` file is read as YAML (``weight-bits: 8``), any other as JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import click

from eptq_onnx.errors import UsageError
from eptq_onnx.settings_file import read_object

NOT_IN_FILE = ("config", "help")  # options a file cannot set


def read_file(path: Path) -> Dict[str, Any]:
    """The object of options in ``path``; click.UsageError (one line) when it is not one."""
    try:
        return read_object(path, "--config", '{"weight-bits": 8}')
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None


def _option_names(command: click.Command) -> Dict[str, Tuple[click.Option, bool]]:
    """Long option name (without ``--``) -> (option, whether the name sets it on: False for ``--no-x``)."""
    names: Dict[str, Tuple[click.Option, bool]] = {}
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        for opts, on in ((param.opts, True), (param.secondary_opts, False)):
            for opt in opts:
                if opt.startswith("--") and opt[2:] not in NOT_IN_FILE:
                    names[opt[2:]] = (param, on)
    return names


def _value(path: Path, key: str, option: click.Option, on: bool, value: Any) -> Any:
    """The default ``value`` gives ``option``, checked for its JSON type (click converts the rest)."""
    if option.is_flag:
        if not isinstance(value, bool):
            raise click.UsageError(f"--config {path}: {key!r} is a flag: give true or false, not {json.dumps(value)}")
        return value if on else not value
    if option.multiple:
        value = value if isinstance(value, list) else [value]
    for item in value if option.multiple else [value]:
        if isinstance(item, (dict, list)):
            raise click.UsageError(f"--config {path}: {key!r} takes {'a list of values' if option.multiple else 'one value'}"
                                   f", not {json.dumps(value)}")
    return value


def defaults_from_file(command: click.Command, path: Path) -> Dict[str, Any]:
    """The ``default_map`` of ``command`` that the options in ``path`` give; one-line errors for unknown
    options and values of the wrong JSON type."""
    names = _option_names(command)
    defaults: Dict[str, Any] = {}
    for key, value in read_file(path).items():
        name = key[2:] if key.startswith("--") else key
        name = name.replace("_", "-")
        if name not in names:
            raise click.UsageError(f"--config {path}: unknown option {key!r}: use the long option names of --help, "
                                   "e.g. \"weight-bits\": 8")
        if value is None:
            continue
        option, on = names[name]
        defaults[option.name] = _value(path, key, option, on, value)  # type: ignore[index]
    return defaults


def _load(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        assert isinstance(ctx.command, click.Command)
        ctx.default_map = {**(ctx.default_map or {}), **defaults_from_file(ctx.command, value)}


def config_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``--config FILE`` option: read first (eager), its options become the command's defaults."""
    return click.option(
        "--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), is_eager=True,
        expose_value=False, callback=_load,
        help="Read options from this JSON (or .yaml/.yml YAML) file: an object keyed by long option names, e.g. {\"calib\": \"calib_dir/\", "
             "\"weight-bits\": 8, \"exclude\": [\"head\"], \"latency\": false}; options given on the command line win "
             "(a repeatable one replaces the file's list).")
