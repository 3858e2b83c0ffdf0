"""ONNX export of the everyday models: checker passes, onnxruntime agrees with eager torch,
parameters keep their names and values, external data works."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from zoo import ZOO, build

from nnconv.converter.export import export_onnx
from nnconv.converter.inputs import example_tensors, input_specs


def _run(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feed)


@pytest.mark.parametrize("name", list(ZOO))
def test_export_agrees_with_eager_and_keeps_parameters(tmp_path, name):
    model = build(name)
    _, shape, atol = ZOO[name]
    specs = input_specs([shape])
    result = export_onnx(model, tmp_path / f"{name}.onnx", inputs=specs)
    onnx.checker.check_model(result.path)
    assert result.exporter in ("dynamo", "torchscript")
    # A different batch size than the example's: the batch dimension is dynamic.
    batch = (5,) + specs[0].shape[1:]
    x = example_tensors(input_specs([",".join(map(str, batch))]), seed=1)
    with torch.no_grad():
        expected = model(*x).numpy()
    (got,) = _run(result.path, x)
    np.testing.assert_allclose(got, expected, atol=atol, rtol=1e-4)
    # Unoptimised export: every parameter survives under its state_dict name, bit-identical.
    inits = {
        t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(result.path).graph.initializer
    }
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        assert key in inits, f"{key} renamed or folded; initializers: {sorted(inits)[:8]}"
        assert np.array_equal(inits[key], value.numpy()), key
    meta = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert meta["nnconv.onnx.optimized"] == "0"
    assert meta["nnconv.onnx.exporter"] == result.exporter


def test_torchscript_exporter_and_static_batch(tmp_path):
    model = build("mlp")
    result = export_onnx(
        model,
        tmp_path / "m.onnx",
        inputs=input_specs(["2,20"]),
        exporter="torchscript",
        dynamic_batch=False,
    )
    assert result.exporter == "torchscript" and result.fallback_reason is None
    dim = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 2


def test_external_data_pair(tmp_path):
    """Over the threshold (lowered here) the weights go to one data file beside the model."""
    model = build("mlp")
    dst = tmp_path / "big.onnx"
    result = export_onnx(
        model,
        dst,
        inputs=input_specs(["2,20"]),
        exporter="torchscript",
        external_data_threshold=1024,
    )
    assert result.external_data == "big.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert dst.stat().st_size < 4096, "weights must not be inside the model file"
    proto = onnx.load(str(dst), load_external_data=False)
    locations = {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"big.onnx.data"}  # relative, beside the model
    x = example_tensors(input_specs(["3,20"]), seed=2)
    with torch.no_grad():
        expected = model(*x).numpy()
    np.testing.assert_allclose(_run(dst, x)[0], expected, atol=1e-5)


def test_optimize_is_recorded(tmp_path):
    model = build("cnn")
    result = export_onnx(
        model,
        tmp_path / "o.onnx",
        inputs=input_specs(["2,3,16,16"]),
        exporter="torchscript",
        optimize=True,
    )
    meta = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert meta["nnconv.onnx.optimized"] == "1" and result.optimized


def test_export_failure_leaves_nothing(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x)[0].real  # no ONNX operator for eig

    from nnconv.formats.errors import NnconvError

    with pytest.raises(NnconvError, match="export failed"):
        export_onnx(Bad(), tmp_path / "bad.onnx", inputs=input_specs(["3,3"]))
    assert list(tmp_path.iterdir()) == []
