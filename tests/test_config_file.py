"""--config FILE: any option of the command from a JSON or YAML object; the command line wins."""
from __future__ import annotations

import json
from pathlib import Path

import click
import onnx
import pytest
from click.testing import CliRunner

from eptq_onnx.cli import main
from eptq_onnx.config_file import defaults_from_file
from models.zoo_control import named_cnn
from models.calib_files import write_calib


def _file(tmp_path: Path, data, name: str = "run.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_long_names_in_any_spelling_become_the_commands_defaults(tmp_path: Path) -> None:
    path = _file(tmp_path, {"calib": "c/", "--weight-bits": 8, "num_calib": 4, "exclude": "head", "no-latency": True,
                            "act-symmetric": True, "scale": 0.5, "iters": None})
    assert defaults_from_file(main, path) == {"calib_dir": "c/", "weight_bits": 8, "num_calib": 4, "exclude": ["head"],
                                              "latency": False, "act_symmetric": True, "pixel_scale": 0.5}


@pytest.mark.parametrize("data, message", [
    ({"weight-bitz": 3}, "unknown option 'weight-bitz'"),
    ({"config": "other.json"}, "unknown option 'config'"),
    ({"force": "yes"}, "'force' is a flag: give true or false"),
    ({"exclude": [["a"]]}, "'exclude' takes a list of values"),
    ({"weight-bits": {"x": 1}}, "'weight-bits' takes one value"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ("{\"weight-bits\": 8,}", "not valid JSON"),
])
def test_a_bad_file_is_a_one_line_usage_error(tmp_path: Path, data, message: str) -> None:
    with pytest.raises(click.UsageError, match=message):
        defaults_from_file(main, _file(tmp_path, data))


def test_a_yaml_file_reads_as_its_json_twin(tmp_path: Path) -> None:
    text = "calib: c/\nweight-bits: 8\nexclude: [head, 'op:Softmax']\nno-latency: true\n"
    assert defaults_from_file(main, _file(tmp_path, text, "run.yml")) == defaults_from_file(
        main, _file(tmp_path, {"calib": "c/", "weight-bits": 8, "exclude": ["head", "op:Softmax"], "no-latency": True}))
    with pytest.raises(click.UsageError, match="not valid YAML"):
        defaults_from_file(main, _file(tmp_path, "weight-bits: [8\n", "bad.yaml"))
    with pytest.raises(click.UsageError, match="holds a YAML list, not an object"):
        defaults_from_file(main, _file(tmp_path, "- 8\n", "list.yaml"))


def test_a_run_from_the_file_and_the_command_line_winning(tmp_path: Path) -> None:
    model = named_cnn()
    onnx.save(model, tmp_path / "cnn.onnx")
    calib = write_calib(model, tmp_path / "calib", 8)
    config = _file(tmp_path, {"calib": str(calib), "weight-bits": 8, "exclude": ["head"], "iters": 0, "latency": False,
                              "quiet": True, "num-calib": 6, "report": str(tmp_path / "file_report.json")})
    args = [str(tmp_path / "cnn.onnx"), str(tmp_path / "out.onnx"), "--config", str(config)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "file_report.json").read_text())
    assert data["config"]["weight_bits"] == 8 and data["config"]["exclude"] == ["head"]
    assert data["config"]["measure_latency"] is False and data["calibration_samples"] == 6
    report = tmp_path / "cli_report.json"
    result = CliRunner().invoke(main, [*args, "--weight-bits", "4", "--exclude", "stem", "--force", "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["config"]["weight_bits"] == 4 and data["config"]["exclude"] == ["stem"]  # the command line's
    assert data["config"]["calib"]["num_samples"] == 6  # the file's


def test_a_bad_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    config = _file(tmp_path, {"weight-bitz": 3})
    result = CliRunner().invoke(main, ["in.onnx", "out.onnx", "--config", str(config)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "unknown option 'weight-bitz'" in lines[0]
    result = CliRunner().invoke(main, ["in.onnx", "out.onnx", "--config", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
