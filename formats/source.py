"""A source classified once: the value ``convert``, ``verify``, ``inspect`` and golden
files take instead of a path.

Opening a path detects its format (content, then extension), finds what it holds
(plain tensors, a whole module, a TorchScript archive, a graph) and keeps what that
cost (the scanned pickle globals, a checkpoint already read), so no later step
detects, scans or parses the file again.  The checkpoint and the graph are read on
first use and kept until the source is closed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import registry
from .adapter import Adapter, Capabilities, Classified, Kind
from .checkpoint import Checkpoint


@dataclass(eq=False)
class Source:
    """One opened path (see the module docstring); close it, or use ``with``."""

    path: Path  # as given: a folder stays a folder
    file: Path  # what the adapter reads (a save_pretrained folder's pytorch_model.bin)
    adapter: Adapter
    classified: Classified
    trust_code: bool = False
    _checkpoint: Checkpoint | None = field(default=None, repr=False)
    _graph: Any = field(default=None, repr=False)

    @property
    def format(self) -> str:
        return self.adapter.NAME

    @property
    def kind(self) -> Kind:
        return self.classified.kind

    @property
    def capabilities(self) -> Capabilities:
        return self.adapter.CAPABILITIES

    @property
    def pickle_globals(self) -> tuple[str, ...] | None:
        return self.classified.pickle_globals

    def checkpoint(self) -> Checkpoint:
        """The weights, read once (lazily: tensors load when asked) and kept open."""
        if self._checkpoint is None:
            found = self.classified
            if found.checkpoint is not None:
                self._checkpoint, found.checkpoint = found.checkpoint, None
            elif found.reader is not None:
                self._checkpoint = found.reader(self.trust_code)
            elif self.kind == "graph":  # the graph parsed once, for its runner too
                graph, folder = self.graph(), self.file.parent
                self._checkpoint = self.adapter.from_graph(  # type: ignore[attr-defined]
                    graph, subject=self.file, folder=folder
                )
            else:
                self._checkpoint = self.adapter.read(self.file, trust_code=self.trust_code)
        return self._checkpoint

    def take(self) -> Checkpoint:
        """The checkpoint, handed over: the caller closes it, the source forgets it."""
        ckpt = self.checkpoint()
        self._checkpoint = None
        return ckpt

    def graph(self) -> Any:
        """The file's graph (``load_graph``), parsed once; only for formats holding one."""
        if self._graph is None:
            self._graph = self.adapter.load_graph(self.file)  # type: ignore[attr-defined]
        return self._graph

    def close(self) -> None:
        for ckpt in (self._checkpoint, self.classified.checkpoint):
            if ckpt is not None:
                ckpt.close()
        self._checkpoint = self.classified.checkpoint = None
        self._graph = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(
    path: str | os.PathLike[str] | Source, *, format: str | None = None, trust_code: bool = False
) -> Source:
    """Detect and classify ``path`` once (a :class:`Source` is returned as it is)."""
    if isinstance(path, Source):
        return path
    path = Path(path)
    adapter = registry.detect(path, format=format)
    file = registry.weights_file(path)
    classify = getattr(adapter, "classify", None)
    found = classify(file) if classify else Classified(adapter.CAPABILITIES.holds[0])
    return Source(path, file, adapter, found, trust_code)
