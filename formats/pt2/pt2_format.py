"""``.pt2``: a ``torch.export`` program (``torch.export.save``), its weights read as data.

Reading runs nothing from the file.  The archive is a zip (:mod:`..pt.torchzip`
parses its central directory, bounded by the file size); the payload configs
(JSON, size-limited) name every parameter, buffer and constant by its state_dict
name and point at raw little-endian storage bytes, which become byte spans of
the archive (memory-mapped on ``load()``, bit-identical, a view where torch stores
the whole storage of a view; tied weights share a storage and become aliases).
The program's JSON signature gives the order: the state_dict entries
(parameters, persistent buffers) as ``state_dict()`` orders them, then the constants
(non-persistent buffers, lifted tensor constants).  Extra files become metadata.
Pickled payloads (tensor subclasses, custom objects) are refused, their globals
listed, unless ``trust_code``.

Why running a ``.pt2`` needs ``--trust-code``: ``torch.export.load`` in torch 2.13
is not a pure graph reader.  It ``sympy.sympify``\\ s the program's symbolic-shape
strings (``eval`` of file text), compiles and runs the program's ``guards_code``
when ``.module()`` is called, unpickles the sample inputs with a fallback to
``torch.load(weights_only=False)``, and unpickles opaque constants with
``pickle.loads``.  So it runs code the file chooses, as ``torch.jit.load`` does:
nnconv reads the weights itself, and only ``converter``'s runner, with
``trust_code``, hands the file to torch.

Writing needs the graph: a ``.pt2`` is exported from a model (``converter.export_pt2``).
"""

from __future__ import annotations

import json
import mmap
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import rawio, torchpickle, torchzip, trust
from ..adapter import Capabilities
from ..checkpoint import RESERVED_KEYS, Checkpoint, paused_gc
from ..dtypes import DTYPES
from ..errors import FormatError, UnsupportedError, UntrustedCodeError, UsageError
from ..objects import Describer, from_object, tensor_flags
from ..options import DEFAULT_OPTIONS, WriteOptions
from . import pt2_archive
from .pt2_archive import CONSTANTS, WEIGHTS, Payload, Refused

NAME = "pt2"
EXTENSIONS = (".pt2",)
DESCRIPTION = "torch.export programs (torch.export.save); written by exporting a model"
# Its weights are a state_dict by name (not a graph's initializers, which ONNX's are):
# nnconv reads them as weights; converter's Pt2Runner runs the program (with trust).
CAPABILITIES = Capabilities(exported=True, runtime="torch.export")
FEATURES = "parameters, buffers and constants by state_dict name; tied weights; extra files"

ZIP_MAGIC = b"PK\x03\x04"
TORCH_VERSION_KEY = "pt2.torch_version"
CONSTANTS_KEY = "pt2.constants"  # names that are not state_dict entries (a JSON list)


def sniff(path: Path, head: bytes) -> bool:
    """A zip whose one root folder holds ``archive_format`` (torch.save and TorchScript
    archives hold ``data.pkl`` instead)."""
    if not head.startswith(ZIP_MAGIC):
        return False
    try:
        members = torchzip.members(Path(path))
    except (FormatError, OSError):
        return False
    return pt2_archive.root_of(members) is not None


def read(path: Path, *, trust_code: bool = False) -> Checkpoint:
    """Parameters, buffers and constants by name, as byte spans; nothing unpickled
    (``trust_code`` lets ``torch.export.load`` read what nnconv refuses)."""
    try:
        ckpt = _read(str(path))
    except Refused as exc:
        if not trust_code:
            raise _refuse(path, *exc.args) from None
        ckpt = _load_trusted(Path(path))
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror or exc}") from None
    ckpt.format, ckpt.source = NAME, str(path)
    return ckpt


def write(ckpt: Checkpoint, path: Path, *, options: WriteOptions = DEFAULT_OPTIONS) -> None:
    raise UsageError(
        path,
        "cannot write .pt2 from weights alone: a torch.export program needs the model's graph",
        remedy="export with --model path.py:Class (or a self-describing source) and --input-shape",
    )


def program(path: Path) -> Any:
    """The exported program's JSON (the graph and its signature), size-limited."""
    with _Opened(str(path)) as archive:
        model = archive.check_header()
        return archive.json(f"{pt2_archive.MODELS}{model}.json", pt2_archive.MAX_PROGRAM)


def declared_inputs(path: Path) -> list[tuple[str, tuple[int, ...], str]] | None:
    """(name, example shape, dtype) of the program's inputs, from the graph's tensor values
    (a symbolic size gives its example value); None unless all are tensors."""
    prog, get = program(path), pt2_archive.get
    values = get(prog, "graph_module", "graph", "tensor_values")
    out = []
    for arg in pt2_archive.signature(str(path), prog).inputs:
        name = get(arg, "as_tensor", "name")
        meta = values.get(name) if type(values) is dict and type(name) is str else None
        dims = get(meta, "sizes")
        code = get(meta, "dtype")
        dtype = pt2_archive.SCALAR_TYPES.get(code) if type(code) is int else None
        if type(dims) is not list or dtype is None:
            return None
        shape = [get(d, "as_int") if "as_int" in d else get(d, "as_expr", "hint", "as_int")
                 for d in dims if type(d) is dict]  # fmt: skip
        if len(shape) != len(dims) or not all(type(n) is int and n >= 0 for n in shape):
            return None
        out.append((name, tuple(shape), dtype))
    return out or None


class _Opened:
    """The archive's records, memory-mapped for the ``with`` block."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> pt2_archive.Archive:
        members = torchzip.members(Path(self.path))  # a FormatError for anything but a zip
        self._fh = open(self.path, "rb")  # noqa: SIM115 (closed by __exit__)
        try:
            self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            return pt2_archive.Archive(self.path, members, self._map)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        if getattr(self, "_map", None) is not None:
            self._map.close()
        self._fh.close()


@paused_gc()
def _read(path: str) -> Checkpoint:
    with _Opened(path) as archive:
        model = archive.check_header()
        prog = archive.json(f"{pt2_archive.MODELS}{model}.json", pt2_archive.MAX_PROGRAM)
        sig = pt2_archive.signature(path, prog)
        weights = {p.fqn: p for p in archive.payloads(model, WEIGHTS)}
        constants = {p.fqn: p for p in archive.payloads(model, CONSTANTS)}
        both = weights.keys() & constants.keys()
        if both:
            raise FormatError(path, f"{min(both)!r} is both a weight and a constant")
        _check_signature(path, sig, weights, constants)
        ordered = dict.fromkeys(pt2_archive.state_dict_order(sig.parameters, sig.buffers))
        ordered.update(dict.fromkeys([*weights, *sig.constants, *constants]))  # the rest after
        payloads = {**weights, **constants}
        entries = OrderedDict((n, payloads[n]) for n in ordered)
        for entry in entries.values():
            if entry.pickled:
                what = "a custom object" if entry.meta is None else "a tensor subclass"
                raise Refused(
                    f"{entry.fqn!r} is {what} stored as a pickle ({entry.member}), which only "
                    "torch.export.load reads, by unpickling it",
                    archive.pickle_globals(entry.member),
                )
        ckpt = _describe(path, archive, entries)
        ckpt.metadata = _metadata(path, archive, prog, [n for n in entries if n in constants])
        return ckpt


def _check_signature(path: str, sig: pt2_archive.Signature, weights: dict, constants: dict) -> None:
    """Every tensor the program takes is stored where its kind says."""
    for names, stored, where in (
        (sig.parameters + sig.buffers, weights, "weights"),
        (sig.constants + sig.objects, constants, "constants"),
    ):
        missing = [n for n in names if n not in stored]
        if missing:
            raise FormatError(
                path, f"the program takes {missing[0]!r}, which the archive's {where} lack"
            )


def _describe(path: str, archive: pt2_archive.Archive, entries: dict[str, Payload]) -> Checkpoint:
    """Each payload as a lazy tensor over its storage record (pt_format's checks)."""
    mapping = rawio.MappedFile(Path(path))
    storages: dict[str, torchpickle.StorageRef] = {}
    dtypes: dict[str, str] = {}

    def tensor_leaf(entry: Any, name: str) -> dict | None:
        if type(entry) is not Payload:
            return None
        meta = pt2_archive.tensor_meta(path, entry.fqn, entry.meta)
        record = archive.record(entry.member)
        if record is None:
            raise FormatError(path, f"{entry.fqn!r}: the archive has no {entry.member!r} record")
        if dtypes.setdefault(entry.member, meta.dtype) != meta.dtype:  # torch views the
            raise FormatError(  # storage in its first tensor's dtype: refuse to guess
                path, f"{entry.member!r} is shared by tensors of different dtypes"
            )
        numel, itemsize = 1, DTYPES[meta.dtype].itemsize
        for n in meta.shape:
            numel *= n
        if record.size % itemsize:  # torch.export.load refuses it too
            raise FormatError(path, f"{entry.member!r} is not a whole number of {meta.dtype}")
        if record.size == 0 and numel:
            raise UnsupportedError(
                path,
                f"{entry.fqn!r} has no stored values (the program was exported from fake tensors)",
            )
        storage = storages.get(entry.member)
        if storage is None:
            storage = storages[entry.member] = torchpickle.StorageRef(
                archive.root + entry.member, None, record.size
            )
        ref = torchpickle.TensorRef(
            storage, meta.offset, meta.shape, meta.stride, meta.requires_grad, meta.dtype
        )
        try:
            lazy, key = torchzip.lazy_tensor(path, archive.heads, record, ref, mapping)
        except torchpickle.NotPlain:
            raise FormatError(path, f"{entry.member!r} is compressed (torch stores it)") from None
        leaf = describer.add(name, lazy, key)
        return tensor_flags(leaf, parameter=entry.is_param, requires_grad=meta.requires_grad)

    describer = Describer(path, tensor_leaf)
    return describer.checkpoint(entries)


def _metadata(
    path: str, archive: pt2_archive.Archive, prog: Any, constants: list[str]
) -> dict[str, str]:
    """Extra files (nnconv's own records dropped), torch's version, the constants' names."""
    out = {k: v for k, v in archive.extras().items() if k not in RESERVED_KEYS}
    version = prog.get("torch_version") if type(prog) is dict else None
    if type(version) is str:
        out[TORCH_VERSION_KEY] = version[:100]
    if constants:
        out[CONSTANTS_KEY] = json.dumps(constants, ensure_ascii=False)
    return out


def _refuse(path: Path | str, why: str, globals_: Sequence[str] = ()) -> UntrustedCodeError:
    what = f"this .pt2 needs {trust.FLAG} to be read: {why}"
    return trust.refuse(path, what, names=list(globals_))


def _load_trusted(path: Path) -> Checkpoint:
    """``torch.export.load`` (which runs code from the file): its state_dict and tensor
    constants."""
    import torch

    try:
        with open(path, "rb") as fh:
            exported = torch.export.load(fh)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        first = (text or [repr(exc)])[0][:200]
        raise FormatError(path, f"torch.export.load failed: {first}") from None
    state = dict(exported.state_dict)
    state.update((k, v) for k, v in exported.constants.items() if isinstance(v, torch.Tensor))
    return from_object(state, subject=str(path))
