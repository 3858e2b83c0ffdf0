"""The format registry: a read-only mapping of adapters, detection by content first.

Every adapter is one module in its own folder with the names of
:class:`~.adapter.Adapter` (``NAME``, ``EXTENSIONS``, ``DESCRIPTION``,
``FEATURES``, ``CAPABILITIES``, ``sniff``, ``read``, ``write`` and optional hooks).
Adding a format is one folder and one entry in :data:`BUILT_IN`; write options are
checked here, once, against what each adapter declares.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

from . import paths, sharding
from .adapter import COMMON_OPTIONS, Adapter, Capabilities
from .errors import FormatError, UsageError
from .gguf import gguf_format
from .hdf5 import hdf5_format
from .npz import npz_format
from .onnx import onnx_format
from .options import WriteOptions
from .pt import pt_format, sharded_bin
from .pt2 import pt2_format
from .safetensors import safetensors_format

BUILT_IN: tuple[Any, ...] = (
    pt_format,
    safetensors_format,
    hdf5_format,
    onnx_format,
    pt2_format,
    gguf_format,
    npz_format,
)
_ADAPTERS: dict[str, Adapter] = {}
ADAPTERS = MappingProxyType(_ADAPTERS)  # name -> adapter, in registration order
REQUIRED = ("NAME", "EXTENSIONS", "DESCRIPTION", "FEATURES", "sniff", "read", "write")


def register(adapter: Any) -> None:
    """Add an adapter (a module or object with the protocol's names)."""
    missing = [n for n in REQUIRED if not hasattr(adapter, n)]
    if missing or not isinstance(getattr(adapter, "CAPABILITIES", None), Capabilities):
        raise TypeError(f"{adapter!r} lacks {missing or ['CAPABILITIES']}: not an adapter")
    if adapter.NAME in _ADAPTERS:
        raise ValueError(f"a format named {adapter.NAME!r} is registered already")
    unknown = adapter.CAPABILITIES.write_options - _OPTION_FIELDS
    if unknown:
        raise ValueError(f"{adapter.NAME}: unknown write options {sorted(unknown)}")
    _ADAPTERS[adapter.NAME] = adapter


def unregister(name: str) -> None:
    """Remove a format added with :func:`register` (tests, plugins)."""
    _ADAPTERS.pop(name, None)


_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(WriteOptions)) - COMMON_OPTIONS
for _adapter in BUILT_IN:
    register(_adapter)
HEAD_BYTES = 64
HF_CONFIG, HF_PT_WEIGHTS = "config.json", "pytorch_model.bin"
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def get(name: str) -> Adapter:
    """The adapter called ``name`` (as ``--from``/``--to`` spell it)."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise UsageError(
            None, f"unknown format {name!r}", remedy=f"known formats: {', '.join(ADAPTERS)}"
        ) from None


def read_head(path: Path) -> bytes:
    """The first bytes of a file (``b""`` for a folder), with missing/unreadable files
    as FormatError.  Stat'ed first: a FIFO, a device or a socket is refused, never
    opened (opening a FIFO blocks; ``/dev/zero`` never ends)."""
    st = paths.check_input(path)
    if stat.S_ISDIR(st.st_mode):
        return b""
    try:
        with os.fdopen(paths.open_regular(path, st), "rb") as fh:
            return fh.read(HEAD_BYTES)
    except FileNotFoundError:
        raise FormatError(path, "no such file") from None
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror or exc}") from None


def detect(path: str | os.PathLike[str], *, format: str | None = None) -> Adapter:
    """The adapter for an existing file: ``format`` if given, else by content, then extension.

    A ``format`` that the content contradicts (``--from pt`` on a safetensors
    file) is an error naming both.
    """
    path = Path(path)
    forced = get(format) if format else None
    head = read_head(path)  # checks the path is a regular file or a folder first
    if head.startswith(LFS_POINTER):
        raise FormatError(
            path, "this is a Git LFS pointer, not the model", remedy="run git lfs pull"
        )
    if not head and path.is_file():
        raise FormatError(path, "file is empty")
    if path.is_dir():
        _check_folder(path)
    found: Adapter | None
    if path.is_dir() and weights_file(path) != path:  # save_pretrained's pytorch_model.bin
        found = cast(Adapter, pt_format)
    else:
        found = next((a for a in ADAPTERS.values() if a.sniff(path, head)), None)
    if forced is not None:
        if found is not None and found is not forced:
            raise FormatError(path, f"--from {forced.NAME} was given but the file is {found.NAME}")
        return forced
    return found or for_destination(path, missing_ok=False)


def _check_folder(path: Path) -> None:
    """A folder is a checkpoint only when it is one: a sharded safetensors folder (its
    index present) or a folder whose only weight file is one ``.safetensors`` (what
    ``save_pretrained`` writes beside its config); anything else is an error listing what
    is there, never a guess."""
    if (path / sharding.INDEX_NAME).is_file():
        return
    found: dict[str, list[str]] = {}
    for name in sorted(os.listdir(path)):
        adapter = next(
            (a for a in ADAPTERS.values() if any(name.lower().endswith(e) for e in a.EXTENSIONS)),
            None,
        )
        if adapter is not None and not (path / name).is_dir():  # a FIFO: refused when read
            found.setdefault(adapter.NAME, []).append(name)
    if list(found) == ["safetensors"] and len(found["safetensors"]) == 1:
        return
    if weights_file(path) != path:
        return
    shown = "; ".join(f"{fmt}: {', '.join(names[:5])}" for fmt, names in found.items())
    raise FormatError(
        path,
        "is a folder (directory) but not one checkpoint: "
        + (f"it holds {shown}" if found else "it holds no weight files")
        + f" and no {sharding.INDEX_NAME}",
        remedy="name the file to read",
    )


def weights_file(path: Path) -> Path:
    """The one weight file of a folder ``save_pretrained`` wrote in the old format
    (``config.json`` beside a single ``pytorch_model.bin``, no safetensors), or the index
    of its ``pytorch_model-*.bin`` shards (``pytorch_model.bin.index.json``); else ``path``."""
    if path.is_dir() and (index := sharded_bin.index_of(path)) is not None:
        return index
    names = os.listdir(path) if path.is_dir() else []
    weights = [n for n in names if n.endswith((".bin", ".safetensors", ".index.json"))]
    if weights == [HF_PT_WEIGHTS] and HF_CONFIG in names and (path / HF_PT_WEIGHTS).is_file():
        return path / HF_PT_WEIGHTS
    return path


def for_destination(path: str | os.PathLike[str], *, missing_ok: bool = True) -> Adapter:
    """The adapter a destination's extension asks for."""
    name = Path(path).name.lower()
    for adapter in ADAPTERS.values():
        if any(name.endswith(ext) for ext in adapter.EXTENSIONS):
            return adapter
    known = ", ".join(f"{a.NAME} ({' '.join(a.EXTENSIONS)})" for a in ADAPTERS.values())
    suffix = Path(path).suffix
    if missing_ok and suffix and not Path(path).is_dir():
        raise UsageError(
            path,
            f"nnconv does not support {suffix} files (yet)",
            remedy=f"it writes {known}; --to names one of these for an unusual file name",
        )
    if missing_ok:
        raise UsageError(
            path, "cannot tell the format from the extension", remedy=f"pass --to; {known}"
        )
    raise FormatError(
        path, "unrecognised format: not a file of any known format", remedy=f"known: {known}"
    )


def taking(option: str) -> list[Adapter]:
    """The formats whose writers take the write option ``option`` (``shard_size``)."""
    return [a for a in ADAPTERS.values() if option in a.CAPABILITIES.write_options]


def check_options(adapter: Adapter, options: WriteOptions, subject: Any = None) -> None:
    """Options a destination's format does not take are an error, one message shape."""
    for name in sorted(_OPTION_FIELDS - adapter.CAPABILITIES.write_options):
        if getattr(options, name) not in (None, False):
            takers = [a.NAME for a in taking(name)]
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                subject,
                f"{flag} applies to {' and '.join(takers) or 'no'} destinations only",
                remedy=f"{adapter.NAME} files take no {flag}",
            )


def holds_graph(format: str | None) -> bool:
    """Whether ``format``'s files are exported graphs: their weights are a graph's
    initializers (equal tensors stored once, training counters dropped, constants kept)."""
    adapter = ADAPTERS.get(format or "")
    return adapter is not None and "graph" in adapter.CAPABILITIES.holds
