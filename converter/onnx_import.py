"""Map an ONNX file's initializers back to a PyTorch module's ``state_dict`` keys.

Exporters rename what they optimise: a Linear's weight is stored transposed as
``onnx::MatMul_123`` (TorchScript) or ``val_12`` (dynamo), BatchNorm is folded into
the Conv before it (dynamo keeps ``conv.weight`` as the folded tensor's name) and
equal initializers are merged.  So the user's module, filled with distinct values,
is exported once the way the file probably was: that reference shows by value which
initializer holds which key and how; aligning the graphs finds each one in the file.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from nnconv.formats.checkpoint import Checkpoint, LazyTensor, flat_structure, tensor_bytes
from nnconv.formats.errors import UnsupportedError
from nnconv.formats.keys import EXPORTER_KEY, MAPPING_KEY, OPTIMIZED_KEY
from nnconv.formats.registry import holds_graph
from nnconv.formats.source import Source, open_source

from . import hf
from .export import quiet as quiet_exporters
from .inputs import example_tensors, graph_inputs

if TYPE_CHECKING:
    import torch

COUNTERS = ("num_batches_tracked",)  # non-trainable state exporters drop
TORCHSCRIPT_OPSETS = range(7, 21)
DYNAMO_OPSETS = range(18, 24)
GENERATED = re.compile(r"onnx::.*|val_\d+")  # exporter-numbered initializer names


@dataclass(frozen=True)
class MappingRow:
    """Where one state_dict key came from; ``how`` "shape" is a guess worth a warning."""

    key: str
    initializer: str | None
    how: str  # "name" | "value" | "shape" | "module default"
    transform: str  # "identity" | "transposed" | "reshaped"


@dataclass
class ImportResult:
    """A state_dict-named checkpoint and the evidence for every key in it."""

    checkpoint: Checkpoint
    mapping: list[MappingRow]
    missing: list[str]
    unused: list[str]  # initializers no key came from (folded constants, shape tensors)
    notes: list[str] = field(default_factory=list)

    @property
    def guesses(self) -> list[MappingRow]:
        return [row for row in self.mapping if row.how == "shape"]


def map_to_state_dict(
    onnx_ckpt: Checkpoint,
    module: torch.nn.Module,
    *,
    allow_missing: bool = False,
    source: Source | str | os.PathLike[str] | None = None,
) -> ImportResult:
    """For every key of ``module.state_dict()``, the ONNX initializer that holds it
    (``source``: the graph file, by default the checkpoint's own)."""
    if source is None and holds_graph(onnx_ckpt.format) and onnx_ckpt.source:
        source = onnx_ckpt.source
    if source is not None and not isinstance(source, Source):
        with open_source(source) as opened:
            return map_to_state_dict(onnx_ckpt, module, allow_missing=allow_missing, source=opened)
    import torch

    lazy_params = torch.nn.parameter.UninitializedParameter
    if source is not None and any(isinstance(p, lazy_params) for p in module.parameters()):
        # Lazy modules learn their shapes from one forward pass on the graph's inputs.
        with torch.no_grad():
            module(*example_tensors(graph_inputs(source.graph().graph)[0]))
    state = {k: v.detach() for k, v in module.state_dict().items()}
    files = onnx_ckpt.tensors
    notes: list[str] = []
    found: dict[str, tuple[str | None, str, str]] = {}  # key -> (initializer, how, transform)
    for key, value in state.items():
        lazy = files.get(key)
        if lazy is not None and (lazy.shape, lazy.dtype) == _spec(value):
            found[key] = (key, "name", "identity")
    for group in hf.tie_groups(state):  # one name of a tie found: the others are it
        hit = next((found[k] for k in group if k in found), None)
        found.update({k: (hit[0], "tied", hit[2]) for k in group if hit and k not in found})
    unmapped = any(k not in found and not _is_counter(k) for k in state)
    ref = _Reference.build(module, source, onnx_ckpt, notes) if unmapped and source else None
    if unmapped and source is None:
        notes.append("no ONNX file to read the graph from: matched by name and shape only")
    suspects: set[str] = set()
    if ref is not None:
        for key in state:
            learned = ref.learned.get(key)
            if learned and (key not in found or ref.contradicts(key)):
                found[key] = (learned[0], "value", learned[1])
            elif key in found and ref.suspicious(key, state[key]):
                suspects.add(key)
    for key in state:
        if key not in found and _is_counter(key) and key not in files:
            found[key] = (None, "module default", "identity")
    _shape_fallback(state, files, found, suspects, ref, notes)
    missing = [k for k in state if k not in found]
    if suspects:  # folding consumes other state; with nothing else missing, none happened
        notes.append(
            f"{', '.join(sorted(suspects))}: the reference export folds these, so the file's "
            "tensors of those names may hold folded values: "
            + ("not used" if missing else "used, as no other key is missing")
        )
        if missing:
            found = {k: v for k, v in found.items() if k not in suspects}
            missing = [k for k in state if k not in found]
    if missing and not allow_missing:
        raise UnsupportedError(
            onnx_ckpt.source,
            f"{len(missing)} state_dict key(s) have no initializer in the ONNX file: "
            f"{', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}",
            value=missing,
            remedy=_remedy(missing, state, files, notes),
        )
    return _result(onnx_ckpt, state, found, missing, notes)


def _spec(value) -> tuple[tuple[int, ...], str]:
    return tuple(value.shape), str(value.dtype).removeprefix("torch.")


def _is_counter(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in COUNTERS


def _swapped(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    return (*shape[:-2], shape[-1], shape[-2]) if len(shape) >= 2 else None


@dataclass
class _Reference:
    """The user's module exported like the file, its initializers matched to keys by value."""

    names: set[str]  # the reference export's initializer names
    by_key: dict[str, list[tuple[str, str]]]  # key -> [(reference initializer, transform)]
    learned: dict[str, tuple[str, str]]  # key -> (file initializer, transform)
    unmatched_shapes: set[tuple[int, ...]]  # shapes of reference values matching no key
    explained: set[str]  # file initializers the reference accounts for

    @classmethod
    def build(cls, module, source: Source, onnx_ckpt: Checkpoint, notes: list[str]):
        try:
            file_model = source.graph()
            proto, filled = _export_reference(module, file_model, onnx_ckpt, notes)
        except Exception as exc:  # exporters fail in many model-specific ways
            text = str(exc).strip().splitlines()
            notes.append(f"reference export failed: {text[0][:300] if text else type(exc)}")
            return None
        ref = source.adapter.from_graph(proto, subject="reference export", folder=None)
        index = _value_index(filled)
        by_key: dict[str, list[tuple[str, str]]] = {}
        unmatched = set()
        for name, lazy in ref.tensors.items():
            hits = _value_hits(index, lazy, filled)
            for key, transform in hits:
                by_key.setdefault(key, []).append((name, transform))
            if not hits:
                unmatched.add(lazy.shape)
        to_file = _translate(proto, file_model, ref, onnx_ckpt)
        learned = {}
        for key, hits in by_key.items():
            usable = sorted((t != "identity", to_file[n], t) for n, t in hits if n in to_file)
            if usable:
                learned[key] = usable[0][1:]
        return cls(set(ref.tensors), by_key, learned, unmatched, set(to_file.values()))

    def contradicts(self, key: str) -> bool:
        """The reference's initializer called ``key`` does not hold ``key`` unchanged."""
        return key in self.names and (key, "identity") not in self.by_key.get(key, [])

    def suspicious(self, key: str, value) -> bool:
        """A name match the reference does not back: the value may have been folded."""
        if key in self.by_key:
            return False
        return key in self.names or tuple(value.shape) in self.unmatched_shapes


def _export_reference(module, file_model, onnx_ckpt: Checkpoint, notes: list[str]):
    """(ModelProto, state of the filled copy): the module exported like the file."""
    import onnx
    import torch

    specs, axes, keep = graph_inputs(file_model.graph)
    exporter = _guess_exporter(file_model, onnx_ckpt.metadata)
    fold = onnx_ckpt.metadata.get(OPTIMIZED_KEY, "1") != "0"
    opset = next((o.version for o in file_model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in (TORCHSCRIPT_OPSETS if exporter == "torchscript" else DYNAMO_OPSETS):
        notes.append(f"reference export uses the exporter's default opset, not {opset}")
        opset = None
    notes.append(f"reference export: {exporter}, constant folding {'on' if fold else 'off'}")
    filled = copy.deepcopy(module).cpu().eval()
    _fill_distinct(filled)
    state = {k: v.detach() for k, v in filled.state_dict().items()}
    args, names = example_tensors(specs, seed=0), [s.name for s in specs]
    kwargs = None
    if hf.is_model(filled):  # a transformers model is called by keyword, as it was exported
        kwargs, args = dict(zip(names, args, strict=True)), ()
    with quiet_exporters():  # not under no_grad: that takes fast paths no exporter knows
        if exporter == "dynamo":
            dims: dict[str, object] = {}
            shapes = [
                {i: dims.setdefault(p, torch.export.Dim(_ident(p))) for i, p in axes[n].items()}
                for n in names
            ]
            dynamic = dict(zip(names, shapes, strict=True)) if kwargs else tuple(shapes)
            program = torch.onnx.export(
                filled,
                args,
                kwargs=kwargs,
                dynamo=True,
                optimize=fold,
                input_names=names,
                verbose=False,
                dynamic_shapes=dynamic if dims else None,
                opset_version=opset,
            )
            return program.model_proto, state
        buf = io.BytesIO()
        torch.onnx.export(
            filled,
            args,
            buf,
            kwargs=kwargs,
            dynamo=False,
            do_constant_folding=fold,
            input_names=names,
            dynamic_axes={n: a for n, a in axes.items() if a} or None,
            opset_version=opset,
            keep_initializers_as_inputs=keep,
        )
    return onnx.load_model_from_string(buf.getvalue()), state


def _guess_exporter(model, meta: dict[str, str]) -> str:
    if meta.get(EXPORTER_KEY) in ("dynamo", "torchscript"):
        return meta[EXPORTER_KEY]
    names = [t.name for t in model.graph.initializer] + [n.name for n in model.graph.node]
    if any(n.startswith(("onnx::", "/")) for n in names):
        return "torchscript"
    return "dynamo" if any(re.fullmatch(r"val_\d+|node_.*", n) for n in names) else "torchscript"


def _ident(text: str) -> str:
    name = re.sub(r"\W", "_", text)
    return name if name[:1].isalpha() else f"d_{name}"


def _fill_distinct(module) -> None:
    """Distinct random floats everywhere, so no two tensors are merged and values identify keys."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in module.state_dict(keep_vars=True).values():
            if value.is_floating_point() or value.is_complex():
                noise = torch.rand(value.shape, generator=gen, dtype=torch.float64) + 0.5
                value.copy_(noise.to(value.dtype))


def _digest(t) -> bytes:
    return hashlib.blake2b(tensor_bytes(t), digest_size=16).digest()


def _value_index(state: dict) -> dict[tuple, list[tuple[str, str]]]:
    """(dtype, numel, digest) -> [(key, "identity" | "transposed")] for the filled state."""
    index: dict[tuple, list[tuple[str, str]]] = {}
    for key, value in state.items():
        views = [("identity", value)] + ([("transposed", value.mT)] if value.dim() >= 2 else [])
        for base, view in views:
            entry = (_spec(value)[1], value.numel(), _digest(view.contiguous()))
            index.setdefault(entry, []).append((key, base))
    return index


def _value_hits(index, lazy: LazyTensor, state: dict) -> list[tuple[str, str]]:
    hits = []
    candidates = index.get((lazy.dtype, lazy.numel, _digest(lazy.load())), [])
    for key, base in candidates:
        shape = tuple(state[key].shape)
        if base == "identity":
            hits.append((key, "identity" if lazy.shape == shape else "reshaped"))
        elif lazy.shape == _swapped(shape):
            hits.append((key, "transposed"))
    return hits


def _translate(ref_model, file_model, ref: Checkpoint, onnx_ckpt: Checkpoint) -> dict[str, str]:
    """Reference initializer -> the file's: by graph position when the graphs align, else name."""
    files = onnx_ckpt.tensors
    ref_nodes, _ = _nodes(ref_model.graph)
    file_nodes, file_alias = _nodes(file_model.graph)
    aligned = _align(ref_nodes, file_nodes, set(ref.tensors), file_alias)
    out = {}
    for name, lazy in ref.tensors.items():
        if aligned is not None:
            candidates = aligned.get(name, [])
        else:  # numbered names mean different tensors in different graphs
            candidates = [] if GENERATED.fullmatch(name) else [file_alias(name)]
        for candidate in candidates:
            other = files.get(candidate)
            if other is not None and (other.shape, other.dtype) == (lazy.shape, lazy.dtype):
                out[name] = candidate
                break
    return out


def _nodes(graph):
    """(nodes, resolve) without the ``Identity(initializer)`` nodes merged duplicates become."""
    inits = {t.name for t in graph.initializer}
    alias = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.input[0] in inits
    }
    nodes = [n for n in graph.node if not (n.output and n.output[0] in alias)]
    return nodes, lambda name: alias.get(name, name)


def _align(ref_nodes, file_nodes, ref_inits: set[str], file_alias) -> dict[str, list[str]] | None:
    """Reference initializer -> the one file value used at the same node inputs, if one is."""

    def signature(nodes):
        return [(n.op_type, n.domain, len(n.output)) for n in nodes]  # optimisers drop inputs

    if signature(ref_nodes) != signature(file_nodes):
        return None
    seen: dict[str, set[str]] = {}
    for ref_node, file_node in zip(ref_nodes, file_nodes, strict=True):
        for ref_in, file_in in zip(ref_node.input, file_node.input, strict=False):
            if ref_in in ref_inits:
                seen.setdefault(ref_in, set()).add(file_alias(file_in))
    return {r: sorted(names) for r, names in seen.items() if len(names) == 1}


def _shape_fallback(state, files, found, suspects, ref, notes: list[str]) -> None:
    """Keys still unmatched take the one unexplained initializer of their (transposed) shape."""
    used = {v[0] for v in found.values()}
    known = ref.explained if ref is not None else set()
    pool = {n: t for n, t in files.items() if n not in used and n not in known}
    options: dict[str, list[tuple[str, str]]] = {}
    for key in (k for k in state if k not in found and k not in suspects):
        shape, dtype = _spec(state[key])
        for name, lazy in pool.items():
            if lazy.dtype != dtype or lazy.numel < 2 or shape == _swapped(shape):
                continue  # scalars tell nothing; a square matrix could be either way round
            transform = {shape: "identity", _swapped(shape): "transposed"}.get(lazy.shape)
            if transform:
                options.setdefault(key, []).append((name, transform))
    claims = Counter(name for hits in options.values() for name, _ in hits)
    for key, hits in options.items():
        if len(hits) == 1 and claims[hits[0][0]] == 1:
            found[key] = (hits[0][0], "shape", hits[0][1])
            notes.append(f"{key}: matched to {hits[0][0]!r} by shape alone ({hits[0][1]})")


def _remedy(missing: list[str], state: dict, files: dict, notes: list[str]) -> str:
    other = next((k for k in missing if k in files and files[k].dtype != _spec(state[k])[1]), None)
    if other is not None:
        return f"the file holds {other} as {files[other].dtype}: convert the module first"
    hint = "".join(f"{n}; " for n in notes if "failed" in n or "folded" in n)
    return hint + (
        "export again without --optimize (nnconv exports unoptimised by default), "
        "or pass --allow-missing to leave these keys out"
    )


def _result(onnx_ckpt: Checkpoint, state, found, missing, notes) -> ImportResult:
    tensors: dict[str, LazyTensor] = {}
    rows, aliases = [], {}
    tied = {k: g[0] for g in hf.tie_groups(state) for k in g[1:]}  # written once
    for key, value in state.items():
        if key not in found:
            continue
        name, how, transform = found[key]
        shape, dtype = _spec(value)
        if tied.get(key) in tensors and found[tied[key]][::2] == (name, transform):
            aliases[key] = tied[key]
        elif name is None:
            tensors[key] = LazyTensor(dtype, shape, lambda v=value: v.clone())
        else:
            lazy = onnx_ckpt.tensors[name]
            tensors[key] = LazyTensor(
                lazy.dtype, shape, lambda lz=lazy, t=transform, s=shape: _restore(lz, t, s)
            )
        rows.append(MappingRow(key, name, how, transform))
    used = {row.initializer for row in rows}
    metadata = dict(onnx_ckpt.metadata)
    table = {row.key: {k: v for k, v in asdict(row).items() if k != "key"} for row in rows}
    metadata[MAPPING_KEY] = json.dumps(table, separators=(",", ":"), ensure_ascii=False)
    structure = flat_structure([k for k in state if k in tensors or k in aliases])
    ckpt = replace(
        onnx_ckpt, tensors=tensors, structure=structure, aliases=aliases, metadata=metadata
    )
    unused = [n for n in onnx_ckpt.tensors if n not in used]
    return ImportResult(ckpt, rows, missing, unused, notes)


def _restore(lazy: LazyTensor, transform: str, shape: tuple[int, ...]):
    """The ONNX values in the module's layout: the exporter's transform undone."""
    t = lazy.load()
    return t.mT.contiguous() if transform == "transposed" else t.reshape(shape)
