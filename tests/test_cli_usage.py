"""Documented commands do what they say (issue: "every documented command works as
written"): strict input shapes, ``--key`` for every conversion, the written size after a
cast, ``--shard-size`` into a name without an extension, unsupported extensions named as
such, ``python -m``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from redteam import nnconv
from safetensors import safe_open
from safetensors.torch import load_file

from nnconv.converter import load
from nnconv.converter.inputs import parse_shape
from nnconv.converter.state_dicts import select_subtree
from nnconv.formats import to_object
from nnconv.formats.errors import UsageError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MLP = FIXTURES / "mlp.params"


@pytest.mark.parametrize("text", ["2 20", "2,,20", "2,20,", "-2,20", "0,4", "2;20", "two", ""])
def test_input_shapes_are_parsed_strictly(text):
    with pytest.raises(UsageError) as err:
        parse_shape(text)
    assert repr(text) in str(err.value)


def test_input_shape_spellings():
    assert parse_shape("2,20") == (2, 20)
    assert parse_shape("2x3x224x224") == (2, 3, 224, 224)
    assert parse_shape(" 7 ") == (7,)


def test_a_spaced_shape_is_an_error_line_not_another_shape(tmp_path):
    run = nnconv(
        "convert", MLP, tmp_path / "m.onnx", "--model", f"{FIXTURES / 'models.py'}:MLP",
        "--input-shape", "2 20",
    )  # fmt: skip
    assert "'2 20'" in run.assert_refused()
    assert not (tmp_path / "m.onnx").exists()


def test_summary_gives_the_written_size_after_a_cast(tmp_path):
    run = nnconv("convert", MLP, tmp_path / "m.safetensors", "--dtype", "bfloat16")
    assert run.rc == 0, run.stderr
    assert "15.5 KiB, cast to bfloat16" in run.stdout, run.stdout  # 31.0 KiB of float32


def test_shard_size_into_a_name_without_extension_is_a_safetensors_folder(tmp_path):
    run = nnconv("convert", MLP, tmp_path / "out", "--shard-size", "20KB")
    assert run.rc == 0, run.stderr
    index = tmp_path / "out" / "model.safetensors.index.json"
    assert index.is_file() and len(list((tmp_path / "out").glob("model-*.safetensors"))) == 2
    with safe_open(next((tmp_path / "out").glob("model-*")), "pt") as f:
        assert list(f.keys())


@pytest.mark.parametrize("name", ["m.msgpack", "m.keras", "m.mlmodel", "m.tflite"])
def test_unsupported_extensions_are_named_as_such(tmp_path, name):
    line = nnconv("convert", MLP, tmp_path / name).assert_refused(tmp_path / name)
    suffix = Path(name).suffix
    assert f"does not support {suffix} files (yet)" in line and "safetensors" in line
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("module", ["nnconv", "nnconv.converter", "nnconv.converter.cli"])
def test_python_dash_m_runs_the_cli(module):
    run = subprocess.run([sys.executable, "-m", module, "formats"], capture_output=True, text=True)
    assert run.returncode == 0 and "safetensors" in run.stdout, run.stderr


def test_key_extracts_the_deployable_weights_for_every_conversion(tmp_path):
    out = tmp_path / "ckpt.safetensors"
    run = nnconv("convert", FIXTURES / "checkpoint.pt", out, "--key", "model")
    assert run.rc == 0, run.stderr
    expected = torch.load(FIXTURES / "checkpoint.pt", weights_only=True)["model"]
    back = load_file(out)
    assert list(back) == list(expected)
    for name, value in expected.items():
        assert torch.equal(back[name], value), name
    line = nnconv("convert", FIXTURES / "checkpoint.pt", tmp_path / "x.pt", "--key", "mdl")
    assert "has no 'mdl'" in line.assert_refused(FIXTURES / "checkpoint.pt")


def test_dotted_keys_and_ties_across_the_part(tmp_path):
    shared = torch.arange(4.0)
    obj = {"model.ema": {"w": shared, "v": shared}, "other": {"t": shared}, "x": {"a": {"b": 1}}}
    torch.save({"ckpt": obj}, tmp_path / "c.pt")
    ckpt = load(tmp_path / "c.pt")
    part = select_subtree(ckpt, "ckpt.model.ema")
    assert list(part.tensors) == ["w"] and part.aliases == {"v": "w"}
    assert torch.equal(to_object(part)["v"], shared)
    part = select_subtree(ckpt, "ckpt.other")  # tied to a tensor outside: its own now
    assert list(part.tensors) == ["t"] and torch.equal(part.tensors["t"].load(), shared)
    with pytest.raises(UsageError, match="names a single value"):
        select_subtree(ckpt, "ckpt.x.a.b")


def test_a_folder_is_a_checkpoint_only_when_it_is_one(tmp_path):
    line = nnconv("inspect", FIXTURES).assert_refused(FIXTURES)  # pt, h5 and one safetensors
    assert "not one checkpoint" in line and "mlp.safetensors" in line and "mlp.h5" in line
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes((FIXTURES / "mlp.safetensors").read_bytes())
    (hf / "config.json").write_text("{}")
    run = nnconv("inspect", hf)  # what save_pretrained writes for a small model
    assert run.rc == 0 and "Tensors:     4" in run.stdout, run.stderr
    (hf / "pytorch_model.bin").write_bytes(MLP.read_bytes())
    assert "pytorch_model.bin" in nnconv("inspect", hf).assert_refused(hf)


def test_help_and_formats_tell_about_onnx():
    assert "ONNX" in nnconv("--help").stdout
    assert "ONNX exporter" in nnconv("convert", "--help").stdout
    onnx_line = next(ln for ln in nnconv("formats").stdout.splitlines() if ln.startswith("onnx"))
    assert "read, export" in onnx_line


def test_onnx_messages_speak_nnconv_flags_and_count_honestly():
    from nnconv.converter.cli import _summary
    from nnconv.converter.convert import ConvertResult
    from nnconv.converter.onnx_import import MappingRow, _remedy

    remedy = _remedy([], {}, {}, [])
    assert "--optimize" in remedy and "--allow-missing" in remedy
    assert "do_constant_folding" not in remedy
    rows = [
        MappingRow("fc.weight", "val_3", "value", "transposed"),
        MappingRow("bn.num_batches_tracked", None, "module default", "identity"),
    ]
    result = ConvertResult("m.onnx", "m.safetensors", "onnx", "safetensors", 2, 0, 8, None,
                           "spec", mapping=rows)  # fmt: skip
    line = _summary(result)
    assert "1 names mapped back, 1 from the model's defaults" in line, line
