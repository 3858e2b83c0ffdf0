"""The checkpoint model every adapter reads into and writes from.

A :class:`Checkpoint` is an ordered mapping of *canonical* tensor names to
lazily loaded tensors, the *aliases* that share a canonical tensor's storage
(tied weights), the original container *structure* (a JSON-able tree, so that
formats without pickles can still record it) and free-form string metadata.

This module does not import torch at import time: listing a file must not pay
for torch, and a 20 GB file is only read when a tensor's ``load()`` is called.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from . import dtypes
from .errors import FormatError, NnconvError, UsageError
from .keys import ALIASES_KEY, STRUCTURE_KEY, VERSION_KEY

if TYPE_CHECKING:
    import torch

# Metadata keys nnconv owns.  Everything else is the user's, carried as is.
RESERVED_KEYS = (STRUCTURE_KEY, ALIASES_KEY, VERSION_KEY)
FORMAT_VERSION = "1"
ROOT_TENSOR_NAME = "tensor"
SCALARS = (type(None), bool, int, float, str)

# Limits on what a file or object may claim, checked before the work they bound: a
# crafted file gets one error with value and limit, not a RecursionError or an OOM.
# MAX_DEPTH: nested dict/list/tuple containers (torch.save'd or in nnconv.structure).
# Real checkpoints nest under 10; 100 keeps every recursive walk (and json's C parser,
# ~3 JSON levels per container) far below Python's recursion limit of 1000.
# MAX_TENSORS: names in one checkpoint, aliases included.  The largest public
# checkpoints (mixture-of-experts LLMs) hold ~10^5; at ~0.5 KB of bookkeeping per
# name, 10^7 stays within a few GB of memory.
MAX_DEPTH = 100
MAX_TENSORS = 10_000_000
# MAX_VIEW_EXPANSION: a tensor may hold at most this many times the bytes the file
# stores for it (its storage), plus VIEW_SLACK, and a checkpoint's tensors together
# as many times their storages: only stride-0 (``expand``) or overlapping views exceed
# 1x, and a state_dict's are small (HF ``position_ids``: 1x).  A crafted 600-byte view
# of 2^29 elements would otherwise become 2 GiB.  NNCONV_MAX_EXPANSION raises it.
# MAX_SHARED_NODES: container nodes and leaves walked again because a dict, list or
# tuple is referenced more than once (optimizers share small tuples between parameter
# groups); pickle memo references make 2^n of them from n levels of a few bytes each.
# INT64_MAX: the largest dimension, stride, offset or byte size torch can represent.
MAX_VIEW_EXPANSION = 16
VIEW_SLACK = 1 << 20
EXPANSION_ENV = "NNCONV_MAX_EXPANSION"
MAX_SHARED_NODES = 100_000
INT64_MAX = (1 << 63) - 1


class Span(NamedTuple):
    """Where a tensor's values lie in a file as raw little-endian C-order bytes.

    Readers set it when the format stores a tensor that way (safetensors, torch
    zip records, contiguous HDF5 datasets), so writers and verify can move and
    compare bytes without materialising tensors or importing torch.
    """

    path: str
    offset: int
    nbytes: int


class LazyTensor:
    """A tensor's dtype and shape now, its values when :meth:`load` is called."""

    __slots__ = ("dtype", "shape", "_load", "span", "_nbytes")

    def __init__(
        self,
        dtype: str,
        shape: tuple[int, ...],
        load: Callable[[], Any],
        span: Span | None = None,
    ) -> None:
        self.dtype = dtype
        self.shape = tuple(shape)
        self._load = load
        self.span = span
        self._nbytes = -1

    @property
    def numel(self) -> int:
        return dtypes.numel(self.shape)

    @property
    def nbytes(self) -> int:
        if self._nbytes < 0:  # cached: writers ask several times per tensor
            self._nbytes = self.numel * dtypes.DTYPES[self.dtype].itemsize
        return self._nbytes

    def load(self) -> torch.Tensor:
        """The values as a CPU ``torch.Tensor`` (possibly a read-only-backed mmap view)."""
        tensor: torch.Tensor = self._load()
        return tensor


@dataclass
class Checkpoint:
    """Tensors, aliases, container structure and metadata of one model file."""

    tensors: dict[str, LazyTensor]
    structure: Any
    aliases: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    format: str | None = None
    source: str | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def names(self) -> list[str]:
        """Every tensor name, aliases included, in the original order."""
        return [leaf["t"] for leaf in iter_leaves(self.structure)]

    def lazy(self, name: str) -> LazyTensor:
        return self.tensors[self.aliases.get(name, name)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def records(self) -> dict[str, str]:
        """Metadata plus nnconv's own records, as the string map formats store."""
        out = dict(self.metadata)
        out[VERSION_KEY] = FORMAT_VERSION
        # A plain {name: tensor} dict needs no record: readers rebuild it from the names
        # (and 50,000 optimizer vectors would spend ~2 µs each encoding it).
        if self.structure != flat_structure([*self.tensors, *self.aliases]):
            out[STRUCTURE_KEY] = json.dumps(
                self.structure, separators=(",", ":"), ensure_ascii=False
            )
        if self.aliases:
            out[ALIASES_KEY] = json.dumps(self.aliases, separators=(",", ":"), ensure_ascii=False)
        return out


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building or walking the bookkeeping of
    a checkpoint: 10^5 tensors make ~10^6 acyclic objects, and collection passes
    over them cost ~10 µs per tensor (measured), a third of a small-tensor conversion."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def flat_structure(names: list[str]) -> dict[str, Any]:
    """The structure of a plain ``{name: tensor}`` dict (what foreign files hold)."""
    return {"d": [[n, {"t": n}] for n in names]}


def from_records(
    subject: str, records: dict[str, str], names: list[str]
) -> tuple[Any, dict[str, str], dict[str, str]]:
    """Split stored metadata into (structure, aliases, user metadata) and check them."""
    check_count(subject, len(names), FormatError)
    metadata = {k: v for k, v in records.items() if k not in RESERVED_KEYS}
    aliases = _json(subject, records, ALIASES_KEY, "{}")
    structure = _json(subject, records, STRUCTURE_KEY, "null")
    if not isinstance(aliases, dict) or not all(isinstance(t, str) for t in aliases.values()):
        raise FormatError(subject, "nnconv.aliases metadata is not a map of names")
    check_count(subject, len(names) + len(aliases), FormatError)
    known = set(names)
    for alias, target in aliases.items():
        if target not in known:
            raise FormatError(subject, f"alias {alias!r} points to missing tensor {target!r}")
    if STRUCTURE_KEY not in records:  # a foreign file: a plain {name: tensor} dict
        structure = flat_structure(names + [a for a in aliases if a not in known])
    leaves = check_structure(subject, structure)
    if sorted(leaves) != sorted(known | set(aliases)):
        missing = sorted((known | set(aliases)) - set(leaves))[:5]
        raise FormatError(
            subject, f"nnconv.structure does not match the stored tensors (e.g. {missing})"
        )
    return structure, aliases, metadata


def check_count(subject: str | None, count: int, error: type = FormatError) -> None:
    """Refuse more than :data:`MAX_TENSORS` tensor names."""
    if count > MAX_TENSORS:
        raise error(
            subject,
            f"{count:,} tensors exceed nnconv's limit of {MAX_TENSORS:,}",
            value=count,
            limit=MAX_TENSORS,
            remedy="the file is corrupt or crafted",
        )


def max_view_expansion() -> int:
    """:data:`MAX_VIEW_EXPANSION`, or the value of ``NNCONV_MAX_EXPANSION`` when set."""
    raw = os.environ.get(EXPANSION_ENV)
    if raw is None:
        return MAX_VIEW_EXPANSION
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(None, f"{EXPANSION_ENV}={raw!r} is not a positive integer")
    return value


def check_expansion(subject: str | None, what: str, nbytes: int, held: int) -> None:
    """Refuse ``nbytes`` materialised from ``held`` stored bytes beyond the view limit."""
    factor = max_view_expansion()
    limit = factor * held + VIEW_SLACK
    if nbytes > limit:
        raise FormatError(
            subject,
            f"{what} spans {nbytes:,} bytes but the file holds {held:,} for it (a view "
            f"repeating its storage more than {factor}x)",
            value=nbytes,
            limit=limit,
            remedy=f"the file is corrupt or crafted; set {EXPANSION_ENV}=N to allow Nx",
        )


def depth_error(subject: str | None, error: type[NnconvError], where: str = "") -> NnconvError:
    problem = f"{where}containers nested more than {MAX_DEPTH} deep"
    remedy = "nnconv refuses deeper nesting: the file is corrupt or crafted"
    return error(subject, problem, value=MAX_DEPTH + 1, limit=MAX_DEPTH, remedy=remedy)


def _json(subject: str, records: dict[str, str], key: str, default: str) -> Any:
    """One of nnconv's JSON records; json's own RecursionError becomes a FormatError."""
    try:
        return json.loads(records.get(key, default))
    except RecursionError:
        raise depth_error(subject, FormatError, f"{key}: ") from None
    except (ValueError, TypeError) as exc:
        raise FormatError(subject, f"nnconv metadata is not valid JSON: {exc}") from None


def check_structure(subject: str, structure: Any) -> list[str]:
    """Validate a stored structure without recursion; return its tensor names in order.

    Every node must be a scalar or exactly what :func:`from_object` writes, nested at
    most :data:`MAX_DEPTH` containers deep, so :func:`to_object` cannot fail on it.
    """

    def bad(problem: str) -> FormatError:
        return FormatError(subject, f"nnconv.structure metadata is malformed: {problem}")

    names: list[str] = []
    stack: list[tuple[Any, int]] = [(structure, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, SCALARS):
            continue
        if not isinstance(node, dict):
            raise bad(f"a node is a {type(node).__name__}")
        kinds = [k for k in ("t", "l", "u", "d") if k in node]
        if len(kinds) != 1:
            raise bad(f"a node has {kinds or 'none'} of the keys t, l, u, d")
        body = node[kinds[0]]
        if kinds[0] == "t":
            if not isinstance(body, str):
                raise bad(f"tensor name {body!r} is not a string")
            names.append(body)
            continue
        if depth >= MAX_DEPTH:
            raise depth_error(subject, FormatError, "nnconv.structure: ")
        if not isinstance(body, list):
            raise bad(f"{kinds[0]!r} is not a list")
        if kinds[0] == "d":
            if not all(isinstance(p, list) and len(p) == 2 for p in body) or not all(
                isinstance(k, SCALARS) for k, _ in body
            ):
                raise bad("a dict entry is not a [scalar key, value] pair")
            if "m" in node and not isinstance(node["m"], dict):
                raise bad("OrderedDict _metadata is not an object")
            body = [value for _, value in body]
        stack.extend((child, depth + 1) for child in reversed(body))
    return names


def iter_leaves(node: Any) -> Iterator[dict[str, Any]]:
    """Tensor leaves of an encoded structure, depth first, in order (no recursion)."""
    stack = [node]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if "t" in node:
            yield node
        children = [*node.get("l", ()), *node.get("u", ()), *(c for _, c in node.get("d", ()))]
        stack.extend(reversed(children))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's values as contiguous little-endian bytes, without a copy when possible."""
    import torch

    flat = t.detach().reshape(-1)  # copies only when no flat view exists
    if flat.stride(0) != 1:  # a flat view of 0 or 1 elements may keep an odd stride
        flat = flat.clone(memory_format=torch.contiguous_format)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy().data).cast("B")
