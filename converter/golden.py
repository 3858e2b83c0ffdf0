"""The tensors of ``nnconv verify``: inputs in, outputs named and paired, golden files.

Every side must run on the same inputs: an ``--inputs`` file, seeded random
tensors of ``--input-shape``, or of the shapes a side declares.  Outputs from
any runtime are flattened to named leaves (``output``, ``output.0``,
``output.logits``) so that two sides compare leaf by leaf.

A golden file freezes one verification's inputs and reference outputs, so a
later run (another machine, another runtime version) compares against them
without the reference model.  It is a safetensors file: tensors
``input.<name>`` and ``output.<leaf>``, and under the metadata key
:data:`GOLDEN_KEY` the input order and specs, the output names, the seed and
the versions that produced it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnconv.formats import dtypes
from nnconv.formats.errors import FormatError, UnsupportedError, UsageError
from nnconv.formats.keys import GOLDEN_KEY
from nnconv.formats.source import open_source

from .inputs import (
    InputSpec,
    default_names,
    derivation,
    example_tensors,
    input_specs,
    spec_of,
    tensor_items,
)
from .state_dicts import _first_line

if TYPE_CHECKING:
    import torch

MAX_DECLARED_INPUT_BYTES = 256 << 20  # random inputs a file's declared shapes may ask for

__all__ = [
    "GOLDEN_KEY",
    "Golden",
    "OutputAlignment",
    "align_outputs",
    "flatten",
    "is_golden",
    "load_golden",
    "read_inputs",
    "resolve_inputs",
    "save_golden",
]

MAX_DEPTH = 100  # outputs nested deeper than this are not a model's
PathLike = str | os.PathLike[str]


# --- flattening -----------------------------------------------------------------


def flatten(output: Any, prefix: str = "output") -> dict[str, torch.Tensor]:
    """Named tensor leaves of a forward pass's result, in order: ``output``, ``output.0``,
    ``output.logits``.  None and non-tensor leaves are skipped."""
    out: dict[str, torch.Tensor] = {}
    _flatten(output, prefix, out, 0)
    return out


def _flatten(value: Any, name: str, out: dict, depth: int) -> None:
    import torch

    if depth > MAX_DEPTH:
        raise UnsupportedError(None, f"{name}: outputs nested more than {MAX_DEPTH} deep")
    if isinstance(value, torch.Tensor):
        key, n = name, 1
        while key in out:  # a dict key holding a dot can repeat a name
            n += 1
            key = f"{name}#{n}"
        out[key] = value
        return
    for key, child in _children(value):
        if child is not None:
            _flatten(child, f"{name}.{key}", out, depth + 1)


def _children(value: Any) -> list[tuple[str, Any]]:
    """(name, child) of a container output: mappings (HF ModelOutput too), namedtuples,
    sequences, dataclasses, objects with ``keys()`` or ``to_tuple()``; [] for a leaf."""
    if isinstance(value, (str, bytes)):
        return []
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return list(zip(value._fields, value, strict=False))
    if isinstance(value, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    keys = getattr(value, "keys", None)
    if callable(keys) and hasattr(value, "__getitem__"):
        with contextlib.suppress(Exception):
            return [(str(k), value[k]) for k in keys()]
    to_tuple = getattr(value, "to_tuple", None)
    if callable(to_tuple):
        with contextlib.suppress(Exception):
            return [(str(i), v) for i, v in enumerate(to_tuple())]
    return []


# --- alignment ------------------------------------------------------------------


@dataclass
class OutputAlignment:
    """Output leaves paired across two sides; unpacks as ``pairs, missing, unexpected``."""

    pairs: list[tuple[str, torch.Tensor, torch.Tensor]]
    missing: list[str]  # reference leaves with no candidate counterpart
    unexpected: list[str]  # candidate leaves with no reference counterpart
    how: str  # "name" | "position"

    def __iter__(self) -> Iterator[Any]:
        return iter((self.pairs, self.missing, self.unexpected))

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected


def align_outputs(ref: dict[str, torch.Tensor], cand: dict[str, torch.Tensor]) -> OutputAlignment:
    """Pair by name when one side's names contain the other's (torch vs torch, ONNX vs
    ONNX), else by position (torch vs ONNX), under the reference's names."""
    shared = set(ref) & set(cand)
    if shared and (shared == set(ref) or shared == set(cand)):
        pairs = [(n, ref[n], cand[n]) for n in ref if n in cand]
        missing = [n for n in ref if n not in cand]
        return OutputAlignment(pairs, missing, [n for n in cand if n not in ref], "name")
    ref_items, cand_items = list(ref.items()), list(cand.items())
    pairs = [(rn, rt, ct) for (rn, rt), (_, ct) in zip(ref_items, cand_items, strict=False)]
    missing = [n for n, _ in ref_items[len(pairs) :]]
    unexpected = [n for n, _ in cand_items[len(pairs) :]]
    return OutputAlignment(pairs, missing, unexpected, "position")


# --- inputs -----------------------------------------------------------------------


def resolve_inputs(
    runners: Sequence[Any],
    *,
    shapes: Sequence[str] = (),
    dtype: str | None = None,
    inputs_file: PathLike | None = None,
    seed: int = 0,
    notes: list[str] | None = None,
    named: Sequence[InputSpec] = (),
) -> tuple[list[InputSpec], list[torch.Tensor]]:
    """The one set of inputs every side runs on: ``--inputs FILE``, else seeded random
    tensors of ``--input-shape``/``--input-dtype``, else of the first declared inputs
    (architecture record, ONNX graph), else derived from the first torch side's first
    layer (said in ``notes``).  Counts are checked against declared inputs."""
    declared = next((s for r in runners if r is not None and (s := r.input_specs())), None)
    if named:  # --input NAME=SHAPE[:DTYPE]: the user's names, each its own dtype
        if shapes or dtype or inputs_file is not None:
            raise UsageError(None, "--input excludes --input-shape, --input-dtype and --inputs")
        wanted = {s.name for s in declared or named}
        if {s.name for s in named} != wanted:
            raise UsageError(
                None,
                f"--input names {', '.join(s.name for s in named)}; the model takes "
                + ", ".join(s.name for s in declared or ()),
            )
        return list(named), list(example_tensors(list(named), seed=seed))
    if inputs_file is not None:
        if shapes or dtype:
            raise UsageError(None, "--inputs excludes --input-shape and --input-dtype")
        return _from_file(inputs_file, declared)
    if shapes:
        specs = input_specs(list(shapes), dtype)
        _check_count(None, len(specs), declared, "--input-shape gives")
        if declared:  # the declared names, so that a golden file records them
            specs = [
                dataclasses.replace(s, name=d.name) for s, d in zip(specs, declared, strict=True)
            ]
    elif declared:
        if dtype:
            dtypes.get(dtype)
        specs = [dataclasses.replace(s, dtype=dtype) if dtype else s for s in declared]
        check_declared_size(specs)
    else:
        specs = _derived(runners, dtype, notes)
    return specs, list(example_tensors(specs, seed=seed))


def _derived(runners: Sequence[Any], dtype: str | None, notes: list[str] | None):
    """Inputs derived from the first torch side's first layer (:func:`.inputs.derivation`),
    said in ``notes``; else the error names that layer."""
    modules = [r.module for r in runners if r is not None and getattr(r, "is_torch", False)]
    found = [derivation(m) for m in modules[:1]]
    if not found or found[0].specs is None:
        why = f", and {found[0].why_not}" if found and found[0].why_not else ""
        raise UsageError(
            None,
            f"no side declares its input shapes{why}",
            remedy=found[0].remedy if found else "pass --input-shape, batch first",
        )
    if dtype:
        dtypes.get(dtype)
    specs = [dataclasses.replace(s, dtype=dtype) if dtype else s for s in found[0].specs]
    if notes is not None:
        notes.append(found[0].note)
    return specs


def check_declared_size(specs: list[InputSpec]) -> None:
    """Shapes a file declares (record, ONNX graph) are claims: bound what they allocate."""
    total = sum(dtypes.numel(s.shape) * dtypes.get(s.dtype).itemsize for s in specs)
    if total > MAX_DECLARED_INPUT_BYTES:
        raise UsageError(
            None,
            f"the declared inputs ({', '.join(f'{s.name} {list(s.shape)}' for s in specs)}) "
            f"would take {total} bytes",
            value=total,
            limit=MAX_DECLARED_INPUT_BYTES,
            remedy="pass --input-shape to choose the input size",
        )


def _check_count(subject, count: int, declared: list[InputSpec] | None, what: str) -> None:
    if declared and count != len(declared):
        names = ", ".join(s.name for s in declared)
        raise UsageError(
            subject, f"{what} {count} input(s); the model takes {len(declared)} ({names})"
        )


def _from_file(
    path: PathLike | Any, declared: list[InputSpec] | None
) -> tuple[list[InputSpec], list[torch.Tensor]]:
    """A file's inputs, or the library's ``example_inputs`` (a tensor, tuple or dict)."""
    given = not isinstance(path, str | os.PathLike)
    if given:  # a library object, not a file: a usage question
        items = tensor_items(path, subject="example_inputs", error=UsageError)
    else:
        items = read_inputs(path)
    path = "example_inputs" if given else path
    _check_count(path, len(items), declared, "--inputs holds")
    names = [n for n, _ in items]
    if declared and None not in names and set(names) == {s.name for s in declared}:
        order = {n: i for i, n in enumerate(names)}
        items = [items[order[s.name]] for s in declared]  # by name, in the declared order
    elif declared:
        items = [(n or d.name, t) for (n, t), d in zip(items, declared, strict=True)]
    else:
        default = default_names(len(items))
        items = [(n or d, t) for (n, t), d in zip(items, default, strict=True)]
    specs = [spec_of(n, t) for n, t in items]
    return specs, [t for _, t in items]


# --- golden files -------------------------------------------------------------------


@dataclass
class Golden:
    """A golden file's inputs (specs and tensors, in order) and reference outputs."""

    inputs: list[InputSpec]
    tensors: list[torch.Tensor]
    outputs: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)  # seed, versions...


def save_golden(
    path: PathLike,
    inputs: list[InputSpec],
    tensors: list[torch.Tensor],
    outputs: dict[str, torch.Tensor],
    *,
    force: bool = False,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write a golden safetensors file atomically (``metadata``: seed, versions...)."""
    from nnconv.formats.objects import from_object

    from .convert import save

    if len(inputs) != len(tensors):
        raise UsageError(path, f"{len(inputs)} input specs for {len(tensors)} input tensors")
    if len({s.name for s in inputs}) != len(inputs):
        raise UsageError(path, "input names repeat: a golden file stores inputs by name")
    obj = {f"input.{s.name}": _copy(t) for s, t in zip(inputs, tensors, strict=True)}
    obj.update({f"output.{name}": _copy(t) for name, t in outputs.items()})
    record = {
        **(metadata or {}),
        "inputs": [s.to_json() for s in inputs],
        "outputs": list(outputs),
    }
    try:
        text = json.dumps(record, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(path, f"golden metadata is not plain JSON: {exc}") from None
    ckpt = from_object(obj, subject=str(path))
    ckpt.metadata = {GOLDEN_KEY: text}
    save(ckpt, path, format="safetensors", force=force)


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy: no storage shared with another entry (no alias records)."""
    return t.detach().to("cpu", copy=True).contiguous()


def is_golden(path: PathLike) -> bool:
    """Whether ``path`` is a file carrying golden metadata (read lazily); never raises."""
    try:
        with open_source(path) as source:
            return GOLDEN_KEY in source.checkpoint().metadata
    except Exception:
        return False


def load_golden(path: PathLike) -> Golden:
    """Read a golden file; anything else (another safetensors file, junk) is a FormatError."""
    from .convert import load

    path = Path(path)
    if not is_golden(path):
        raise FormatError(path, f"not an nnconv golden file (no {GOLDEN_KEY} metadata)")
    with load(path, format="safetensors") as ckpt:
        try:
            record = json.loads(ckpt.metadata[GOLDEN_KEY])
            specs = [InputSpec.from_json(s) for s in record["inputs"]]
            names = [str(n) for n in record["outputs"]]
            tensors = [ckpt.lazy(f"input.{s.name}").load().clone() for s in specs]
            outputs = {n: ckpt.lazy(f"output.{n}").load().clone() for n in names}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise FormatError(
                path, f"malformed golden file ({type(exc).__name__}: {exc})"
            ) from None
    for spec, t in zip(specs, tensors, strict=True):
        if tuple(t.shape) != spec.shape or str(t.dtype).removeprefix("torch.") != spec.dtype:
            raise FormatError(path, f"input {spec.name!r} does not match its recorded spec")
    extra = {k: v for k, v in record.items() if k not in ("inputs", "outputs")}
    return Golden(specs, tensors, outputs, extra)


def read_inputs(path: PathLike) -> list[tuple[str | None, torch.Tensor]]:
    """``--inputs FILE``: (name or None, tensor) in the file's order.  ``.npz`` (numpy,
    no pickles), ``.pt`` (``torch.load(weights_only=True)`` of a tensor, list, tuple or
    dict), ``.safetensors`` (a golden file gives its inputs)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FormatError(path, "no such file")
    if suffix == ".npz":
        return _read_npz(path)
    if suffix in (".pt", ".pth"):
        return tensor_items(_torch_load(path), subject=path)
    if suffix == ".safetensors":
        if is_golden(path):
            golden = load_golden(path)
            return [(s.name, t) for s, t in zip(golden.inputs, golden.tensors, strict=True)]
        from nnconv.formats.objects import to_object

        from .convert import load

        with load(path, format="safetensors") as ckpt:
            obj = to_object(ckpt)
            return [(n, t.clone()) for n, t in tensor_items(obj, subject=path)]
    raise UsageError(path, "--inputs takes a .npz, .pt or .safetensors file")


def _read_npz(path: Path) -> list[tuple[str | None, torch.Tensor]]:
    import zipfile

    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = [(name, npz[name]) for name in npz.files]
        return [(name, torch.from_numpy(np.array(a, copy=True))) for name, a in arrays]
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        raise FormatError(path, f"cannot read the .npz inputs: {exc}") from None


def _torch_load(path: Path) -> Any:
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise FormatError(
            path, f"cannot read the inputs with weights_only torch.load: {_first_line(exc)}"
        ) from None
