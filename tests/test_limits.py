"""Limits and containment: crafted files get one clear error, never a crash or an OOM.

Nesting depth (torch.save'd objects and stored ``nnconv.structure``), tensor
counts, HDF5 shapes checked against the bytes the file stores, HDF5 links and
storage that would read outside the file, and ``inspect``'s list of the globals
a pt file references (found without unpickling).
"""

from __future__ import annotations

import json
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import assert_same

from nnconv import inspect, load, save
from nnconv.converter.cli import cli
from nnconv.formats import checkpoint, to_object
from nnconv.formats.checkpoint import MAX_DEPTH, from_records
from nnconv.formats.errors import FormatError, NnconvError, UnsupportedError
from nnconv.formats.hdf5 import hdf5_format
from nnconv.formats.keys import STRUCTURE_KEY
from nnconv.formats.objects import from_object


def nested(levels: int, leaf=None):
    """``levels`` lists inside each other around ``leaf``."""
    obj = leaf if leaf is not None else torch.ones(2)
    for _ in range(levels):
        obj = [obj]
    return obj


def encoded(levels: int) -> dict:
    """The structure from_object writes for ``nested(levels)`` (tensor named ``w``)."""
    node: dict = {"t": "w"}
    for _ in range(levels):
        node = {"l": [node]}
    return node


def safetensors_with(path: Path, records: dict[str, str], names=("w",)) -> Path:
    """A safetensors file of float32 scalars with ``records`` as its __metadata__."""
    header: dict = {"__metadata__": records}
    for i, name in enumerate(names):
        header[name] = {"dtype": "F32", "shape": [], "data_offsets": [4 * i, 4 * i + 4]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * len(names)))
    return path


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in-process; it must exit 2 with one ``Error:`` line."""
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv), prog_name="nnconv")
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("Error: ") and "unexpected" not in lines[0], err
    return lines[0]


# --- nesting depth ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "hdf5"])
def test_deepest_allowed_nesting_round_trips(fmt, tmp_path):
    obj = {"deep": nested(MAX_DEPTH - 1), "n": 3}  # the dict is the 100th container
    path = tmp_path / f"deep.{fmt}"
    save(obj, path, format=fmt)
    with load(path) as ckpt:
        assert_same(to_object(ckpt), obj)


def test_object_nested_too_deep_is_unsupported():
    with pytest.raises(UnsupportedError, match=f"nested more than {MAX_DEPTH} deep") as info:
        from_object(nested(MAX_DEPTH + 1))
    assert (info.value.value, info.value.limit) == (MAX_DEPTH + 1, MAX_DEPTH)


def test_self_referencing_list_is_a_clear_error():
    loop: list = [torch.ones(1)]
    loop.append(loop)
    with pytest.raises(UnsupportedError, match="nested more than"):
        from_object(loop)


def test_pt_file_nested_too_deep(tmp_path, capsys):
    path = tmp_path / "deep.pt"
    torch.save(nested(MAX_DEPTH + 50), path)
    assert "nested more than 100 deep" in cli_error(capsys, "inspect", str(path))


def test_stored_structure_too_deep():
    records = {STRUCTURE_KEY: json.dumps(encoded(MAX_DEPTH + 1))}
    with pytest.raises(FormatError, match="nested more than 100 deep") as info:
        from_records("f", records, ["w"])
    assert info.value.limit == MAX_DEPTH
    structure, _, _ = from_records("f", {STRUCTURE_KEY: json.dumps(encoded(MAX_DEPTH))}, ["w"])
    assert checkpoint.check_structure("f", structure) == ["w"]


@pytest.mark.parametrize("depth", [2_000, 200_000])
def test_json_deeper_than_the_parser_is_a_format_error(depth):
    """json.loads raises RecursionError on such input (unless another library raised the
    recursion limit, then the structure check refuses it): a FormatError either way."""
    records = {STRUCTURE_KEY: '{"l":[' * depth + '{"t":"w"}' + "]}" * depth}
    with pytest.raises(FormatError, match="nested more than") as info:
        from_records("f", records, ["w"])
    assert info.value.limit == MAX_DEPTH


@pytest.mark.parametrize("fmt", ["safetensors", "hdf5"])
def test_deep_structure_in_a_file_is_one_error_line(fmt, tmp_path, capsys):
    deep = '{"l":[' * 5_000 + '{"t":"w"}' + "]}" * 5_000  # too deep for json.dumps itself
    if fmt == "safetensors":
        path = safetensors_with(tmp_path / "deep.safetensors", {STRUCTURE_KEY: deep})
    else:
        path = tmp_path / "deep.h5"
        with h5py.File(path, "w") as f:
            f["w"] = np.float32(1)
            f.attrs[STRUCTURE_KEY] = deep
            f.attrs["nnconv.version"] = "1"
    line = cli_error(capsys, "convert", str(path), str(tmp_path / "out.pt"))
    assert "nested more than 100 deep" in line
    assert list(tmp_path.glob("out*")) == []


@pytest.mark.parametrize(
    "structure, words",
    [
        ({"x": 1}, "none of the keys"),
        ({"t": "w", "l": []}, "t', 'l'"),
        ({"t": 3}, "not a string"),
        ({"l": {"t": "w"}}, "not a list"),
        ({"d": [[["k"], {"t": "w"}]]}, "scalar key"),
        ({"d": [["k", {"t": "w"}, 3]]}, "scalar key"),
        ({"d": [["k", {"t": "w"}]], "o": 1, "m": [1]}, "_metadata"),
        ([{"t": "w"}], "a node is a list"),
    ],
)
def test_malformed_structure_is_a_format_error(structure, words):
    with pytest.raises(FormatError, match="malformed") as info:
        from_records("f", {STRUCTURE_KEY: json.dumps(structure)}, ["w"])
    assert words in str(info.value)


# --- tensor counts ---------------------------------------------------------------------


def test_tensor_count_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "MAX_TENSORS", 3)
    with pytest.raises(UnsupportedError, match="4 tensors exceed") as info:
        from_object({str(i): torch.zeros(1) for i in range(4)})
    assert (info.value.value, info.value.limit) == (4, 3)
    from_object({str(i): torch.zeros(1) for i in range(3)})
    path = safetensors_with(tmp_path / "many.safetensors", {}, names=list("abcd"))
    with pytest.raises(FormatError, match="4 tensors exceed") as info:
        load(path)
    assert (info.value.value, info.value.limit) == (4, 3)


def test_aliases_count_towards_the_limit(monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_TENSORS", 3)
    aliases = json.dumps({"x": "a", "y": "a"})
    with pytest.raises(FormatError, match="4 tensors exceed"):
        from_records("f", {checkpoint.ALIASES_KEY: aliases}, ["a", "b"])


def test_hdf5_link_count_limit(monkeypatch, tmp_path):
    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as f:
        for i in range(3):
            f.create_group(f"g{i}")[f"w{i}"] = np.float32(i)
    monkeypatch.setattr(hdf5_format, "MAX_LINKS", 5)
    with pytest.raises(FormatError, match="more than 5 links") as info:
        load(path)
    assert info.value.limit == 5


# --- HDF5: shapes against stored bytes, nothing outside the file --------------------------


def hdf5_file(path: Path, build) -> Path:
    with h5py.File(path, "w") as f:
        build(f)
    return path


@pytest.mark.parametrize(
    "build",
    [
        lambda f: f.create_dataset("w", shape=(10**9,), dtype="f4"),  # never written
        lambda f: f.create_dataset("w", shape=(10**12,), dtype="f4", chunks=(1024,)),
        lambda f: f.create_dataset("w", shape=(10**10,), dtype="f4", compression="gzip"),
    ],
    ids=["contiguous-unallocated", "chunked-unwritten", "gzip-unwritten"],
)
def test_hdf5_shape_claiming_more_than_stored(build, tmp_path, capsys):
    path = hdf5_file(tmp_path / "big.h5", build)
    with pytest.raises(FormatError, match="expansion") as info:
        load(path)
    assert info.value.value >= 4 * 10**9 and info.value.limit < info.value.value
    assert "expansion" in cli_error(capsys, "inspect", str(path))


def test_hdf5_partly_written_chunks_are_bounded(tmp_path):
    def build(f):
        ds = f.create_dataset("w", shape=(2 * 10**9,), dtype="u1", chunks=(1000,))
        ds[:1000] = 7  # one 1000-byte chunk stored, two billion bytes claimed

    with pytest.raises(FormatError, match="claims 2,000,000,000 bytes from 1,000 stored"):
        load(hdf5_file(tmp_path / "sparse.h5", build))


def test_hdf5_contiguous_data_past_the_end_of_file(tmp_path):
    """A dataset's extent patched past the end of the file is refused, not half read."""
    path = hdf5_file(tmp_path / "x.h5", lambda f: f.create_dataset("x", data=np.arange(1000.0)))
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", 1000))  # the dataspace's current dimension
    data[at : at + 8] = struct.pack("<Q", 10**9)
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="'x'"):
        load(path)


@pytest.mark.parametrize(
    "build",
    [
        lambda f: f.create_dataset("w", shape=(1000,), dtype="f4"),  # fill values: zeros
        lambda f: f.create_dataset("w", data=np.zeros((2000, 2000), "f4"), compression="gzip"),
        lambda f: f.create_dataset("w", data=np.zeros((2000, 2000), "f4"), compression="lzf"),
    ],
    ids=["small-unallocated", "gzip-zeros", "lzf-zeros"],
)
def test_hdf5_legitimate_sparse_storage_loads(build, tmp_path):
    with load(hdf5_file(tmp_path / "ok.h5", build)) as ckpt:
        assert not ckpt.lazy("w").load().any()


def test_hdf5_null_dataspace_is_unsupported(tmp_path):
    path = hdf5_file(tmp_path / "n.h5", lambda f: f.create_dataset("n", data=h5py.Empty("f4")))
    with pytest.raises(UnsupportedError, match="no shape"):
        load(path)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A secret HDF5 file and a raw file next to the crafted files: never read."""
    with h5py.File(tmp_path / "secret.h5", "w") as f:
        f["secret"] = np.arange(4, dtype="f4")
        f.create_group("g")["s"] = np.arange(3, dtype="f4")
    (tmp_path / "secret.bin").write_bytes(np.arange(8, dtype="f4").tobytes())
    return tmp_path


def _virtual(f, folder: Path) -> None:
    layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
    layout[:] = h5py.VirtualSource(str(folder / "secret.h5"), "secret", shape=(4,))
    f.create_virtual_dataset("v", layout)


@pytest.mark.parametrize(
    "case, words",
    [
        ("external-link", "external link"),
        ("external-group", "external link"),
        ("soft-link-through-external", "external link"),
        ("external-storage", "external raw files"),
        ("virtual", "virtual dataset"),
    ],
)
def test_hdf5_never_reads_outside_the_file(case, words, outside, capsys):
    secret = str(outside / "secret.h5")

    def build(f):
        f["ok"] = np.float32(1)
        if case == "external-link":
            f["x"] = h5py.ExternalLink(secret, "/secret")
        elif case == "external-group":
            f["g"] = h5py.ExternalLink(secret, "/g")
        elif case == "soft-link-through-external":
            f["a"] = h5py.SoftLink("/z/s")
            f["z"] = h5py.ExternalLink(secret, "/g")
        elif case == "external-storage":
            f.create_dataset("r", (8,), "f4", external=[(str(outside / "secret.bin"), 0, 32)])
        else:
            _virtual(f, outside)

    path = hdf5_file(outside / "crafted.h5", build)
    with pytest.raises(FormatError, match=words) as info:
        load(path)
    assert "outside the file" in str(info.value)
    assert words in cli_error(capsys, "convert", str(path), str(outside / "out.safetensors"))
    assert not (outside / "out.safetensors").exists()


def test_hdf5_soft_link_into_external_group_via_keras_names(outside):
    """Legacy Keras names are paths: each step is checked, not only the last one."""

    def build(f):
        f.attrs["layer_names"] = [b"dense"]
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"ext/s"]
        g["ext"] = h5py.ExternalLink(str(outside / "secret.h5"), "/g")

    with pytest.raises(FormatError, match="external link"):
        load(hdf5_file(outside / "keras.h5", build))


@pytest.mark.parametrize(
    "case", ["cycle", "root-cycle", "group-linked-twice"], ids=lambda c: c.replace("-", "_")
)
def test_hdf5_group_links_are_walked_once(case, tmp_path):
    def build(f):
        g = f.create_group("a")
        g["w"] = np.float32(1)
        if case == "cycle":
            g["loop"] = h5py.SoftLink("/a")
        elif case == "root-cycle":
            g["root"] = h5py.SoftLink("/")
        else:
            f["b"] = g

    with pytest.raises(FormatError, match="also linked as"):
        load(hdf5_file(tmp_path / "links.h5", build))


def test_hdf5_dangling_soft_link_is_ignored(tmp_path):
    def build(f):
        f["w"] = np.float32(1)
        f["gone"] = h5py.SoftLink("/nowhere")

    with load(hdf5_file(tmp_path / "d.h5", build)) as ckpt:
        assert ckpt.names() == ["w"]


def test_hdf5_deep_groups_need_no_recursion(tmp_path):
    """Foreign files may nest groups deeper than the recursion limit: walked iteratively."""
    depth = sys.getrecursionlimit() + 100
    with h5py.File(tmp_path / "deep.h5", "w") as f:
        f["/".join(["g"] * depth) + "/w"] = np.float32(1)
    with load(tmp_path / "deep.h5") as ckpt:
        assert ckpt.names() == [".".join(["g"] * depth) + ".w"]


def test_hdf5_malformed_nnconv_paths_record(tmp_path):
    def build(f):
        f["w"] = np.float32(1)
        f.attrs["nnconv.paths"] = "[1, 2]"

    with pytest.raises(FormatError, match="not a map"):
        load(hdf5_file(tmp_path / "p.h5", build))


# --- inspect: the globals a pt file references -----------------------------------------


def test_inspect_lists_pt_globals(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(OrderedDict(w=torch.zeros(2, dtype=torch.bfloat16)), path)
    report = inspect(path)
    assert report.globals == sorted(set(report.globals))
    assert {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2"} <= set(report.globals)
    assert "torch.BFloat16Storage" in report.globals
    assert report.to_json()["globals"] == report.globals
    assert "Globals:     collections.OrderedDict, " in report.render()
    with pytest.raises(SystemExit):
        cli.main(["inspect", "--json", str(path)], prog_name="nnconv")
    assert json.loads(capsys.readouterr().out)["globals"] == report.globals


def test_inspect_lists_legacy_and_whole_module_globals(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert "torch.FloatStorage" in inspect(legacy).globals
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 3)), module)
    names = inspect(module).globals
    assert {"torch.nn.modules.container.Sequential", "torch.nn.modules.linear.Linear"} <= set(names)


class AsDict:
    """Pickles as ``builtins.dict(pairs)``: harmless, but outside the allowlist."""

    def __reduce__(self):
        return dict, ([("w", torch.zeros(1))],)


def test_inspect_refusal_names_globals_and_trusted_report_lists_them(tmp_path):
    """A file the gate refuses gives no report: the error itself names the globals."""
    path = tmp_path / "foreign.pt"
    torch.save(AsDict(), path)
    with pytest.raises(NnconvError, match="builtins.dict"):
        inspect(path)
    assert "builtins.dict" in inspect(path, trust_code=True).globals


def test_inspect_globals_absent_for_other_formats(tmp_path):
    st = tmp_path / "m.safetensors"
    save({"w": torch.zeros(2)}, st)
    report = inspect(st)
    assert report.globals is None and report.to_json()["globals"] is None
    assert "Globals:" not in report.render()


def test_inspect_torchscript_has_no_globals_list(tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), path)
    assert zipfile.is_zipfile(path)
    report = inspect(path)
    assert report.format == "pt" and report.globals is None
