"""Fuzz seeds and the mutations hypothesis draws from them.

Hypothesis draws the *mutations* (bit flips, byte writes, truncations,
deletions, insertions, duplications, splices from any seed, and edits of
length/offset/count fields with boundary integers), never the bytes
themselves, so a failing input shrinks to the fewest, simplest edits of a
committed seed.  Field edits aim where parsers trust the file: zip records,
the safetensors header length and the numbers in its JSON, the HDF5
superblock, protobuf varints, and any integer that could be an offset or a
length into the file.  Nothing here imports torch.
"""

from __future__ import annotations

import re
import shutil
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from nnconv.formats.onnx.onnx_format import varint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIXTURES = ROOT / "fixtures"
SEED_DIR = HERE / "seeds"


# --- seeds -------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    """A committed file mutations start from; with ``siblings`` its folder travels with it
    (ONNX external data, safetensors shards), unmutated."""

    reader: str
    path: Path
    siblings: bool = False

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    def __repr__(self) -> str:  # what hypothesis prints in a falsifying example
        return f"Seed({self.name!r})"


SEEDS: dict[str, tuple[Seed, ...]] = {
    "pt": (
        *(Seed("pt", FIXTURES / n) for n in ("mlp.params", "x-file", "checkpoint.pt", "legacy.pt")),
        # TorchScript archives (torch.jit.save), read by nnconv's restricted reader
        *(Seed("pt", SEED_DIR / "pt" / n) for n in ("scripted.pt", "traced.pt")),
    ),
    "safetensors": (
        Seed("safetensors", FIXTURES / "mlp.safetensors"),
        Seed("safetensors", SEED_DIR / "safetensors/record.safetensors"),  # architecture record
        Seed(
            "safetensors",
            SEED_DIR / "safetensors/sharded/model.safetensors.index.json",
            siblings=True,
        ),
    ),
    "gguf": (  # llama.cpp's layout (quantised types) and nnconv's (structure, records)
        Seed("gguf", SEED_DIR / "gguf/llama.gguf"),
        Seed("gguf", SEED_DIR / "gguf/nnconv.gguf"),
    ),
    "hdf5": (
        Seed("hdf5", FIXTURES / "mlp.h5"),
        Seed("hdf5", SEED_DIR / "hdf5/model.weights.h5"),
        Seed("hdf5", SEED_DIR / "hdf5/keras_legacy.h5"),
        Seed("hdf5", SEED_DIR / "hdf5/record.h5"),  # architecture record
    ),
    "npz": tuple(
        Seed("npz", SEED_DIR / "npz" / n) for n in ("nnconv.npz", "numpy.npz", "compressed.npz")
    ),
    "onnx": (
        Seed("onnx", SEED_DIR / "onnx/mlp.onnx"),
        Seed("onnx", SEED_DIR / "onnx/typed.onnx"),
        Seed("onnx", SEED_DIR / "onnx/external/tiny.onnx", siblings=True),
    ),
    "pt2": (  # torch.export.save: tied weights, constants; nnconv's export with its record
        Seed("pt2", SEED_DIR / "pt2/tied.pt2"),
        Seed("pt2", SEED_DIR / "pt2/record.pt2"),
    ),
}
ALL_SEEDS = tuple(s for seeds in SEEDS.values() for s in seeds)
SEED_BY_NAME = {s.name: s for s in ALL_SEEDS}


@cache
def seed_bytes(seed: Seed) -> bytes:
    return seed.path.read_bytes()


def stage(seed: Seed, folder: Path) -> Path:
    """The path a mutated ``seed`` is written to inside ``folder`` (siblings copied once)."""
    folder.mkdir(parents=True, exist_ok=True)
    if seed.siblings:
        for other in seed.path.parent.iterdir():
            if other.is_file() and other != seed.path and not (folder / other.name).exists():
                shutil.copyfile(other, folder / other.name)
    return folder / seed.path.name


# --- where a mutation may do the most harm -----------------------------------

# Zip record signature -> (offset, width) of its flags, method, size, count and offset fields.
_ZIP_FIELDS = {
    b"PK\x03\x04": ((6, 2), (8, 2), (18, 4), (22, 4), (26, 2), (28, 2)),
    b"PK\x01\x02": ((8, 2), (10, 2), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (34, 2), (42, 4)),
    b"PK\x05\x06": ((8, 2), (10, 2), (12, 4), (16, 4), (20, 2)),
    b"PK\x06\x06": ((4, 8), (24, 8), (32, 8), (40, 8), (48, 8)),
    b"PK\x06\x07": ((8, 8),),
}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MAX_FIELDS = 4096


@cache
def fields(seed: Seed) -> tuple[tuple[int, int], ...]:
    """(offset, width) of the seed's little-endian length/offset/count fields.

    Structure first (zip records, the safetensors header length, the HDF5
    superblock's addresses), then any u32/u64 whose value could be an offset
    or length into this file: that finds HDF5 object addresses, pickle string
    lengths and the like without a parser per format.
    """
    data = seed_bytes(seed)
    size = len(data)
    found: set[tuple[int, int]] = set()
    for signature, spec in _ZIP_FIELDS.items():
        for match in re.finditer(re.escape(signature), data):
            found.update((match.start() + o, w) for o, w in spec if match.start() + o + w <= size)
    if seed.reader == "safetensors" and not seed.path.name.endswith(".json"):
        found.add((0, 8))
    if seed.reader == "gguf":  # version, tensor count, key/value count
        found.update(((4, 4), (8, 8), (16, 8)))
    if data.startswith(_HDF5_SIGNATURE):
        version = data[8]
        addresses = range(24, 96, 8) if version < 2 else range(12, 44, 8)
        found.update((a, 8) for a in addresses if a + 8 <= size)
    plausible = [
        (pos, width)
        for width, code in ((8, "<Q"), (4, "<I"))
        for pos in range(size - width + 1)
        if 1 <= struct.unpack_from(code, data, pos)[0] <= size
    ]
    step = max(1, len(plausible) // _MAX_FIELDS)
    found.update(plausible[::step])
    return tuple(sorted(found))


def _protobuf(data: bytes, start: int, end: int, depth: int, out: list) -> bool:
    """Collect (offset, width) of every varint value and length in a protobuf message;
    False when ``data[start:end]`` does not parse as one (then it is a plain string)."""
    pos, mine = start, []
    while pos < end:
        tag, pos = varint(data, pos, end)
        if not tag or tag >> 3 == 0:
            return False
        wire = tag & 7
        if wire in (0, 2):
            at = pos
            value, pos = varint(data, pos, end)
            if value is None:
                return False
            mine.append((at, pos - at))
            if wire == 2:
                if pos + value > end:
                    return False
                if depth < 12:
                    _protobuf(data, pos, pos + value, depth + 1, mine)
                pos += value
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            return False
    if pos != end:
        return False
    out.extend(mine)
    return True


@cache
def varints(seed: Seed) -> tuple[tuple[int, int], ...]:
    """(offset, width) of the varints (lengths, dims, enums) of an ONNX seed."""
    if seed.reader != "onnx":
        return ()
    data = seed_bytes(seed)
    out: list[tuple[int, int]] = []
    _protobuf(data, 0, len(data), 0, out)
    return tuple(sorted(set(out)))


def _json_spans(seed: Seed, pattern: bytes) -> tuple[tuple[int, int], ...]:
    """(start, end) of ``pattern``'s matches (or its group) in a seed's JSON: the
    safetensors header or a shard index, where names, dtypes, shapes, offsets and sizes live."""
    data = seed_bytes(seed)
    if seed.path.name.endswith(".json"):
        start, end = 0, len(data)
    elif seed.reader == "safetensors":
        start, end = 8, 8 + struct.unpack_from("<Q", data)[0]
    else:
        return ()
    spans = (m.span(m.lastindex or 0) for m in re.finditer(pattern, data[start:end]))
    return tuple((start + a, start + b) for a, b in spans)


@cache
def numbers(seed: Seed) -> tuple[tuple[int, int], ...]:
    return _json_spans(seed, rb"-?\d+")


@cache
def words(seed: Seed) -> tuple[tuple[int, int], ...]:
    """The JSON strings (keys and values) between their quotes."""
    return _json_spans(seed, rb'"((?:[^"\\]|\\.)*)"')


# --- mutations ---------------------------------------------------------------

BOUNDARY = (
    0,
    1,
    2,
    7,
    8,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
)
TEXT_NUMBERS = (
    "0",
    "-1",
    "1",
    "8",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551616",
    "1e309",
    "0.5",
    "null",
    "9" * 5000,
)
JSON_WORDS = (
    "",
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "U8",
    "BOOL",
    "C64",
    "F8_E4M3",
    "F8_E5M2",
    "F8_E8M0",
    "XX",
    "__metadata__",
    "dtype",
    "shape",
    "data_offsets",
    "weight_map",
    "metadata",
    "nnconv.structure",
    "nnconv.aliases",
    "model-00001-of-00002.safetensors",
    "model.safetensors.index.json",
    "../x",
    "\\u0000",
    "\\ud800",
    "a" * 300,
)


def _boundaries(original: int, size: int) -> list[int]:
    near = (size - 8, size - 1, size, size + 1, size + 8, original - 1, original + 1)
    near += (original * 2, original // 2, original + size)
    return sorted(set(BOUNDARY) | {v for v in near if v >= 0})


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


SPECIAL_BYTES = (0, 0xFF, 0x7F, 0x80, 1)
TABLES = {"field": fields, "varint": varints, "number": numbers, "word": words}
OPS = (
    "truncate",
    "flip",
    "byte",
    "delete",
    "insert",
    "duplicate",
    "splice",
    "field",
    "varint",
    "number",
    "word",
)


def mutations():
    """1 to 4 raw mutations: (op, a, b, c, blob); :func:`apply` reads a, b, c modulo
    what they index, so every draw is valid for every seed and shrinks towards
    truncating at 0, index 0, value 0."""
    from hypothesis import strategies as st

    u32 = st.integers(0, 2**32 - 1)
    raw = st.tuples(st.sampled_from(OPS), u32, u32, u32, st.binary(min_size=1, max_size=16))
    return st.lists(raw, min_size=1, max_size=4)


def apply(seed: Seed, raw: list[tuple]) -> tuple[bytes, list[tuple]]:
    """The seed's bytes after the raw mutations, and the mutations as readable tuples."""
    buf = bytearray(seed_bytes(seed))
    done: list[tuple] = []
    for op, a, b, c, blob in raw:
        if op in TABLES and not TABLES[op](seed):
            op = "flip"  # this seed has no such fields
        n = len(buf)
        if op == "insert":
            at = a % (n + 1)
            if c % 2:
                blob = (b"\0", b"\xff")[(c >> 1) % 2] * (1 + b % 4096)
            buf[at:at] = blob
            done.append((op, at, blob if len(blob) <= 16 else f"{blob[:1]!r}*{len(blob)}"))
        elif op == "splice":
            donor = ALL_SEEDS[c % len(ALL_SEEDS)]
            source = seed_bytes(donor)
            start, count = b % len(source), 1 + (c >> 8) % (256 if (c >> 20) % 2 else 4096)
            chunk, at, replace = source[start : start + count], a % (n + 1), (c >> 21) % 2
            buf[at : at + (len(chunk) if replace else 0)] = chunk
            done.append((op, donor.name, start, count, at, "replace" if replace else "insert"))
        elif not n:
            continue
        elif op == "truncate":
            del buf[a % n :]
            done.append((op, a % n))
        elif op == "flip":
            buf[a % n] ^= 1 << (b % 8)
            done.append((op, a % n, b % 8))
        elif op == "byte":
            buf[a % n] = SPECIAL_BYTES[b % 5] if c % 2 == 0 else b & 0xFF
            done.append((op, a % n, buf[a % n]))
        elif op in ("delete", "duplicate"):
            at, count = a % n, 1 + (b % n if c % 2 else b % (16 if op == "delete" else 64))
            buf[at : at + count] = b"" if op == "delete" else buf[at : at + count] * 2
            done.append((op, at, count))
        elif op in ("field", "varint"):
            table = TABLES[op](seed)
            at, width = table[a % len(table)]
            if at + width > n:
                continue
            if op == "field":
                original = int.from_bytes(buf[at : at + width], "little")
            else:
                original = varint(bytes(buf), at, at + width)[0] or 0
            choices = _boundaries(original, n)
            value = choices[b % len(choices)]
            if op == "field":
                buf[at : at + width] = min(value, 2 ** (8 * width) - 1).to_bytes(width, "little")
            else:
                buf[at : at + width] = _encode_varint(value)
            done.append((op, at, width, value))
        else:  # number, word: text in the JSON
            table = TABLES[op](seed)
            start, end = table[a % len(table)]
            if end > n:
                continue
            original = bytes(buf[start:end]).decode("utf-8", "replace")
            if op == "number":
                choices = (*TEXT_NUMBERS, str(n), original + "0", "-" + original)
            else:
                choices = JSON_WORDS
            text = choices[b % len(choices)]
            buf[start:end] = text.encode()
            done.append((op, start, original[:20], text if len(text) < 40 else f"{text[:8]}..."))
    return bytes(buf), done
