"""The layout of a ``torch.export.save`` archive, read as data: records, JSON, names.

torch 2.13 writes a zip (parsed by :mod:`..pt.torchzip`) under one root folder::

    <root>/archive_format                            b"pt2"
    <root>/archive_version                           b"0"
    <root>/models/<model>.json                       the program: graph and signature
    <root>/data/weights/<model>_weights_config.json  state_dict name -> payload
    <root>/data/weights/weight_<i>                   a storage's raw little-endian bytes
    <root>/data/constants/<model>_constants_config.json   the same for constants
    <root>/data/constants/tensor_<i>                 (non-persistent buffers, lifted ones)
    <root>/data/sample_inputs/<model>.pt             torch.save of the example inputs
    <root>/extra/<name>                              ``extra_files``: free text

A payload is ``{"path_name", "is_param", "use_pickle", "tensor_meta"}``; tensors
sharing a storage (tied weights) share its ``path_name``, each a strided view
(dtype code, sizes, strides, storage offset) of the whole storage.  Pickled
payloads (tensor subclasses, torchbind and opaque objects) and the sample inputs
are never unpickled here: they are :class:`Refused`.  Every JSON record is read
with a size limit and parsed by ``json`` alone.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any, NamedTuple

from .. import pickle_gate, torchzip
from ..checkpoint import INT64_MAX, MAX_DEPTH, depth_error
from ..errors import FormatError, UnsupportedError

FORMAT_VALUE, VERSION_VALUE = b"pt2", b"0"
WEIGHTS, CONSTANTS = "data/weights/", "data/constants/"
MODELS, EXTRA, AOTI = "models/", "extra/", "data/aotinductor/"
# Sizes a record may claim: the program grows ~3 KB per graph node (a 10^4-node
# graph is ~30 MB), a payload config ~300 bytes per tensor.
MAX_PROGRAM = 256 << 20
MAX_CONFIG = 64 << 20
MAX_EXTRA = 16 << 20  # each extra file, and all of them together
MAX_SCANNED = 64 << 20  # a pickled payload whose globals are listed in the refusal
MAX_DIMS = 64
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than this
STRIDED = 7  # schema.Layout.Strided

# torch/_export/serde/schema.py ScalarType -> torch dtype name (complex32 has no entry).
SCALAR_TYPES: dict[int, str] = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    10: "complex64",
    11: "complex128",
    12: "bool",
    13: "bfloat16",
    28: "uint16",
    29: "float8_e4m3fn",
    30: "float8_e5m2",
    31: "float8_e4m3fnuz",
    32: "float8_e5m2fnuz",
    33: "float8_e8m0fnu",
    34: "uint32",
    35: "uint64",
}


class Refused(Exception):
    """Something only ``torch.export.load`` reads (by unpickling it): needs trust."""


class Payload(NamedTuple):
    """One config entry: a state_dict or constant name and where its bytes are."""

    fqn: str
    member: str  # relative to the root: "data/weights/weight_0"
    is_param: bool
    pickled: bool
    meta: Any  # the tensor_meta object (a dict), or None


class Meta(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    requires_grad: bool


class Signature(NamedTuple):
    """The program's inputs by kind, each in the program's order."""

    parameters: list[str]
    buffers: list[str]  # persistent: state_dict entries
    constants: list[str]  # non-persistent buffers and tensor constants
    objects: list[str]  # custom (torchbind) objects
    inputs: list[Any]  # the user inputs' arguments (``{"as_tensor": {"name": ...}}``...)


def root_of(members: dict[str, torchzip.Record]) -> str | None:
    """The root folder (``"model/"``) of the one ``<root>/archive_format`` record."""
    found = [n for n in members if n.endswith("/archive_format") and n.count("/") == 1]
    return found[0][: -len("archive_format")] if len(found) == 1 else None


class Archive:
    """The archive's records by their name below the root, read with size limits."""

    def __init__(self, path: str, members: dict[str, torchzip.Record], heads: Any) -> None:
        self.path, self.members, self.heads = path, members, heads
        root = root_of(members)
        if root is None:
            raise FormatError(path, "not a torch.export archive: no one archive_format record")
        self.root = root

    def record(self, name: str) -> torchzip.Record | None:
        return self.members.get(self.root + name)

    def names(self, folder: str) -> list[str]:
        """Records inside ``folder`` (their names below the root)."""
        start = self.root + folder
        return [n[len(self.root) :] for n in self.members if n.startswith(start)]

    def bytes(self, name: str, limit: int) -> bytes:
        record = self.record(name)
        if record is None:
            raise FormatError(self.path, f"torch.export archive has no {name!r} record")
        limit = min(limit, DEFLATE_MAX_RATIO * record.csize)
        return torchzip.member_bytes(self.path, self.heads, record, limit=limit)

    def json(self, name: str, limit: int) -> Any:
        data = self.bytes(name, limit)
        try:
            return json.loads(data.decode("utf-8"))
        except RecursionError:
            raise depth_error(self.path, FormatError, f"{name}: ") from None
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
            raise FormatError(self.path, f"{name} is not valid JSON: {exc}"[:300]) from None

    def check_header(self) -> str:
        """The format and version records checked; the one model's name."""
        if self.bytes("archive_format", 64) != FORMAT_VALUE:
            raise FormatError(self.path, "archive_format is not 'pt2'")
        version = self.bytes("archive_version", 64)
        if version != VERSION_VALUE:
            raise UnsupportedError(
                self.path,
                f"PT2 archive version {version[:20]!r}: nnconv reads version 0 (torch 2.13)",
            )
        order = self.record("byteorder")
        if order is not None and self.bytes("byteorder", 64) != b"little":
            raise UnsupportedError(self.path, "big-endian tensors are not supported")
        models = [n for n in self.names(MODELS) if n.endswith(".json") and n.count("/") == 1]
        if len(models) == 1:
            return models[0][len(MODELS) : -len(".json")]
        if not models and self.names(AOTI):
            raise UnsupportedError(
                self.path,
                "an AOTInductor package (compiled code), not an exported program",
                remedy="read the torch.export.save archive it was compiled from",
            )
        raise UnsupportedError(
            self.path,
            f"the archive holds {len(models)} exported programs; nnconv reads exactly one",
        )

    def payloads(self, model: str, folder: str) -> list[Payload]:
        """The config of ``folder`` (weights or constants) as payloads, in file order."""
        name = f"{folder}{model}_{folder.split('/')[1]}_config.json"
        if name not in self.names(folder):
            if self.record(f"{folder}{model}.pt") is not None:
                raise UnsupportedError(
                    self.path,
                    f"the older torch.export layout ({folder}{model}.pt, one pickle)",
                    remedy="save the program again with a recent torch.export.save",
                )
            raise FormatError(self.path, f"torch.export archive has no {name!r} record")
        config = self.json(name, MAX_CONFIG)
        entries = config.get("config") if type(config) is dict else None
        if type(entries) is not dict:
            raise FormatError(self.path, f"{name} is not a payload config")
        out = []
        for fqn, entry in entries.items():
            keys = ("path_name", "is_param", "use_pickle", "tensor_meta")
            path_name, is_param, pickled, meta = (
                entry.get(k) if type(entry) is dict else None for k in keys
            )
            if (
                not fqn
                or type(path_name) is not str
                or not path_name
                or "/" in path_name
                or type(is_param) is not bool
                or type(pickled) is not bool
                or not (meta is None or type(meta) is dict)
            ):
                raise FormatError(self.path, f"{name}: entry {fqn[:100]!r} is malformed")
            out.append(Payload(fqn, folder + path_name, is_param, pickled, meta))
        return out

    def extras(self) -> dict[str, str]:
        """``extra/<name>`` records as text (what ``extra_files`` stored)."""
        out, total = {}, 0
        for name in self.names(EXTRA):
            record = self.record(name)
            total += record.size if record else 0
            if total > MAX_EXTRA:
                raise FormatError(
                    self.path, "extra files exceed nnconv's limit", value=total, limit=MAX_EXTRA
                )
            try:
                out[name[len(EXTRA) :]] = self.bytes(name, MAX_EXTRA).decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(self.path, f"{name} is not UTF-8 text") from None
        return out

    def pickle_globals(self, member: str) -> list[str]:
        """Best effort, for the refusal's message: the globals a pickled payload names
        (a torch.save zip, or a plain pickle), listed without unpickling; [] if unknown."""
        record = self.record(member)
        if record is None or record.size > MAX_SCANNED:
            return []
        try:
            data = self.bytes(member, MAX_SCANNED)
            if data.startswith(b"PK\x03\x04"):
                with zipfile.ZipFile(io.BytesIO(data)) as inner:
                    pkl = [i for i in inner.infolist() if i.filename.endswith("data.pkl")]
                    if len(pkl) != 1 or pkl[0].file_size > MAX_SCANNED:
                        return []
                    with inner.open(pkl[0]) as fh:
                        data = fh.read(MAX_SCANNED)
            return sorted(set(pickle_gate.scan_bytes(self.path, data)))
        except Exception:  # a corrupt payload: the refusal stands without names
            return []


def tensor_meta(path: str, fqn: str, meta: Any) -> Meta:
    """A payload's ``tensor_meta``: a strided tensor of concrete sizes, or an error."""
    if type(meta) is not dict:
        raise FormatError(path, f"{fqn!r} has no tensor_meta")
    code = meta.get("dtype")
    dtype = SCALAR_TYPES.get(code) if type(code) is int else None
    if dtype is None:
        raise UnsupportedError(path, f"{fqn!r}: serialized dtype {code!r} is not supported")
    if meta.get("layout") != STRIDED:
        raise UnsupportedError(path, f"{fqn!r}: layout {meta.get('layout')!r} is not strided")
    sizes, strides = meta.get("sizes"), meta.get("strides")
    if type(sizes) is not list or type(strides) is not list or len(sizes) != len(strides):
        raise FormatError(path, f"{fqn!r}: sizes and strides do not match")
    if len(sizes) > MAX_DIMS:
        raise UnsupportedError(path, f"{fqn!r} has {len(sizes)} dimensions", limit=MAX_DIMS)
    shape = tuple(_int(path, fqn, s) for s in sizes)
    stride = tuple(_int(path, fqn, s) for s in strides)
    offset = _int(path, fqn, meta.get("storage_offset"))
    return Meta(dtype, shape, stride, offset, meta.get("requires_grad") is True)


def _int(path: str, fqn: str, value: Any) -> int:
    """A stored tensor's size, stride or offset: ``{"as_int": n}``, 0 <= n < 2**63."""
    n = value.get("as_int") if type(value) is dict and len(value) == 1 else None
    if type(n) is not int or not 0 <= n <= INT64_MAX:
        raise FormatError(path, f"{fqn!r}: size, stride or offset {str(value)[:60]} is not valid")
    return n


def signature(path: str, program: Any) -> Signature:
    """The program's input specs: which state_dict and constant names it takes."""
    specs = get(program, "graph_module", "signature", "input_specs")
    if type(specs) is not list:
        raise FormatError(path, "the program has no input_specs")
    out = Signature([], [], [], [], [])
    fields = {
        "parameter": ("parameter_name", out.parameters),
        "tensor_constant": ("tensor_constant_name", out.constants),
        "custom_obj": ("custom_obj_name", out.objects),
    }
    for spec in specs:
        if type(spec) is not dict or len(spec) != 1 or type(next(iter(spec.values()))) is not dict:
            raise FormatError(path, "the program's input_specs are malformed")
        ((kind, body),) = spec.items()
        if kind == "user_input":
            out.inputs.append(body.get("arg"))
            continue
        if kind == "buffer":
            name = body.get("buffer_name")
            persistent = body.get("persistent")
            target = out.buffers if persistent is not False else out.constants
        elif kind in fields:
            key, target = fields[kind]
            name = body.get(key)
        else:  # tokens, constant inputs: nothing stored
            continue
        if type(name) is not str or not name:
            raise FormatError(path, f"the program's {kind} input has no name")
        if name.count(".") > MAX_DEPTH:
            raise depth_error(path, FormatError, f"{name[:60]!r}...: module names ")
        target.append(name)
    return out


def get(node: Any, *keys: str) -> Any:
    """``node[k1][k2]...`` through dicts only; None where any step is not there."""
    for key in keys:
        node = node.get(key) if type(node) is dict else None
    return node


def state_dict_order(parameters: list[str], buffers: list[str]) -> list[str]:
    """Parameters and buffers (each in module order, as the program lists them) merged as
    ``module.state_dict()`` orders them: each module's parameters, its buffers, then its
    children's, depth first.  Where the two lists do not say which of two sibling
    modules comes first (one holds only parameters, the other only buffers), the one
    with parameters is put first."""
    tree: dict[str, _Node] = {"": _Node()}
    for kind, names in enumerate((parameters, buffers)):
        for name in names:
            module, _, _ = name.rpartition(".")
            node = _add(tree, module)
            node.own[kind].append(name)
            while module:  # record each child in its parent's order, for this list
                parent, _, child = module.rpartition(".")
                siblings = _add(tree, parent).children[kind]
                if module in siblings:  # and so are its ancestors
                    break
                siblings[module] = len(siblings)
                module = parent
    out: list[str] = []
    stack = [""]
    while stack:  # depth first, without recursion (names may nest deeply)
        node = tree[stack.pop()]
        out += node.own[0] + node.own[1]
        stack.extend(reversed(_merge(*node.children)))
    return out


class _Node:
    __slots__ = ("own", "children")

    def __init__(self) -> None:
        self.own: tuple[list[str], list[str]] = ([], [])
        self.children: tuple[dict[str, int], dict[str, int]] = ({}, {})


def _add(tree: dict[str, _Node], module: str) -> _Node:
    node = tree.get(module)
    if node is None:
        node = tree[module] = _Node()
    return node


def _merge(first: dict[str, int], second: dict[str, int]) -> list[str]:
    """Two orders of children merged consistently with both (ties: ``first``'s first)."""
    a, b = list(first), list(second)
    out: list[str] = []
    done: set[str] = set()
    i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] in done:
            i += 1
        elif j < len(b) and b[j] in done:
            j += 1
        elif j == len(b) or i < len(a) and (a[i] == b[j] or second.get(a[i], -1) < j):
            done.add(a[i])
            out.append(a[i])
            i += 1
        else:  # b[j] comes before a[i] in ``second``, or a is exhausted
            done.add(b[j])
            out.append(b[j])
            j += 1
    return out
