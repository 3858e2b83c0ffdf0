"""ONNX initializers mapped back to a module's state_dict keys: renamed, transposed, merged
and folded initializers from real TorchScript (and one dynamo) exports."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from helpers import assert_tensor_same
from onnx import helper, numpy_helper
from torch import nn

from nnconv.converter.export import export_onnx
from nnconv.converter.inputs import input_specs
from nnconv.converter.onnx_import import map_to_state_dict
from nnconv.formats import to_object
from nnconv.formats.errors import UnsupportedError
from nnconv.formats.keys import MAPPING_KEY
from nnconv.formats.onnx import onnx_format


class Encoder(nn.Module):
    """MultiheadAttention inside a TransformerEncoderLayer, then a Linear on 3-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


class BiasFree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 10, bias=False)
        self.down = nn.Linear(10, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Linear(4, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))  # [b, 4, h, w]
        return self.proj(y.flatten(2).transpose(1, 2))  # a bias-free Linear on 3-D input


def trained(cls, *, seed: int = 0) -> nn.Module:
    """An instance with distinct, non-default values everywhere, as a trained model has."""
    torch.manual_seed(seed)
    model = cls().eval()
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.uniform_(0.5, 1.5)
    return model


def export_ts(model: nn.Module, x: torch.Tensor, path: Path, *, axes=None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            do_constant_folding=True,
            input_names=["x"],
            dynamic_axes={"x": axes} if axes else None,
        )
    return path


def by_how(result) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for row in result.mapping:
        out.setdefault((row.how, row.transform), set()).add(row.key)
    return out


def assert_loads_identically(result, cls, exported: nn.Module) -> None:
    fresh = cls()
    fresh.load_state_dict(to_object(result.checkpoint), strict=True)
    for key, value in exported.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert_tensor_same(fresh.state_dict()[key], value, key)


def test_transformer_torchscript_constant_folding(tmp_path):
    model = trained(Encoder)
    path = export_ts(model, torch.randn(2, 5, 16), tmp_path / "enc.onnx", axes={0: "b", 1: "s"})
    result = map_to_state_dict(onnx_format.read(path), Encoder())
    hows = by_how(result)
    transposed = {
        "enc.self_attn.in_proj_weight",
        "enc.linear1.weight",
        "enc.linear2.weight",
        "head.weight",
    }
    assert hows.pop(("value", "transposed")) == transposed
    assert hows == {("name", "identity"): set(model.state_dict()) - transposed}
    rows = {row.key: row for row in result.mapping}
    assert all(rows[k].initializer.startswith("onnx::MatMul_") for k in transposed)
    assert result.missing == [] and result.unused == [] and result.guesses == []
    assert list(result.checkpoint.tensors) == list(model.state_dict())
    assert_loads_identically(result, Encoder, model)
    recorded = json.loads(result.checkpoint.metadata[MAPPING_KEY])
    assert recorded["head.weight"] == {
        "initializer": rows["head.weight"].initializer,
        "how": "value",
        "transform": "transposed",
    }
    assert result.checkpoint.metadata["onnx.producer"].startswith("pytorch")


def test_bias_free_linear_on_3d_input(tmp_path):
    model = trained(BiasFree)
    path = export_ts(model, torch.randn(2, 7, 6), tmp_path / "lin.onnx")
    result = map_to_state_dict(onnx_format.read(path), BiasFree(), source=path)
    assert by_how(result) == {("value", "transposed"): {"up.weight", "down.weight"}}
    assert all(row.initializer.startswith("onnx::MatMul_") for row in result.mapping)
    assert result.checkpoint.tensors["up.weight"].shape == (10, 6)
    assert_loads_identically(result, BiasFree, model)


def test_merged_duplicates_of_a_fresh_model(tmp_path):
    """Untrained LayerNorms are all ones/zeros: the exporter keeps one and aliases the rest."""
    torch.manual_seed(0)
    model = Encoder().eval()
    path = export_ts(model, torch.randn(2, 5, 16), tmp_path / "fresh.onnx")
    ckpt = onnx_format.read(path)
    assert "enc.norm2.weight" not in ckpt.tensors
    result = map_to_state_dict(ckpt, Encoder())
    rows = {row.key: row for row in result.mapping}
    assert rows["enc.norm2.weight"].how == "value"
    assert rows["enc.norm2.weight"].initializer == "enc.norm1.weight"
    assert_loads_identically(result, Encoder, model)


def test_missing_parameter_is_named(tmp_path):
    model = trained(Encoder)
    path = export_ts(model, torch.randn(2, 5, 16), tmp_path / "enc.onnx")
    proto = onnx.load(str(path))
    kept = [t for t in proto.graph.initializer if t.name != "enc.linear1.bias"]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    onnx.save_model(proto, str(path))
    ckpt = onnx_format.read(path)
    with pytest.raises(UnsupportedError, match=r"1 state_dict key.*enc\.linear1\.bias") as err:
        map_to_state_dict(ckpt, Encoder())
    assert err.value.value == ["enc.linear1.bias"]
    result = map_to_state_dict(ckpt, Encoder(), allow_missing=True)
    assert result.missing == ["enc.linear1.bias"]
    assert "enc.linear1.bias" not in result.checkpoint.tensors
    fresh = Encoder()
    assert fresh.load_state_dict(to_object(result.checkpoint), strict=False).missing_keys == [
        "enc.linear1.bias"
    ]
    assert_tensor_same(fresh.enc.linear1.weight.detach(), model.enc.linear1.weight.detach())


def test_batchnorm_folded_into_conv_is_reported_not_guessed(tmp_path):
    model = trained(ConvBN)
    path = export_ts(model, torch.randn(1, 3, 8, 8), tmp_path / "cnn.onnx")
    ckpt = onnx_format.read(path)
    folded = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean"]
    with pytest.raises(UnsupportedError, match="6 state_dict key") as err:
        map_to_state_dict(ckpt, ConvBN())
    assert err.value.value == [*folded, "bn.running_var"]
    assert "--optimize" in err.value.remedy
    result = map_to_state_dict(ckpt, ConvBN(), allow_missing=True)
    rows = {row.key: row for row in result.mapping}
    assert rows["bn.num_batches_tracked"].how == "module default"
    assert (rows["proj.weight"].how, rows["proj.weight"].transform) == ("value", "transposed")
    assert result.guesses == []  # the folded Conv tensors have the Conv's shapes: not taken
    assert sorted(result.unused) == sorted(n for n in ckpt.tensors if n.startswith("onnx::Conv"))


def test_dynamo_export_keeps_folded_names_and_transposes(tmp_path):
    """The dynamo exporter folds BatchNorm into ``conv.weight`` under the same name."""
    model = trained(ConvBN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), dynamo=True, verbose=False)
    path = tmp_path / "dyn.onnx"
    program.save(str(path))
    ckpt = onnx_format.read(path)
    assert "conv.weight" in ckpt.tensors  # with BatchNorm folded in
    assert not torch.equal(ckpt.tensors["conv.weight"].load(), model.conv.weight.detach())
    result = map_to_state_dict(ckpt, ConvBN(), allow_missing=True)
    assert "conv.weight" in result.missing and "conv.bias" in result.missing
    assert any("folded" in note for note in result.notes)
    rows = {row.key: row for row in result.mapping}
    assert (rows["proj.weight"].how, rows["proj.weight"].transform) == ("value", "transposed")
    assert_tensor_same(
        result.checkpoint.tensors["proj.weight"].load(), model.proj.weight.detach(), "proj"
    )


def test_nnconv_unoptimised_export_maps_by_name(tmp_path):
    model = trained(ConvBN)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, inputs=input_specs(["1,3,8,8"]), exporter="torchscript")
    result = map_to_state_dict(onnx_format.read(path), ConvBN())
    assert by_how(result) == {
        ("name", "identity"): set(model.state_dict()) - {"bn.num_batches_tracked"},
        ("module default", "identity"): {"bn.num_batches_tracked"},
    }
    assert result.notes == []  # every name matched: no reference export was needed
    assert_loads_identically(result, ConvBN, model)


def test_shape_fallback_without_a_graph(tmp_path):
    model = trained(BiasFree)
    up, down = model.up.weight.detach(), model.down.weight.detach()
    inits = [numpy_helper.from_array(up.t().contiguous().numpy(), "a")]
    inits.append(numpy_helper.from_array(down.numpy(), "b"))
    graph = helper.make_graph([], "g", [], [], initializer=inits)
    onnx.save_model(helper.make_model(graph), str(tmp_path / "h.onnx"))
    ckpt = onnx_format.read(tmp_path / "h.onnx")
    ckpt.source = None  # an in-memory checkpoint: no graph to learn from
    result = map_to_state_dict(ckpt, BiasFree())
    assert {(r.key, r.initializer, r.how, r.transform) for r in result.guesses} == {
        ("up.weight", "a", "shape", "transposed"),
        ("down.weight", "b", "shape", "identity"),
    }
    assert any("no ONNX file" in note for note in result.notes)
    assert_loads_identically(result, BiasFree, model)
