"""Runnable models for checkpoints: ``--model`` specs, state_dict selection, strict
loading with one-line mismatch errors, lazy modules, and self-describing files
(whole-module pickles behind the module allowlist, TorchScript archives).

Every model file, checkpoint and pickle is real and written under tmp_path.
"""

from __future__ import annotations

import io
import uuid
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from nnconv.converter import models
from nnconv.converter.models import ModelMismatchError, ModelSpec, load_model, parse_spec
from nnconv.formats import pickle_gate
from nnconv.formats.errors import (
    FormatError,
    LazyParameterError,
    NnconvError,
    UnsafePickleError,
    UntrustedCodeError,
    UsageError,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MLP_SPEC = f"{FIXTURES / 'models.py'}:MLP"

NETS = '''
import torch
from torch import nn


class Seq(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


class MyLinear(nn.Module):
    """A layer of its own: weight stored [in, out], unlike nn.Linear."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x):
        return x @ self.weight


class Centre(nn.Module):
    def forward(self, x):
        return x - x.mean()


class Custom(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.proj = MyLinear(3, width)
        self.centre = Centre()

    def forward(self, x):
        return self.centre(self.proj(x))


class LazyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.LazyLinear(8)
        self.b = nn.LazyLinear(2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))
'''


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nets") / "nets.py"
    path.write_text(NETS)
    return path


def spec(nets: Path, name: str, args: str | None = None) -> ModelSpec:
    return parse_spec(f"{nets}:{name}", args)


def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


# --- specs ----------------------------------------------------------------------


def test_spec_by_file_path():
    module = models.instantiate(parse_spec(MLP_SPEC))
    assert type(module).__name__ == "MLP"
    assert module.hidden.out_features == 256


def test_spec_by_module_name_with_model_args():
    s = parse_spec("torch.nn:Linear", '{"in_features": 3, "out_features": 2, "bias": false}')
    assert s == ModelSpec("torch.nn:Linear", {"in_features": 3, "out_features": 2, "bias": False})
    module = models.instantiate(s)
    assert isinstance(module, nn.Linear) and module.bias is None


def test_spec_module_on_sys_path(tmp_path, monkeypatch):
    name = f"netmod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = models.instantiate(parse_spec(f"{name}:Custom", '{"width": 5}'))
    assert module.proj.weight.shape == (3, 5)


def test_file_imports_its_neighbours(tmp_path):
    helper = f"helper_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{helper}.py").write_text("WIDTH = 7\n")
    (tmp_path / "net.py").write_text(
        f"from torch import nn\nfrom {helper} import WIDTH\n\n"
        "class Net(nn.Linear):\n    def __init__(self):\n        super().__init__(2, WIDTH)\n"
    )
    assert models.instantiate(parse_spec(f"{tmp_path / 'net.py'}:Net")).out_features == 7


@pytest.mark.parametrize(
    ("target", "args", "expected"),
    [
        ("no-colon", None, "invalid --model"),
        ("{fixtures}/missing.py:MLP", None, "no such file"),
        ("{fixtures}/models.py:Nope", None, "no class 'Nope'"),
        ("{fixtures}/models.py:1bad", None, "invalid --model"),
        ("no_such_module_xyz:Net", None, "cannot import no_such_module_xyz"),
        ("torch.nn.functional:relu", None, "not an nn.Module class"),
        ("{fixtures}/models.py:MLP", "{bad json", "not valid JSON"),
        ("{fixtures}/models.py:MLP", "[1, 2]", "must be a JSON object"),
        ("{fixtures}/models.py:MLP", '{"width": 3}', "unexpected keyword argument 'width'"),
    ],
)
def test_bad_specs_are_usage_errors(target, args, expected):
    target = target.format(fixtures=FIXTURES)
    with pytest.raises(UsageError) as err:
        models.instantiate(parse_spec(target, args))
    assert expected in err.value.cli_message()
    assert target in str(err.value)


def test_import_failure_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UsageError, match="importing broken.py failed: RuntimeError: boom"):
        models.instantiate(parse_spec(f"{tmp_path / 'broken.py'}:Net"))


# --- state_dict selection ---------------------------------------------------------


def test_fixture_mlp_loads_strictly():
    loaded = load_model(FIXTURES / "mlp.params", spec=parse_spec(MLP_SPEC))
    assert loaded.source == "spec" and not loaded.module.training
    assert loaded.selection == models.Selection(None, "", False, 4)
    reference = models.instantiate(parse_spec(MLP_SPEC))
    reference.load_state_dict(torch.load(FIXTURES / "mlp.params"))
    same_outputs(loaded.module, reference, torch.randn(3, 20))


@pytest.mark.parametrize("key", ["model", None])
def test_training_checkpoint(key):
    loaded = load_model(FIXTURES / "checkpoint.pt", spec=parse_spec(MLP_SPEC), key=key)
    assert loaded.selection.key_used == "model"
    assert loaded.selection.auto_selected is (key is None)
    expected = torch.load(FIXTURES / "checkpoint.pt")["model"]["output.bias"]
    assert torch.equal(loaded.module.output.bias, expected)


def _mlp_sd() -> dict:
    return torch.load(FIXTURES / "mlp.params")


def test_nested_key_and_auto_selection(tmp_path):
    path = tmp_path / "nested.pt"
    torch.save({"state": {"model": _mlp_sd(), "step": 3}, "epoch": 1}, path)
    for key in ("state.model", None):
        loaded = load_model(path, spec=parse_spec(MLP_SPEC), key=key)
        assert loaded.selection.key_used == "state.model"
    with pytest.raises(UsageError, match="'state.nope': state has no 'nope'.*keys there: model"):
        load_model(path, spec=parse_spec(MLP_SPEC), key="state.nope")


def test_several_fitting_state_dicts_need_key(tmp_path):
    path = tmp_path / "two.pt"
    sd = _mlp_sd()
    ema = {k: v + 1 for k, v in sd.items()}
    torch.save({"model": sd, "ema": ema}, path)
    with pytest.raises(UsageError, match=r"several state_dicts fit MLP: 'model', 'ema'.*key"):
        load_model(path, spec=parse_spec(MLP_SPEC))
    loaded = load_model(path, spec=parse_spec(MLP_SPEC), key="ema")
    assert torch.equal(loaded.module.hidden.bias, ema["hidden.bias"])


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped_and_reported(tmp_path, prefix):
    path = tmp_path / "wrapped.pt"
    torch.save({"model": {prefix + k: v for k, v in _mlp_sd().items()}}, path)
    loaded = load_model(path, spec=parse_spec(MLP_SPEC))
    assert loaded.selection.prefix_stripped == prefix
    assert loaded.selection.key_used == "model"


def test_mismatch_is_one_readable_line(tmp_path):
    sd = _mlp_sd()
    del sd["output.bias"]
    sd["extra.weight"] = torch.zeros(2)
    sd["hidden.weight"] = torch.zeros(128, 20)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ModelMismatchError) as err:
        load_model(tmp_path / "bad.pt", spec=parse_spec(MLP_SPEC))
    text = str(err.value)
    assert isinstance(err.value, FormatError)
    assert "\n" not in text and "Error(s) in loading" not in text
    assert "1 missing key (output.bias)" in text
    assert "1 unexpected key (extra.weight)" in text
    assert "1 shape mismatch (hidden.weight: checkpoint [128, 20] vs model [256, 20])" in text
    assert err.value.mismatched == [("hidden.weight", (128, 20), (256, 20))]


def test_mismatch_lists_the_first_ten():
    module = nn.Sequential(*[nn.Linear(1, 1) for _ in range(12)])
    with pytest.raises(ModelMismatchError, match=r"24 missing keys \(0.weight, .*and 14 more\)"):
        models.load_weights(module, {})


# --- model kinds -----------------------------------------------------------------


def test_sequential_of_builtins(nets, tmp_path):
    source = models.instantiate(spec(nets, "Seq"))
    torch.save(source.state_dict(), tmp_path / "seq.pt")
    loaded = load_model(tmp_path / "seq.pt", spec=spec(nets, "Seq"))
    same_outputs(loaded.module, source, torch.randn(5, 4))


def test_custom_layers(nets, tmp_path):
    source = models.instantiate(spec(nets, "Custom", '{"width": 4}'))
    torch.save(source.state_dict(), tmp_path / "custom.pt")
    loaded = load_model(tmp_path / "custom.pt", spec=spec(nets, "Custom", '{"width": 4}'))
    same_outputs(loaded.module, source, torch.randn(2, 3))
    with pytest.raises(ModelMismatchError, match=r"checkpoint \[3, 4\] vs model \[3, 6\]"):
        load_model(tmp_path / "custom.pt", spec=spec(nets, "Custom"))


@pytest.mark.parametrize("by_forward", [False, True])
def test_lazy_modules_are_materialised(nets, tmp_path, by_forward):
    x = torch.randn(2, 5)
    source = models.instantiate(spec(nets, "LazyNet"))
    source(x)
    torch.save(source.state_dict(), tmp_path / "lazy.pt")
    loaded = load_model(
        tmp_path / "lazy.pt",
        spec=spec(nets, "LazyNet"),
        example_inputs=(x,) if by_forward else None,
    )
    assert type(loaded.module.a) is nn.Linear and loaded.module.a.in_features == 5
    same_outputs(loaded.module, source, x)


def test_uninitialised_parameters_without_hook_need_inputs():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.UninitializedParameter()

    with pytest.raises(UsageError, match="only a forward pass can materialise.*input_shapes"):
        models.load_weights(Odd(), {"w": torch.zeros(2)})


# --- self-describing files ---------------------------------------------------------


def _builtins_net() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.LayerNorm(8),
        nn.Embedding(10, 4),
        nn.Dropout(0.1),
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
        nn.GELU(),
    )


def test_whole_module_of_builtins_loads_without_trust(tmp_path):
    net = _builtins_net()
    torch.save(net, tmp_path / "net.pt")
    loaded = load_model(tmp_path / "net.pt")
    assert loaded.source == "module-pickle" and not loaded.module.training
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.module.state_dict().values(), net.state_dict().values(), strict=True)
    )
    same_outputs(loaded.module[7], net[7], torch.randn(2, 3, 16))
    # with a spec, a whole-module file serves as the state_dict
    s = ModelSpec("torch.nn:Sequential")
    with pytest.raises(ModelMismatchError, match="unexpected key"):
        load_model(tmp_path / "net.pt", spec=s)


class Wrapper(nn.Module):  # importable as test_models.Wrapper for the trusted load
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)


def test_custom_class_module_is_refused_unless_trusted(tmp_path):
    torch.save(Wrapper(), tmp_path / "custom.pt")
    with pytest.raises(UnsafePickleError) as err:
        load_model(tmp_path / "custom.pt")
    assert err.value.globals == [f"{__name__}.Wrapper"]
    assert "trust_code=True" in str(err.value)
    loaded = load_model(tmp_path / "custom.pt", trust_code=True)
    assert type(loaded.module).__name__ == "Wrapper"


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_code_in_a_module_pickle_never_runs(tmp_path):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    for target, path in ((marker, tmp_path / "evil.pt"), (control, tmp_path / "control.pt")):
        net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        net.extra = Payload(target)
        torch.save(net, path)
    with pytest.raises(UnsafePickleError) as err:
        load_model(tmp_path / "evil.pt")
    assert err.value.globals == ["builtins.exec"]
    with pytest.raises(UnsafePickleError):  # the spec path reads it through the same gate
        load_model(tmp_path / "evil.pt", spec=ModelSpec("torch.nn:Identity"))
    assert not marker.exists()
    torch.load(tmp_path / "control.pt", weights_only=False)  # the payload is real
    assert control.exists()


def test_unmaterialised_lazy_module_pickle(nets, tmp_path):
    torch.save(nn.Sequential(nn.LazyLinear(3)), tmp_path / "lazy.pt")
    with pytest.raises(LazyParameterError):
        load_model(tmp_path / "lazy.pt")


def test_module_allowlist_is_explicit_classes():
    extra = pickle_gate.MODULE_ALLOWED - pickle_gate.ALLOWED
    for name in extra - pickle_gate.MODULE_EXTRAS:
        module, _, cls = name.rpartition(".")
        assert module.startswith("torch.nn.modules.") and cls.isidentifier()
        assert isinstance(getattr(__import__(module, fromlist=[cls]), cls), type)
    with pytest.raises(UnsafePickleError):
        pickle_gate.check_module("f", ["torch.nn.modules.module.Module.__init__"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive(nets, tmp_path):
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    torch.jit.save(torch.jit.script(net), tmp_path / "ts.pt")
    assert models.is_torchscript(tmp_path / "ts.pt")
    with pytest.raises(UntrustedCodeError, match="TorchScript"):
        load_model(tmp_path / "ts.pt")  # running it runs its code: only when trusted
    loaded = load_model(tmp_path / "ts.pt", trust_code=True)
    assert loaded.source == "torchscript"
    same_outputs(loaded.module, net, torch.randn(3, 4))
    with_spec = load_model(tmp_path / "ts.pt", spec=spec(nets, "Seq"))  # its state_dict
    assert with_spec.source == "spec"
    same_outputs(with_spec.module, net, torch.randn(3, 4))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_is_self_describing(tmp_path):
    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "module.pt")
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "ts.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04junk")
    assert models.is_self_describing(tmp_path / "module.pt")
    assert models.is_self_describing(tmp_path / "ts.pt")
    for weights in (FIXTURES / "mlp.params", FIXTURES / "mlp.safetensors", FIXTURES / "legacy.pt"):
        assert not models.is_self_describing(weights)
    assert not models.is_self_describing(tmp_path / "junk.pt")
    assert not models.is_self_describing(tmp_path / "missing.pt")


def test_weights_only_file_without_spec_asks_for_model():
    with pytest.raises(UsageError, match=r"no model.*model='path.py:Class'"):
        load_model(FIXTURES / "mlp.params")


def test_errors_are_nnconv_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04not a zip")
    with pytest.raises(NnconvError):
        load_model(tmp_path / "junk.pt", spec=parse_spec(MLP_SPEC))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ts/constants.pkl", b"junk")
        zf.writestr("ts/code/x.py", b"junk")
    (tmp_path / "badts.pt").write_bytes(buf.getvalue())
    with pytest.raises(FormatError):
        load_model(tmp_path / "badts.pt")
    with pytest.raises(FormatError):
        load_model(tmp_path / "badts.pt", trust_code=True)
