"""Tensor-by-tensor and element-by-element comparison behind ``nnconv verify``.

Parameters must be bit-identical unless the user gives tolerances (a recorded ``--dtype``
cast is compared at the cast precision; what an optimised ONNX export folded is left to
the outputs).  Outputs must agree within per-dtype ``torch.testing.assert_close`` defaults.
``a`` is always the candidate, ``b`` the reference: an element passes when ``|a - b| <=
atol + rtol * |b|`` (equal infinities and NaN against NaN pass).  Work is streamed and
chunked, so memory stays bounded on 100 GB files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from nnconv.formats import dtypes
from nnconv.formats.checkpoint import Checkpoint
from nnconv.formats.errors import UsageError
from nnconv.formats.keys import CAST_KEY, OPTIMIZED_KEY
from nnconv.formats.rawio import SpanReader
from nnconv.formats.registry import holds_graph

from . import hf
from .alignment import NOT_A_PARAMETER, Pair, align, sharing, with_config_ties
from .report import OutputCheck, TensorCheck
from .tolerances import DEFAULTS, Tolerances, parse_tolerances  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)
OUTPUT_FIELDS = {f.name for f in fields(OutputCheck)}
CHUNK = 1 << 22  # elements per float64 pass: ~32 MB for each temporary


@dataclass
class Stats:
    """How close candidate ``a`` is to reference ``b``; ``passed`` when no element violates."""

    atol: float
    rtol: float
    numel: int
    max_abs: float  # max |a - b| (inf where one side is NaN or a lone infinity)
    max_rel: float  # max |a - b| / |b| (inf where b == 0 and a != b)
    mean_abs: float
    differing: int  # elements not bit-identical (values, when the dtypes differ)
    violations: int  # elements with |a - b| > atol + rtol * |b|
    fraction_out: float
    cosine: float  # over the finite positions; 1.0 for two all-zero tensors
    worst_index: list[int]  # the largest violation; the largest |a - b| when none violate
    reference_value: float  # nan for an empty tensor; magnitudes for complex tensors
    candidate_value: float
    needed_atol: float  # the smallest atol that passes at this rtol
    finite: bool  # both tensors all finite
    passed: bool


def _flat(t: torch.Tensor) -> torch.Tensor:
    import torch

    flat = t.detach().reshape(-1)
    return flat if flat.stride(0) == 1 else flat.clone(memory_format=torch.contiguous_format)


def compare_values(
    ref: torch.Tensor, cand: torch.Tensor, *, atol: float, rtol: float, chunk: int = CHUNK
) -> Stats:
    """Closeness of ``cand`` (a) to ``ref`` (b), computed in float64 one chunk at a time."""
    import torch

    if tuple(ref.shape) != tuple(cand.shape):
        raise UsageError(None, f"cannot compare shapes {list(ref.shape)} and {list(cand.shape)}")
    b_all, a_all = _flat(ref).cpu(), _flat(cand).cpu()
    complex_ = b_all.is_complex() or a_all.is_complex()
    wide = torch.complex128 if complex_ else torch.float64
    exact = atol == 0 and rtol == 0 and not (ref.is_floating_point() or ref.is_complex())
    n, inf = b_all.numel(), math.inf
    differing = violations = 0
    max_abs = max_rel = sum_abs = needed = dot = norm_a = norm_b = 0.0
    finite, best = True, (False, -inf, 0)  # (violates, excess or |a - b|, -flat index)
    for start in range(0, n, chunk):
        b_raw, a_raw = b_all[start : start + chunk], a_all[start : start + chunk]
        b, a = b_raw.to(wide), a_raw.to(wide)
        eq = (a == b) | (a.isnan() & b.isnan())
        fin = a.isfinite() & b.isfinite()
        finite = finite and bool(fin.all())
        bits = (t.view(torch.uint8).reshape(-1, t.element_size()) for t in (a_raw, b_raw))
        unequal = torch.ne(*bits).any(1) if ref.dtype == cand.dtype else ~eq
        differing += int(unequal.sum())
        diff = torch.where(eq, 0.0, torch.where(fin, (a - b).abs(), inf))
        slack = rtol * torch.where(b.isfinite(), b.abs(), 0.0)
        bad = unequal if exact else diff > atol + slack
        violations += int(bad.sum())
        excess = diff - slack
        for _ in range(8):  # make (needed + slack) round up to diff, so needed_atol passes
            low = excess + slack < diff
            if not bool(low.any()):
                break
            excess = torch.where(low, torch.nextafter(excess, excess.new_tensor(inf)), excess)
        needed = max(needed, float(excess.max()))
        rel = torch.where(diff == 0, 0.0, torch.where(diff.isinf(), inf, diff / b.abs()))
        max_abs, max_rel = max(max_abs, float(diff.max())), max(max_rel, float(rel.max()))
        sum_abs += float(diff.sum())
        i = int(torch.where(bad, excess, -inf).argmax() if bool(bad.any()) else diff.argmax())
        best = max(best, (bool(bad[i]), float((excess if bad[i] else diff)[i]), -(start + i)))
        a0, b0 = torch.where(fin, a, 0), torch.where(fin, b, 0)
        dot += float((a0 * b0.conj()).real.sum())
        norm_a += float((a0.abs() ** 2).sum())
        norm_b += float((b0.abs() ** 2).sum())
    norms = math.sqrt(norm_a * norm_b)  # exact for x vs x; split only on over/underflow
    norms = norms if 0 < norms < math.inf else math.sqrt(norm_a) * math.sqrt(norm_b)
    cosine = max(-1.0, min(1.0, dot / norms)) if norms else float(norm_a == norm_b)
    at = -best[2]

    def value(t: torch.Tensor) -> float:
        return float(t[at].to(wide).abs() if complex_ else t[at].to(wide)) if n else math.nan

    index = [int(i) for i in torch.unravel_index(torch.tensor(at), ref.shape)] if n else []
    return Stats(
        atol,
        rtol,
        n,
        max_abs,
        max_rel,
        sum_abs / max(n, 1),
        differing,
        violations,
        violations / max(n, 1),
        cosine,
        index,
        value(b_all),
        value(a_all),
        max(0.0, needed),
        finite,
        violations == 0,
    )


def bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors hold the same bytes (same dtype and shape): no float math and,
    for contiguous tensors, no copy, so identical checkpoints compare at memory speed."""
    import torch

    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    x, y = _flat(a).cpu().view(torch.uint8), _flat(b).cpu().view(torch.uint8)
    if x.storage_offset() % 8 or y.storage_offset() % 8:  # unaligned: byte by byte
        return torch.equal(x, y)
    whole = x.numel() // 8 * 8
    if not torch.equal(x[whole:], y[whole:]):
        return False
    return torch.equal(x[:whole].view(torch.int64), y[:whole].view(torch.int64))  # ~6x faster


def _numbers(check: TensorCheck, stats: Stats) -> str:
    """Copy the statistics into ``check``; say them in words for its note."""
    check.max_abs, check.max_rel = stats.max_abs, stats.max_rel
    check.differing, check.worst_index = stats.differing, stats.worst_index
    return (
        f"{stats.differing} of {stats.numel} elements differ; max |a-b| {stats.max_abs:.3g} "
        f"at {stats.worst_index} (reference {stats.reference_value:.8g}, candidate "
        f"{stats.candidate_value:.8g}); atol {stats.needed_atol:.3g} passes at rtol "
        f"{stats.rtol:g}"
    )


def _check(
    ref: Checkpoint, cand: Checkpoint, pair: Pair, tolerances: Tolerances, reader: SpanReader
) -> TensorCheck:
    """One aligned pair: shape, then dtype (a recorded cast or not), then bytes, then values."""
    rl = ref.lazy(pair.ref) if pair.ref is not None else None
    cl = cand.lazy(pair.cand) if pair.cand is not None else None
    check = TensorCheck(pair.ref or "", pair.cand, "identical", True, how=pair.how)
    if rl is not None:
        check.dtype, check.shape = rl.dtype, list(rl.shape)
    if cl is not None:
        check.candidate_dtype, check.candidate_shape = cl.dtype, list(cl.shape)

    def done(status: str, passed: bool, note: str | None = None) -> TensorCheck:
        check.status, check.passed = status, passed
        check.note = "; ".join(filter(None, [pair.note, note])) or None
        return check

    folded = any(f.metadata.get(OPTIMIZED_KEY) == "1" for f in (ref, cand) if holds_graph(f.format))
    if rl is None or cl is None:
        note = f"not in the {'reference' if rl is None else 'candidate'}"
        if folded:  # an optimised export folds constants away (BatchNorm into Conv...)
            return done("transformed", True, f"{note}: folded by export? outputs decide")
        if pair.how == NOT_A_PARAMETER:  # an ONNX-only constant: no parameter to compare
            return done(NOT_A_PARAMETER, True)
        return done("unexpected" if rl is None else "missing", False, note)
    expected = rl.shape[:-2] + rl.shape[-2:][::-1] if pair.transform == "transposed" else rl.shape
    if cl.shape != expected and not (pair.transform == "reshaped" and cl.numel == rl.numel):
        note = f"shape {list(rl.shape)} in the reference, {list(cl.shape)} in the candidate"
        flipped = len(rl.shape) == 2 and cl.shape == rl.shape[::-1] and rl.dtype == cl.dtype
        if flipped and pair.transform == "identity" and bytes_equal(rl.load().t(), cl.load()):
            note += ": transposed? the values are the reference's transpose"
        return done("shape", False, note)
    cast = rl.dtype != cl.dtype
    if cast and (cand.metadata.get(CAST_KEY) != cl.dtype or not dtypes.DTYPES[rl.dtype].floating):
        return done("dtype", False, f"{rl.dtype} -> {cl.dtype} with no recorded cast")
    if (
        not cast
        and pair.transform in ("identity", "reshaped")
        and rl.span is not None
        and cl.span is not None
        and reader.equal(rl.span, cl.span)
    ):  # the same bytes, compared in the files: no tensor, no torch
        return done("identical", True)
    r, c = rl.load(), cl.load()
    c = c.mT if pair.transform == "transposed" else c.reshape(rl.shape)
    r = r.to(c.dtype) if cast else r  # the reference as the intended cast would give it
    intended = f"intended cast to {cl.dtype}" if cast else None
    if bytes_equal(r, c):
        return done("cast" if cast else "identical", True, intended)
    user = tolerances.for_parameter(pair.ref, cl.dtype)
    atol, rtol = tolerances.for_output(pair.ref, cl.dtype) if cast else (user or (0.0, 0.0))
    stats = compare_values(r, c, atol=atol, rtol=rtol)
    note = _numbers(check, stats)
    if cast:
        return done("cast", stats.passed, f"{intended}, not identical: {note}")
    if folded:
        return done("transformed", True, f"transformed by export: outputs decide; {note}")
    if user and stats.passed:
        return done("close", True, f"within tolerance, not identical: {note}")
    return done("different", False, note)


def compare_parameters(
    ref: Checkpoint, cand: Checkpoint, *, tolerances: Tolerances, progress: Progress | None = None
) -> tuple[list[TensorCheck], list[str]]:
    """One TensorCheck per aligned pair, and the differences in tied-weight sharing.
    Ties a model's config declares (HF folders) count as aliases of both sides: the two
    are compared as one model, so a file converted out of a folder, which carries no
    config, drops the same names (``lm_head.weight``) for the same reason."""
    ties = [*hf.config_ties(ref.source), *hf.config_ties(cand.source)]
    ref, cand = with_config_ties(ref, ties), with_config_ties(cand, ties)
    pairs = [
        (p, ref.lazy(p.ref).nbytes + cand.lazy(p.cand).nbytes if p.ref and p.cand else 0)
        for p in align(ref, cand)
    ]
    total, done, checks = sum(size for _, size in pairs), 0, []
    with SpanReader() as reader:
        for pair, size in pairs:
            checks.append(_check(ref, cand, pair, tolerances, reader))  # one pair at a time
            done += size
            if progress is not None and size:
                progress(done, total)
    return checks, sharing(ref, cand, [p for p, _ in pairs])


def compare_outputs(
    name: str, ref: torch.Tensor, cand: torch.Tensor, *, tolerances: Tolerances, device: str
) -> OutputCheck:
    """One output leaf; a shape or dtype mismatch fails (with numbers for a dtype one)."""
    dtype = str(ref.dtype).removeprefix("torch.")
    atol, rtol = tolerances.for_output(name, dtype)
    where = {"name": name, "device": device, "shape": list(ref.shape), "dtype": dtype}
    if tuple(ref.shape) != tuple(cand.shape):
        nan = dict.fromkeys(("max_abs", "max_rel", "mean_abs", "cosine", "needed_atol"), math.nan)
        return OutputCheck(
            **where,
            **nan,
            passed=False,
            atol=atol,
            rtol=rtol,
            fraction_out=1.0,
            worst_index=[],
            reference_value=math.nan,
            candidate_value=math.nan,
            note=f"shape {list(ref.shape)} in the reference, {list(cand.shape)} in the candidate",
        )
    stats = asdict(compare_values(ref, cand, atol=atol, rtol=rtol))
    check = OutputCheck(**where, **{k: v for k, v in stats.items() if k in OUTPUT_FIELDS})
    if ref.dtype != cand.dtype:
        other = str(cand.dtype).removeprefix("torch.")
        check.passed = False
        check.note = f"dtype {dtype} in the reference, {other} in the candidate"
    return check
