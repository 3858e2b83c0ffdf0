"""nnconv's own safetensors reader and writer against the safetensors library."""

from __future__ import annotations

import json
import struct
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nnconv.converter import load, save
from nnconv.formats import to_object


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb.weight": torch.randn(7, 3, generator=g),
        "norm.weight": torch.randn(3, generator=g).to(torch.bfloat16),
        "steps": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "fp8": torch.randn(4, generator=g).to(torch.float8_e5m2),
        "scalar": torch.tensor(1.5, dtype=torch.float16),
        "empty": torch.zeros(0, 4),
    }


def test_library_reads_what_nnconv_writes(tmp_path):
    tensors = _sample()
    path = tmp_path / "m.safetensors"
    save(tensors, path)
    back = load_file(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(_bytes(back[name]), _bytes(t))
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"  # transformers requires it
    assert "nnconv.structure" not in meta  # a plain {name: tensor} dict needs no record
    save(OrderedDict(tensors), tmp_path / "o.safetensors")
    with safe_open(tmp_path / "o.safetensors", "pt") as f:
        structure = json.loads(f.metadata()["nnconv.structure"])
    assert structure["o"] == 1 and structure["d"][0][0] == "emb.weight"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % 8 == 0, "data section must start 8-byte aligned"


def test_nnconv_reads_what_the_library_writes(tmp_path):
    tensors = _sample()
    path = tmp_path / "lib.safetensors"
    save_file(tensors, path, metadata={"author": "someone"})
    ckpt = load(path)
    assert ckpt.format == "safetensors"
    assert ckpt.metadata == {"author": "someone"}
    obj = to_object(ckpt)
    assert set(obj) == set(tensors)
    for name, t in tensors.items():
        assert obj[name].dtype == t.dtype and obj[name].shape == t.shape
        assert torch.equal(_bytes(obj[name]), _bytes(t))


def test_reading_is_lazy(tmp_path, monkeypatch):
    """Listing a file reads its header only; values come when a tensor is loaded."""
    path = tmp_path / "big.safetensors"
    save_file({"a": torch.zeros(1024, 1024), "b": torch.ones(3)}, path)
    opened = []
    real_open = open

    def spy(file, mode="r", *args, **kwargs):
        opened.append((str(file), mode))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    ckpt = load(path)
    assert ckpt.tensors["a"].shape == (1024, 1024)
    assert ckpt.nbytes == 1024 * 1024 * 4 + 12
    reads_before = len(opened)
    assert torch.equal(ckpt.tensors["b"].load(), torch.ones(3))
    assert len(opened) == reads_before + 1, "the map is opened on first load"


@pytest.mark.parametrize("dtype", ["float8_e4m3fnuz", "float8_e5m2fnuz", "complex128"])
def test_dtypes_safetensors_cannot_hold_are_named(tmp_path, dtype):
    from nnconv.formats.errors import UnsupportedError

    t = torch.zeros(2, dtype=getattr(torch, dtype))
    with pytest.raises(UnsupportedError, match=dtype):
        save({"t": t}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
