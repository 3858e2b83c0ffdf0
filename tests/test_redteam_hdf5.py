"""Red team: HDF5 files that inflate without bound, burn CPU on Keras names, carry
malformed Keras attributes, or reach outside the file.

Every hostile file is built here with h5py (low-level calls where the high-level
API refuses) and the real CLI runs in a child process (``redteam.nnconv``):
``convert`` and ``inspect`` must answer exit 2 with one ``Error: <file>: ...``
line, within the RSS and wall bounds, leaving no output.  Targets outside the
model are FIFOs (a process that opened one would block until killed: finishing in
seconds proves it never did) or files holding a sentinel that must appear nowhere.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nnconv.converter import load, save
from nnconv.formats import checkpoint
from nnconv.formats.errors import FormatError, UnsupportedError
from nnconv.formats.hdf5 import hdf5_chunks, hdf5_probe

sys.path.insert(0, str(Path(__file__).parent))
from redteam import WALL_LIMIT_S, nnconv  # noqa: E402

SENTINEL = b"SENTINEL-h5-5c1e-never-leak"
GIB = 1 << 30


def refused_both(bad: Path, tmp_path: Path, *words: str) -> list:
    """``convert`` and ``inspect`` of ``bad``: refused, bounded, nothing written or leaked."""
    out = tmp_path / "out.safetensors"
    runs = [nnconv("convert", bad, out), nnconv("inspect", bad)]
    for run in runs:
        line = run.assert_refused(bad)
        run.assert_bounded()
        for word in words:
            assert word in line, line
        assert SENTINEL.decode() not in run.stdout + run.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "nnconv-tmp" in p.name]
    return runs


# --- 1. decompression bombs: each chunk inflates within its own size ----------------------


def zeros_stream(size: int) -> bytes:
    """A zlib stream of ``size`` zero bytes (a multiple of 1 MiB), built without deflating
    them all: full-flushed 1 MiB pieces are byte-identical, so they repeat."""
    mib = bytes(1 << 20)
    c = zlib.compressobj(9)
    head = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    piece = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.flush()[:-4] + struct.pack(">I", ((size % 65521) << 16) | 1)  # adler32 of zeros
    return head + piece * (size // len(mib) - 1) + tail


def chunk_file(path: Path, raw: bytes, *, shape: int, filters: list) -> Path:
    """One float32 dataset ``x`` of ``shape`` elements in one chunk whose stored bytes are
    ``raw``, behind ``filters`` (h5py's ``set_filter`` calls, stacked as given)."""
    with h5py.File(path, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((shape,))
        for code, cd in filters:
            dcpl.set_filter(code, h5py.h5z.FLAG_OPTIONAL, cd)
        space = h5py.h5s.create_simple((shape,))
        dsid = h5py.h5d.create(f.id, b"x", h5py.h5t.IEEE_F32LE, space, dcpl=dcpl)
        dsid.write_direct_chunk((0,), raw)
    return path


def test_zeros_stream_is_what_it_claims() -> None:
    assert zlib.decompress(zeros_stream(4 << 20)) == bytes(4 << 20)


def test_stacked_deflate_bomb_is_refused_before_any_value(tmp_path: Path) -> None:
    """16 KB of file, one float, two deflate filters: 8 GiB once both are undone."""
    raw = zlib.compress(zeros_stream(8 * GIB), 9)
    bad = chunk_file(tmp_path / "bomb.h5", raw, shape=1, filters=[(1, (9,)), (1, (9,))])
    assert bad.stat().st_size < 64 << 10
    refused_both(bad, tmp_path, "stacks HDF5 filters", "deflate")


def test_single_deflate_chunk_inflating_past_its_size(tmp_path: Path) -> None:
    """One deflate filter, 4 KiB declared, 1 GiB in the stream: the 1100x bound on the
    shape passes, the chunk's own bound stops inflation at 4 KiB."""
    bad = chunk_file(tmp_path / "b.h5", zeros_stream(GIB), shape=1024, filters=[(1, (9,))])
    out = tmp_path / "out.safetensors"
    run = nnconv("convert", bad, out)
    line = run.assert_refused(bad)
    run.assert_bounded()
    assert "inflates past 4,096 bytes" in line, line
    assert not out.exists()
    inspect = nnconv("inspect", bad)  # metadata only: nothing to inflate
    assert inspect.rc == 0, inspect.stderr
    inspect.assert_bounded()


def test_lzf_chunk_decompressing_past_its_size(tmp_path: Path) -> None:
    # A literal zero, then back-references of 264 bytes at distance 1: 88:1.
    raw = b"\x00\x00" + b"\xe0\xff\x00" * 50_000
    bad = chunk_file(tmp_path / "l.h5", raw, shape=16, filters=[(32000, (4, 0, 64))])
    with pytest.raises(FormatError, match="lzf chunk decompresses past 64 by"), load(bad) as ckpt:
        ckpt.lazy("x").load()
    with pytest.raises(hdf5_chunks.Refused, match="past 64"):
        hdf5_chunks.unlzf_python(raw, 64)


@pytest.mark.parametrize(
    "filters, error, words",
    [
        ([(1, (4,)), (32000, (4, 0, 64))], FormatError, "deflate and lzf"),
        ([(2, (4,)), (2, (4,))], FormatError, "shuffle more than once"),
        ([(6, (0,))], UnsupportedError, "filter 6 (scaleoffset)"),
        ([(32001, ())], UnsupportedError, "filter 32001 (blosc)"),
    ],
    ids=["deflate-and-lzf", "two-shuffles", "scaleoffset", "plugin"],
)
def test_other_pipelines_are_refused_at_read(tmp_path, filters, error, words) -> None:
    bad = chunk_file(tmp_path / "p.h5", bytes(64), shape=16, filters=filters)
    with pytest.raises(error, match=re.escape(words)):
        load(bad)


def test_chunk_decoding_to_the_wrong_size(tmp_path: Path) -> None:
    bad = chunk_file(tmp_path / "s.h5", zlib.compress(bytes(10)), shape=16, filters=[(1, (4,))])
    with pytest.raises(FormatError, match="decodes to 10 bytes, not its 64"), load(bad) as ckpt:
        ckpt.lazy("x").load()


def nnconv_written(tmp_path: Path, compression: str) -> tuple[Path, dict]:
    rng = np.random.default_rng(3)
    expected = {
        "a.weight": torch.from_numpy(rng.standard_normal((300, 77)).astype(np.float32)),
        "a.bias": torch.zeros(77),
        "b.idx": torch.arange(5000, dtype=torch.int64),
        "b.half": torch.from_numpy(rng.standard_normal(999).astype(np.float16)),
        "b.bf16": torch.linspace(-3, 3, 513).to(torch.bfloat16),
    }
    path = tmp_path / f"{compression}.h5"
    save(expected, path, compression=compression)
    return path, expected


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_nnconv_compressed_files_still_read_bit_identically(tmp_path, compression) -> None:
    path, expected = nnconv_written(tmp_path, compression)
    out = tmp_path / "out.safetensors"
    run = nnconv("convert", path, out)
    assert run.rc == 0, run.stderr
    got = load_file(out)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert got[name].view(torch.uint8).equal(t.contiguous().view(torch.uint8)), name


@pytest.mark.parametrize(
    "options",
    [
        dict(compression="gzip", shuffle=True, fletcher32=True),
        dict(compression="gzip", compression_opts=1, chunks=(7, 5)),
        dict(compression="lzf", shuffle=True),
        dict(fletcher32=True, chunks=(16, 3)),
        dict(chunks=(5, 5)),
    ],
    ids=["gzip-shuffle-fletcher32", "gzip-edge-chunks", "lzf-shuffle", "fletcher32", "plain"],
)
@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<i2", "|b1", "<f2"])
def test_plain_h5py_filtered_files_read_as_h5py_reads_them(tmp_path, options, dtype) -> None:
    rng = np.random.default_rng(4)
    data = (rng.standard_normal((33, 17)) * 50).astype(dtype)
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("w", data=data, **options)
        part = f.create_dataset("p", shape=(40, 40), dtype=dtype, fillvalue=1, **options)
        part[:6, :6] = data[:6, :6]  # most chunks never written: the fill value
    with h5py.File(path, "r") as f:
        want = {k: np.asarray(f[k][()]) for k in ("w", "p")}
    with load(path) as ckpt:
        for k, v in want.items():
            got = ckpt.lazy(k).load().numpy()
            assert np.array_equal(got, v.astype(got.dtype)), (k, dtype)


def test_fletcher32_matches_libhdf5_and_catches_corruption(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("w", data=np.arange(1001, dtype="u1"), fletcher32=True, chunks=(1001,))
    data = bytearray(path.read_bytes())
    at = data.index(bytes(range(100, 120)))
    data[at] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="Fletcher32"), load(path) as ckpt:
        ckpt.lazy("w").load()


# --- 2 and 3. Keras name lists: linear, bounded, well-typed ------------------------------


def keras_file(path: Path, layers, weights, *, link: bool = False) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = layers
        g = f.create_group("d")
        g.attrs["weight_names"] = weights
        g["w"] = np.float32(1)
        if link:
            f["e"] = g  # a second name for the same layer group
    return path


def test_repeated_keras_names_are_refused_in_linear_time(tmp_path: Path) -> None:
    """3,000 x 3,000 repeats meant 9,000,000 entries (minutes of CPU): one set lookup each."""
    bad = keras_file(tmp_path / "rep.h5", [b"d"] * 3000, [b"w"] * 3000)
    runs = refused_both(bad, tmp_path, "'layer_names' lists 'd' twice")
    assert all(r.wall_s < WALL_LIMIT_S / 2 for r in runs)
    bad = keras_file(tmp_path / "w.h5", [b"d"], [b"w"] * 3000)
    with pytest.raises(FormatError, match="'weight_names' lists 'w' twice"):
        load(bad)


def test_one_keras_layer_group_under_two_names(tmp_path: Path) -> None:
    bad = keras_file(tmp_path / "two.h5", [b"d", b"e"], [b"w"], link=True)
    with pytest.raises(FormatError, match="Keras layers 'd' and 'e' are one group"):
        load(bad)


def test_keras_name_lists_are_bounded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(checkpoint, "MAX_TENSORS", 3)
    bad = keras_file(tmp_path / "many.h5", [f"l{i}".encode() for i in range(5)], [b"w"])
    with pytest.raises(FormatError, match="lists more than 3 names") as info:
        load(bad)
    assert (info.value.value, info.value.limit) == (5, 3)


@pytest.mark.parametrize(
    "layers, weights, words",
    [
        (np.arange(3), [b"w"], "'layer_names' is not a list of strings"),
        (np.float64(1.5), [b"w"], "'layer_names' is not a list of strings"),
        ("d", [b"w"], "'layer_names' is not a list of strings (a single string)"),
        ([b"d"], np.arange(2, dtype="i4"), "'weight_names' is not a list of strings"),
    ],
    ids=["int-array", "float", "scalar-string", "int-weight-names"],
)
def test_malformed_keras_attributes_are_errors(tmp_path, layers, weights, words) -> None:
    bad = keras_file(tmp_path / "m.h5", layers, weights)
    refused_both(bad, tmp_path, words)


def test_empty_non_string_weight_names_are_no_weights(tmp_path: Path) -> None:
    """What Keras writes for a layer without weights: an empty float64 array."""
    path = keras_file(tmp_path / "ok.h5", [b"d"], np.array([]))
    with load(path) as ckpt:
        assert ckpt.names() == []


# --- 4. nothing outside the file is ever opened ------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A FIFO (opening it blocks), a sentinel HDF5 file and a sentinel raw file."""
    os.mkfifo(tmp_path / "fifo")
    with h5py.File(tmp_path / "secret.h5", "w") as f:
        f.create_group("g")["s"] = np.frombuffer(SENTINEL, "u1")
        f.attrs["note"] = SENTINEL
    (tmp_path / "secret.bin").write_bytes(SENTINEL * 4)
    return tmp_path


def build_outside(f, case: str, target: str) -> None:
    f["ok"] = np.float32(1)
    if case == "soft-through-external":
        f["a"] = h5py.SoftLink("/z/s")
        f["z"] = h5py.ExternalLink(target, "/g")
    elif case == "soft-chain-to-external":
        f["a"] = h5py.SoftLink("b/c")
        f["b"] = h5py.SoftLink("/y")
        f.create_group("y")["c"] = h5py.ExternalLink(target, "/g/s")
    elif case == "external-link":
        f["x"] = h5py.ExternalLink(target, "/g/s")
    elif case == "external-storage":
        f.create_dataset("r", (8,), "f4", external=[(target, 0, 32)])
    elif case == "keras-weight-through-soft-link":
        f.attrs["layer_names"] = [b"dense"]
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"alias/s"]
        g["alias"] = h5py.SoftLink("/dense/ext")
        g["ext"] = h5py.ExternalLink(target, "/g")
    else:
        layout = h5py.VirtualLayout(shape=(4,), dtype="u1")
        layout[:] = h5py.VirtualSource(target, "g/s", shape=(4,))
        f.create_virtual_dataset("v", layout)


CASES = [
    ("soft-through-external", "external link"),
    ("soft-chain-to-external", "external link"),
    ("external-link", "external link"),
    ("external-storage", "external raw files"),
    ("keras-weight-through-soft-link", "external link"),
    ("virtual", "virtual dataset"),
]


@pytest.mark.parametrize("case, words", CASES, ids=[c for c, _ in CASES])
@pytest.mark.parametrize("target", ["fifo", "sentinel"])
def test_nothing_outside_the_file_is_opened(outside, case, words, target) -> None:
    if target == "fifo":
        where = outside / "fifo"
    else:
        where = outside / ("secret.bin" if case == "external-storage" else "secret.h5")
    bad = outside / "crafted.h5"
    with h5py.File(bad, "w") as f:
        build_outside(f, case, str(where))
    runs = refused_both(bad, outside, words)
    assert all("outside the file" in r.stderr for r in runs)
    assert all(r.wall_s < WALL_LIMIT_S / 2 for r in runs)  # a FIFO opened would block


def test_in_process_loader_resolves_links_itself(outside) -> None:
    """The in-process reader's own lookup refuses a soft link through an external link to
    a FIFO without opening it (a child process, killed if it blocked)."""
    bad = outside / "crafted.h5"
    with h5py.File(bad, "w") as f:
        build_outside(f, "soft-through-external", str(outside / "fifo"))
    script = textwrap.dedent(
        """
        import sys, h5py
        from nnconv.formats.hdf5 import hdf5_chunks
        f, size = hdf5_chunks.open_file(h5py, sys.argv[1])
        try:
            hdf5_chunks.read_values(h5py, f.id, "a", (3,), size)
        except hdf5_chunks.Refused as exc:
            print("refused:", exc.problem)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(bad)], capture_output=True, text=True, timeout=60
    )
    assert "refused: 'a' goes through an external link" in done.stdout, done


# --- 5. only regular files -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_input_must_be_a_regular_file(tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "model.h5"
    if kind == "fifo":
        os.mkfifo(bad)
    elif kind == "device":
        bad.symlink_to("/dev/zero")
    else:
        bad.mkdir()
    run = nnconv("inspect", bad)
    line = run.assert_refused(bad)
    run.assert_bounded()
    assert "not a regular file" in line or "directory" in line.lower(), line


def test_worker_refuses_a_fifo_itself(tmp_path: Path) -> None:
    """Past hdf5_format's check (a file swapped for a FIFO): the worker stats, never opens."""
    os.mkfifo(tmp_path / "swapped.h5")
    with pytest.raises(hdf5_probe.Refusal, match="not a regular file"):
        hdf5_probe.describe(str(tmp_path / "swapped.h5"), max_links=10, max_tensors=10)
