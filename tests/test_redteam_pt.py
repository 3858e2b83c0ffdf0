"""Red team: hostile ``.pt`` (and safetensors) files built here, run through the real CLI.

One test per attack: stride-0 views that expand a few bytes into gigabytes,
shared containers whose walk is exponential, storage offsets outside their
storage, dimensions that overflow 64 bits, zip archives read one way by the
gate and another by torch, and crafted rebuild arguments.  Each must end in
exit 2 with one ``Error: <file>: ...`` line, bounded memory and time, and no
output; each has a legitimate control that still converts.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import assert_same
from safetensors.torch import load_file

from nnconv.formats import checkpoint, to_object, torchzip
from nnconv.formats.errors import FormatError, NnconvError, UnsupportedError
from nnconv.formats.pt import pt_format
from nnconv.formats.safetensors import safetensors_format

sys.path.insert(0, str(Path(__file__).parent))
from redteam import nnconv  # noqa: E402

# --- hand-written pickles --------------------------------------------------------------

OD = b"ccollections\nOrderedDict\n)R"
FLOAT = b"ctorch\nFloatStorage\n"


def _u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _i(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    encoded = pickle.encode_long(value)
    return b"\x8a" + bytes([len(encoded)]) + encoded


def _ints(values) -> bytes:
    return b"(" + b"".join(_i(v) for v in values) + b"t"


def _pid(key: bytes = b"", numel: int = 2) -> bytes:
    return b"(" + _u("storage") + FLOAT + (key or _u("0")) + _u("cpu") + _i(numel) + b"tQ"


def _tensor(numel=2, offset=0, shape=(2,), stride=(1,), pid=b"", offset_op=b"") -> bytes:
    """``_rebuild_tensor_v2(storage '0', offset, shape, stride, False, OrderedDict())``."""
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + (pid or _pid(numel=numel))
        + (offset_op or _i(offset))
        + _ints(shape)
        + _ints(stride)
        + b"\x89"
        + OD
        + b"tR"
    )


def _dict(**items: bytes) -> bytes:
    return b"}(" + b"".join(_u(k) + v for k, v in items.items()) + b"u"


def _pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _archive(data_pkl: bytes, storages=None, *, first=(), method=zipfile.ZIP_STORED) -> bytes:
    """A torch zip archive: ``first`` members, data.pkl, byteorder, storages, version."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names we want
        for name, data in first:
            zf.writestr(name, data)
        zf.writestr("archive/data.pkl", data_pkl, compress_type=method)
        zf.writestr("archive/byteorder", b"little")
        for key, data in (storages or {"0": bytes(8)}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", b"3\n")
    return out.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _refused_everywhere(bad: Path, tmp_path: Path) -> list[str]:
    """``convert`` and ``inspect`` both refuse ``bad``, bounded, leaving no output."""
    out = tmp_path / "out.safetensors"
    lines = []
    for args in (("convert", bad, out), ("inspect", bad)):
        run = nnconv(*args)
        lines.append(run.assert_refused(bad))
        run.assert_bounded()
        assert not out.exists()
    return lines


def _converts(src: Path, tmp_path: Path):
    out = tmp_path / "ok.safetensors"
    run = nnconv("convert", src, out, "--force")
    assert run.rc == 0, run.stderr
    run.assert_bounded()
    return load_file(str(out))


# --- 1. stride-0 and overlapping views ----------------------------------------------------


def test_expanded_view_is_refused(tmp_path):
    bad = tmp_path / "expand.pt"
    torch.save({"w": torch.zeros(1).expand(2**29)}, bad)  # 4 stored bytes, 2 GiB claimed
    assert bad.stat().st_size < 2000
    for line in _refused_everywhere(bad, tmp_path):
        assert "more than 16x" in line and "NNCONV_MAX_EXPANSION" in line
    with pytest.raises(FormatError) as info:
        pt_format.read(bad)
    assert info.value.value == 2**31
    assert info.value.limit == 16 * 4 + checkpoint.VIEW_SLACK
    # The same view through torch.load: a legacy file, and a zip with another global.
    legacy = tmp_path / "legacy.pt"
    torch.save([torch.zeros(1).expand(2**29)], legacy, _use_new_zipfile_serialization=False)
    hand = _pickle(_dict(w=_tensor(numel=1, shape=(2**29,), stride=(0,)), s=b"ctorch\nSize\n)R"))
    fallback = _write(tmp_path / "fallback.pt", _archive(hand, {"0": bytes(4)}))
    for path in (legacy, fallback):
        with pytest.raises(FormatError, match="more than 16x") as info:
            pt_format.read(path)
        assert info.value.limit == 16 * 4 + checkpoint.VIEW_SLACK


def test_many_overlapping_views_are_bounded_in_total(tmp_path):
    base = torch.arange(65536.0)  # 256 KiB stored once, viewed 30 times
    path = tmp_path / "views.pt"
    torch.save({f"v{i}": base[i:] for i in range(30)}, path)
    with pytest.raises(FormatError, match="the checkpoint spans") as info:
        pt_format.read(path)
    assert info.value.limit == 16 * 65536 * 4 + checkpoint.VIEW_SLACK


def test_expanded_views_within_the_limit_convert(tmp_path, monkeypatch):
    sd = {
        "position_ids": torch.arange(512).expand(1, -1),  # as Hugging Face models save it
        "bias": torch.ones(8, 1).expand(8, 1000),  # 32 KB from 32 bytes: under 1 MiB
        "w": torch.randn(4, 4),
    }
    src = tmp_path / "ok.pt"
    torch.save(sd, src)
    assert_same({k: v.contiguous() for k, v in sd.items()}, _converts(src, tmp_path))
    big = tmp_path / "big.pt"  # 4 MiB from 4 bytes: refused, unless the limit is raised
    torch.save({"w": torch.zeros(1).expand(2**20)}, big)
    with pytest.raises(FormatError, match="more than 16x"):
        pt_format.read(big)
    monkeypatch.setenv(checkpoint.EXPANSION_ENV, str(2**20))
    assert to_object(pt_format.read(big))["w"].shape == (2**20,)
    monkeypatch.setenv(checkpoint.EXPANSION_ENV, "lots")
    with pytest.raises(NnconvError, match="positive integer"):
        pt_format.read(big)


# --- 2. shared containers -----------------------------------------------------------------


def _shared_lists(levels: int) -> bytes:
    """Each list holds the previous one twice: n levels, 2^n paths, a few bytes each."""
    body = b"]" + _tensor() + b"aq\x000"
    for n in range(1, levels + 1):
        body += b"](h" + bytes([n - 1]) + b"h" + bytes([n - 1]) + b"eq" + bytes([n])
        body += b"0" if n < levels else b""
    return _pickle(body)


@pytest.mark.parametrize("levels", [22, 40])
def test_shared_containers_are_bounded(tmp_path, levels):
    bad = _write(tmp_path / "shared.pt", _archive(_shared_lists(levels)))
    assert bad.stat().st_size < 1200
    for line in _refused_everywhere(bad, tmp_path):
        assert "shared" in line and "100,000" in line
    with pytest.raises(UnsupportedError) as info:
        pt_format.read(bad)
    assert info.value.limit == checkpoint.MAX_SHARED_NODES


def test_shared_containers_through_torch_load_are_bounded(tmp_path):
    nested: list = [torch.zeros(1)]
    for _ in range(30):
        nested = [nested, nested]
    legacy = tmp_path / "legacy.pt"
    torch.save(nested, legacy, _use_new_zipfile_serialization=False)
    run = nnconv("inspect", legacy)
    assert "shared" in run.assert_refused(legacy)
    run.assert_bounded()
    cycle = _write(tmp_path / "cycle.pt", _archive(_pickle(b"]q\x00h\x00a")))
    with pytest.raises(UnsupportedError, match="holds itself"):
        pt_format.read(cycle)


def test_optimizer_state_sharing_small_tuples_converts(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))]
    opt = torch.optim.Adam([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.1}])
    sum(p.sum() for p in params).backward()
    opt.step()
    state = opt.state_dict()
    groups = state["param_groups"]
    assert groups[0]["betas"] is groups[1]["betas"]  # one tuple, pickled once, memo-shared
    path = tmp_path / "opt.pt"
    torch.save({"optimizer": state, "epoch": 3}, path)
    assert_same({"optimizer": state, "epoch": 3}, to_object(pt_format.read(path)))


# --- 3. storage offsets outside the storage ----------------------------------------------


def test_storage_offsets_outside_the_storage_are_errors(tmp_path):
    build = b"N}(" + _u("offset") + _i(-2) + b"u\x86b"  # BUILD sets the slot, unchecked
    cases = {
        "negative.pt": _archive(_pickle(_dict(w=_tensor(offset=-1)))),
        "built.pt": _archive(_pickle(_dict(w=_tensor() + build))),
        "past.pt": _archive(_pickle(_dict(w=_tensor(offset=1)))),
        "far.pt": _archive(_pickle(_dict(w=_tensor(offset=2**40)))),
    }
    for name, data in cases.items():
        bad = _write(tmp_path / name, data)
        if name in ("negative.pt", "built.pt"):
            _refused_everywhere(bad, tmp_path)
        with pytest.raises(FormatError):
            pt_format.read(bad)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    raw = legacy.read_bytes()
    at = raw.index(b"tq\x07QK\x00K\x02")  # the storage offset after BINPERSID
    for offset in (b"K\x05", b"J\xff\xff\xff\xff"):
        bad = _write(tmp_path / "legacy-bad.pt", raw[: at + 4] + offset + raw[at + 6 :])
        with pytest.raises(FormatError):
            pt_format.read(bad)


# --- 4. dimensions beyond 64 bits --------------------------------------------------------


def _safetensors(path: Path, shape: list[int]) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    return _write(path, struct.pack("<Q", len(header)) + header.encode())


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**62, 4], [2**64, 0]])
def test_dimensions_overflowing_int64_are_refused(tmp_path, shape):
    bad = _safetensors(tmp_path / "huge.safetensors", shape)
    out = tmp_path / "out.pt"
    for args in (("convert", bad, out), ("inspect", bad)):
        run = nnconv(*args)
        assert "64-bit" in run.assert_refused(bad)
        run.assert_bounded()
    assert not out.exists()
    with pytest.raises(FormatError, match="64-bit"):
        safetensors_format.read_header(bad)
    pt = _write(
        tmp_path / "huge.pt", _archive(_pickle(_dict(w=_tensor(shape=shape[:2], stride=(1, 1)))))
    )
    with pytest.raises(FormatError, match="not valid|64-bit"):
        pt_format.read(pt)


def test_empty_tensors_with_large_dimensions_convert(tmp_path):
    src = _safetensors(tmp_path / "empty.safetensors", [0, 2**40])
    out = tmp_path / "empty.pt"
    run = nnconv("convert", src, out)
    assert run.rc == 0, run.stderr
    assert torch.load(out, weights_only=True)["w"].shape == (0, 2**40)


# --- 5. zip archives read one way ----------------------------------------------------------

MARKER_PICKLE = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R."


@pytest.mark.parametrize(
    "case, words",
    [
        ("case", "twice, up to case"),
        ("duplicate", "twice"),
        ("two-pickles", "torch reads only"),
        ("other-folder", "torch reads only"),
    ],
)
def test_zip_members_are_read_one_way(tmp_path, case, words):
    good = _pickle(_dict(w=_tensor()))
    first = {
        "case": [("archive/DATA.PKL", MARKER_PICKLE)],
        "duplicate": [("archive/data.pkl", MARKER_PICKLE)],
        "two-pickles": [("archive/x/data.pkl", MARKER_PICKLE)],
        "other-folder": [("evil/x", b"")],
    }[case]
    bad = _write(tmp_path / f"{case}.pt", _archive(good, first=first))
    for line in _refused_everywhere(bad, tmp_path):
        assert words in line
    with pytest.raises(FormatError, match=words):
        pt_format.globals_in(bad)


@pytest.mark.parametrize("field", ["name-length", "method", "size", "name"])
def test_local_header_disagreeing_with_the_central_directory(tmp_path, field):
    src = tmp_path / "src.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    raw = bytearray(src.read_bytes())
    (record,) = [r for n, r in torchzip.members(src).items() if n.endswith("/data/0")]
    at = record.header
    if field == "name-length":  # one byte of the name moved into the extra field
        name_len, extra_len = struct.unpack_from("<HH", raw, at + 26)
        raw[at + 26 : at + 30] = struct.pack("<HH", name_len - 1, extra_len + 1)
    elif field == "method":
        raw[at + 8] = 8
    elif field == "size":
        raw[at + 18 : at + 26] = struct.pack("<II", 12, 12)
    else:  # same length: both readers use the central name, so only the gate checks it
        raw[at + 30 + record.nlen - 1] = ord("1")
    bad = _write(tmp_path / f"{field}.pt", bytes(raw))
    if field != "name":
        for line in _refused_everywhere(bad, tmp_path):
            assert "local header disagrees" in line
    with pytest.raises(FormatError, match="local header disagrees"):
        pt_format.globals_in(bad)


def test_normal_and_recompressed_archives_still_read(tmp_path):
    sd = {"w": torch.randn(3, 4), "b": torch.zeros(3)}
    src = tmp_path / "src.pt"
    torch.save(sd, src)
    assert_same(sd, _converts(src, tmp_path))
    ours = tmp_path / "ours.pt"
    pt_format.write(pt_format.read(src), ours)
    assert_same(sd, to_object(pt_format.read(ours)))
    with zipfile.ZipFile(src) as zf:  # data.pkl deflated (torch.load reads it): the gate too
        records = {n: zf.read(n) for n in zf.namelist()}
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(deflated, "w") as zf:
        for name, data in records.items():
            method = zipfile.ZIP_DEFLATED if name.endswith(".pkl") else zipfile.ZIP_STORED
            zf.writestr(name, data, compress_type=method)
    assert "torch._utils._rebuild_tensor_v2" in pt_format.globals_in(deflated)
    assert_same(sd, to_object(pt_format.read(deflated)))
    storages = tmp_path / "storages.pt"  # torch.load(mmap=True) would map deflated bytes
    with zipfile.ZipFile(storages, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    with pytest.raises(FormatError, match="compressed"):
        pt_format.read(storages)


# --- 6. crafted rebuild arguments ---------------------------------------------------------

T2 = b"ctorch._utils\n_rebuild_tensor_v2\n"


def _rebuild(storage: bytes, rest: bytes = _i(0) + _ints((2,)) + _ints((1,))) -> bytes:
    return T2 + b"(" + storage + rest + b"\x89" + OD + b"tR"


def _set(field: str, value: bytes) -> bytes:
    return _rebuild(_pid()) + b"N}(" + _u(field) + value + b"u\x86b"


CRAFTED = {
    "pid-int": _rebuild(_i(5) + b"Q"),
    "pid-short": _rebuild(b"(" + _u("storage") + FLOAT + b"tQ"),
    "pid-type-str": _rebuild(b"(" + _u("storage") + _u("x") + _u("0") + _u("cpu") + _i(2) + b"tQ"),
    "pid-key-none": _rebuild(_pid(key=b"N")),
    "pid-numel-str": _rebuild(b"(" + _u("storage") + FLOAT + _u("0") + _u("cpu") + _u("2") + b"tQ"),
    "pid-numel-huge": _rebuild(_pid(numel=2**70)),
    "storage-int": _rebuild(_i(3)),
    "offset-str": _rebuild(_pid(), _u("0") + _ints((2,)) + _ints((1,))),
    "size-int": _rebuild(_pid(), _i(0) + _i(2) + _ints((1,))),
    "size-str": _rebuild(_pid(), _i(0) + _u("ab") + _u("ab")),
    "size-dict": _rebuild(_pid(), _i(0) + b"}K\x02K\x01s" + _ints((1,))),
    "size-float": _rebuild(_pid(), _i(0) + b"(G" + struct.pack(">d", 2.0) + b"t" + _ints((1,))),
    "stride-huge": _rebuild(_pid(), _i(0) + _ints((1,)) + _ints((2**70,))),
    "stride-length": _rebuild(_pid(), _i(0) + _ints((2,)) + _ints((1, 1))),
    "param-of-dict": b"ctorch._utils\n_rebuild_parameter\n(}\x88" + OD + b"tR",
    "set-storage": _set("storage", _i(5)),
    "set-shape": _set("shape", _i(5)),
    "set-dtype": _set("dtype", _u("nope")),
    "metadata-tensor": OD + b"}(" + _u("_metadata") + _rebuild(_pid()) + b"ub",
    "key-tensor": b"}(" + _rebuild(_pid()) + _i(1) + b"u",
    "storage-leaf": _pid(),
    "dtype-leaf": b"ctorch\nfloat32\n",
    "v3-dtype-str": b"ctorch._utils\n_rebuild_tensor_v3\n("
    + b"(" + _u("storage") + b"ctorch.storage\nUntypedStorage\n" + _u("0") + _u("cpu") + _i(8)
    + b"tQ" + _i(0) + _ints((2,)) + _ints((1,)) + b"\x89" + OD + _u("float32") + b"tR",
    "empty-stack": b"",
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_rebuild_arguments_are_errors_naming_the_file(tmp_path, case):
    bad = _write(tmp_path / f"{case}.pt", _archive(_pickle(CRAFTED[case])))
    with pytest.raises(NnconvError) as info:
        ckpt = pt_format.read(bad)
        for lazy in ckpt.tensors.values():
            lazy.load()
        raise AssertionError(f"{case} was read: {list(ckpt.tensors)}")
    assert info.value.subject == str(bad)


@pytest.mark.parametrize("case", ["set-storage", "key-tensor"])
def test_crafted_rebuild_arguments_through_the_cli(tmp_path, case):
    bad = _write(tmp_path / f"{case}.pt", _archive(_pickle(CRAFTED[case])))
    _refused_everywhere(bad, tmp_path)


# --- memo and length bombs in the torch-free unpickler ------------------------------


@pytest.mark.parametrize(
    "bomb",
    [
        b"\x80\x02]r\xff\xff\xff\x03.",  # LONG_BINPUT 67M: a 1 GiB memo list (exit 0 before)
        b"\x80\x02]p67108863\n.",  # the same through the text PUT
        b"\x80\x02B\xff\xff\xff\x33.",  # BINBYTES claiming 860 MB
        b"\x80\x02\x8e\xff\xff\xff\xff\xff\x00\x00\x00.",  # BINBYTES8 claiming 1 TB
    ],
)
def test_pickle_claims_are_bounded_before_unpickling(tmp_path, bomb):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", bomb)
        zf.writestr("archive/byteorder", "little")
    for args in (["inspect", path], ["convert", path, tmp_path / "out.safetensors"]):
        run = nnconv(*args)
        run.assert_bounded()
        run.assert_refused(path)
    assert not (tmp_path / "out.safetensors").exists()


def test_size_check_accepts_every_real_pickle():
    """The opcode walk agrees with pickletools on what real pickles hold (all protocols)."""
    from nnconv.formats import torchpickle

    objects = [
        {"a": [1, 2.5, "r\xff\x00", b"rbytes" * 50, None, True], "b": (1,) * 300},
        list(range(70000)),  # memo indexes past 2^16
        [bytearray(b"x" * 300), "y" * 70000, 2**100, -(2**70), {1: "z"}],
    ]
    for obj in objects:
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            torchpickle.check_sizes(pickle.dumps(obj, protocol=protocol))
    buf = io.BytesIO()
    torch.save({f"layer{i}.running_mean": torch.zeros(2) for i in range(3000)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        torchpickle.check_sizes(zf.read("archive/data.pkl"))
