"""The state_dict a model needs, picked out of a checkpoint and loaded strictly.

A file rarely holds exactly ``model.state_dict()``: training checkpoints nest it
(``{"model": ..., "optimizer": ...}``), DataParallel and torch.compile prefix its
keys, lazy modules have no shapes until loaded.  This module finds the right
dict, strips the wrappers' prefixes, and loads it strictly; a mismatch is one
:class:`ModelMismatchError` line listing missing, unexpected and mis-shaped
keys, never torch's traceback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from typing import TYPE_CHECKING, Any

from nnconv.formats.checkpoint import Checkpoint, iter_leaves
from nnconv.formats.errors import FormatError, UsageError
from nnconv.formats.objects import to_object

if TYPE_CHECKING:
    import torch
    from torch import nn

# Wrappers that prefix every key: DataParallel/DDP, then torch.compile.
KNOWN_PREFIXES = ("module.", "_orig_mod.")
MAX_KEY_DEPTH = 3  # how deep automatic selection looks for a state_dict
SHOWN = 10  # keys listed per kind of mismatch


class ModelMismatchError(FormatError):
    """The checkpoint's state_dict does not fit the model (keys or shapes).  A FormatError:
    the file is inconsistent with the model it is meant for."""

    def __init__(
        self,
        subject: str | None,
        problem: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple, tuple]] = (),
        **kw: Any,
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)  # (name, checkpoint shape, model shape)
        super().__init__(subject, problem, **kw)


@dataclass(frozen=True)
class Selection:
    """Which part of the checkpoint became the state_dict, and what was stripped."""

    key_used: str | None  # dotted key of the sub-dict; None: the object itself
    prefix_stripped: str  # "" or e.g. "module." / "_orig_mod.module."
    auto_selected: bool  # found by matching the model's keys rather than given --key
    tensors: int


# --- picking the state_dict ----------------------------------------------------


def select_state_dict(
    source: Checkpoint | Any, module: nn.Module, *, key: str | None = None
) -> tuple[dict[str, torch.Tensor], Selection]:
    """The state_dict for ``module`` inside a checkpoint or a loaded object.

    ``key`` (dotted for nesting: ``state.model``) names a sub-dict; without it the
    object itself or the one sub-dict (at most 3 levels down) whose keys fit the
    module is taken.  ``module.``/``_orig_mod.`` prefixes are stripped when that
    makes the keys fit.
    """
    subject = source.source if isinstance(source, Checkpoint) else None
    obj = to_object(source) if isinstance(source, Checkpoint) else source
    wanted = list(module.state_dict().keys())
    if key is not None:
        found = _follow(subject, obj, key)
        if not _is_state_dict(found):
            raise UsageError(
                subject, f"--key {key!r} is a {type(found).__name__}, not a state_dict"
            )
        prefix = _fitting_prefix(found, wanted)
        prefix = _best_prefix(found, wanted)[1] if prefix is None else prefix
        return _strip(found, prefix), Selection(key, prefix, False, len(found))
    candidates = list(_state_dicts(obj, None, 0))
    if not candidates:
        raise UsageError(subject, "holds no state_dict (no dict of tensors)")
    fits = [(k, d, p) for k, d in candidates if (p := _fitting_prefix(d, wanted)) is not None]
    if len(fits) > 1:
        names = ", ".join(_key_name(k) for k, _, _ in fits)
        raise UsageError(
            subject,
            f"several state_dicts fit {type(module).__name__}: {names}",
            remedy="pick one with --key",
        )
    if fits:
        k, d, prefix = fits[0]
    else:  # none fits: take the closest, so that the mismatch error names real differences
        scored = sorted(
            ((*_best_prefix(d, wanted), k, d) for k, d in candidates),
            key=lambda s: s[0],
            reverse=True,
        )
        if len(scored) > 1 and scored[0][0] == scored[1][0]:
            names = ", ".join(_key_name(s[2]) for s in scored)
            raise UsageError(
                subject,
                f"no state_dict fits {type(module).__name__} (candidates: {names})",
                remedy="pick one with --key, or check --model",
            )
        _, prefix, k, d = scored[0]
    return _strip(d, prefix), Selection(k, prefix, k is not None, len(d))


def _key_name(key: str | None) -> str:
    return "(the whole object)" if key is None else repr(key)


def _is_state_dict(value: Any) -> bool:
    import torch

    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) for k in value)
        and all(isinstance(v, torch.Tensor) or k.endswith("_extra_state") for k, v in value.items())
    )


def _state_dicts(value: Any, key: str | None, depth: int):
    if _is_state_dict(value):
        yield key, value
    elif isinstance(value, Mapping) and depth < MAX_KEY_DEPTH:
        for k, v in value.items():
            yield from _state_dicts(v, str(k) if key is None else f"{key}.{k}", depth + 1)


def _follow(subject: str | None, obj: Any, key: str) -> Any:
    """Walk a dotted key; a part may itself hold dots (``{"model.ema": ...}``)."""
    parts, node, done = key.split("."), obj, []
    while parts:
        for n in range(len(parts), 0, -1):
            step = _step(node, ".".join(parts[:n]))
            if step is not None:
                node, done, parts = node[step], [*done, ".".join(parts[:n])], parts[n:]
                break
        else:
            there = list(node)[:SHOWN] if isinstance(node, Mapping) else []
            raise UsageError(
                subject,
                f"--key {key!r}: {'.'.join(done) or 'the checkpoint'} has no {parts[0]!r}",
                remedy=f"keys there: {', '.join(map(str, there))}" if there else None,
            )
    return node


def select_subtree(ckpt: Checkpoint, key: str, subject: str | None = None) -> Checkpoint:
    """The part of ``ckpt`` at the dotted ``key`` (``model``, ``model.ema``), lazily: its
    tensors renamed without the ``key.`` prefix, ties kept (a tensor tied to one outside
    the part becomes the part's own).  What ``--key`` extracts for every conversion."""
    import json

    node, done, parts = ckpt.structure, [], key.split(".")
    while parts:
        for n in range(len(parts), 0, -1):
            child = _encoded_child(node, ".".join(parts[:n]))
            if child is not None:
                node, done, parts = child, [*done, ".".join(parts[:n])], parts[n:]
                break
        else:
            there = [str(k) for k, _ in node.get("d", ())][:SHOWN] if isinstance(node, dict) else []
            raise UsageError(
                subject,
                f"--key {key!r}: {'.'.join(done) or 'the checkpoint'} has no {parts[0]!r}",
                remedy=f"keys there: {', '.join(there)}" if there else None,
            )
    if not isinstance(node, dict) or "t" in node:
        raise UsageError(subject, f"--key {key!r} names a single value, not a state_dict")
    node, prefix = json.loads(json.dumps(node)), f"{key}."
    tensors, aliases, renamed = {}, {}, {}
    for leaf in iter_leaves(node):
        old = leaf["t"]
        leaf["t"] = new = old.removeprefix(prefix)
        canonical = ckpt.aliases.get(old, old)
        if canonical in renamed:
            aliases[new] = renamed[canonical]
        else:
            tensors[new], renamed[canonical] = ckpt.tensors[canonical], new
    return replace(ckpt, tensors=tensors, structure=node, aliases=aliases)


def _encoded_child(node: Any, part: str) -> Any:
    """A child of an encoded structure node (see :mod:`nnconv.formats.checkpoint`)."""
    if not isinstance(node, dict):
        return None
    for k, value in node.get("d", ()):
        if str(k) == part:
            return value
    items = node.get("l", node.get("u"))
    return (
        items[int(part)]
        if items is not None and part.isdigit() and int(part) < len(items)
        else None
    )


def _step(node: Any, part: str) -> Any:
    if isinstance(node, Mapping):
        if part in node:
            return part
        return int(part) if part.isdigit() and int(part) in node else None
    if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
        return int(part)
    return None


def _prefixes(keys: list[str]):
    """ "" then each known wrapper prefix that every key carries, nested."""
    prefix = ""
    yield prefix
    while True:
        step = next(
            (p for p in KNOWN_PREFIXES if all(k.startswith(prefix + p) for k in keys)), None
        )
        if step is None:
            return
        prefix += step
        yield prefix


def _fitting_prefix(sd: Mapping, wanted: list[str]) -> str | None:
    keys, target = list(sd), set(wanted)
    for prefix in _prefixes(keys):
        if len(keys) == len(target) and {k[len(prefix) :] for k in keys} == target:
            return prefix
    return None


def _best_prefix(sd: Mapping, wanted: list[str]) -> tuple[int, str]:
    keys, target = list(sd), set(wanted)
    scored = [(len({k[len(p) :] for k in keys} & target), p) for p in _prefixes(keys)]
    return max(scored, key=lambda s: s[0])  # first (least stripped) of the best


def _strip(sd: Mapping, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items()}


# --- loading weights -----------------------------------------------------------


def load_weights(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    example_inputs: tuple | None = None,
    subject: str | None = None,
) -> None:
    """Load ``state_dict`` strictly, then put ``module`` in eval mode.

    Lazy modules are materialised by one forward pass on ``example_inputs`` when
    given, else from the checkpoint's shapes (torch's lazy load hook).
    """
    import torch
    from torch.nn.modules.lazy import LazyModuleMixin
    from torch.nn.parameter import is_lazy

    tensors = chain(module.named_parameters(), module.named_buffers())
    lazy = [n for n, t in tensors if is_lazy(t)]
    if lazy and example_inputs is not None:
        module.eval()
        try:
            with torch.no_grad():
                module(*example_inputs)
        except Exception as exc:
            raise UsageError(
                subject,
                f"the forward pass that materialises lazy modules failed: {_first_line(exc)}",
                remedy="check --input-shape and --input-dtype",
            ) from None
    elif lazy:
        owners = {n.rpartition(".")[0] for n in lazy}
        unhooked = [o for o in owners if not isinstance(module.get_submodule(o), LazyModuleMixin)]
        if unhooked:
            raise UsageError(
                subject,
                f"{', '.join(sorted(unhooked)) or 'the model'} has uninitialised parameters "
                "that only a forward pass can materialise",
                remedy="pass --input-shape",
            )
    _check_fit(module, state_dict, subject)
    on_meta = any(t.is_meta for t in chain(module.parameters(), module.buffers()))
    if on_meta:  # built from a record: the file's tensors become the module's, in its dtypes
        state_dict = _in_dtypes(module, state_dict)
    try:
        module.load_state_dict(state_dict, strict=True, assign=on_meta)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise ModelMismatchError(
            subject, f"the checkpoint does not fit {type(module).__name__}: {detail}"
        ) from None
    _finish_lazy(module)
    left = [n for n, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if left:
        raise ModelMismatchError(
            subject, f"the checkpoint leaves {_listed(left, 'tensor')} of the model unset"
        )
    module.eval()


def _in_dtypes(module: nn.Module, state_dict: Mapping) -> dict:
    """``state_dict`` with each tensor in the dtype the module declares for it (what a
    copying load would do); tensors already in that dtype are kept, not copied."""
    want = {k: t.dtype for k, t in module.state_dict(keep_vars=True).items()}
    return {
        k: v.to(want[k]) if k in want and hasattr(v, "dtype") and v.dtype != want[k] else v
        for k, v in state_dict.items()
    }


def _check_fit(module: nn.Module, state_dict: Mapping, subject: str | None) -> None:
    import torch
    from torch.nn.parameter import is_lazy

    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = []
    for k, want in expected.items():
        got = state_dict.get(k)
        if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor):
            continue
        if is_lazy(want) or got.shape == want.shape:
            continue
        if want.dim() == 0 and tuple(got.shape) == (1,):  # torch accepts this old spelling
            continue
        mismatched.append((k, tuple(got.shape), tuple(want.shape)))
    if not (missing or unexpected or mismatched):
        return
    shapes = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
    parts = [
        _listed(items, noun)
        for items, noun in (
            (missing, "missing key"),
            (unexpected, "unexpected key"),
            (shapes, "shape mismatch"),
        )
        if items
    ]
    raise ModelMismatchError(
        subject,
        f"the checkpoint does not fit {type(module).__name__}: {'; '.join(parts)}",
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
        remedy="check --model and --model-args, or pick another state_dict with --key",
    )


def _listed(items: list[str], noun: str) -> str:
    """``2 missing keys (a, b)``, naming the first :data:`SHOWN`."""
    plural = "" if len(items) == 1 else "es" if noun.endswith("h") else "s"
    more = f", ... and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return f"{len(items)} {noun}{plural} ({', '.join(items[:SHOWN])}{more})"


def _finish_lazy(module: nn.Module) -> None:
    """What a lazy module's first forward pass does after loading materialised it:
    set the inferred size attribute, drop the hooks, become the plain class."""
    from torch.nn.modules.lazy import LazyModuleMixin

    for m in module.modules():
        if not isinstance(m, LazyModuleMixin) or m.has_uninitialized_params():
            continue
        weight = getattr(m, "weight", None)
        if getattr(m, "in_features", None) == 0 and weight is not None:
            m.in_features = weight.shape[-1]
        if getattr(m, "in_channels", None) == 0 and weight is not None:
            m.in_channels = weight.shape[0] if m.transposed else weight.shape[1] * m.groups
        if getattr(m, "num_features", None) == 0:
            stats = weight if weight is not None else getattr(m, "running_mean", None)
            if stats is not None:
                m.num_features = stats.shape[0]
        for hook in ("_initialize_hook", "_load_hook"):
            if hasattr(m, hook):
                getattr(m, hook).remove()
                delattr(m, hook)
        if getattr(m, "cls_to_become", None) is not None:
            m.__class__ = m.cls_to_become


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
