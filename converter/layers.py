"""The module tree and layer kinds of a checkpoint, guessed from names and shapes alone.

Inspecting a file must not import torch or read tensor values, so everything
here works on what a header gives: dotted names, dtype names and shapes.  A
layer kind (``Linear(20 → 256)``) is only named where the shapes leave no
doubt; anything else is left without a kind, and its tensors are listed as is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Shape = tuple[int, ...]
Row = tuple[str, str, Shape]  # (name, dtype, shape)

# Dotted parts past this depth stay in the tensor's own name: a crafted file
# with a 10,000-part name must not exhaust the recursion limit.
MAX_DEPTH = 64
EMBEDDING_HINTS = ("emb", "wte", "wpe", "tok")
RNN_KINDS = {4: "LSTM", 3: "GRU", 1: "RNN"}
BATCHNORM_AFTER = {
    "Linear": "BatchNorm1d",
    "Conv1d": "BatchNorm1d",
    "Conv2d": "BatchNorm2d",
    "Conv3d": "BatchNorm3d",
}
_BATCHNORM_KEYS = {"weight", "bias", "running_mean", "running_var"}
_ATTENTION_KEYS = {"in_proj_weight", "in_proj_bias", "bias_k", "bias_v"}
_SPLIT_ATTENTION_KEYS = {"q_proj_weight", "k_proj_weight", "v_proj_weight"}
_RNN_KEY = re.compile(r"(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?")


@dataclass(frozen=True)
class ModuleNode:
    """One level of the dotted-name hierarchy: a module, a plain container, or the root."""

    name: str  # own name (last dotted part); "" at the root
    path: str  # dotted prefix of its tensors; "" at the root
    depth: int  # number of dotted parts in ``path``
    kind: str | None  # e.g. "Linear(20 → 256)"; None where the shapes are not conclusive
    tensors: tuple[str, ...]  # full names of its direct tensors, in order
    children: tuple[ModuleNode, ...]  # in first-appearance order
    first: int  # index (in the rows) of the first tensor below it, to interleave entries

    def local(self, tensor: str) -> str:
        """A direct tensor's name relative to this node (``weight`` for ``fc.weight``)."""
        return tensor.split(".", self.depth)[-1] if self.depth else tensor

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "kind": self.kind,
            "tensors": list(self.tensors),
            "children": [c.to_json() for c in self.children],
        }


class _Builder:
    __slots__ = ("name", "parts", "tensors", "children", "first")

    def __init__(self, name: str, parts: tuple[str, ...], first: int) -> None:
        self.name, self.parts, self.first = name, parts, first
        self.tensors: list[str] = []
        self.children: dict[str, _Builder] = {}


def build_tree(rows: Iterable[Row]) -> ModuleNode:
    """The module hierarchy of ``(name, dtype, shape)`` rows, split at dots, kinds inferred.

    Siblings keep the order their first tensor appears in, so ``layers.10``
    follows ``layers.9`` as in the file rather than sorting before ``layers.2``.
    """
    root = _Builder("", (), 0)
    shapes: dict[str, Shape] = {}
    for index, (name, _dtype, shape) in enumerate(rows):
        parts = name.split(".", MAX_DEPTH)[:-1]
        node = root
        for part in parts:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Builder(part, (*node.parts, part), index)
            node = child
        node.tensors.append(name)
        shapes[name] = tuple(shape)
    return _freeze(root, shapes, None)


def _freeze(node: _Builder, shapes: dict[str, Shape], previous: str | None) -> ModuleNode:
    depth = len(node.parts)
    own = {(n.split(".", depth)[-1] if depth else n): shapes[n] for n in node.tensors}
    children = []
    sibling_kind = None
    for child in node.children.values():
        frozen = _freeze(child, shapes, sibling_kind)
        children.append(frozen)
        sibling_kind = frozen.kind
    return ModuleNode(
        name=node.name,
        path=".".join(node.parts),
        depth=depth,
        kind=infer_kind(node.name, own, previous),
        tensors=tuple(node.tensors),
        children=tuple(children),
        first=node.first,
    )


def infer_kind(name: str, params: Mapping[str, Shape], previous: str | None = None) -> str | None:
    """The layer kind of a module called ``name`` whose direct tensors have these shapes.

    ``previous`` is the kind of the preceding sibling module: a BatchNorm's
    dimensionality only shows in the layer it follows.  None when ambiguous.
    """
    keys = set(params)
    if "weight" in keys and keys <= {"weight", "bias"}:
        return _weighted(name, params["weight"], params.get("bias"), previous)
    if keys >= _BATCHNORM_KEYS:
        return _batchnorm(params, previous)
    if "in_proj_weight" in keys or "q_proj_weight" in keys:
        return _attention(params)
    if "weight_ih_l0" in keys:
        return _recurrent(params)
    return None


def _weighted(name: str, weight: Shape, bias: Shape | None, previous: str | None) -> str | None:
    """Linear, Embedding, ConvNd or LayerNorm: a ``weight`` and an optional ``bias``;
    transformers' ``Conv1D`` stores a Linear's weight transposed ([in, out], bias [out])."""
    if len(weight) == 2 and bias is not None and bias == weight[1:] and weight[0] != weight[1]:
        return f"Conv1D({weight[0]} → {weight[1]}, transposed)"
    if not weight or (bias is not None and bias != weight[:1]):
        return None
    out = weight[0]
    if len(weight) == 1:
        return f"LayerNorm({out})" if bias is not None else None
    if len(weight) == 2:
        if bias is None and any(hint in name.lower() for hint in EMBEDDING_HINTS):
            return f"Embedding({out}, {weight[1]})"
        return f"Linear({weight[1]} → {out}{'' if bias is not None else ', bias=False'})"
    if len(weight) <= 5:
        kernel = "×".join(map(str, weight[2:]))
        channels, groups = _grouped(weight[1], previous)
        return f"Conv{len(weight) - 2}d({channels} → {out}, {kernel}{groups})"
    return None


def _grouped(per_group: int, previous: str | None) -> tuple[int, str]:
    """A convolution's input channels and groups: its weight holds in/groups channels, so
    when the preceding layer gives a multiple of that, the convolution is grouped (one
    channel per group: depthwise)."""
    found = re.search(r"→ (\d+)", previous or "")
    before = int(found.group(1)) if found else 0
    if before <= per_group or before % per_group:
        return per_group, ""
    groups = before // per_group
    return before, f", groups={groups}" + (", depthwise" if per_group == 1 else "")


def _batchnorm(params: Mapping[str, Shape], previous: str | None) -> str | None:
    extra = set(params) - _BATCHNORM_KEYS
    if extra - {"num_batches_tracked"} or params.get("num_batches_tracked", ()) != ():
        return None
    shapes = {params[k] for k in _BATCHNORM_KEYS}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return None
    channels = next(iter(shapes))[0]
    kind = "BatchNorm"
    if previous:
        before = BATCHNORM_AFTER.get(previous.partition("(")[0])
        out = re.search(r"→ (\d+)", previous)
        if before and out and int(out.group(1)) == channels:
            kind = before
    return f"{kind}({channels})"


def _attention(params: Mapping[str, Shape]) -> str | None:
    keys = set(params)
    bias = params.get("in_proj_bias")
    if "in_proj_weight" in keys:
        weight = params["in_proj_weight"]
        if keys - _ATTENTION_KEYS or len(weight) != 2 or weight[0] != 3 * weight[1]:
            return None
        embed = weight[1]
        return f"MultiheadAttention({embed})" if bias in (None, (3 * embed,)) else None
    if not keys >= _SPLIT_ATTENTION_KEYS or keys - _ATTENTION_KEYS - _SPLIT_ATTENTION_KEYS:
        return None
    q, k, v = (params[n] for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
    if len(q) != 2 or q[0] != q[1] or len(k) != 2 or len(v) != 2 or k[0] != q[0] or v[0] != q[0]:
        return None
    embed = q[0]
    if bias not in (None, (3 * embed,)):
        return None
    return f"MultiheadAttention({embed}, kdim={k[1]}, vdim={v[1]})"


def _recurrent(params: Mapping[str, Shape]) -> str | None:
    """LSTM, GRU or RNN from ``weight_ih_lK`` [gates*hidden, in] and ``weight_hh_lK``."""
    matches = [_RNN_KEY.fullmatch(key) for key in params]
    if not all(matches):
        return None
    layers = 1 + max(int(m.group(3)) for m in matches if m)
    if any(f"weight_{g}_l{n}" not in params for n in range(layers) for g in ("ih", "hh")):
        return None
    ih, hh, hr = params["weight_ih_l0"], params["weight_hh_l0"], params.get("weight_hr_l0")
    if len(ih) != 2 or len(hh) != 2 or hh[0] != ih[0] or (hr is not None and len(hr) != 2):
        return None
    hidden = hr[1] if hr is not None else hh[1]
    if hidden <= 0 or ih[0] % hidden:
        return None
    kind = RNN_KINDS.get(ih[0] // hidden)
    if kind is None or (hr is not None and kind != "LSTM"):
        return None
    extras = f", layers={layers}"
    if any(m and m.group(4) for m in matches):
        extras += ", bidirectional"
    if hr is not None:
        extras += f", proj={hr[0]}"
    if not any(m and m.group(1) == "bias" for m in matches):
        extras += ", bias=False"
    return f"{kind}({ih[1]} → {hidden}{extras})"
