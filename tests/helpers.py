"""Assertions the test modules share.

``assert_same(a, b)`` is the equality nnconv promises for a round trip: the
same Python type at every level (dict vs OrderedDict, list vs tuple,
Parameter vs Tensor), the same keys in the same order, OrderedDict
``_metadata``, tensors with the same dtype, shape, ``requires_grad`` and
bit-identical values (NaN payloads and -0.0 included), equal scalar leaves,
and -- unless ``check_sharing=False`` -- the same pattern of tensors sharing
storage (tied weights).  ``nan_ok=True`` lets any NaN match any NaN in floating
tensors, for conversions that need not keep a NaN's payload (``--dtype`` casts).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["assert_same", "assert_shares_storage", "assert_tensor_same", "tensors_in"]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a flat uint8 tensor (contiguous, on the CPU)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.stride(0) != 1:  # .contiguous() keeps odd strides of 1-element and empty tensors
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def assert_tensor_same(
    a: torch.Tensor, b: torch.Tensor, where: str = "tensor", *, nan_ok: bool = False
) -> None:
    """Same type, dtype, shape, requires_grad and bytes (so NaN == NaN, -0.0 != 0.0).

    With ``nan_ok``, a NaN in a floating tensor matches any NaN, whatever its payload.
    """
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.requires_grad == b.requires_grad, (
        f"{where}: requires_grad {a.requires_grad} != {b.requires_grad}"
    )
    ab, bb = _bytes(a), _bytes(b)
    if not torch.equal(ab, bb):
        differ = ab != bb
        if nan_ok and a.is_floating_point():
            both_nan = a.detach().cpu().float().isnan() & b.detach().cpu().float().isnan()
            differ &= ~both_nan.reshape(-1).repeat_interleave(a.element_size())
            if not differ.any():
                return
        diff = differ.nonzero()
        first = int(diff[0]) // a.element_size() if len(diff) else "?"
        raise AssertionError(
            f"{where}: values differ ({len(diff)} of {ab.numel()} bytes; first at element {first})"
        )


def _scalar_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, float):
        same = (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
        )
        assert same, f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _walk(a: Any, b: Any, where: str, nan_ok: bool) -> None:
    assert type(a) is type(b), (
        f"{where}: type {type(a).__module__}.{type(a).__qualname__} != "
        f"{type(b).__module__}.{type(b).__qualname__}"
    )
    if isinstance(a, torch.Tensor):
        assert_tensor_same(a, b, where, nan_ok=nan_ok)
    elif isinstance(a, dict):
        ka, kb = list(a), list(b)
        assert ka == kb, f"{where}: keys {ka} != {kb}"
        types_a, types_b = [type(k) for k in ka], [type(k) for k in kb]
        assert types_a == types_b, f"{where}: key types {types_a} != {types_b}"
        meta_a, meta_b = getattr(a, "_metadata", None), getattr(b, "_metadata", None)
        assert meta_a == meta_b, f"{where}: _metadata {meta_a!r} != {meta_b!r}"
        for k in ka:
            _walk(a[k], b[k], f"{where}[{k!r}]", nan_ok)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _walk(x, y, f"{where}[{i}]", nan_ok)
    else:
        _scalar_same(a, b, where)


def tensors_in(obj: Any, where: str = "obj") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor in a container tree, depth first, in order."""
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_in(v, f"{where}[{k!r}]")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from tensors_in(v, f"{where}[{i}]")


def _sharing(obj: Any) -> list[int]:
    """For each tensor, the index of the first tensor on the same storage."""
    first: dict[int, int] = {}
    out = []
    for i, (_, t) in enumerate(tensors_in(obj)):
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        out.append(first.setdefault(ptr, i) if ptr else i)  # empty tensors share nothing
    return out


def assert_same(
    a: Any, b: Any, *, check_sharing: bool = True, where: str = "obj", nan_ok: bool = False
) -> None:
    """Assert two ``torch.load``-style objects are the same, recursively (see module doc)."""
    _walk(a, b, where, nan_ok)
    if check_sharing:
        sa, sb = _sharing(a), _sharing(b)
        if sa != sb:
            paths = [p for p, _ in tensors_in(a, where)]
            bad = [paths[i] for i, (x, y) in enumerate(zip(sa, sb, strict=True)) if x != y]
            raise AssertionError(f"storage sharing differs at {bad[:5]}")


def assert_shares_storage(a: torch.Tensor, b: torch.Tensor, *, shared: bool = True) -> None:
    """Assert ``a`` and ``b`` live on one storage (tied weights), or not with ``shared=False``.

    Writing through one must be visible through the other, so views count too.
    """
    assert a.numel() and b.numel(), "empty tensors have no storage to share"
    same = a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    if shared:
        assert same, "tensors do not share storage"
    else:
        assert not same, "tensors share storage"


class Payload:
    """A malicious pickle: unpickling it creates ``marker`` (proof that code ran)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


# Source for a fresh interpreter: ``peak_anon(fn)`` runs ``fn`` and returns (its result,
# how far RssAnon rose above where it was before, in bytes), sampled every millisecond
# from a thread: the memory tests of conversions and of verify share it.
PEAK_ANON = """
import threading, time

def anon():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

def peak_anon(fn):
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)

    before = anon()
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak[0], anon()) - before
"""


@dataclass
class CliRun:
    rc: int
    out: str
    err: str


def cli(capfd: Any, *args: Any) -> CliRun:
    """``nnconv ARGS`` in this process (imports paid once): exit status, stdout, stderr."""
    from nnconv.converter.cli import cli as group

    capfd.readouterr()
    try:
        group.main(args=[str(a) for a in args], prog_name="nnconv")
        rc = 0
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    out, err = capfd.readouterr()
    return CliRun(rc, out, err)
