"""nnconv verify: every form of every model passes; each kind of difference fails, named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import onnx
import pytest
import torch
from helpers import Payload
from zoo import ZOO, build, spec

from nnconv import convert, save
from nnconv.converter.options import OnnxOptions
from nnconv.converter.verify import verify

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "verify.schema.json").read_text())
# onnxruntime's kernels differ from eager torch in the last bits of float32 sums.
ATOL = {"cnn": ["1e-4"], "transformer": ["1e-4"]}


def _forms(tmp_path: Path, name: str) -> list[Path]:
    """The model's pt, safetensors, hdf5 and onnx forms, written by nnconv."""
    model = build(name)
    pt = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), pt)
    shape = [ZOO[name][1]]
    st, h5, onx = (tmp_path / f"{name}{ext}" for ext in (".safetensors", ".h5", ".onnx"))
    convert(pt, st, model=spec(name), input_shapes=shape)
    convert(st, h5)
    convert(pt, onx, model=spec(name), input_shapes=shape, onnx=OnnxOptions(exporter="torchscript"))
    return [pt, st, h5, onx]


def _cli(*args):
    run = subprocess.run(
        [sys.executable, "-m", "nnconv.converter", *map(str, args)], capture_output=True, text=True
    )
    return run.returncode, run.stdout, run.stderr


@pytest.mark.parametrize("name", list(ZOO))
def test_every_form_of_every_model_passes(tmp_path, name):
    pt, *others = _forms(tmp_path, name)
    report = verify(
        pt, *others, model=spec(name), input_shapes=[ZOO[name][1]], atol=ATOL.get(name, [])
    )
    assert report, report.render()
    assert report.outputs_checked
    for cand in report.candidates:
        assert cand.outputs_checked and cand.outputs, cand.path
        statuses = {p.status for p in cand.parameters}
        assert statuses <= {"identical"}, (cand.path, statuses)


SEEDS = ["x-file", "x-files", "mydict", "mlp.params", "sequential.pt", "checkpoint.pt", "legacy.pt"]


@pytest.mark.parametrize("fixture", SEEDS)
def test_seed_fixtures_verify_across_formats(tmp_path, fixture):
    src = ROOT / "fixtures" / fixture
    st, h5 = tmp_path / "f.safetensors", tmp_path / "f.h5"
    convert(src, st)
    convert(st, h5)
    report = verify(src, st, h5)
    assert report, report.render()
    assert not report.outputs_checked  # weights only: the report must not pretend


def _perturbed(src: Path, dst: Path, edit) -> Path:
    sd = torch.load(src)
    edit(sd)
    torch.save(sd, dst)
    return dst


def test_one_element_perturbed_fails_naming_tensor_and_index(tmp_path):
    src = ROOT / "fixtures" / "mlp.params"

    def bump(sd):
        sd["hidden.weight"][3, 7] += 1e-3

    bad = _perturbed(src, tmp_path / "bad.pt", bump)
    rc, out, err = _cli("verify", src, bad)
    assert rc == 1, err
    assert "hidden.weight" in out and "[3, 7]" in out and "FAIL" in out


def test_missing_tensor_fails_naming_it(tmp_path):
    src = ROOT / "fixtures" / "mlp.params"
    bad = _perturbed(src, tmp_path / "bad.pt", lambda sd: sd.pop("output.bias"))
    rc, out, _ = _cli("verify", src, bad)
    assert rc == 1 and "output.bias" in out and "missing" in out


def test_transposed_weight_fails_on_shape(tmp_path):
    src = ROOT / "fixtures" / "mlp.params"

    def transpose(sd):
        sd["output.weight"] = sd["output.weight"].t().contiguous()

    bad = _perturbed(src, tmp_path / "bad.pt", transpose)
    rc, out, _ = _cli("verify", src, bad)
    assert rc == 1 and "output.weight" in out and "shape" in out


def test_scaled_onnx_output_fails_naming_the_output(tmp_path):
    pt, _, _, onx = _forms(tmp_path, "mlp")
    model = onnx.load(str(onx))
    graph = model.graph
    out = graph.output[0]
    scale = onnx.numpy_helper.from_array(torch.tensor(1.01).numpy(), "nnconv_scale")
    graph.initializer.append(scale)
    graph.node.append(onnx.helper.make_node("Mul", [out.name, "nnconv_scale"], ["scaled"]))
    new_out = onnx.helper.make_tensor_value_info("scaled", out.type.tensor_type.elem_type, None)
    graph.output.remove(out)
    graph.output.append(new_out)
    scaled = tmp_path / "scaled.onnx"
    onnx.save(model, str(scaled))
    report = verify(pt, scaled, model=spec("mlp"), input_shapes=["2,20"])
    assert not report
    failed = [o for c in report.candidates for o in c.outputs if not o.passed]
    assert failed and failed[0].name.startswith("output")
    assert failed[0].needed_atol > 1e-5
    assert "FAIL  output" in report.render()


def test_first_diverging_module_is_reported(tmp_path):
    src = ROOT / "fixtures" / "mlp.params"

    def bump(sd):
        sd["output.weight"] *= 1.01

    bad = _perturbed(src, tmp_path / "bad.pt", bump)
    report = verify(src, bad, model=f"{ROOT / 'fixtures' / 'models.py'}:MLP", input_shapes=["2,20"])
    assert not report
    assert report.candidates[0].first_divergence == "output"


def test_json_report_validates_against_the_documented_schema(tmp_path):
    src = ROOT / "fixtures" / "mlp.params"
    bad = _perturbed(src, tmp_path / "bad.pt", lambda sd: sd["hidden.bias"].add_(1.0))
    rc, out, err = _cli(
        "verify",
        src,
        bad,
        "--model",
        f"{ROOT / 'fixtures' / 'models.py'}:MLP",
        "--input-shape",
        "2,20",
        "--json",
        "-",
    )
    assert rc == 1, err
    data = json.loads(out)
    jsonschema.validate(data, SCHEMA)
    assert data["passed"] is False and data["outputs_checked"] is True
    assert data["versions"]["torch"] == torch.__version__.split("+")[0] or data["versions"]["torch"]


def test_golden_round_trip(tmp_path):
    pt, st, _, onx = _forms(tmp_path, "mlp")
    golden = tmp_path / "golden.safetensors"
    report = verify(pt, model=spec("mlp"), input_shapes=["2,20"], save_golden=golden)
    assert report and golden.exists()
    assert verify(onx, golden=golden)  # the converted file replays the stored inputs
    # its architecture record makes it runnable, once trusted to import the user's class
    assert verify(st, golden=golden, trust_code=True)

    def bump(sd):
        sd["output.bias"] += 0.1

    bad = _perturbed(pt, tmp_path / "bad.pt", bump)
    assert not verify(bad, golden=golden, model=spec("mlp"))


def test_compatibility_mode_checks_strict_load_and_finite_outputs(tmp_path):
    src = ROOT / "fixtures" / "mlp.params"
    rc, out, err = _cli(
        "verify", src, "--model", f"{ROOT / 'fixtures' / 'models.py'}:MLP", "--input-shape", "2,20"
    )
    assert rc == 0, err + out
    rc, _, err = _cli(
        "verify",
        src,
        "--model",
        f"{ROOT / 'fixtures' / 'models.py'}:CustomNet",
        "--input-shape",
        "2,8",
    )
    assert rc == 2 and err.startswith("Error: ")


def test_cast_recorded_is_an_intended_cast(tmp_path):
    src = ROOT / "fixtures" / "mlp.params"
    half = tmp_path / "half.safetensors"
    convert(src, half, dtype="float16")
    report = verify(src, half)
    assert report, report.render()
    assert {p.status for p in report.candidates[0].parameters} == {"cast"}
    save(
        torch.load(src) | {"hidden.bias": torch.load(src)["hidden.bias"].half()},
        tmp_path / "sneaky.safetensors",
    )
    assert not verify(src, tmp_path / "sneaky.safetensors")


def test_convert_then_verify_flag(tmp_path):
    rc, out, err = _cli(
        "convert", ROOT / "fixtures" / "mlp.params", tmp_path / "m.safetensors", "--verify"
    )
    assert rc == 0, err
    assert "PASSED" in out


@pytest.mark.cuda
def test_device_all_compares_cpu_and_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pt, st, _, onx = _forms(tmp_path, "cnn")
    report = verify(
        pt, st, onx, model=spec("cnn"), input_shapes=[ZOO["cnn"][1]], device="all", atol=["1e-3"]
    )
    assert report, report.render()
    assert any(o.device == "cpu vs cuda" for c in report.candidates for o in c.outputs)


@pytest.mark.parametrize("side", ["reference", "candidate"])
def test_malicious_pickle_is_refused_by_verify(tmp_path, side):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, evil)
    good = ROOT / "fixtures" / "mlp.params"
    args = [evil, good] if side == "reference" else [good, evil]
    rc, out, err = _cli("verify", *args)
    assert rc == 2, out + err
    assert err.startswith("Error: ") and "builtins.exec" in err and "--trust-code" in err
    assert not marker.exists()
