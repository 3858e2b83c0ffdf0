"""NumPy ``.npz`` (issue 13, point 5): numpy's own files read bit-identically, nnconv's
output reads with ``np.load(allow_pickle=False)``, bfloat16/float8 survive npz <->
safetensors <-> pt, and hostile archives are one clean error each, quickly, with
nothing executed and memory bounded by what the file holds.

The registry-parametrised suites (``test_properties.py``, ``tests/fuzz``) cover npz
as one more format; this module covers what is particular to it.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Payload, assert_same, assert_shares_storage, cli
from hypothesis import HealthCheck, given, settings
from test_properties import tensors

from nnconv import convert, load, save
from nnconv.formats import NnconvError, UnsupportedError, UsageError, registry, to_object
from nnconv.formats.npz import npz_format, npzio, npzwrite

NUMPY_DTYPES = [
    "float16", "float32", "float64", "complex64", "complex128", "bool",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
]  # fmt: skip
BIT_PATTERNS = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu")


def _numpy_arrays() -> dict[str, np.ndarray]:
    """Every numpy dtype torch shares, with 0-d, empty, Fortran-order and big-endian arrays;
    values are random bytes, so NaN payloads, -0.0 and subnormals turn up."""
    rng = np.random.default_rng(0)
    out = {}
    for name in NUMPY_DTYPES:
        dtype = np.dtype(name)
        raw = rng.integers(0, 256, 24 * dtype.itemsize, dtype=np.uint8)
        values = raw.view(dtype) if name != "bool" else raw % 2 == 1
        out[name] = values.reshape(2, 3, 4)
        out[f"{name}.fortran"] = np.asfortranarray(values.reshape(2, 3, 4))
        out[f"{name}.big"] = values.reshape(4, 6).astype(dtype.newbyteorder(">"))
    out["scalar"] = np.float32(-0.0).reshape(())
    out["empty"] = np.zeros((0, 5), np.int16)
    out["fortran.row"] = np.asfortranarray(np.arange(4.0).reshape(1, 4))
    out["positional"] = np.arange(3, dtype=np.int8)
    return out


def _bits(a: np.ndarray) -> bytes:
    """The values as little-endian C-order bytes (so NaN payloads and -0.0 compare)."""
    little = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
    return np.ascontiguousarray(little).tobytes()


@pytest.mark.parametrize("save_fn", [np.savez, np.savez_compressed])
def test_files_numpy_writes_read_bit_identically(tmp_path, save_fn):
    arrays = _numpy_arrays()
    path = tmp_path / "numpy.npz"
    save_fn(path, **arrays)
    assert registry.detect(path) is npz_format
    with load(path) as ckpt, np.load(path, allow_pickle=False) as expected:
        assert ckpt.format == "npz" and ckpt.names() == list(arrays) == expected.files
        assert ckpt.metadata == {} and ckpt.aliases == {}
        for name, value in to_object(ckpt).items():
            want = expected[name]
            assert str(value.dtype) == f"torch.{want.dtype.name}", name
            assert tuple(value.shape) == want.shape, name
            assert _bits(value.numpy()) == _bits(want), name
            lazy = ckpt.tensors[name]
            swapped = arrays[name].dtype.byteorder == ">"
            c_order = save_fn is np.savez and not name.endswith(".fortran") and not swapped
            assert (lazy.span is not None) == c_order, name  # stored C order: zero copy


def test_an_empty_npz_reads_as_no_tensors(tmp_path):
    np.savez(tmp_path / "empty.npz")
    assert registry.detect(tmp_path / "empty.npz") is npz_format
    with load(tmp_path / "empty.npz") as ckpt:
        assert ckpt.tensors == {} and to_object(ckpt) == {}


def _checkpoint_object() -> dict:
    rng = torch.Generator().manual_seed(0)
    shared = torch.randn(3, 4, generator=rng)
    obj = {
        "layer": {"weight": shared, "bias": torch.randn(3, generator=rng).to(torch.bfloat16)},
        "head.weight": shared,  # tied
        "fp8": torch.randn(5, generator=rng).to(torch.float8_e4m3fn),
        "steps": torch.tensor(7),
        "flags": torch.tensor([True, False]),
        "opt": [torch.arange(4, dtype=torch.int64), 0.5, "adam"],
        "../escape": torch.ones(2),
        "nul\x00name": torch.zeros(1),
        "__nnconv__": torch.full((2,), 3.0),
    }
    return obj


def test_nnconv_output_is_a_plain_npz_numpy_reads(tmp_path):
    obj = _checkpoint_object()
    path = tmp_path / "model.npz"
    save(obj, path)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every CRC-32 right
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    with load(path) as ckpt:
        stored = {n: ckpt.lazy(n) for n in ckpt.tensors}
        assert all(t.span is not None and t.span.offset % 64 == 0 for t in stored.values())
        assert_same(to_object(ckpt), obj)
        names = dict(ckpt.tensors)
    with np.load(path, allow_pickle=False) as npz:
        record = json.loads(bytes(npz["__nnconv__"]))
        keys = [k for k in npz.files if k != "__nnconv__"]
        renamed = record["names"]
        assert [renamed.get(k, k) for k in keys] == list(names)
        assert set(renamed.values()) == {"../escape", "nul\x00name", "__nnconv__"}
        assert record["dtypes"] == {"layer.bias": "bfloat16", "fp8": "float8_e4m3fn"}
        assert json.loads(record["records"]["nnconv.aliases"]) == {"head.weight": "layer.weight"}
        for key in keys:
            with load(path) as ckpt:
                want = ckpt.tensors[renamed.get(key, key)].load()
            assert npz[key].shape == tuple(want.shape), key
            assert npz[key].tobytes() == want.reshape(-1).view(torch.uint8).numpy().tobytes()
        assert npz["layer.bias"].dtype == np.uint16 and npz["fp8"].dtype == np.uint8


def test_tied_weights_stay_tied_and_metadata_is_kept(tmp_path):
    save(_checkpoint_object(), tmp_path / "a.npz")
    with load(tmp_path / "a.npz") as ckpt:
        ckpt.metadata["note"] = "kept"
        save(ckpt, tmp_path / "b.npz")
    with load(tmp_path / "b.npz") as ckpt:
        assert ckpt.metadata == {"note": "kept"}
        out = to_object(ckpt)
    assert_shares_storage(out["layer"]["weight"], out["head.weight"])


BITS_SETTINGS = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@BITS_SETTINGS
@given(t=tensors(BIT_PATTERNS[:3]), u=tensors(("float8_e4m3fnuz", "float8_e5m2fnuz")))
def test_bfloat16_and_float8_survive_npz_safetensors_pt(tmp_path_factory, t, u):
    tmp = tmp_path_factory.mktemp("bits")
    save({"t": t}, tmp / "a.npz")
    convert(tmp / "a.npz", tmp / "b.safetensors")
    convert(tmp / "b.safetensors", tmp / "c.pt")
    convert(tmp / "c.pt", tmp / "d.npz")
    with load(tmp / "d.npz") as ckpt:
        assert_same(to_object(ckpt), {"t": t})
    save({"u": u}, tmp / "e.npz")  # float8 kinds safetensors has no code for: npz <-> pt
    convert(tmp / "e.npz", tmp / "f.pt")
    convert(tmp / "f.pt", tmp / "g.npz")
    assert_same(torch.load(tmp / "f.pt", weights_only=True), {"u": u})
    with load(tmp / "g.npz") as ckpt:
        assert_same(to_object(ckpt), {"u": u})


def test_inspect_and_formats_show_npz(tmp_path, capfd):
    save(_checkpoint_object(), tmp_path / "m.npz")
    shown = cli(capfd, "inspect", tmp_path / "m.npz")
    assert shown.rc == 0 and "npz" in shown.out and "layer.bias" in shown.out, shown.err
    assert "bfloat16" in shown.out and "= layer.weight" in shown.out  # the dtype, the tie
    listed = cli(capfd, "formats")
    assert any(ln.startswith("npz") and "read, write" in ln for ln in listed.out.splitlines())


def test_crc32_combine_matches_zlib():
    rng = np.random.default_rng(1)
    for a, b in [(0, 0), (3, 0), (0, 5), (100, 1000), (64, 300_000)]:
        x, y = rng.bytes(a), rng.bytes(b)
        assert npzwrite.crc32_combine(zlib.crc32(x), zlib.crc32(y), b) == zlib.crc32(x + y)


def test_writer_refuses_options_and_leaves_no_file(tmp_path):
    save({"w": torch.ones(2)}, tmp_path / "a.pt")
    with pytest.raises(UsageError):
        convert(tmp_path / "a.pt", tmp_path / "b.npz", compression="gzip")
    with pytest.raises(UnsupportedError, match="64"):
        save({"w": torch.ones([1] * 65)}, tmp_path / "c.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


# --- hostile files ------------------------------------------------------------------


def _npy(descr: str, shape: tuple, data: bytes = b"") -> bytes:
    return npzwrite.npy_header(descr, shape) + data


def _zip(entries: list[tuple]) -> bytes:
    """A zip from (name, bytes as stored, method, declared size, CRC-32) entries, written
    by hand so that names, sizes and contents can lie."""
    out, central = bytearray(), bytearray()
    for name, payload, method, usize, crc in entries:
        raw, at = name.encode(), len(out)
        fields = (0x04034B50, 20, 0x800, method, 0, 0x21, crc, len(payload), usize, len(raw), 0)
        out += struct.pack("<IHHHHHIIIHH", *fields) + raw + payload
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0x800, method, 0, 0x21, crc,
            len(payload), usize, len(raw), 0, 0, 0, 0, 0, at,
        ) + raw  # fmt: skip
    count, start = len(entries), len(out)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), start, 0)
    return bytes(out + central + end)


def _stored(name: str, data: bytes) -> tuple:
    return (name, data, 0, len(data), zlib.crc32(data))


def _deflated(name: str, data: bytes, declared: int | None = None) -> tuple:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = packer.compress(data) + packer.flush()
    size = len(data) if declared is None else declared
    return (name, payload, 8, size, zlib.crc32(data[:size]))


def _object_array(tmp: Path) -> bytes:
    arr = np.empty(1, dtype=object)
    arr[0] = Payload(tmp / "pwned")
    np.savez(tmp / "obj.npz", a=np.arange(2.0), b=arr)
    return (tmp / "obj.npz").read_bytes()


def _torch_zip(tmp: Path) -> bytes:
    torch.save({"a": torch.ones(2), "p": Payload(tmp / "pwned")}, tmp / "t.pt")
    return (tmp / "t.pt").read_bytes()


F4 = _npy("<f4", (4,), bytes(16))
BOMB = F4 + bytes(20 << 20)  # 20 MiB of zeros after a 4-float array

HOSTILE = {
    "object-array": (_object_array, "object array"),
    "torch-zip-renamed": (_torch_zip, "torch.save zip archive"),
    "zip-bomb-claimed": (
        lambda _: _zip([_deflated("a.npy", _npy("<f4", (1 << 30,)), (1 << 32) - 2)]),
        "more than deflate's 1032x",
    ),
    "zip-bomb-inflating": (lambda _: _zip([_deflated("a.npy", BOMB, len(F4))]), None),
    "huge-shape-stored": (
        lambda _: _zip([_stored("a.npy", _npy("<f4", (1 << 40,), bytes(16)))]),
        "needs 4,398,046,511,104 bytes",
    ),
    "huge-shape-deflated": (
        lambda _: _zip([_deflated("a.npy", _npy("<f8", (10**12, 10**6)))]),
        "needs 8,000,000,000,000,000,000 bytes",
    ),
    "truncated-member": (lambda _: _zip([_stored("a.npy", F4[:-5])]), "holds 11"),
    "truncated-file": (lambda _: _zip([_stored("a.npy", F4)])[:-30], "zip archive"),
    "duplicate-names": (
        lambda _: _zip([_stored("a.npy", F4), _stored("a.npy", F4)]),
        "names member 'a.npy' twice",
    ),
    "dot-dot-name": (lambda _: _zip([_stored("../a.npy", F4)]), "'..'"),
    "absolute-name": (lambda _: _zip([_stored("/etc/a.npy", F4)]), "absolute"),
    "not-npy-member": (lambda _: _zip([_stored("a.npy", F4), _stored("b.txt", b"hi")]), "b.txt"),
    "not-npy-bytes": (lambda _: _zip([_stored("a.npy", b"PK not numpy")]), "NUMPY magic"),
    "header-code": (
        lambda _: _zip([_stored("a.npy", _raw_header(b"__import__('os').system('touch pwned')"))]),
        "not a Python dict literal",
    ),
    "structured-dtype": (
        lambda tmp: _numpy_file(tmp, np.zeros(2, dtype=[("x", "<f4"), ("y", "<i4")])),
        "structured dtype",
    ),
    "string-dtype": (lambda tmp: _numpy_file(tmp, np.array(["abc"])), "'<U3'"),
    "record-lies": (lambda tmp: _record_lies(tmp), "bfloat16"),
}


def _raw_header(text: bytes) -> bytes:
    return npzio.MAGIC + b"\x01\x00" + struct.pack("<H", len(text)) + text


def _numpy_file(tmp: Path, arr: np.ndarray) -> bytes:
    np.savez(tmp / "x.npz", a=arr)
    return (tmp / "x.npz").read_bytes()


def _record_lies(tmp: Path) -> bytes:
    """nnconv's record claims a float32 array holds bfloat16 bit patterns."""
    record = json.dumps({"records": {}, "dtypes": {"a": "bfloat16"}, "names": {}}).encode()
    meta = _npy("|u1", (len(record),), record)
    return _zip([_stored("a.npy", F4), _stored("__nnconv__.npy", meta)])


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_npz_is_one_clean_error(tmp_path, capfd, case):
    build, words = HOSTILE[case]
    path = tmp_path / "bad.npz"
    path.write_bytes(build(tmp_path))
    began = time.monotonic()
    tracemalloc.start()
    try:
        with npz_format.read(path) as ckpt:  # deferred problems show when values load
            for lazy in ckpt.tensors.values():
                assert lazy.load().nbytes == lazy.nbytes
        if words is not None:
            pytest.fail(f"{case} was read")
    except NnconvError as exc:
        assert words is None or words in str(exc), str(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 8 << 20, f"{case}: {peak:,} bytes allocated"
    assert time.monotonic() - began < 2.0
    if words is not None:
        run = cli(capfd, "convert", path, tmp_path / "out.safetensors", "--from", "npz")
        lines = run.err.strip().splitlines()
        assert run.rc == 2 and len(lines) == 1 and lines[0].startswith("Error: "), run.err
        assert str(path) in lines[0] and "unexpected" not in lines[0]
        assert not (tmp_path / "out.safetensors").exists()
    assert not (tmp_path / "pwned").exists()  # no pickle ran


def test_the_inflating_bomb_yields_only_the_declared_values(tmp_path):
    (tmp_path / "bomb.npz").write_bytes(_zip([_deflated("a.npy", BOMB, len(F4))]))
    with load(tmp_path / "bomb.npz") as ckpt:
        assert torch.equal(to_object(ckpt)["a"], torch.zeros(4))


def test_torch_zips_and_npz_files_are_told_apart(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "t.npz")
    with open(tmp_path / "n.pt", "wb") as fh:  # a path would get .npz appended
        np.savez(fh, a=np.ones(2))
    assert registry.detect(tmp_path / "t.npz").NAME == "pt"
    assert registry.detect(tmp_path / "n.pt") is npz_format
    assert not npz_format.sniff(tmp_path / "t.npz", (tmp_path / "t.npz").read_bytes()[:64])


def test_a_big_endian_header_and_numpy_limits_are_parsed_not_evaluated():
    head = _npy(">i2", (2, 3), bytes(12))
    array = npzio.parse_header("x", _member(len(head)), head, 0)
    assert array.big and array.spec.name == "int16" and array.shape == (2, 3)
    odd = b"{'shape': (2,), 'fortran_order': False, 'descr': '|b1'}\n"  # not numpy's order
    raw = npzio.MAGIC + bytes([2, 0]) + struct.pack("<I", len(odd)) + odd + b"\x01\x00"
    array = npzio.parse_header("x", _member(len(raw)), raw, 0)
    assert array.spec.name == "bool" and array.nbytes == 2


def _member(size: int):
    from nnconv.formats.npz.npzzip import Member

    return Member("a.npy", 0, size, size, 0, 0, 0, 5)
