"""Torch-free sharding core: size strings, shard plans and Hugging Face indexes.

Shards follow transformers' naming (``model-00001-of-00003.safetensors`` plus
``model.safetensors.index.json`` with ``metadata.total_size`` and
``weight_map``), so ``from_pretrained`` loads a folder nnconv wrote.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from . import paths
from .errors import FormatError, UsageError

INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MAX_INDEX_BYTES = 100_000_000  # an index this large is not an index (as the header limit)
DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' save_pretrained default (5GB)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"512MiB"`` -> 536_870_912 (B, KB..TB, KiB..TiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(
            None,
            f"invalid size {text!r}",
            remedy="write a number with B, KB, MB, GB, TB or KiB, MiB, GiB, TiB, e.g. 5GB",
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UsageError(None, f"size {text!r} must be positive")
    return size


def plan(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group names into consecutive shards of at most ``max_bytes`` each.

    Order is kept; a tensor larger than ``max_bytes`` gets a shard of its own.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_name(index: int, count: int) -> str:
    """The file name of shard ``index`` (0-based) of ``count``, as transformers names it."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def build_index(shards: list[list[str]], total_size: int, metadata: dict[str, str]) -> dict:
    """The index transformers reads (``metadata.total_size`` and ``weight_map``)."""
    weight_map = {
        name: shard_name(i, len(shards)) for i, names in enumerate(shards) for name in names
    }
    return {"metadata": {"total_size": total_size, **metadata}, "weight_map": weight_map}


def is_output_name(name: str) -> bool:
    """A name a sharded write owns in its folder (the index, ``model-NNNNN-of-NNNNN``):
    the only names it may replace there."""
    return name == INDEX_NAME or SHARD_PATTERN.fullmatch(name) is not None


def shard_size_for(path: str | os.PathLike[str], shard_size: int | None) -> int | None:
    """The shard size a safetensors write to ``path`` uses: the one asked for, else the
    default when ``path`` is a folder already holding an index (a Hugging Face-style
    folder is written as shards, as ``save_pretrained`` does), else None (one file)."""
    if shard_size:
        return shard_size
    if Path(path).is_dir() and os.path.lexists(Path(path) / INDEX_NAME):
        return DEFAULT_SHARD_SIZE
    return None


def json_problem(exc: Exception) -> str:
    """A JSON error without the document's text (json's messages give a position only;
    anything else is named by its type)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at character {exc.pos}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc) if str(exc) == "duplicate key in header" else type(exc).__name__


def read_index(path: Path, expect: os.stat_result | None = None) -> tuple[Path, dict]:
    """A Hugging Face shard index (``weight_map``), bounded and checked: (folder, index)."""
    try:
        with os.fdopen(paths.open_regular(path, expect), "rb") as fh:
            raw = fh.read(MAX_INDEX_BYTES + 1)
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_INDEX_BYTES:
        raise FormatError(
            path, "shard index is larger than the 100 MB limit", limit=MAX_INDEX_BYTES
        )
    try:
        index = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"shard index is not UTF-8 (at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(path, f"unreadable shard index: {json_problem(exc)}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError(path, "shard index has no weight_map object")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise FormatError(path, f"weight_map entry {bad!r} does not name a shard file")
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise FormatError(path, "shard index metadata is not an object")
    return path.parent, index


def member(folder: Path, name: str, subject: Path, what: str) -> tuple[Path, os.stat_result]:
    """A file the folder's index names (or its index): checked by the one containment rule."""
    remedy = "a sharded model's files must be regular files in its folder"
    return paths.contained(folder, name, subject=subject, what=what, remedy=remedy)
