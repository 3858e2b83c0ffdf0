"""Opt-in (``pytest -m slow``): a real model over 2 GiB exports with external data and
reads back.  It needs ~10 GiB of memory and about a minute or two."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nnconv import convert, load
from nnconv.converter.export import export_onnx
from nnconv.converter.inputs import input_specs

pytestmark = pytest.mark.slow


class Wide(torch.nn.Module):
    """Three 16384 x 12288 float32 layers: 2.25 GiB of weights."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(12288, 16384, bias=False)
        self.b = torch.nn.Linear(16384, 12288, bias=False)
        self.c = torch.nn.Linear(12288, 16384, bias=False)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_model_over_2gib_exports_with_external_data_and_reads_back(tmp_path):
    torch.manual_seed(0)
    with torch.no_grad():
        model = Wide().eval()
        for p in model.parameters():
            p.mul_(0.01)
    result = export_onnx(
        model, tmp_path / "wide.onnx", inputs=input_specs(["1,12288"]), exporter="torchscript"
    )
    assert result.external_data == "wide.onnx.data"
    assert result.parameters_bytes > 2**31
    assert (tmp_path / "wide.onnx").stat().st_size < 1 << 20
    x = torch.randn(2, 12288)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(tmp_path / "wide.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-3)
    del session
    # nnconv reads the pair back, tensor by tensor, bit-identical.
    with load(tmp_path / "wide.onnx") as ckpt:
        for name, value in model.state_dict().items():
            assert torch.equal(ckpt.tensors[name].load(), value), name
    convert(tmp_path / "wide.onnx", tmp_path / "wide.safetensors")
