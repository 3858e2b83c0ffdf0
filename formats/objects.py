"""Python objects <-> checkpoints: what ``torch.save`` pickles, described and rebuilt.

:class:`Describer` walks an object graph (dicts, lists, tuples, scalars and
tensors) into a checkpoint's structure; :func:`from_object` does it for live
torch objects and ``pt_format`` for the references its torch-free unpickler
makes.  :func:`to_object` rebuilds the object, :func:`cast` changes dtypes
lazily.  torch is imported only by the functions that need it.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import checkpoint, dtypes
from .checkpoint import (
    ROOT_TENSOR_NAME,
    SCALARS,
    Checkpoint,
    LazyTensor,
    check_count,
    depth_error,
)
from .errors import LazyParameterError, UnsupportedError
from .keys import CAST_KEY


class Describer:
    """Builds a checkpoint from a Python object graph: tensors, aliases and structure.

    ``tensor_leaf(value, path)`` recognises a tensor (a torch.Tensor, or a
    reference to bytes in a torch zip archive) and returns its leaf node by
    calling :meth:`add`; it returns None for anything else.

    Walking stays linear in the object graph: a container reached again (pickle memo
    references share it) is walked again only within :data:`checkpoint.MAX_SHARED_NODES`
    nodes in all, and one inside itself is refused.  A tensor ``key`` starts with
    (storage identity, bytes stored for that storage): the tensors' total size is
    bounded by :func:`checkpoint.check_expansion` against their storages' total.
    """

    def __init__(
        self, subject: str | None, tensor_leaf: Callable[[Any, str], dict[str, Any] | None]
    ) -> None:
        self.subject = subject
        self.tensors: dict[str, LazyTensor] = {}
        self.aliases: dict[str, str] = {}
        self._seen: dict[Any, str] = {}
        self._tensor_leaf = tensor_leaf
        self._walked: set[int] = set()  # ids of containers walked (alive: obj holds them)
        self._open: set[int] = set()  # ids of the containers being walked
        self._again = 0  # > 0 while walking a container a second time
        self._repeated = 0  # nodes walked again, against MAX_SHARED_NODES
        self.nbytes = 0  # canonical tensors' bytes
        self._held: dict[Any, int] = {}  # storage identity -> bytes stored

    def add(self, path: str, lazy: LazyTensor, key: Any = None) -> dict[str, Any]:
        """Name a tensor after its path; one already seen under ``key`` becomes an alias."""
        count = len(self.tensors) + len(self.aliases) + 1
        if count > checkpoint.MAX_TENSORS:
            check_count(self.subject, count, UnsupportedError)
        if lazy.dtype not in dtypes.DTYPES:
            dtypes.get(lazy.dtype, subject=self.subject)
        name, n = path or ROOT_TENSOR_NAME, 1
        while name in self.tensors or name in self.aliases:
            n += 1
            name = f"{path or ROOT_TENSOR_NAME}#{n}"
        if key is not None and key in self._seen:
            self.aliases[name] = self._seen[key]
        else:
            if key is not None:
                self._seen[key] = name
                self._held[key[0]] = key[1]
                self.nbytes += lazy.nbytes
            self.tensors[name] = lazy
        return {"t": name}

    def checkpoint(self, obj: Any) -> Checkpoint:
        structure = self._walk(obj, "", 0)
        if self.subject is not None and self.nbytes > checkpoint.VIEW_SLACK:  # from a file
            held = sum(self._held.values())
            checkpoint.check_expansion(self.subject, "the checkpoint", self.nbytes, held)
        return Checkpoint(tensors=self.tensors, structure=structure, aliases=self.aliases)

    def _enter(self, value: Any, path: str) -> bool:
        """Note a container about to be walked; True when it was walked before."""
        ident = id(value)
        if ident in self._open:
            raise UnsupportedError(
                self.subject,
                f"{path or 'the object'}: a container holds itself (containers nested more "
                f"than {checkpoint.MAX_DEPTH} deep)",
                value=checkpoint.MAX_DEPTH + 1,
                limit=checkpoint.MAX_DEPTH,
                remedy="the file is corrupt or crafted",
            )
        self._open.add(ident)
        again = ident in self._walked
        self._walked.add(ident)
        if again or self._again:
            self._repeated += len(value) + 1
            if self._repeated > checkpoint.MAX_SHARED_NODES:
                raise UnsupportedError(
                    self.subject,
                    f"{path or 'the object'}: container shared (referenced more than once) "
                    f"so often that walking it visits over {checkpoint.MAX_SHARED_NODES:,} "
                    "nodes again",
                    value=self._repeated,
                    limit=checkpoint.MAX_SHARED_NODES,
                    remedy="torch.save of a state_dict shares no containers: the file is "
                    "corrupt or crafted",
                )
        self._again += again
        return again

    def _walk(self, value: Any, path: str, depth: int) -> Any:
        kind = type(value)
        if kind in (dict, OrderedDict, list, tuple):
            again = self._enter(value, path)
            try:
                return self._node(value, path, depth)
            finally:
                self._open.discard(id(value))
                self._again -= again
        return self._node(value, path, depth)

    def _node(self, value: Any, path: str, depth: int) -> Any:
        leaf = self._tensor_leaf(value, path)
        if leaf is not None:
            return leaf
        if isinstance(value, SCALARS):
            return value
        subject = self.subject
        if depth >= checkpoint.MAX_DEPTH and type(value) in (dict, OrderedDict, list, tuple):
            raise depth_error(subject, UnsupportedError, f"{path}: ")
        join = (lambda k: f"{path}.{k}") if path else str
        if type(value) in (dict, OrderedDict):
            items, tensor_leaf = [], self._tensor_leaf
            for k, v in value.items():
                if not isinstance(k, SCALARS):
                    raise UnsupportedError(subject, f"{path}: dict key {k!r} is not a scalar")
                name = join(k)
                leaf = tensor_leaf(v, name)  # most values of a state_dict: one call, not two
                items.append([k, self._walk(v, name, depth + 1) if leaf is None else leaf])
            node: dict[str, Any] = {"d": items}
            if isinstance(value, OrderedDict):
                node["o"] = 1
                meta = getattr(value, "_metadata", None)
                try:
                    if meta is not None:
                        node["m"] = dict(json.loads(json.dumps(meta)))
                except (TypeError, ValueError, RecursionError):
                    raise UnsupportedError(subject, f"{path}: _metadata is not JSON data") from None
            return node
        if type(value) in (list, tuple):
            children = [self._walk(v, join(i), depth + 1) for i, v in enumerate(value)]
            return {"l" if isinstance(value, list) else "u": children}
        raise UnsupportedError(
            subject,
            f"{path or 'the object'} is a {type(value).__module__}.{type(value).__qualname__}",
            remedy="only tensors, dict/list/tuple containers and int, float, str, bool, None "
            "leaves can be converted",
        )


def tensor_flags(leaf: dict[str, Any], *, parameter: bool, requires_grad: bool) -> dict[str, Any]:
    """Record nn.Parameter and requires_grad on a leaf, as :func:`to_object` restores them."""
    if parameter:
        leaf["p"] = 1
        if not requires_grad:
            leaf["g"] = 0
    elif requires_grad:
        leaf["g"] = 1
    return leaf


def from_object(obj: Any, *, subject: str | None = None) -> Checkpoint:
    """Describe a ``torch.save``-able object (tensor, list, dict, state_dict...).

    With a ``subject`` (the object came from that file), a view larger than
    :func:`checkpoint.check_expansion` allows over its storage is refused."""
    import torch

    def tensor_leaf(t: Any, path: str) -> dict[str, Any] | None:
        if not isinstance(t, torch.Tensor):
            return None
        if isinstance(t, torch.nn.parameter.UninitializedTensorMixin) or t.is_meta:  # type: ignore[attr-defined]
            raise LazyParameterError(
                subject,
                f"{path or 'the object'} is an uninitialised lazy parameter with no shape or "
                "values",
                remedy="run the model once on an example input (or load a checkpoint into it) "
                "before calling state_dict()",
            )
        if t.layout != torch.strided or t.is_quantized or t.is_nested:
            raise UnsupportedError(subject, f"{path}: {t.layout} tensors are not supported")
        dtype = str(t.dtype).removeprefix("torch.")
        parameter, requires_grad = isinstance(t, torch.nn.Parameter), t.requires_grad
        t = t.detach()
        key = None
        if t.numel() and t.device.type == "cpu":
            storage = t.untyped_storage()
            held, nbytes = storage.nbytes(), t.numel() * t.element_size()
            if subject is not None and nbytes > checkpoint.VIEW_SLACK:  # from a file
                checkpoint.check_expansion(subject, f"tensor {path!r}", nbytes, held)
            # Strides of size-1 dimensions do not matter (and view() resets them).
            stride = tuple(0 if n == 1 else st for n, st in zip(t.shape, t.stride(), strict=True))
            key = (storage.data_ptr(), held, t.storage_offset(), tuple(t.shape), stride, t.dtype)
        lazy = LazyTensor(dtype, tuple(t.shape), functools.partial(torch.Tensor.cpu, t))
        leaf = describer.add(path, lazy, key)
        return tensor_flags(leaf, parameter=parameter, requires_grad=requires_grad)

    describer = Describer(subject, tensor_leaf)
    return describer.checkpoint(obj)


def to_object(ckpt: Checkpoint) -> Any:
    """Rebuild the Python object: same container types, keys, order and tensor sharing."""
    import torch

    loaded: dict[str, torch.Tensor] = {}

    def tensor(leaf: dict[str, Any]) -> torch.Tensor:
        name = leaf["t"]
        canonical = ckpt.aliases.get(name, name)
        if canonical not in loaded:
            loaded[canonical] = ckpt.tensors[canonical].load()
        t = loaded[canonical]
        if canonical != name:
            t = t.detach().view(t.shape)  # a distinct tensor on the same storage
        if leaf.get("p"):
            return torch.nn.Parameter(t, requires_grad=bool(leaf.get("g", 1)))
        if leaf.get("g"):
            t.requires_grad_(True)
        return t

    def build(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if "t" in node:
            return tensor(node)
        if "l" in node:
            return [build(c) for c in node["l"]]
        if "u" in node:
            return tuple(build(c) for c in node["u"])
        pairs = [(k, build(v)) for k, v in node["d"]]
        if not node.get("o"):
            return dict(pairs)
        out = OrderedDict(pairs)
        if "m" in node:
            out._metadata = OrderedDict(node["m"])  # type: ignore[attr-defined]
        return out

    return build(ckpt.structure)


def _cast_one(lazy: LazyTensor, target: Any) -> Any:
    return lazy.load().to(target)


def cast(ckpt: Checkpoint, dtype: str) -> Checkpoint:
    """A view of ``ckpt`` whose floating tensors load as ``dtype`` (one at a time)."""
    import torch

    if dtype not in dtypes.CAST_TARGETS:
        raise UnsupportedError(
            None, f"cannot cast to {dtype!r}", remedy=f"choose one of {dtypes.CAST_TARGETS}"
        )
    target = getattr(torch, dtype)
    tensors = {}
    for name, lazy in ckpt.tensors.items():
        if dtypes.DTYPES[lazy.dtype].floating and lazy.dtype != dtype:
            lazy = LazyTensor(dtype, lazy.shape, functools.partial(_cast_one, lazy, target))
        tensors[name] = lazy
    metadata = {**ckpt.metadata, CAST_KEY: dtype}
    return Checkpoint(
        tensors=tensors,
        structure=ckpt.structure,
        aliases=dict(ckpt.aliases),
        metadata=metadata,
        format=ckpt.format,
        source=ckpt.source,
        _closers=ckpt._closers,
    )
