"""Forward passes for verify: outputs flattened to named leaves, torch and onnxruntime
runners that agree, one set of inputs for every side (files, seeds, declared specs),
the device list, the first diverging module, and golden files that round-trip."""

from __future__ import annotations

import copy
import dataclasses
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from zoo import build, spec

from nnconv import convert, save
from nnconv.converter.export import export_onnx
from nnconv.converter.golden import is_golden, load_golden, read_inputs, save_golden
from nnconv.converter.inputs import InputSpec, input_specs
from nnconv.converter.models import LoadedModel
from nnconv.converter.runner import (
    OnnxRunner,
    TorchRunner,
    align_outputs,
    capture_modules,
    devices_for,
    first_divergence,
    flatten,
    make_runner,
    resolve_inputs,
)
from nnconv.formats.errors import FormatError, UntrustedCodeError, UsageError

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(2, 20, generator=torch.Generator().manual_seed(3))
MLP_INPUTS = [InputSpec("input", (2, 20))]


@pytest.fixture
def fixtures_importable(monkeypatch):
    """The MLP class importable as fixtures.models, as from the repo root (records)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))


@pytest.fixture
def mlp_weights(tmp_path) -> Path:
    path = tmp_path / "mlp.safetensors"
    save(build("mlp").state_dict(), path)
    return path


@pytest.fixture
def mlp_onnx(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    export_onnx(build("mlp"), path, inputs=input_specs(["2,20"]), exporter="torchscript")
    return path


def eager(x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return build("mlp")(x)


# --- flatten ---------------------------------------------------------------------


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    steps: int = 3


class ModelOutputLike:
    """Hugging Face's ModelOutput in miniature: keys() and to_tuple(), None fields absent."""

    def __init__(self, **fields):
        self._fields = {k: v for k, v in fields.items() if v is not None}

    def keys(self):
        return self._fields.keys()

    def __getitem__(self, key):
        return self._fields[key]

    def to_tuple(self):
        return tuple(self._fields.values())


def test_flatten_names_every_kind_of_output():
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    assert list(flatten(a)) == ["output"] and flatten(a)["output"] is a
    assert list(flatten((a, b))) == ["output.0", "output.1"]
    assert list(flatten([a, None, b])) == ["output.0", "output.2"]
    assert list(flatten({"logits": a, "aux": [b, c], "n": 4})) == [
        "output.logits",
        "output.aux.0",
        "output.aux.1",
    ]
    assert list(flatten(Out(a))) == ["output.logits"]
    assert list(flatten(Out(a, b))) == ["output.logits", "output.hidden"]
    Pair = namedtuple("Pair", "first second")
    assert list(flatten(Pair(a, (b, c)))) == ["output.first", "output.second.0", "output.second.1"]
    assert list(flatten(ModelOutputLike(loss=None, logits=a, past=(b,)))) == [
        "output.logits",
        "output.past.0",
    ]
    assert flatten(None) == {} and flatten("text") == {} and flatten(7) == {}
    assert list(flatten((a,), prefix="y")) == ["y.0"]


def test_align_by_name_or_by_position():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    same = align_outputs({"output.x": a, "output.y": b}, {"output.y": b, "output.x": a})
    assert same.how == "name" and [n for n, *_ in same.pairs] == ["output.x", "output.y"]
    assert same.complete
    extra = align_outputs({"output.x": a}, {"output.x": a, "output.z": c})
    assert extra.how == "name" and extra.unexpected == ["output.z"] and not extra.complete
    # torch names a dict's leaves by key, onnxruntime by position: pair in order.
    pos = align_outputs({"output.logits": a, "output.aux": b}, {"output.0": a, "output.1": b})
    assert pos.how == "position" and [(n, r is a, c_ is a) for n, r, c_ in pos.pairs][0] == (
        "output.logits",
        True,
        True,
    )
    short = align_outputs({"output.0": a, "output.2": b, "output.3": c}, {"output.0": a})
    assert short.how == "name" and short.missing == ["output.2", "output.3"]
    pairs, missing, unexpected = align_outputs({"output.a": a, "output.b": b}, {"output.0": a})
    assert [n for n, *_ in pairs] == ["output.a"] and missing == ["output.b"] and not unexpected


# --- runners ---------------------------------------------------------------------


def test_torch_runner_from_spec(mlp_weights):
    runner = make_runner(mlp_weights, spec=spec("mlp"))
    assert isinstance(runner, TorchRunner) and runner.is_torch
    assert runner.label == "torch (spec)" and runner.input_specs() is None
    out = runner.run([X], device="cpu")
    assert list(out) == ["output"] and torch.equal(out["output"], eager())
    assert not out["output"].requires_grad and out["output"].device.type == "cpu"


def test_torch_runner_from_record(tmp_path, mlp_weights, fixtures_importable):
    dst = tmp_path / "with_record.safetensors"
    convert(mlp_weights, dst, model="fixtures/models.py:MLP", input_shapes=["2,20"])
    with pytest.raises(UntrustedCodeError):  # the record names a user class: not imported
        make_runner(dst)
    runner = make_runner(dst, trust_code=True)
    assert runner.label == "torch (record)"
    assert runner.input_specs() == MLP_INPUTS
    assert torch.equal(runner.run([X], device="cpu")["output"], eager())


def test_weights_only_file_has_no_runner(mlp_weights):
    assert make_runner(mlp_weights) is None
    with pytest.raises(FormatError):  # a mismatch is an error, not "parameters only"
        make_runner(mlp_weights, spec=spec("sequential"))
    with pytest.raises(UsageError):
        make_runner(mlp_weights, spec="no-colon")


def test_onnx_runner_matches_torch(mlp_onnx, mlp_weights):
    runner = make_runner(mlp_onnx)
    assert isinstance(runner, OnnxRunner) and not runner.is_torch
    assert runner.label == "onnxruntime (CPUExecutionProvider)"
    assert runner.input_specs() == MLP_INPUTS  # the symbolic batch becomes 2
    x5 = torch.randn(5, 20)
    got = runner.run([x5], device="cpu")
    assert list(got) == ["output"]
    torch.testing.assert_close(got["output"], eager(x5), atol=1e-5, rtol=1e-5)
    ref = make_runner(mlp_weights, spec=spec("mlp")).run([x5], device="cpu")
    aligned = align_outputs(ref, got)
    assert aligned.how == "name" and aligned.complete
    with pytest.raises(UsageError, match="takes 1 input"):
        runner.run([x5, x5], device="cpu")
    with pytest.raises(UsageError, match="forward pass"):
        runner.run([torch.randn(5, 7)], device="cpu")


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(20, 8)
        self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"scores": self.a(h), "extra": self.b(h)}


def test_onnx_outputs_pair_with_torch_leaves_by_position(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    path = tmp_path / "heads.onnx"
    export_onnx(model, path, inputs=input_specs(["2,20"]), exporter="torchscript")
    got = make_runner(path).run([X], device="cpu")
    assert list(got) == ["output.0", "output.1"]
    ref = TorchRunner(LoadedModel(model, "spec")).run([X], device="cpu")
    aligned = align_outputs(ref, got)
    assert aligned.how == "position" and aligned.complete
    for name, r, c in aligned.pairs:
        assert name.startswith("output.") and name[7:] in ("scores", "extra")
        torch.testing.assert_close(c, r, atol=1e-5, rtol=1e-5)


# --- inputs ----------------------------------------------------------------------


def test_random_inputs_are_seeded(mlp_onnx):
    specs, tensors = resolve_inputs([], shapes=["3,20"], dtype=None, inputs_file=None, seed=7)
    assert specs == [InputSpec("input", (3, 20))]
    _, again = resolve_inputs([None], shapes=["3,20"], dtype=None, inputs_file=None, seed=7)
    _, other = resolve_inputs([], shapes=["3,20"], dtype=None, inputs_file=None, seed=8)
    assert torch.equal(tensors[0], again[0]) and not torch.equal(tensors[0], other[0])
    # No shapes: the first side that declares its inputs (here the ONNX graph) decides.
    onnx_runner = make_runner(mlp_onnx)
    specs, tensors = resolve_inputs(
        [None, onnx_runner], shapes=[], dtype="float64", inputs_file=None, seed=0
    )
    assert specs == [InputSpec("input", (2, 20), "float64")] and tensors[0].dtype == torch.float64
    with pytest.raises(UsageError, match="takes 1"):
        resolve_inputs([onnx_runner], shapes=["2,20", "2,3"], dtype=None, inputs_file=None, seed=0)
    with pytest.raises(UsageError, match="input_shapes"):
        resolve_inputs([None], shapes=[], dtype=None, inputs_file=None, seed=0)


def test_inputs_from_files(tmp_path, mlp_onnx):
    a, b = torch.randn(2, 20), torch.arange(6).reshape(2, 3)
    np.savez(tmp_path / "in.npz", x=a.numpy(), ids=b.numpy())
    torch.save({"x": a, "ids": b}, tmp_path / "in.pt")
    save_file({"x": a, "ids": b}, tmp_path / "in.safetensors")
    save({"x": a, "ids": b}, tmp_path / "nnconv.safetensors")  # keeps the dict's order
    for name in ("in.npz", "in.pt", "nnconv.safetensors"):
        specs, tensors = resolve_inputs([], shapes=[], dtype=None, inputs_file=tmp_path / name)
        assert [s.name for s in specs] == ["x", "ids"], name
        assert specs[1] == InputSpec("ids", (2, 3), "int64")
        assert torch.equal(tensors[0], a) and torch.equal(tensors[1], b), name
    got = dict(read_inputs(tmp_path / "in.safetensors"))  # a foreign file: header order
    assert torch.equal(got["x"], a) and torch.equal(got["ids"], b)
    # Unnamed tensors take the declared names; a count that does not fit is refused.
    torch.save([a], tmp_path / "list.pt")
    onnx_runner = make_runner(mlp_onnx)
    specs, _ = resolve_inputs(
        [onnx_runner], shapes=[], dtype=None, inputs_file=tmp_path / "list.pt"
    )
    assert specs == MLP_INPUTS
    with pytest.raises(UsageError, match="holds 2 input"):
        resolve_inputs([onnx_runner], inputs_file=tmp_path / "in.pt")
    with pytest.raises(UsageError, match="excludes"):
        resolve_inputs([], shapes=["2,20"], inputs_file=tmp_path / "in.pt")
    # Declared names put named inputs in the declared order.
    save({"second": b, "input": a}, tmp_path / "named.safetensors")
    declared = TorchRunner(LoadedModel(nn.Identity(), "record", record={"inputs": [
        {"name": "input", "shape": [2, 20], "dtype": "float32"},
        {"name": "second", "shape": [2, 3], "dtype": "int64"},
    ]}))  # fmt: skip
    specs, tensors = resolve_inputs([declared], inputs_file=tmp_path / "named.safetensors")
    assert [s.name for s in specs] == ["input", "second"] and torch.equal(tensors[0], a)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(FormatError):
        read_inputs(tmp_path / "junk.pt")
    with pytest.raises(UsageError, match=".npz, .pt or .safetensors"):
        read_inputs(mlp_onnx)


def test_devices(monkeypatch):
    assert devices_for("cpu") == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices_for("all") == ["cpu"]
    with pytest.raises(UsageError, match="CUDA is not available"):
        devices_for("cuda")
    with pytest.raises(UsageError, match="unknown device"):
        devices_for("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices_for("all") == ["cpu", "cuda"] and devices_for("cuda") == ["cuda"]


# --- first divergence --------------------------------------------------------------


def test_first_divergence_names_the_perturbed_module(mlp_onnx):
    model = build("mlp")
    ref = capture_modules(TorchRunner(LoadedModel(model, "spec")), [X], device="cpu")
    assert [name for name, _ in ref] == ["hidden", "output"]
    assert first_divergence(ref, ref, atol=0.0, rtol=0.0) is None
    for name in ("output", "hidden"):
        bad = copy.deepcopy(model)
        with torch.no_grad():
            getattr(bad, name).weight[0, 0] += 0.5
        cand = capture_modules(TorchRunner(LoadedModel(bad, "spec")), [X], device="cpu")
        assert first_divergence(ref, cand, atol=1e-5, rtol=1e-5) == name
        assert first_divergence(ref, cand, atol=10.0, rtol=0.0) is None
    assert capture_modules(make_runner(mlp_onnx), [X], device="cpu") == []
    assert all(p.device.type == "cpu" for p in model.parameters())  # hooks removed, model kept
    assert not model._forward_hooks and not model.hidden._forward_hooks


# --- golden files -------------------------------------------------------------------


def test_golden_round_trip(tmp_path, mlp_weights):
    specs = [InputSpec("x", (2, 20)), InputSpec("ids", (2,), "int64")]
    tensors = [X, torch.tensor([1, 2])]
    outputs = {"output.0": eager(), "output.1": X}  # the same storage as an input: copied
    path = tmp_path / "golden.safetensors"
    save_golden(path, specs, tensors, outputs, metadata={"seed": 5, "versions": {"torch": "x"}})
    assert is_golden(path) and not is_golden(mlp_weights)
    golden = load_golden(path)
    assert golden.inputs == specs and list(golden.outputs) == ["output.0", "output.1"]
    assert all(torch.equal(a, b) for a, b in zip(golden.tensors, tensors, strict=True))
    assert torch.equal(golden.outputs["output.0"], eager())
    assert golden.metadata == {"seed": 5, "versions": {"torch": "x"}}
    specs_back, tensors_back = resolve_inputs([], inputs_file=path)  # --inputs golden.safetensors
    assert specs_back == specs and torch.equal(tensors_back[1], tensors[1])
    with pytest.raises(Exception, match="exists"):
        save_golden(path, specs, tensors, outputs)
    save_golden(path, specs[:1], tensors[:1], {}, force=True)
    assert load_golden(path).outputs == {}
    with pytest.raises(FormatError, match="not an nnconv golden file"):
        load_golden(mlp_weights)
    with pytest.raises(FormatError):
        load_golden(tmp_path / "missing.safetensors")


# --- CUDA ------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mlp_on_cuda_matches_cpu(mlp_weights, mlp_onnx):
    assert devices_for("all") == ["cpu", "cuda"]
    runner = make_runner(mlp_weights, spec=spec("mlp"))
    cpu = runner.run([X], device="cpu")["output"]
    gpu = runner.run([X], device="cuda")["output"]
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, atol=1e-5, rtol=1e-5)  # no TF32 while verifying
    trace = capture_modules(runner, [X], device="cuda")
    assert [n for n, _ in trace] == ["hidden", "output"]
    onnx_runner = make_runner(mlp_onnx)
    got = onnx_runner.run([X], device="cuda")["output"]
    torch.testing.assert_close(got, cpu, atol=1e-5, rtol=1e-5)
    assert onnx_runner.notes or "CUDAExecutionProvider" in onnx_runner.label
