"""convert with a model: export to ONNX, ONNX back to state_dict names, architecture records,
self-describing sources (whole-module pickles, TorchScript)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import Payload
from safetensors.torch import load_file
from zoo import MODELS_FILE, ZOO, build, fixture_models, spec

from nnconv import convert, inspect, load
from nnconv.converter.convert import OnnxOptions
from nnconv.converter.inputs import example_tensors, input_specs
from nnconv.formats.errors import UntrustedCodeError
from nnconv.formats.keys import ARCHITECTURE_KEY

ROOT = MODELS_FILE.parents[1]


def _onnx_out(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "nnconv.converter", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_mlp_fixture_to_onnx_from_the_command_line(tmp_path):
    """The README's example: a state_dict plus its class file becomes a runnable ONNX."""
    run = _cli(
        "convert",
        ROOT / "fixtures" / "mlp.params",
        tmp_path / "mlp.onnx",
        "--model",
        f"{MODELS_FILE}:MLP",
        "--input-shape",
        "2,20",
    )
    assert run.returncode == 0, run.stderr
    assert "exporter" in run.stdout
    model = build("mlp")
    model.load_state_dict(torch.load(ROOT / "fixtures" / "mlp.params"))
    x = torch.randn(7, 20)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_onnx_out(tmp_path / "mlp.onnx", x), expected, atol=1e-5)


@pytest.mark.parametrize("name", list(ZOO))
def test_onnx_round_trip_loads_strictly_and_bit_identical(tmp_path, name):
    """state_dict -> ONNX (TorchScript exporter: cheap) -> safetensors named by the model's
    keys -> load_state_dict(strict=True): every parameter bit-identical."""
    model = build(name)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    convert(
        tmp_path / "w.pt",
        tmp_path / "m.onnx",
        model=spec(name),
        input_shapes=[ZOO[name][1]],
        onnx=OnnxOptions(exporter="torchscript"),
    )
    result = convert(tmp_path / "m.onnx", tmp_path / "back.safetensors", model=spec(name))
    assert result.model_source == "spec" and not result.missing
    fresh = build(name, seed=123)
    back = load_file(tmp_path / "back.safetensors")
    fresh.load_state_dict(back, strict=True)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # a training counter ONNX does not carry: filled from the module
        assert torch.equal(fresh.state_dict()[key], value), key
    notes = {row.key: row.how for row in result.mapping}
    assert all(notes[k] == "module default" for k in notes if k.endswith("num_batches_tracked"))


def test_record_is_embedded_and_rebuilds_without_model(tmp_path):
    """A safetensors file written with --model carries the architecture record; exporting
    it to ONNX then needs neither --model nor --input-shape."""
    convert(
        ROOT / "fixtures" / "mlp.params",
        tmp_path / "mlp.safetensors",
        model=f"{MODELS_FILE}:MLP",
        input_shapes=["2,20"],
    )
    ckpt = load(tmp_path / "mlp.safetensors")
    assert ARCHITECTURE_KEY in ckpt.metadata
    report = inspect(tmp_path / "mlp.safetensors")
    assert "hidden: Linear(in_features=20, out_features=256, bias=True)" in report.render()
    with pytest.raises(UntrustedCodeError, match="models:MLP"):  # the record names a user class
        convert(tmp_path / "mlp.safetensors", tmp_path / "mlp.onnx")
    result = convert(tmp_path / "mlp.safetensors", tmp_path / "mlp.onnx", trust_code=True)
    assert result.model_source == "record"
    x = example_tensors(input_specs(["3,20"]), seed=4)[0]
    model = build("mlp")
    model.load_state_dict(torch.load(ROOT / "fixtures" / "mlp.params"))
    with torch.no_grad():
        np.testing.assert_allclose(_onnx_out(tmp_path / "mlp.onnx", x), model(x).numpy(), atol=1e-5)


def test_whole_module_pickle_exports_with_only_an_input_shape(tmp_path):
    torch.manual_seed(0)
    net = fixture_models().sequential().eval()  # a plain nn.Sequential of built-ins
    torch.save(net, tmp_path / "net.pt")
    run = _cli("convert", tmp_path / "net.pt", tmp_path / "net.onnx", "--input-shape", "2,4")
    assert run.returncode == 0, run.stderr
    x = torch.randn(3, 4)
    with torch.no_grad():
        np.testing.assert_allclose(_onnx_out(tmp_path / "net.onnx", x), net(x).numpy(), atol=1e-5)
    # and its weights convert too, named as its state_dict
    convert(tmp_path / "net.pt", tmp_path / "net.safetensors")
    assert list(load_file(tmp_path / "net.safetensors")) == list(net.state_dict())


def test_torchscript_archive_converts(tmp_path):
    net = build("mlp")
    torch.jit.save(torch.jit.script(net), tmp_path / "ts.pt")
    convert(tmp_path / "ts.pt", tmp_path / "ts.safetensors")
    back = load_file(tmp_path / "ts.safetensors")
    for key, value in net.state_dict().items():
        assert torch.equal(back[key], value)


@pytest.mark.parametrize("container", ["zip", "bare"])
def test_malicious_pickle_never_runs_on_export(tmp_path, container):
    marker = tmp_path / "MARKER"
    src = tmp_path / "evil.pt"
    if container == "zip":
        torch.save({"w": torch.zeros(2), "x": Payload(marker)}, src)
    else:
        import pickle

        src.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    run = _cli(
        "convert",
        src,
        tmp_path / "evil.onnx",
        "--input-shape",
        "2,4",
        "--model",
        f"{MODELS_FILE}:MLP",
    )
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), run.stderr
    assert not marker.exists()
    assert not (tmp_path / "evil.onnx").exists()


def test_model_mismatch_is_one_line(tmp_path):
    torch.save(build("sequential").state_dict(), tmp_path / "seq.pt")
    run = _cli(
        "convert",
        tmp_path / "seq.pt",
        tmp_path / "x.onnx",
        "--model",
        f"{MODELS_FILE}:MLP",
        "--input-shape",
        "2,20",
    )
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "missing" in lines[0] and "unexpected" in lines[0], run.stderr


def test_onnx_without_model_or_inputs_is_a_clear_error(tmp_path):
    run = _cli("convert", ROOT / "fixtures" / "mlp.params", tmp_path / "x.onnx")
    assert run.returncode == 2
    assert "--model" in run.stderr and "Traceback" not in run.stderr
