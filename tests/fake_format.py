"""A format that exists only in the tests: proof that a format is one adapter.

Layout: ``NNFAKE1\\n``, an 8-byte little-endian header length, a JSON header
(nnconv's records, then ``[name, dtype, shape, offset, nbytes]`` per tensor) and the
raw tensor bytes.  Nothing else in nnconv knows it exists: registering it is enough
for ``convert``, ``inspect``, ``verify`` and ``nnconv formats`` to take it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from nnconv.formats.adapter import Capabilities
from nnconv.formats.atomic import atomic_output
from nnconv.formats.checkpoint import Checkpoint, LazyTensor, Span, from_records, tensor_bytes
from nnconv.formats.errors import FormatError
from nnconv.formats.options import DEFAULT_OPTIONS, WriteOptions

NAME = "fake"
EXTENSIONS = (".fake",)
DESCRIPTION = "a test-only format: JSON header and raw bytes"
FEATURES = "everything nnconv records, as JSON"
CAPABILITIES = Capabilities(writes=True)
MAGIC = b"NNFAKE1\n"


def sniff(path: Path, head: bytes) -> bool:
    return head.startswith(MAGIC)


def read(path: Path, *, trust_code: bool = False) -> Checkpoint:
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC) or len(data) < 16:
        raise FormatError(path, "not a fake file")
    (size,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16 : 16 + size])
    base = 16 + size
    tensors = {}
    for name, dtype, shape, offset, nbytes in header["tensors"]:
        raw = data[base + offset : base + offset + nbytes]

        def load(raw: bytes = raw, dtype: str = dtype, shape: list = shape) -> torch.Tensor:
            flat = torch.tensor(list(raw), dtype=torch.uint8)
            return flat.view(getattr(torch, dtype)).reshape(shape)

        span = Span(str(path), base + offset, nbytes)
        tensors[name] = LazyTensor(dtype, tuple(shape), load, span)
    structure, aliases, metadata = from_records(str(path), header["records"], list(tensors))
    return Checkpoint(tensors, structure, aliases, metadata, format=NAME, source=str(path))


def write(ckpt: Checkpoint, path: Path, *, options: WriteOptions = DEFAULT_OPTIONS) -> None:
    entries, blobs, offset = [], [], 0
    for name, lazy in ckpt.tensors.items():
        blob = bytes(tensor_bytes(lazy.load()))
        entries.append([name, lazy.dtype, list(lazy.shape), offset, len(blob)])
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps({"records": ckpt.records(), "tensors": entries}).encode()
    with (
        atomic_output(Path(path), force=options.force, fsync=options.fsync) as tmp,
        open(tmp, "wb") as fh,
    ):
        fh.write(MAGIC + struct.pack("<Q", len(header)) + header + b"".join(blobs))
