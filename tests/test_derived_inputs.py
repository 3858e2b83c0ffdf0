"""Inputs derived from the model's first layer (issue 11, point 6): the README's CI-mode
command ``nnconv verify fixtures/mlp.params --model fixtures/models.py:MLP`` runs as
written, and where nothing can be derived the hint names the model's first layer instead
of a fixed ``--input-shape 2,20``."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from redteam import nnconv
from torch import nn

from nnconv.converter import models
from nnconv.converter.golden import resolve_inputs
from nnconv.converter.inputs import InputSpec, derivation, derive_inputs, example_tensors
from nnconv.converter.runner import TorchRunner
from nnconv.formats.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


def _model(name: str) -> nn.Module:
    return models.instantiate(models.parse_spec(f"{FIXTURES / 'models.py'}:{name}"))


class Reversed(nn.Module):
    """Defines its head first: execution order decides which layer is first."""

    def __init__(self) -> None:
        super().__init__()
        self.head, self.body = nn.Linear(8, 2), nn.Linear(4, 8)

    def forward(self, x):
        return self.head(self.body(x))


class Sized(nn.Module):
    """A CNN whose classifier only fits 64×64 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 64 * 64, 2)

    def forward(self, x):
        return self.fc(self.conv1(x).flatten(1))


@pytest.mark.parametrize(
    ("module", "shape", "dtype", "layer"),
    [
        (_model("MLP"), (2, 20), "float32", "hidden: Linear(20 → 256)"),
        (_model("SmallCNN"), (1, 3, 32, 32), "float32", "conv1: Conv2d(3 → 8, 3×3)"),
        (nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU()), (1, 2, 32), "float32", None),
        (nn.Conv3d(2, 3, 3), (1, 2, 8, 8, 8), "float32", "Conv3d(2 → 3, 3×3×3)"),
        (nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2)), (2, 16), "int64", None),
        (Reversed(), (2, 4), "float32", "body: Linear(4 → 8)"),
    ],
)
def test_derived_from_the_first_layer(module, shape, dtype, layer):
    found = derivation(module)
    assert found.specs is not None, found.why_not
    assert [(s.shape, s.dtype) for s in found.specs] == [(shape, dtype)]
    assert derive_inputs(module) == found.specs
    if layer:
        assert found.layer == layer
        assert found.note.endswith(
            f"derived from the first layer {layer}; pass --input-shape to choose"
        )
    with torch.no_grad():
        module(*example_tensors(found.specs))  # the derived inputs run


def test_embedding_inputs_stay_below_its_size():
    found = derivation(nn.Sequential(nn.Embedding(3, 4)))
    (tokens,) = example_tensors(found.specs, seed=1)
    assert tokens.dtype == torch.int64 and int(tokens.max()) < 3
    assert InputSpec.from_json(found.specs[0].to_json()) == found.specs[0]


@pytest.mark.parametrize(
    ("module", "why"),
    [
        (_model("CustomNet"), "first layer (first: MyLinear"),
        (_model("TinyTransformer"), "first layer (encoder.layers.0.self_attn: MultiheadAttention"),
        (nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)), "first layer (0: LayerNorm"),
        (nn.Sequential(nn.ReLU()), "no parameterised layer"),
        (Sized(), "1×3×32×32 float32 derived from the first layer conv1: Conv2d(3 → 4, 3×3) did"),
    ],
)
def test_ambiguous_models_derive_nothing(module, why):
    found = derivation(module)
    assert found.specs is None and why in found.why_not


def test_derivation_leaves_training_state_alone():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    before = net[1].running_mean.clone()
    assert derive_inputs(net) is not None
    assert net.training and net[1].training and torch.equal(net[1].running_mean, before)


def test_resolve_inputs_says_where_the_inputs_came_from():
    runner = TorchRunner(models.LoadedModel(_model("MLP"), "spec"))
    notes: list[str] = []
    specs, tensors = resolve_inputs([runner], notes=notes)
    assert [s.shape for s in specs] == [(2, 20)] and tensors[0].shape == (2, 20)
    assert notes == [
        "inputs: 2×20 float32, derived from the first layer hidden: Linear(20 → 256); "
        "pass --input-shape to choose"
    ]


def test_the_hint_names_the_first_layer():
    runner = TorchRunner(models.LoadedModel(_model("CustomNet"), "spec"))
    with pytest.raises(UsageError) as err:
        resolve_inputs([runner])
    assert "first: MyLinear" in str(err.value) and "2,20" not in str(err.value)
    runner = TorchRunner(models.LoadedModel(Sized(), "spec"))
    with pytest.raises(UsageError, match=r"conv1: Conv2d.*input_shapes=\['1,3,224,224'\]"):
        resolve_inputs([runner])


def test_readme_ci_mode_command_runs_as_written():
    run = nnconv("verify", "fixtures/mlp.params", "--model", "fixtures/models.py:MLP", cwd=ROOT)
    assert run.rc == 0, run.stderr
    assert "PASSED" in run.stdout


def test_export_derives_a_linear_models_inputs(tmp_path):
    out = tmp_path / "mlp.onnx"
    run = nnconv("convert", MLP_PARAMS, out, "--model", f"{FIXTURES / 'models.py'}:MLP")
    assert run.rc == 0, run.stderr
    (graph_input,) = onnx.load(str(out)).graph.input
    assert graph_input.type.tensor_type.shape.dim[1].dim_value == 20


def test_export_of_a_cnn_asks_for_the_size(tmp_path):
    ckpt = tmp_path / "cnn.pt"
    torch.save(_model("SmallCNN").state_dict(), ckpt)
    run = nnconv(
        "convert", ckpt, tmp_path / "cnn.onnx", "--model", f"{FIXTURES / 'models.py'}:SmallCNN"
    )
    assert run.rc == 2
    line = run.error_line
    assert "conv1: Conv2d(3 → 8, 3×3)" in line and "--input-shape 1,3,224,224" in line


MLP_PARAMS = FIXTURES / "mlp.params"
