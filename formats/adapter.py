"""The adapter protocol: what one format folder gives the rest of nnconv.

Every format lives in its own folder under ``formats/`` and exposes one adapter
module with the names below; :mod:`.registry` builds a read-only mapping from
them, and ``nnconv.converter`` reaches a format only through that mapping and
the :class:`~.source.Source` it opens.  Whatever a format can do beyond reading
tensors is *declared* in :class:`Capabilities` (options it accepts, what kinds of
source it holds, how a graph in it runs), so the engine asks instead of testing
format names.

Optional hooks, looked up with ``getattr``:

``classify(path) -> Classified``
    What the file holds, found once (pt: plain tensors, a whole-module pickle or
    a TorchScript archive, with the pickle globals it scanned); without it a file
    is ``Capabilities.holds[0]`` and is read with ``read``.
``load_graph(path)``
    The file's graph object for a format whose ``holds`` include ``"graph"``.
``from_graph(graph, *, subject, folder) -> Checkpoint``
    The weights of an in-memory graph (an export nnconv just made).
``describe(path, classified) -> dict``
    What ``inspect`` adds for this format (JSON-able), beyond names and shapes.
``program(path)``, ``declared_inputs(path)``
    For a format whose files run in a runtime other than onnxruntime (``.pt2``): the
    program's description and its inputs as (name, shape, dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .options import WriteOptions

Kind = Literal["weights", "module", "torchscript", "graph"]
KINDS: tuple[Kind, ...] = ("weights", "module", "torchscript", "graph")
COMMON_OPTIONS = frozenset({"force", "progress", "fsync"})  # every writer honours these


@dataclass(frozen=True)
class Capabilities:
    """What a format can do, declared once, checked by the engine."""

    writes: bool = False  # ``write`` stores any checkpoint
    write_options: frozenset[str] = frozenset()  # WriteOptions fields beyond COMMON_OPTIONS
    holds: tuple[Kind, ...] = ("weights",)  # what a file of it can be; the first is the default
    runtime: str | None = None  # what runs its files ("onnxruntime", "torch.export")
    exported: bool = False  # written by exporting a module (a graph), not by ``write``
    dtypes: frozenset[str] | None = None  # the dtypes it stores; None: all of dtypes.DTYPES
    metadata: bool = True  # keeps free-form metadata (so a cast is recorded in the file)
    reserved_names: frozenset[str] = frozenset()  # tensor names it keeps for itself

    def __post_init__(self) -> None:
        unknown = set(self.holds) - set(KINDS)
        if unknown or not self.holds:
            raise ValueError(f"holds must be drawn from {KINDS}, got {self.holds}")
        if "graph" in self.holds and self.runtime is None:
            raise ValueError("a format holding a graph names the runtime that runs it")


@dataclass
class Classified:
    """A file's kind and what finding it cost, kept so nothing is read twice."""

    kind: Kind
    pickle_globals: tuple[str, ...] | None = None  # scanned without unpickling (pt)
    checkpoint: Checkpoint | None = None  # already read while classifying (plain tensors)
    reader: Callable[[bool], Checkpoint] | None = None  # read(trust_code) reusing the scan
    extra: dict[str, object] = field(default_factory=dict)


class Adapter(Protocol):
    """One format's module (see the module docstring for the optional hooks)."""

    NAME: str
    EXTENSIONS: tuple[str, ...]
    DESCRIPTION: str
    FEATURES: str
    CAPABILITIES: Capabilities

    def sniff(self, path: Path, head: bytes) -> bool: ...

    def read(self, path: Path, *, trust_code: bool = False) -> Checkpoint: ...

    def write(self, ckpt: Checkpoint, path: Path, *, options: WriteOptions = ...) -> None: ...
