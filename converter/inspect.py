"""What a model file holds: tensors, dtypes, shapes, metadata and module tree.

The report is built from headers only: :func:`inspect` never loads a tensor's
values, and for safetensors and HDF5 it never imports torch, so inspecting a
70B-parameter file takes as long as reading its header.  The report is plain
data: ``render()`` gives the text ``nnconv inspect`` prints, ``to_json()`` the
object ``nnconv inspect --json`` prints.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from nnconv.formats.checkpoint import Checkpoint
from nnconv.formats.keys import (
    ALIASES_KEY,
    ARCHITECTURE_KEY,
    DEQUANTIZED_KEY,
    QUANT_KEY,
    STRUCTURE_KEY,
)
from nnconv.formats.source import Source, open_source

from . import quantization
from . import record as arch
from .convert import weights
from .layers import ModuleNode, build_tree

PathLike = str | os.PathLike[str]

MAX_VALUE = 80  # metadata values longer than this are cut in render()
MAX_NAME_COLUMN = 60  # longer names overflow the table column rather than widen it
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


@dataclass(frozen=True)
class TensorRow:
    """One tensor name; ``alias_of`` names the canonical tensor a tied name shares."""

    name: str
    dtype: str  # torch's name without "torch.", e.g. "bfloat16"
    shape: tuple[int, ...]
    nbytes: int  # the data's size; for an alias, that of the tensor it shares
    alias_of: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "alias_of": self.alias_of,
        }


@dataclass(frozen=True)
class InspectReport:
    """Everything ``nnconv inspect`` shows, computed once and detached from the file."""

    path: str
    format: str
    metadata: dict[str, str]  # the user's metadata (nnconv's own records removed)
    tensors: list[TensorRow]  # every name in file order, aliases included
    parameters: int  # elements of the canonical tensors (aliases counted once)
    nbytes: int  # bytes of the canonical tensors
    tree: ModuleNode
    architecture: dict[str, Any] | None = None  # nnconv's record, when the file has one
    # pt files: every global their pickles reference, sorted (None for other formats).
    globals: list[str] | None = None

    @property
    def aliases(self) -> int:
        return sum(row.alias_of is not None for row in self.tensors)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: a stable contract for scripts (``nnconv inspect --json``)."""
        return {
            "path": self.path,
            "format": self.format,
            "metadata": dict(self.metadata),
            "tensors": [row.to_json() for row in self.tensors],
            "parameters": self.parameters,
            "nbytes": self.nbytes,
            "tree": self.tree.to_json(),
            "architecture": self.architecture,
            "globals": None if self.globals is None else list(self.globals),
        }

    def render(self, *, table: bool = True, tree: bool = True) -> str:
        """Text for a terminal: summary, metadata, tensor table, then the module tree.

        Names and values come from the file, so control characters are escaped
        (a crafted name must not drive the terminal).
        """
        count = len(self.tensors) - self.aliases
        tied = f" (+{self.aliases:,} tied {_plural(self.aliases, 'name')})" if self.aliases else ""
        lines = [
            f"File:        {_clean(self.path)}",
            f"Format:      {self.format}",
            f"Tensors:     {count:,}{tied}",
            f"Parameters:  {self.parameters:,}",
            f"Size:        {human_bytes(self.nbytes)} ({self.nbytes:,} bytes)",
        ]
        dtypes = Counter(row.dtype for row in self.tensors if row.alias_of is None)
        if dtypes:
            lines.append("Dtypes:      " + ", ".join(f"{d} ({n:,})" for d, n in dtypes.items()))
        if self.globals is not None:
            names = ", ".join(_clean(g) for g in self.globals) or "(none)"
            lines.append(f"Globals:     {names}")
        if self.metadata:
            lines.append("Metadata:")
            lines += [f"  {_clean(k)}: {_summary(k, v)}" for k, v in self.metadata.items()]
        if self.architecture:
            lines += ["", "Architecture record:"]
            lines += [f"  {_clean(line)}" for line in arch.summary(self.architecture)]
        if not self.tensors:
            lines += ["", "No tensors."]
            return "\n".join(lines)
        if table:
            lines += ["", *_table(self.tensors, quantization.types_record(self.metadata))]
        if tree:
            lines += ["", *render_tree(self.tree, self.tensors)]
        return "\n".join(lines)


def inspect(
    path: PathLike, *, format: str | None = None, trust_code: bool = False
) -> InspectReport:
    """Describe a model file without loading its tensor values.

    ``format`` overrides detection; ``trust_code`` lets a pt file reference
    globals outside the allowlist (its pickle code runs: trusted files only).
    """
    with open_source(path, format=format, trust_code=trust_code) as source:
        ckpt = weights(source)
        names = [str(n) for n in ckpt.names()]
        listed = set(names)
        names += [n for n in ckpt.tensors if n not in listed]  # defensive: never drop one
        rows = []
        for name in names:
            canonical = ckpt.aliases.get(name, name)
            lazy = ckpt.tensors[canonical]
            rows.append(
                TensorRow(
                    name=name,
                    dtype=str(lazy.dtype).removeprefix("torch."),
                    shape=tuple(int(d) for d in lazy.shape),
                    nbytes=lazy.nbytes,
                    alias_of=canonical if canonical != name else None,
                )
            )
        return InspectReport(
            path=str(path),
            format=ckpt.format or "",
            metadata=dict(ckpt.metadata),
            tensors=rows,
            parameters=ckpt.numel,
            nbytes=ckpt.nbytes,
            tree=build_tree((r.name, r.dtype, r.shape) for r in rows),
            architecture=_architecture(ckpt),
            globals=_describe(source).get("globals"),
        )


def _describe(source: Source) -> dict[str, Any]:
    """What the format's adapter adds for ``inspect`` (pt: the globals its pickles name)."""
    describe = getattr(source.adapter, "describe", None)
    return describe(source.file, source.classified) if describe else {}


def _architecture(ckpt: Checkpoint) -> dict[str, Any] | None:
    text = ckpt.metadata.get(ARCHITECTURE_KEY)
    return None if text is None else arch.loads(text, ckpt.source)


# --- text helpers -------------------------------------------------------------


def human_bytes(n: int) -> str:
    """``1258291`` -> ``"1.2 MiB"``; below 1 KiB, exact bytes."""
    if n < 1024:
        return f"{n} B"
    value, unit = float(n), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{value:.1f} {_UNITS[unit]}"


def format_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def _clean(text: str) -> str:
    """Control and other non-printable characters escaped; empty text shown as ''."""
    if not text:
        return "''"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _summary(key: str, value: str) -> str:
    """A metadata value for one line: nnconv's JSON records summarised, long values cut."""
    if key == ARCHITECTURE_KEY:
        return f"(architecture record, {len(value):,} chars of JSON; shown below)"
    if key.startswith(STRUCTURE_KEY):
        return f"(container layout, {len(value):,} chars of JSON)"
    if key in (QUANT_KEY, DEQUANTIZED_KEY):  # GGUF: GGML types
        types = quantization.types_record({key: value}, key)
        how = "dequantised when read" if key == QUANT_KEY else "values dequantised"
        return f"({how} from {quantization.summary(types)})"
    if key.startswith(ALIASES_KEY):
        try:
            return f"({len(json.loads(value)):,} tied names)"
        except (ValueError, TypeError):
            return f"({len(value):,} chars of JSON)"
    if len(value) > MAX_VALUE:
        value = value[: MAX_VALUE - 1] + f"… ({len(value):,} chars)"
    return _clean(value)


def _table(rows: list[TensorRow], stored: dict[str, str] | None = None) -> list[str]:
    """Aligned columns: name, dtype (and the GGML type a tensor was dequantised from),
    shape, bytes (``= canonical`` for tied names)."""
    stored = stored or {}
    cells = [
        (
            _clean(r.name),
            f"{r.dtype} ({_clean(stored[r.name])})" if r.name in stored else r.dtype,
            format_shape(r.shape),
            f"= {_clean(r.alias_of)}" if r.alias_of is not None else human_bytes(r.nbytes),
        )
        for r in rows
    ]
    header = ("name", "dtype", "shape", "bytes")
    widths = [max(len(header[i]), *(len(c[i]) for c in cells)) for i in range(3)]
    widths[0] = min(widths[0], MAX_NAME_COLUMN)
    size_width = max([len(c[3]) for c in cells if not c[3].startswith("=")] + [5])
    lines = []
    for name, dtype, shape, size in [header, *cells]:
        size = size if size.startswith("=") else size.rjust(size_width)
        line = f"  {name.ljust(widths[0])}  {dtype.ljust(widths[1])}  {shape.ljust(widths[2])}"
        lines.append(f"{line}  {size}")
    return lines


def render_tree(root: ModuleNode, rows: list[TensorRow]) -> list[str]:
    """The hierarchy drawn with box characters; a node with a kind hides its own tensors.

    ::

        (root)
        ├── hidden: Linear(20 → 256)
        └── output: Linear(256 → 10)
    """
    info = {row.name: (index, row) for index, row in enumerate(rows)}
    lines = [_label("(root)", root)]
    _branch(root, "", lines, info)
    return lines


def _label(name: str, node: ModuleNode) -> str:
    return f"{name}: {node.kind}" if node.kind else name


def _branch(
    node: ModuleNode, prefix: str, lines: list[str], info: dict[str, tuple[int, TensorRow]]
) -> None:
    entries: list[tuple[int, ModuleNode | str]] = [(c.first, c) for c in node.children]
    if node.kind is None:
        entries += [(info[t][0], t) for t in node.tensors]
    entries.sort(key=lambda entry: entry[0])
    for i, (_, entry) in enumerate(entries):
        last = i == len(entries) - 1
        connector = "└── " if last else "├── "
        if isinstance(entry, str):
            row = info[entry][1]
            leaf = f"{_clean(node.local(entry))} {format_shape(row.shape)} {row.dtype}"
            if row.alias_of is not None:
                leaf += f" = {_clean(row.alias_of)}"
            lines.append(prefix + connector + leaf)
        else:
            lines.append(prefix + connector + _label(_clean(entry.name), entry))
            _branch(entry, prefix + ("    " if last else "│   "), lines, info)
