"""The library as a Python user meets it (#11 points 14-16): ``import nnconv`` gives the
public calls and ``__version__``, the calls take Python objects (modules, classes, tuples,
tensors, keyword options, float tolerances), errors name arguments, submodules are not
shadowed by functions, and the README's snippet runs as written."""

from __future__ import annotations

import importlib
import re
import sys
import types
from importlib import metadata
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import nnconv
from nnconv.formats import errors

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "fixtures" / "mlp.params"


class Net(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.hidden, self.output = nn.Linear(20, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.output(torch.relu(self.hidden(x)))


def test_one_namespace_with_a_version():
    assert nnconv.__version__ == metadata.version("nnconv")
    for name in nnconv.__all__:
        assert getattr(nnconv, name) is not None, name
    for name in ("convert", "verify", "inspect", "load", "save"):
        assert callable(getattr(nnconv, name))
    for name in ("NnconvError", "FormatError", "UntrustedCodeError", "UsageError"):
        assert getattr(nnconv, name) is getattr(errors, name)


@pytest.mark.parametrize("name", ["convert", "verify", "inspect"])
def test_submodules_are_not_shadowed_by_functions(name):
    module = importlib.import_module(f"nnconv.converter.{name}")
    assert isinstance(module, types.ModuleType)
    import nnconv.converter

    assert getattr(nnconv.converter, name) is module  # `import nnconv.converter.convert`
    assert getattr(nnconv, name) is getattr(module, name)  # the function, at the top


def test_python_objects_for_model_shapes_inputs_and_options(tmp_path):
    net = Net()
    net.load_state_dict(torch.load(MLP))
    out = tmp_path / "net.onnx"
    result = nnconv.convert(
        MLP, out, model=net, example_inputs=torch.randn(3, 20), opset=18, dynamic_batch=False
    )
    assert result.export.opset == 18
    dims = [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, 20]  # the example's batch, fixed
    nnconv.convert(MLP, tmp_path / "cls.onnx", model=Net, model_args={"hidden": 256},
                   input_shapes=(2, 20))  # fmt: skip
    report = nnconv.verify(
        MLP, tmp_path / "cls.onnx", model=net, example_inputs={"x": torch.randn(4, 20)}, atol=1e-4
    )
    assert report, report.render()
    assert report.candidates[0].outputs[0].atol == 1e-4 and report.candidates[0].outputs[
        0
    ].shape == [4, 10]
    by_name = nnconv.verify(MLP, tmp_path / "cls.onnx", model=Net, input_shapes=[(2, 20)],
                            rtol={"output": 1e-3})  # fmt: skip
    assert by_name and by_name.candidates[0].outputs[0].rtol == 1e-3
    assert sum(p.numel() for p in net.parameters()) and net.hidden.weight.requires_grad  # untouched


def test_library_errors_name_arguments(tmp_path):
    with pytest.raises(nnconv.UsageError, match=r"model=.*expected an nn.Module class or instance"):
        nnconv.verify(MLP, model=42)
    with pytest.raises(nnconv.UsageError, match="example_inputs excludes input_shapes"):
        nnconv.convert(MLP, tmp_path / "x.onnx", model=Net, example_inputs=torch.randn(2, 20),
                       input_shapes=(2, 20))  # fmt: skip
    with pytest.raises(nnconv.UsageError) as err:
        nnconv.convert(MLP, tmp_path / "x.safetensors", shard_size="lots")
    assert "--" not in str(err.value), str(err.value)
    assert errors.as_arguments("pass --input-shape 2,20 or --trust-code") == (
        "pass input_shapes=['2,20'] or trust_code=True"
    )


def test_the_readme_snippet_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Library") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["readme"])
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert "PASSED (parameters and outputs)" in printed and "4 cast" in printed
    assert "missing.pt: no such file" in printed
    assert (tmp_path / "net.onnx").is_file() and (tmp_path / "net.h5").is_file()
