"""nnconv's architecture record: build -> dumps -> loads -> rebuild gives a module
that loads the original state_dict strictly and computes the same outputs, for
a user class, Sequentials of built-ins, a CNN with BatchNorm and a
TransformerEncoder; a safetensors file carrying the record is a runnable model
on its own.  Nothing in a record can make nnconv call anything but a
torch.nn.Module class, and junk records are FormatErrors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nnconv.converter import models, record
from nnconv.converter.convert import save
from nnconv.converter.inputs import InputSpec
from nnconv.formats.errors import FormatError, UntrustedCodeError, UsageError
from nnconv.formats.objects import from_object

ROOT = Path(__file__).resolve().parents[1]
INPUTS = [InputSpec("input", (2, 4))]


def round_trip(module: nn.Module, x: tuple, **build) -> nn.Module:
    """Rebuild ``module`` from its record's JSON; check strict load and outputs."""
    text = record.dumps(record.build(module, INPUTS, **build))
    rebuilt = record.rebuild(record.loads(text, "test"), trust_code="model_args" in build)
    assert type(rebuilt) is type(module)
    on_meta = all(t.is_meta for t in rebuilt.state_dict().values())
    rebuilt.load_state_dict(module.state_dict(), strict=True, assign=on_meta)
    module.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(*x), module(*x))
    return rebuilt


@pytest.fixture
def fixtures_importable(monkeypatch):
    """The MLP class importable as fixtures.models (or models), as from the repo root."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(ROOT / "fixtures"))


def test_user_class_mlp(fixtures_importable):
    mlp = models.instantiate(models.parse_spec("fixtures/models.py:MLP"))
    mlp.load_state_dict(torch.load(ROOT / "fixtures" / "mlp.params"))
    rec = record.build(mlp, [InputSpec("input", (2, 20))], model_args={})
    assert rec["root"]["class"].endswith("models:MLP")
    assert rec["root"]["file"] == "fixtures/models.py"
    assert rec["root"]["children"][0] == {
        "path": "hidden",
        "class": "torch.nn.modules.linear:Linear",
        "args": {"in_features": 20, "out_features": 256, "bias": True},
    }
    with pytest.raises(UntrustedCodeError, match="models:MLP"):
        record.rebuild(record.loads(record.dumps(rec)))  # a record names, it does not import
    rebuilt = record.rebuild(record.loads(record.dumps(rec)), trust_code=True)
    rebuilt.load_state_dict(mlp.state_dict(), strict=True)
    x = torch.randn(3, 20)
    assert torch.equal(rebuilt.eval()(x), mlp.eval()(x))
    lines = record.summary(rec)
    assert lines[0].startswith("MLP (") and lines[0].endswith("models:MLP)")
    assert lines[1] == "  hidden: Linear(in_features=20, out_features=256, bias=True)"
    assert lines[-1] == "inputs: input float32[2, 20]"


def test_sequential_of_builtins():
    net = nn.Sequential(
        nn.Linear(4, 8, bias=False),
        nn.LeakyReLU(0.2),
        nn.Dropout(0.3),
        nn.LayerNorm(8, eps=1e-3),
        nn.GELU(approximate="tanh"),
        nn.Sequential(nn.Linear(8, 3), nn.Softmax(dim=-1)),
    )
    rebuilt = round_trip(net, (torch.randn(2, 4),))
    assert rebuilt[0].bias is None and rebuilt[1].negative_slope == 0.2
    assert rebuilt[2].p == 0.3 and rebuilt[4].approximate == "tanh"


def test_cnn_with_batchnorm():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=0.2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 4, (3, 1), stride=2, padding="valid", padding_mode="zeros"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    net(torch.randn(4, 3, 8, 8))  # training mode: real running statistics
    rebuilt = round_trip(net, (torch.randn(2, 3, 8, 8),))
    assert rebuilt[1].momentum == 0.2 and rebuilt[4].kernel_size == (3, 1)


def test_transformer_encoder():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=True)
    net = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)
    rebuilt = round_trip(net, (torch.randn(2, 5, 16),))
    assert rebuilt.num_layers == 2 and rebuilt.layers[1].norm_first


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_containers_attention_and_rnns():
    net = nn.ModuleDict(
        {
            "attn": nn.MultiheadAttention(8, 2, bias=False, kdim=6, vdim=4, batch_first=True),
            "blocks": nn.ModuleList([nn.LSTM(4, 6, num_layers=2, proj_size=3), nn.GRU(3, 5)]),
            "rnn": nn.RNN(2, 3, nonlinearity="relu", bidirectional=True),
            "emb": nn.Embedding(10, 4, padding_idx=0),
            "layer": nn.TransformerEncoderLayer(8, 2, 16, activation=nn.SiLU()),
        }
    )
    rec = record.loads(record.dumps(record.build(net, [])))
    rebuilt = record.rebuild(rec)  # built-ins only: on the meta device, then the weights
    rebuilt.load_state_dict(net.state_dict(), strict=True, assign=True)
    assert rebuilt["rnn"].nonlinearity == "relu" and rebuilt["emb"].padding_idx == 0
    assert isinstance(rebuilt["layer"].activation, nn.SiLU)
    x = torch.randn(3, 1, 4)
    assert torch.equal(rebuilt["blocks"][0](x)[0], net["blocks"][0](x)[0])
    total = sum(1 for _ in net.named_modules(remove_duplicate=False))
    assert record.summary(rec, max_lines=3)[-2] == f"... and {total - 3} more modules"


def test_safetensors_file_with_record_is_a_model(tmp_path):
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    ckpt = from_object(net.state_dict())
    ckpt.metadata[record.ARCHITECTURE_KEY] = record.dumps(record.build(net, INPUTS))
    save(ckpt, tmp_path / "net.safetensors")
    loaded = models.load_model(tmp_path / "net.safetensors")
    assert loaded.source == "record" and loaded.record["inputs"] == [INPUTS[0].to_json()]
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), net(x))


def _record(cls: str, args: dict | None = None, **node) -> dict:
    return {"version": 1, "root": {"path": "", "class": cls, "args": args, **node}, "inputs": []}


@pytest.mark.parametrize(
    "cls", ["no_such_package_xyz.models:Net", "json:Nope", "test_record:local.<locals>.Net"]
)
def test_unimportable_class_names_it_and_suggests_model(cls):
    rec = record.loads(json.dumps(_record(cls, {}, file="nets.py")))
    with pytest.raises(UntrustedCodeError, match="trust_code=True"):
        record.rebuild(rec)
    with pytest.raises(UsageError) as err:
        record.rebuild(rec, trust_code=True)
    assert cls in str(err.value)
    # nets.py is nowhere to be found: the hint is a placeholder, not a path that fails
    assert "--model path/to/nets.py:" in err.value.cli_message()


def test_only_module_classes_are_ever_called(tmp_path):
    marker = tmp_path / "called"
    for cls in ("subprocess:Popen", "os:system", "builtins:exec"):
        rec = _record(cls, {"args": ["touch", str(marker)]})
        with pytest.raises(UntrustedCodeError, match=cls):
            record.rebuild(record.loads(json.dumps(rec)))
        with pytest.raises(UsageError, match="not a torch.nn.Module class"):
            record.rebuild(record.loads(json.dumps(rec)), trust_code=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    "layer",
    [
        nn.Transformer(8, 2, 1, 1, 16, batch_first=True),
        nn.ParameterList([nn.Parameter(torch.ones(2))]),
    ],
)
def test_unrecorded_arguments_need_model(layer):
    rec = record.build(nn.Sequential(layer), [])
    name = type(layer).__name__
    with pytest.raises(UsageError, match=f"cannot rebuild 0: .* {name}.*model"):
        record.rebuild(rec)


def test_bad_model_args_are_usage_errors():
    with pytest.raises(UsageError, match="plain JSON"):
        record.build(nn.Identity(), [], model_args={"x": object()})
    rec = _record("torch.nn.modules.linear:Linear", {"in_features": "two"})
    with pytest.raises(UsageError, match="rebuilding torch.nn.modules.linear:Linear at the root"):
        record.rebuild(record.loads(json.dumps(rec)))


def _deep(n: int) -> dict:
    node: dict = {"path": "x" * 0, "class": "torch.nn.modules.container:Sequential"}
    root = node
    for i in range(n):
        child = {"path": ".".join(["0"] * (i + 1)), "class": node["class"]}
        node["children"] = [child]
        node = child
    return {"version": 1, "root": root, "inputs": []}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"version": 2, "root": {}}',
        '{"version": 1}',
        json.dumps(_record("no colon")),
        json.dumps(_record("os:system", [1])),
        json.dumps(_record("a:B", children={"x": 1})),
        json.dumps(_record("a:B", children=[{"path": "wrong.x", "class": "a:B"}])),
        json.dumps({**_record("a:B"), "inputs": [{"name": "x"}]}),
        json.dumps(_deep(150)),
        "[" * 100_000,
    ],
)
def test_junk_records_are_format_errors(text):
    with pytest.raises(FormatError, match=record.ARCHITECTURE_KEY):
        record.loads(text, "file.safetensors")


def test_deep_but_fine_record():
    assert isinstance(record.rebuild(record.loads(json.dumps(_deep(20)))), nn.Sequential)
