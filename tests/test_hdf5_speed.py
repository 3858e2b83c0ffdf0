"""HDF5 through raw byte spans: contiguous datasets are read and written as bytes.

Reading gives a contiguous, unfiltered, little-endian dataset a ``Span`` (its
offset and size in the file) and loads it from a memory map; compressed or
chunked datasets keep reading through h5py.  Writing creates the datasets with
libhdf5, then places every tensor's bytes at the offset libhdf5 allocated: a
span is copied by the kernel without loading the tensor, so a safetensors ->
hdf5 conversion, like ``inspect`` of an HDF5 file, needs no torch.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import assert_same

from nnconv import convert, load, save
from nnconv.formats import Checkpoint, LazyTensor, from_object, to_object
from nnconv.formats.hdf5 import hdf5_format
from nnconv.formats.options import WriteOptions

ROOT = Path(__file__).resolve().parents[1]


def values() -> dict[str, torch.Tensor]:
    """Every kind of value the span path moves, bit patterns and odd sizes included."""
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(3, 5, generator=g)
    f32[0, 0], f32[0, 1] = float("nan"), -0.0
    out = {
        "layer.weight": f32,
        "layer.bias": torch.randn(5, generator=g).to(torch.float64),
        "bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "fp8.e4m3": torch.randn(7, generator=g).to(torch.float8_e4m3fn),
        "fp8.e5m2": torch.randn(3, generator=g).to(torch.float8_e5m2),
        "half": torch.randn(3, generator=g).to(torch.float16),
        "odd": torch.arange(3, dtype=torch.uint8),  # 3 bytes: the next tensor is unaligned
        "ints": torch.arange(-4, 5, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "cplx": torch.randn(2, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    out["tied"] = out["layer.weight"]  # a hard link in HDF5
    return out


def h5_bits(value) -> bytes:
    return np.ascontiguousarray(value).tobytes()


def torch_bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def written(tmp_path: Path) -> Path:
    path = tmp_path / "m.h5"
    save(values(), path)
    return path


def test_contiguous_datasets_get_spans_that_hold_their_bytes(written: Path) -> None:
    expected = values()
    raw = written.read_bytes()
    with load(written) as ckpt:
        assert ckpt.aliases == {"tied": "layer.weight"}
        for name, lazy in ckpt.tensors.items():
            span = lazy.span
            assert span is not None, name
            assert (span.path, span.nbytes) == (str(written), lazy.nbytes), name
            assert raw[span.offset : span.offset + span.nbytes] == torch_bits(expected[name])
        assert_same(to_object(ckpt), expected)


def test_compressed_datasets_have_no_span_and_still_load(tmp_path: Path) -> None:
    expected = values()
    for method in ("gzip", "lzf"):
        path = tmp_path / f"{method}.h5"
        save(expected, path, compression=method)
        with load(path) as ckpt:
            spans = {n: t.span for n, t in ckpt.tensors.items()}
            assert spans["layer.weight"] is None and spans["bf16"] is None, method
            # Scalars and empty tensors cannot be chunked: contiguous, so spanned.
            assert spans["scalar"] is not None and spans["empty"] is not None
            assert_same(to_object(ckpt), expected)


def test_big_endian_and_chunked_datasets_read_through_h5py(tmp_path: Path) -> None:
    path = tmp_path / "foreign.h5"
    data = np.arange(12, dtype=">f4").reshape(3, 4)
    with h5py.File(path, "w") as f:
        f["big"] = data
        f.create_dataset("chunked", data=np.arange(6, dtype="<i8"), chunks=(2,))
        f.create_dataset("unwritten", shape=(4,), dtype="<f4")  # no storage yet
    with load(path) as ckpt:
        assert {n: t.span for n, t in ckpt.tensors.items()} == dict.fromkeys(ckpt.tensors)
        assert torch.equal(ckpt.lazy("big").load(), torch.from_numpy(data.astype("<f4")))
        assert ckpt.lazy("chunked").load().tolist() == list(range(6))
        assert not ckpt.lazy("unwritten").load().any()


@pytest.mark.parametrize("source", ["torch", "safetensors", "hdf5"])
def test_bytes_round_trip_bit_identical_through_h5py(source: str, tmp_path: Path) -> None:
    """Written through spans (safetensors, hdf5 sources) or torch values: what h5py
    reads back is the source's bits, and the bit patterns carry their dtype attribute."""
    expected = values()
    if source == "torch":
        path = tmp_path / "out.h5"
        save(expected, path)
    else:
        middle = tmp_path / f"src.{'h5' if source == 'hdf5' else 'safetensors'}"
        save(expected, middle)
        path = tmp_path / "out.h5"
        convert(middle, path)
    with h5py.File(path, "r") as f:
        for name, t in expected.items():
            ds = f[name.replace(".", "/")]
            assert h5_bits(ds[()]) == torch_bits(t), name
            attr = ds.attrs.get("dtype")
            kind = str(t.dtype).removeprefix("torch.")
            assert attr == (kind if kind in ("bfloat16", "float8_e4m3fn", "float8_e5m2") else None)
        assert f["tied"].id == f["layer/weight"].id  # one dataset, two links
    with load(path) as ckpt:
        assert_same(to_object(ckpt), expected)


def test_spanned_tensors_are_never_loaded_when_written(written: Path, tmp_path: Path) -> None:
    with load(written) as ckpt:

        def refuse():
            raise AssertionError("a tensor with a span was loaded")

        tensors = {
            n: LazyTensor(t.dtype, t.shape, refuse, span=t.span) for n, t in ckpt.tensors.items()
        }
        copy = Checkpoint(tensors, ckpt.structure, dict(ckpt.aliases), dict(ckpt.metadata))
        seen: list[int] = []
        hdf5_format.write(copy, tmp_path / "copy.h5", options=WriteOptions(progress=seen.append))
    assert seen == sorted(seen) and len(seen) == len(tensors) and seen[-1] == copy.nbytes
    with load(tmp_path / "copy.h5") as again:
        assert_same(to_object(again), values())


def test_a_wrong_sized_load_is_refused(tmp_path: Path) -> None:
    ckpt = from_object({"w": torch.ones(4)})
    ckpt.tensors["w"] = LazyTensor("float32", (4,), lambda: torch.ones(3))
    with pytest.raises(Exception, match="3|12"):
        save(ckpt, tmp_path / "bad.h5")
    assert not (tmp_path / "bad.h5").exists()


NO_TORCH = textwrap.dedent(
    """
    import sys
    from nnconv import convert, inspect
    convert(sys.argv[1], sys.argv[2])
    convert(sys.argv[2], sys.argv[3])
    report = inspect(sys.argv[3])
    assert report.to_json()["tensors"], report
    print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
    """
)


def test_safetensors_to_hdf5_and_inspect_need_no_torch(tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    save(values(), src)
    args = [str(src), str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
