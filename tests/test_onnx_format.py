"""The ONNX adapter: initializers read back bit-identical in every encoding, external data
read lazily and only from inside the model's folder, sniffing, corrupt files, metadata."""

from __future__ import annotations

import builtins
import io
import json
import os
import struct
import warnings
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from helpers import assert_tensor_same
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from nnconv.formats.errors import FormatError, UnsupportedError, UsageError
from nnconv.formats.onnx import onnx_format

CODES = {name: code for code, name in onnx_format.ONNX_DTYPES.items()}


def sample(dtype: str) -> torch.Tensor:
    """Values that show a lossy path: extremes, -0.0, inf/NaN, every float8 bit pattern."""
    if dtype.startswith("float8"):
        return torch.arange(256, dtype=torch.uint8).view(getattr(torch, dtype)).reshape(4, 64)
    if dtype in ("float16", "bfloat16", "float32", "float64"):
        values = [1.5, -0.0, float("inf"), float("nan"), 1e-3, -2.0]
        return torch.tensor(values, dtype=getattr(torch, dtype)).reshape(2, 3)
    if dtype.startswith("complex"):
        return torch.tensor([1 + 2j, -0.5j, 3.0], dtype=getattr(torch, dtype))
    if dtype == "bool":
        return torch.tensor([[True, False], [False, True]])
    info = np.iinfo(np.dtype(dtype))
    return torch.from_numpy(np.array([info.min, info.max, 0, 7], dtype=dtype))


def raw_proto(name: str, t: torch.Tensor) -> TensorProto:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    dtype = str(t.dtype).removeprefix("torch.")
    return helper.make_tensor(name, CODES[dtype], list(t.shape), data, raw=True)


def typed_proto(name: str, t: torch.Tensor) -> TensorProto:
    """The typed-field encoding exactly as onnx.proto specifies it."""
    dtype = str(t.dtype).removeprefix("torch.")
    proto = TensorProto(name=name, data_type=CODES[dtype], dims=list(t.shape))
    flat = t.contiguous().reshape(-1)
    if dtype in ("float32", "complex64"):
        proto.float_data.extend(flat.view(torch.float32).tolist())
    elif dtype in ("float64", "complex128"):
        proto.double_data.extend(flat.view(torch.float64).tolist())
    elif dtype == "int64":
        proto.int64_data.extend(flat.tolist())
    elif dtype in ("uint32", "uint64"):
        proto.uint64_data.extend(int(v) for v in flat.numpy())
    elif dtype in ("float16", "bfloat16"):  # the bit pattern as an unsigned 16-bit value
        proto.int32_data.extend(flat.view(torch.int16).numpy().view(np.uint16).tolist())
    elif dtype.startswith("float8"):
        proto.int32_data.extend(flat.view(torch.uint8).tolist())
    else:  # int8/16/32, uint8/16, bool: the values
        proto.int32_data.extend(int(v) for v in flat.numpy())
    return proto


def save(path: Path, tensors: list[TensorProto], *, metadata=None, **kwargs) -> Path:
    graph = helper.make_graph([], "g", [], [], initializer=tensors)
    model = helper.make_model(
        graph, producer_name="test", opset_imports=[helper.make_opsetid("", 17)]
    )
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, str(path), **kwargs)
    return path


def export(module: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), dynamo=False, do_constant_folding=True)
    return path


def mlp(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).to(
        dtype
    )


def read_checked(path: Path):
    head = path.read_bytes()[:64]
    assert onnx_format.sniff(path, head)
    return onnx_format.read(path)


# --- values -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exported_model_reads_back_bit_identical(tmp_path, dtype):
    model = mlp(dtype)
    path = export(model, torch.randn(2, 6, dtype=dtype), tmp_path / "m.onnx")
    ckpt = read_checked(path)
    assert list(ckpt.tensors) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert ckpt.tensors[key].dtype == str(dtype).removeprefix("torch.")
        assert_tensor_same(ckpt.tensors[key].load(), value, key)
    assert ckpt.format == "onnx" and ckpt.metadata["onnx.producer"].startswith("pytorch")
    assert ckpt.metadata["onnx.opset"].isdigit()


@pytest.mark.parametrize("dtype", sorted(CODES))
@pytest.mark.parametrize("encoding", ["raw", "typed"])
def test_every_dtype_in_both_encodings(tmp_path, dtype, encoding):
    t = sample(dtype)
    proto = (raw_proto if encoding == "raw" else typed_proto)("w", t)
    assert proto.HasField("raw_data") == (encoding == "raw")
    ckpt = read_checked(save(tmp_path / "m.onnx", [proto]))
    lazy = ckpt.tensors["w"]
    assert (lazy.dtype, lazy.shape) == (dtype, tuple(t.shape))
    assert_tensor_same(lazy.load(), t, dtype)


def test_onnx_helpers_encodings_with_ml_dtypes(tmp_path):
    """What onnx's own writers produce: numpy_helper raw bytes and make_tensor typed fields."""
    values = [1.5, -2.0, 0.25, 0.0]
    expected, protos = {}, []
    for dtype, np_type in [
        ("bfloat16", ml_dtypes.bfloat16),
        ("float8_e4m3fn", ml_dtypes.float8_e4m3fn),
        ("float8_e5m2", ml_dtypes.float8_e5m2),
        ("float8_e4m3fnuz", ml_dtypes.float8_e4m3fnuz),
        ("float8_e5m2fnuz", ml_dtypes.float8_e5m2fnuz),
        ("float16", np.float16),
    ]:
        want = torch.tensor(values).to(getattr(torch, dtype))
        protos.append(numpy_helper.from_array(np.array(values, dtype=np_type), f"np_{dtype}"))
        protos.append(helper.make_tensor(f"mk_{dtype}", CODES[dtype], [4], values))
        expected[f"np_{dtype}"] = expected[f"mk_{dtype}"] = want
    for name, t in [("i64", torch.tensor([-(2**63), 5])), ("b", torch.tensor([True, False]))]:
        protos.append(numpy_helper.from_array(t.numpy(), f"np_{name}"))
        protos.append(helper.make_tensor(f"mk_{name}", CODES[str(t.dtype)[6:]], [2], t.tolist()))
        expected[f"np_{name}"] = expected[f"mk_{name}"] = t
    ckpt = read_checked(save(tmp_path / "m.onnx", protos))
    assert list(ckpt.tensors) == [p.name for p in protos]
    for name, want in expected.items():
        assert_tensor_same(ckpt.tensors[name].load(), want, name)


def test_scalar_and_empty_initializers(tmp_path):
    protos = [raw_proto("s", torch.tensor(2.5)), typed_proto("e", torch.zeros(0, 3))]
    ckpt = read_checked(save(tmp_path / "m.onnx", protos))
    assert_tensor_same(ckpt.tensors["s"].load(), torch.tensor(2.5))
    assert_tensor_same(ckpt.tensors["e"].load(), torch.zeros(0, 3))


# --- external data ------------------------------------------------------------


class OpenSpy:
    """Records every path opened through ``open``/``io.open`` (what onnx and nnconv use)."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []
        real = builtins.open

        def spy(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)):
                self.paths.append(os.path.realpath(file))
            return real(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", spy)
        monkeypatch.setattr(io, "open", spy)

    def opened(self, path: Path) -> bool:
        return os.path.realpath(path) in self.paths


def test_external_data_reads_lazily(tmp_path, monkeypatch):
    model = mlp()
    proto = onnx.load(str(export(model, torch.randn(2, 6), tmp_path / "tmp.onnx")))
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.data",
        size_threshold=0,
    )
    assert path.stat().st_size < 1000  # the weights really are outside
    spy = OpenSpy(monkeypatch)
    ckpt = read_checked(path)
    assert not spy.opened(folder / "weights.data")
    assert [t.shape for t in ckpt.tensors.values()] == [
        tuple(v.shape) for v in model.state_dict().values()
    ]
    for key, value in model.state_dict().items():
        assert_tensor_same(ckpt.tensors[key].load(), value, key)
    assert spy.opened(folder / "weights.data")


def external_model(folder: Path, location: str, *, offset=0, length=16) -> Path:
    proto = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    proto.data_location = TensorProto.EXTERNAL
    for key, value in [("location", location), ("offset", str(offset)), ("length", str(length))]:
        proto.external_data.add(key=key, value=value)
    return save(folder / "m.onnx", [proto])


@pytest.fixture
def layout(tmp_path):
    """A model folder with a 16-byte data file, and a sentinel file outside it."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.data").write_bytes(struct.pack("<4f", 1, 2, 3, 4))
    sentinel = tmp_path / "outside.bin"
    sentinel.write_bytes(struct.pack("<4f", 9, 9, 9, 9))
    return folder, sentinel


@pytest.mark.parametrize(
    "case", ["dotdot", "nested_dotdot", "absolute", "symlink", "symlinked_dir", "missing"]
)
def test_external_data_outside_the_folder_is_refused(layout, monkeypatch, case):
    folder, sentinel = layout
    location = {
        "dotdot": "../outside.bin",
        "nested_dotdot": "sub/../../outside.bin",
        "absolute": str(sentinel),
        "symlink": "link.bin",
        "symlinked_dir": "up/outside.bin",
        "missing": "nothere.bin",
    }[case]
    (folder / "link.bin").symlink_to(sentinel)
    (folder / "up").symlink_to(sentinel.parent, target_is_directory=True)
    path = external_model(folder, location)
    spy = OpenSpy(monkeypatch)
    with pytest.raises(FormatError, match="initializer 'w'") as err:
        onnx_format.read(path)
    assert repr(location) in str(err.value)
    assert not spy.opened(sentinel)


@pytest.mark.parametrize(("offset", "length"), [(8, 16), (100, 16), (0, 64), (-4, 16)])
def test_external_range_beyond_the_file_is_refused(layout, offset, length):
    folder, _ = layout
    path = external_model(folder, "weights.data", offset=offset, length=length)
    with pytest.raises(FormatError, match="'weights.data'"):
        onnx_format.read(path)


def test_external_location_checked_again_at_load(layout, monkeypatch):
    folder, sentinel = layout
    ckpt = onnx_format.read(external_model(folder, "weights.data"))
    assert ckpt.tensors["w"].load().tolist() == [1, 2, 3, 4]
    (folder / "weights.data").unlink()
    (folder / "weights.data").symlink_to(sentinel)  # swapped after read()
    spy = OpenSpy(monkeypatch)
    with pytest.raises(FormatError, match="outside the model's folder"):
        ckpt.tensors["w"].load()
    assert not spy.opened(sentinel)


# --- sniffing, corrupt files, metadata, errors ------------------------------------


def test_sniff_accepts_onnx_and_rejects_other_formats(tmp_path):
    onnx_files = [
        export(mlp(), torch.randn(2, 6), tmp_path / "a.onnx"),
        save(tmp_path / "b.onnx", [raw_proto("w", torch.ones(3))]),
        external_model(tmp_path, "x.data"),
    ]
    others = []
    state = {"w": torch.ones(3)}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(state, tmp_path / "s.safetensors")
    with h5py.File(tmp_path / "h.h5", "w") as f:
        f["w"] = np.ones(3)
    # A safetensors header of 0x0208 bytes starts with 08 02, like an ONNX ir_version.
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    header = header.encode().ljust(0x208)
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    (tmp_path / "t.txt").write_text("hello world, not a model")
    others = [
        tmp_path / n for n in ("zip.pt", "legacy.pt", "s.safetensors", "h.h5", "odd.safetensors")
    ] + [tmp_path / "t.txt"]
    for path in onnx_files:
        assert onnx_format.sniff(path, path.read_bytes()[:64]), path.name
    for path in others:
        assert not onnx_format.sniff(path, path.read_bytes()[:64]), path.name


def test_truncated_and_corrupt_files(tmp_path):
    whole = export(mlp(), torch.randn(2, 6), tmp_path / "m.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(whole[: len(whole) // 2])
    assert onnx_format.sniff(cut, whole[:64])  # looks like ONNX, cannot be decoded
    with pytest.raises(FormatError, match="not a valid ONNX model"):
        onnx_format.read(cut)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07\x12\x05" + os.urandom(200))
    with pytest.raises(FormatError):
        onnx_format.read(garbage)
    bad = raw_proto("w", torch.ones(4))
    bad.raw_data = bad.raw_data[:-1]
    with pytest.raises(FormatError, match=r"'w'.*15 bytes"):
        onnx_format.read(save(tmp_path / "short.onnx", [bad]))
    few = typed_proto("w", torch.ones(4))
    del few.float_data[-1]
    with pytest.raises(FormatError, match="float_data has 3 values"):
        onnx_format.read(save(tmp_path / "few.onnx", [few]))


def test_metadata_props_and_nnconv_records(tmp_path):
    structure = {"d": [["model", {"d": [["w", {"t": "w"}]]}]]}
    meta = {"nnconv.structure": json.dumps(structure), "nnconv.architecture": "MLP", "note": "x"}
    ckpt = read_checked(save(tmp_path / "m.onnx", [raw_proto("w", torch.ones(2))], metadata=meta))
    assert ckpt.structure == structure
    assert ckpt.metadata == {
        "nnconv.architecture": "MLP",
        "note": "x",
        "onnx.producer": "test",
        "onnx.opset": "17",
    }
    # nnconv records that name other tensors (a renaming export) are set aside, not fatal.
    meta["nnconv.structure"] = json.dumps({"d": [["x", {"t": "x"}]]})
    path = save(tmp_path / "n.onnx", [raw_proto("w", torch.ones(2))], metadata=meta)
    ckpt = onnx_format.read(path)
    assert ckpt.names() == ["w"] and ckpt.metadata["nnconv.architecture"] == "MLP"


def test_invalid_initializers(tmp_path):
    ones = raw_proto("w", torch.ones(2))
    with pytest.raises(FormatError, match="'w' appears more than once"):
        onnx_format.read(save(tmp_path / "dup.onnx", [ones, ones]))
    text = helper.make_tensor("names", TensorProto.STRING, [1], [b"a"])
    with pytest.raises(UnsupportedError, match="'names'.*STRING"):
        onnx_format.read(save(tmp_path / "str.onnx", [text]))
    model = onnx.load(str(save(tmp_path / "sp.onnx", [])))
    values = raw_proto("sp_values", torch.ones(1))
    indices = raw_proto("sp_indices", torch.tensor([0]))
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [3]))
    onnx.save_model(model, str(tmp_path / "sp.onnx"))
    with pytest.raises(UnsupportedError, match="sparse"):
        onnx_format.read(tmp_path / "sp.onnx")


def test_write_explains_that_export_needs_a_model(tmp_path):
    ckpt = read_checked(save(tmp_path / "m.onnx", [raw_proto("w", torch.ones(2))]))
    with pytest.raises(UsageError, match="model.*input_shapes"):
        onnx_format.write(ckpt, tmp_path / "out.onnx")
    assert not onnx_format.CAPABILITIES.writes and ".onnx" in onnx_format.EXTENSIONS
