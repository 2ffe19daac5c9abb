"""``python -m cnnvis_tb``: the ``summary`` command, run in-process through ``main(argv)`` and once as a program."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cnnvis_tb.__main__ import main

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    CALLS = []

    def tiny(width=8, num_classes=4):
        CALLS.append((width, num_classes))
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width)),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
        )

    def not_a_model():
        return torch.zeros(3)

    def broken():
        raise RuntimeError("factory exploded")

    class Holder:
        make = staticmethod(tiny)

    NUMBER = 3
    """
)


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A module ``cli_models`` importable by name, and its file path."""
    path = tmp_path / "cli_models.py"
    path.write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cli_models", raising=False)
    return path


def _table_rows(out: str) -> dict[str, list[str]]:
    """Rows of the text table keyed by layer name: [type, output shape, parameters]."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 4 and cells[0] not in ("layer",):
            rows[cells[0]] = cells[1:]
    return rows


def test_summary_prints_every_layer_with_shape_and_parameters(models, capsys):
    assert main(["summary", "cli_models:tiny", "--input", "2,3,16,12", "--kwargs", '{"width": 4}']) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert rows["0"] == ["Conv2d", "2×4×16×12", "112"]  # 3*4*3*3 weights + 4 biases
    assert rows["2"] == ["Sequential", "2×8×8×6", "312"]  # a parent: the sum of its children (296 + 16)
    assert rows["2.0"] == ["Conv2d", "2×8×8×6", "296"]
    assert rows["5"] == ["Linear", "2×4", "36"]
    assert "input [2, 3, 16, 12] -> output [2, 4]" in out
    assert "total: 460 parameters (460 trainable)" in out
    assert "  2.1 " in out  # children are indented under their parent


def test_kwargs_reach_the_factory(models, capsys):
    import cli_models

    assert main(["summary", "cli_models:tiny", "--input", "1,3,8,8", "--kwargs", '{"num_classes": 7}']) == 0
    assert cli_models.CALLS == [(8, 7)]
    assert _table_rows(capsys.readouterr().out)["5"][1] == "1×7"


def test_file_path_and_nested_attribute(models, capsys):
    assert main(["summary", f"{models}:Holder.make", "--input", "1,3,8,8", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| layer | type | output shape | parameters |" in out  # the Markdown table VisLogger logs
    assert "| &nbsp;&nbsp;2.0 | Conv2d | 1×16×4×4 | 1,168 |" in out


def test_torchvision_resnet18_needs_no_download(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # where downloaded weights would land
    assert main(["summary", "torchvision.models:resnet18", "--kwargs", '{"num_classes": 10}',
                 "--input", "1,3,64,64"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert rows["layer4.1.conv2"] == ["Conv2d", "1×512×2×2", "2,359,296"]
    assert rows["fc"] == ["Linear", "1×10", "5,130"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cli_models"], "expected MODULE:FACTORY such as torchvision.models:resnet18"),
        (["cli_models:"], "expected MODULE:FACTORY"),
        (["cli models:tiny"], "expected MODULE:FACTORY"),
        (["cli_models:tiny", "--input", "1,3,x,8"], "--input: expected comma-separated positive integers"),
        (["cli_models:tiny", "--input", "1,3,0,8"], "--input: expected comma-separated positive integers"),
        (["cli_models:tiny", "--input", ""], "--input: expected comma-separated positive integers"),
        (["cli_models:tiny", "--kwargs", "{width: 4}"], "--kwargs: not valid JSON"),
        (["cli_models:tiny", "--kwargs", "[4]"], "--kwargs: expected a JSON object"),
    ],
)
def test_usage_errors_exit_with_status_2(models, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no_such_module_xyz:tiny"], "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
        (["cli_models:tinny"], "cli_models has no attribute 'tinny'; did you mean 'tiny'?"),
        (["cli_models:Holder.mak"], "cli_models.Holder has no attribute 'mak'"),
        (["cli_models:NUMBER"], "cli_models:NUMBER is a int, not a callable"),
        (["cli_models:not_a_model"], "cli_models:not_a_model() returned a Tensor, not a torch.nn.Module"),
        (["cli_models:broken"], "cli_models:broken() raised RuntimeError: factory exploded"),
        (["cli_models:tiny", "--kwargs", '{"depth": 2}'], "unexpected keyword argument 'depth'"),
        (["cli_models:tiny", "--input", "1,1,8,8"], "could not run on a random input of shape [1, 1, 8, 8]"),
        (["missing_file.py:tiny"], "no such file: missing_file.py"),
    ],
)
def test_runtime_errors_exit_with_status_1_and_no_traceback(models, capsys, argv, message):
    assert main(["summary", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m cnnvis_tb summary: error: ")
    assert message in err
    assert "Traceback" not in err


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_runs_as_a_program(tmp_path):
    (tmp_path / "cli_models.py").write_text(MODELS)
    help_run = subprocess.run([sys.executable, "-m", "cnnvis_tb", "--help"], capture_output=True, text=True,
                              timeout=60)
    assert help_run.returncode == 0 and "summary" in help_run.stdout
    # A module in the current folder, as `python -m` puts that folder on the path.
    run = subprocess.run([sys.executable, "-m", "cnnvis_tb", "summary", "cli_models:tiny", "--input", "1,3,8,8"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert _table_rows(run.stdout)["2.0"] == ["Conv2d", "1×16×4×4", "1,168"]
