"""Which tensor of one file is which tensor of another, for ``nnconv verify``.

Names are paired by name, the mapping an ONNX import recorded, wrapper prefixes
(``module.``, ``_orig_mod.``), then by value (transposed copies included).  What the
model really has decides what is left over: ties the model's config declares (names
``save_pretrained`` drops, such as ``lm_head.weight``) are aliases, and an ONNX
initializer with no state_dict counterpart (a non-persistent buffer such as BERT's
``position_ids`` or a rotary ``inv_freq``, or an exporter constant) is "not a
parameter": the outputs decide.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from nnconv.formats.checkpoint import Checkpoint, tensor_bytes
from nnconv.formats.keys import MAPPING_KEY
from nnconv.formats.registry import holds_graph

from .onnx_import import COUNTERS

if TYPE_CHECKING:
    import torch

WRAPPERS = re.compile(r"^(?:module\.|_orig_mod\.)+")  # DataParallel, torch.compile
NOT_A_PARAMETER = "not a parameter"
CONSTANT_NOTE = (
    "an ONNX constant with no state_dict counterpart (a non-persistent buffer such as "
    "position_ids or inv_freq, or an exporter constant): outputs decide"
)


@dataclass(frozen=True)
class Pair:
    """A reference name and its candidate counterpart (None when one side lacks it)."""

    ref: str | None
    cand: str | None
    how: str = "name"  # "name" | "mapping" | "prefix" | "value" | "value, transposed"
    transform: str = "identity"  # what brings the candidate to the reference's layout
    note: str | None = None


def _mapping(ckpt: Checkpoint) -> dict[str, tuple[str, str]]:
    """state_dict key -> (ONNX initializer, transform), as an ONNX import recorded it."""
    try:
        table = json.loads(ckpt.metadata.get(MAPPING_KEY, "{}"))
        return {
            k: (r["initializer"], r.get("transform", "identity"))
            for k, r in table.items()
            if isinstance(r, dict) and isinstance(r.get("initializer"), str)
        }
    except (ValueError, AttributeError):  # not JSON, or not a map of rows: no mapping
        return {}


def _digest(t: torch.Tensor) -> bytes:
    return hashlib.blake2b(tensor_bytes(t), digest_size=16).digest()


def align(ref: Checkpoint, cand: Checkpoint) -> list[Pair]:
    """Pair canonical tensors by name, recorded ONNX mapping, wrapper prefix, then value."""
    pairs: list[Pair] = []
    ref_all, cand_all = set(ref.tensors) | set(ref.aliases), set(cand.tensors) | set(cand.aliases)
    done_ref, done_cand = set(), set()  # canonical names already paired

    def add(r: str, c: str, how: str, transform: str = "identity", note: str | None = None):
        pairs.append(Pair(r, c, how, transform, note))
        done_ref.add(ref.aliases.get(r, r))
        done_cand.add(cand.aliases.get(c, c))

    for name in ref.tensors:
        if name in cand_all:
            add(name, name, "name")
    for name in cand.tensors:  # a name the reference has only as an alias: a split tie
        if name not in done_cand and name in ref_all:
            add(name, name, "name")
    for key, (init, transform) in _mapping(cand).items():  # ONNX-named reference
        if key in cand.tensors and key not in done_cand and init in ref_all:
            add(init, key, "mapping", transform)
    for key, (init, transform) in _mapping(ref).items():  # ONNX-named candidate
        if key in ref.tensors and key not in done_ref and init in cand_all:
            add(key, init, "mapping", transform)
    stripped = {WRAPPERS.sub("", n): n for n in reversed(cand.tensors) if n not in done_cand}
    for name in ref.tensors:
        other = stripped.get(WRAPPERS.sub("", name))
        if name not in done_ref and other is not None and other not in done_cand:
            add(name, other, "prefix")
    _align_values(ref, cand, done_ref, done_cand, add)
    if holds_graph(ref.format):  # the same the other way round: a merged reference
        _align_values(cand, ref, done_cand, done_ref, lambda c, r, *rest: add(r, c, *rest))
    order = {name: i for i, name in enumerate(ref.names())}
    pairs.sort(key=lambda p: order.get(p.ref, len(order)))
    left = [n for n in ref.tensors if n not in done_ref and not _dropped(n, cand)]
    extra = [n for n in cand.tensors if n not in done_cand and not _dropped(n, ref)]
    return pairs + [_alone(ref, cand, n, None) for n in left] + [
        _alone(cand, ref, None, n) for n in extra
    ]


def _alone(here: Checkpoint, there: Checkpoint, ref: str | None, cand: str | None) -> Pair:
    """A tensor with no counterpart: an ONNX initializer against a state_dict is not a
    parameter (the state_dict is the model's whole persistent state); else it fails."""
    if holds_graph(here.format) and not holds_graph(there.format):
        return Pair(ref, cand, NOT_A_PARAMETER, note=CONSTANT_NOTE)
    return Pair(ref, cand, "")


def _dropped(name: str, other: Checkpoint) -> bool:
    """A training counter (num_batches_tracked), which exporters drop: ONNX never holds it."""
    return holds_graph(other.format) and name.rsplit(".", 1)[-1] in COUNTERS


def _align_values(ref: Checkpoint, cand: Checkpoint, done_ref, done_cand, add) -> None:
    """Match what is left by bit-identical values, or a 2-D transpose, via hashes."""
    left = {n: t for n, t in ref.tensors.items() if n not in done_ref}
    specs = {(t.dtype, t.shape) for t in left.values()}
    merged = holds_graph(cand.format)  # exporters store equal initializers once, for many keys
    offers: dict[tuple, list[tuple[str, str]]] = {}  # (dtype, shape, digest) -> (name, how)
    for name, lazy in cand.tensors.items():
        flip = lazy.shape[::-1] if len(lazy.shape) == 2 else None
        kinds = {(lazy.dtype, lazy.shape), (lazy.dtype, flip)}
        if name in done_cand and not merged or not kinds & specs:
            continue
        t = lazy.load()  # only tensors some reference tensor could match are read
        offers.setdefault((lazy.dtype, lazy.shape, _digest(t)), []).append((name, "value"))
        if flip is not None and (lazy.dtype, flip) in specs:
            flipped = (lazy.dtype, flip, _digest(t.t()))
            offers.setdefault(flipped, []).append((name, "value, transposed"))
    offered = {key[:2] for key in offers}
    wanted = {
        n: (t.dtype, t.shape, _digest(t.load()))
        for n, t in left.items()
        if (t.dtype, t.shape) in offered
    }
    counts = Counter(wanted.values())
    for name, key in wanted.items():
        options = [o for o in offers.get(key, []) if o[0] not in done_cand]
        many = max(counts[key], len(offers.get(key, ())))
        note = None if many == 1 else f"ambiguous: matched in order among {many} equal tensors"
        if not options and merged and key in offers:
            options, note = offers[key][:1], "stored once for several tensors (merged by export)"
        if options:
            other, how = options[0]
            add(name, other, how, "transposed" if how.endswith("transposed") else "identity", note)


def sharing(ref: Checkpoint, cand: Checkpoint, pairs: list[Pair]) -> list[str]:
    """Tied-weight groups (of any size) that differ once names are aligned, both ways
    round.  An ONNX file stores a tied tensor once under any one of its names: there,
    names of a group that is present are not missing."""
    out = []
    for one, other, here, there in (
        (ref, cand, "reference", "candidate"),
        (cand, ref, "candidate", "reference"),
    ):
        link = {p.ref: p.cand for p in pairs} if one is ref else {p.cand: p.ref for p in pairs}
        names = {*other.tensors, *other.aliases}
        stripped = {WRAPPERS.sub("", n): n for n in names}

        def locate(n: str, link=link, names=names, stripped=stripped, other=other):
            f = link.get(n) or (n if n in names else stripped.get(WRAPPERS.sub("", n)))
            return None if f is None else other.aliases.get(f, f)

        groups: dict[str, list[str]] = {}
        for alias, target in one.aliases.items():
            groups.setdefault(target, []).append(alias)
        for target, aliases in groups.items():
            where = {n: locate(n) for n in (target, *aliases)}
            found = [w for w in where.values() if w is not None]
            base = where[target] if where[target] is not None else (found or [None])[0]
            for alias in aliases:  # where each name is in ``other``, if anywhere
                if where[alias] is None and not (holds_graph(other.format) and found):
                    out.append(
                        f"{alias} shares {target} in the {here} but is absent from the {there}"
                    )
                elif where[alias] is not None and where[alias] != base:
                    out.append(f"{alias} shares {target} in the {here} but not in the {there}")
    return out


def with_config_ties(ckpt: Checkpoint, ties: list[tuple[str, ...]]) -> Checkpoint:
    """``ckpt`` with the ties an HF config declares (:func:`hf.config_ties`) as aliases:
    the names ``save_pretrained`` drops (``lm_head.weight``, ``cls.predictions.decoder.*``,
    T5's embeddings) point at the group's stored tensor.  A name stored as a tensor of
    its own stays one (and ``sharing`` says it is not tied)."""
    aliases = dict(ckpt.aliases)
    for group in ties:
        stored = next((aliases.get(n, n) for n in group if n in ckpt.tensors or n in aliases), None)
        for name in group:
            if stored is not None and name not in ckpt.tensors and name not in aliases:
                aliases[name] = stored
    return ckpt if aliases == ckpt.aliases else replace(ckpt, aliases=aliases)

