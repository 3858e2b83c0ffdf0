"""nnconv's own torch.save zip reader and writer, checked against torch and zipfile.

Written files: valid CRCs and 64-byte alignment (``zipfile``), tensor records
byte-identical to ``torch.save``'s, and plain ``torch.load(weights_only=True)``
(with and without mmap) rebuilds the same containers, Parameters, dtypes,
values and shared storages.  Read files: the torch-free reader gives what
``torch.load`` gives, bit for bit, views and shared storages included.
"""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import assert_same
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnconv.formats import dtypes, torchpickle, torchzip
from nnconv.formats.errors import FormatError
from nnconv.formats.objects import from_object, to_object
from nnconv.formats.pt import pt_format

DTYPES = [getattr(torch, name) for name in dtypes.DTYPES]


def _values(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (dtypes.numel(shape) * dtype.itemsize,), generator=g)
    flat = raw.to(torch.uint8)
    if dtype == torch.bool:
        return (flat % 2).bool().reshape(shape)
    return flat.view(dtype).reshape(shape)


def _state() -> OrderedDict:
    sd = OrderedDict(
        (f"t.{name}", _values(getattr(torch, name), (3, 5), i))
        for i, name in enumerate(dtypes.DTYPES)
    )
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros(0, 4)
    sd._metadata = OrderedDict({"": {"version": 1}, "t": {"version": 2}})
    return sd


def _records(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}


def test_written_archive_matches_torch_save_record_for_record(tmp_path):
    sd = _state()
    ours, theirs = tmp_path / "ours.pt", tmp_path / "theirs.pt"
    pt_format.write(from_object(sd), ours)
    torch.save(sd, theirs)
    with zipfile.ZipFile(ours) as zf:
        assert zf.testzip() is None  # every CRC-32 right
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
    mine, reference = _records(ours), _records(theirs)
    assert {n for n in mine if n.startswith("data/")} == {
        n for n in reference if n.startswith("data/")
    }
    for name in reference:  # tensor bytes byte for byte; version, byteorder, alignment too
        if name not in ("data.pkl", ".data/serialization_id"):
            assert mine[name] == reference[name], name
    members = torchzip.members(ours)
    with open(ours, "rb") as fh:
        for record in members.values():
            fh.seek(record.header + 26)
            n, m = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
            assert (record.header + torchzip.LOCAL.size + n + m) % torchzip.ALIGNMENT == 0


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_load_rebuilds_the_object(tmp_path, mmap):
    sd = _state()
    sd["tied"] = sd["t.float32"]
    sd["param"] = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    sd["grad"] = torch.zeros(2).requires_grad_()
    sd["misc"] = [1, -(2**40), 2.5, None, "x", True, (3, {"k": [4]})]
    path = tmp_path / "out.pt"
    pt_format.write(from_object(sd), path)
    back = torch.load(path, weights_only=True, mmap=mmap)
    assert_same(sd, back)
    assert back._metadata == sd._metadata
    assert type(back["param"]) is torch.nn.Parameter and not back["param"].requires_grad
    assert back["grad"].requires_grad
    assert (
        back["tied"].untyped_storage().data_ptr() == back["t.float32"].untyped_storage().data_ptr()
    )


def test_reader_matches_torch_load_for_views_and_shared_storages(tmp_path):
    base = torch.arange(60, dtype=torch.float32)
    sd = {
        "whole": base,
        "slice": base[10:20],  # a view at an offset: still contiguous bytes
        "transposed": base[:12].reshape(3, 4).t(),  # not contiguous: loaded through torch
        "same": base,
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    path = tmp_path / "views.pt"
    torch.save(sd, path)
    ckpt = pt_format.read_plain(path)
    assert ckpt is not None
    assert ckpt.aliases == {"same": "whole"}
    assert ckpt.tensors["slice"].span.nbytes == 40
    assert ckpt.tensors["transposed"].span is None
    # Values bit for bit; only exact aliases are kept (a slice of another tensor becomes
    # a tensor of its own, as from_object does: no format but pt can share part of one).
    assert_same(torch.load(path, weights_only=True), to_object(ckpt), check_sharing=False)
    back = to_object(ckpt)
    assert back["same"].untyped_storage().data_ptr() == back["whole"].untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "obj",
    [
        {"array": __import__("numpy").zeros(3)},  # numpy: torch.load's allowlist
        {"device": torch.device("cpu"), "w": torch.ones(2)},
    ],
    ids=["numpy", "device"],
)
def test_other_globals_fall_back_to_torch_load(tmp_path, obj):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    assert pt_format.read_plain(path) is None  # the fast path declines ...
    with pytest.raises(Exception):  # noqa: B017  ... and the gated torch path decides
        pt_format.read(path)


def test_legacy_format_falls_back_to_torch_load(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert pt_format.read_plain(path) is None
    assert_same({"w": torch.arange(4.0)}, to_object(pt_format.read(path)))


def test_zip64_records_read_by_torch_zipfile_and_nnconv(tmp_path, monkeypatch):
    monkeypatch.setattr(torchzip, "ZIP64_LIMIT", 100)  # every size and offset over it
    sd = {f"w{i}": torch.full((50,), float(i)) for i in range(3)}
    path = tmp_path / "zip64.pt"
    pt_format.write(from_object(sd), path)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    assert_same(sd, torch.load(path, weights_only=True))
    assert_same(sd, torch.load(path, weights_only=True, mmap=True))
    assert_same(sd, to_object(pt_format.read_plain(path)))


def test_storage_claiming_more_than_its_record_is_refused(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"w": torch.zeros(4)}, path)
    raw = bytearray(path.read_bytes())
    numel = raw.find(b"K\x04", raw.find(b"cpu"))  # the storage numel after its location
    assert 0 < numel - raw.find(b"cpu") < 8
    raw[numel + 1] = 200  # 4 -> 200 elements
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="declares 800 bytes"):
        pt_format.read_plain(path)


def test_unpickler_declines_any_other_global():
    data = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R."
    with pytest.raises(torchpickle.NotPlain, match="os.system"):
        torchpickle.load(data)


DTYPE_NAMES = st.sampled_from(list(dtypes.DTYPES))
SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    entries=st.lists(st.tuples(DTYPE_NAMES, SHAPES), min_size=1, max_size=6), seed=st.integers(0, 9)
)
def test_round_trip_any_dtypes_and_shapes(tmp_path_factory, entries, seed):
    sd = {
        f"t{i}": _values(getattr(torch, name), shape, seed + i)
        for i, (name, shape) in enumerate(entries)
    }
    folder = tmp_path_factory.mktemp("prop")
    theirs, ours = folder / "theirs.pt", folder / "ours.pt"
    torch.save(sd, theirs)
    ckpt = pt_format.read_plain(theirs)
    assert_same(sd, to_object(ckpt))  # torch.save -> nnconv, torch-free
    pt_format.write(ckpt, ours)  # nnconv -> torch.load, spans copied byte for byte
    assert_same(sd, torch.load(ours, weights_only=True))
