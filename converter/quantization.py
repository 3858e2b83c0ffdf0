"""Quantised GGUF files in ``convert`` and ``verify``.

``convert``: a GGUF reader dequantises Q8_0, Q4_K... tensors to float32 and records
which (``nnconv.quantization``); writing them anywhere stores dequantised values, so
:func:`require_cast` asks for that explicitly (``--dtype float32`` keeps the
dequantised values exactly) and renames the record ``nnconv.dequantized``: the output
says where its values came from, and is not taken for quantised when read again.

``verify``: a GGUF file written by llama.cpp's ``convert_hf_to_gguf.py`` names tensors
its own way (``blk.0.attn_q.weight``), permutes the rows of Llama-style Q and K
projections for its rotary layout, and once quantised cannot be bit-identical to the
weights it came from.  When one side of ``verify`` is such a file,
:func:`compare_parameters` maps names through gguf's own tensor name map for the file's
``general.architecture``, undoes the Q/K permutation where it makes the values match,
and compares each tensor by error: max |a - b|, relative RMS error ||a - b|| / ||b||,
cosine similarity, and the GGML type the tensor is stored as.  Verdict: names and
shapes must match (a missing, unexpected or mis-shaped tensor fails); values pass when
the cosine similarity is at least :data:`MIN_COSINE`: far below what quantisation leaves
(Gaussian weights: Q8_0 0.99998, Q4_K 0.997, MXFP4 0.993) and far above another tensor,
or a layout left permuted (~0).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from nnconv.formats.checkpoint import Checkpoint
from nnconv.formats.errors import UsageError
from nnconv.formats.keys import DEQUANTIZED_KEY, QUANT_KEY

from . import compare
from .report import CandidateReport, TensorCheck

if TYPE_CHECKING:
    import torch

MIN_COSINE = 0.8
CHUNK = 1 << 22  # elements per float64 pass
HOW = "gguf name map"
QK = re.compile(r"^blk\.(\d+)\.attn_([qk])\.(?:weight|bias)$")
BLOCK = re.compile(r"^blk\.(\d+)\.")
# Tensors llama.cpp's converter computes rather than copies (no source counterpart).
GENERATED = re.compile(r"^(?:rope_freqs|rope_factors_long|rope_factors_short)\.weight$")
# Source buffers llama.cpp's converter leaves out (it recomputes them).
BUFFERS = re.compile(r"(?:rotary_emb\.inv_freq|rope\.freqs)$")
PERMUTED = "Q/K permutation undone"


@dataclass
class QuantError:
    """One tensor of a GGUF file against its reference counterpart."""

    name: str  # the reference's name
    candidate_name: str
    quant_type: str  # the GGUF side's GGML type ("Q4_K", "Q8_0"), or its dtype when unquantised
    shape: list[int]
    max_abs: float  # max |candidate - reference|
    rel_rms: float  # ||candidate - reference|| / ||reference||
    cosine: float
    layout: str  # "as stored", or PERMUTED
    passed: bool


def quantized(ckpt: Checkpoint) -> dict[str, str]:
    """{tensor: GGML type} of the tensors a GGUF reader dequantised (present ones only)."""
    return {k: v for k, v in types_record(ckpt.metadata).items() if k in ckpt.tensors}


def types_record(metadata: Mapping[str, str], key: str = QUANT_KEY) -> dict[str, str]:
    """The {tensor: GGML type} record under ``key`` (empty when absent or malformed)."""
    try:
        record = json.loads(metadata.get(key, "{}"))
    except (ValueError, RecursionError):
        return {}
    return {str(k): str(v) for k, v in record.items()} if isinstance(record, dict) else {}


def summary(types: dict[str, str]) -> str:
    """``"193 Q4_K, 33 Q6_K"``."""
    return ", ".join(f"{n} {t}" for t, n in Counter(types.values()).most_common())


def require_cast(ckpt: Checkpoint, dtype: str | None, subject: Any = None) -> Checkpoint:
    """``ckpt`` ready to write: dequantised tensors only with a ``--dtype`` cast."""
    types = quantized(ckpt)
    if not types:
        return ckpt
    if not dtype:
        raise UsageError(
            ckpt.source or subject,
            f"{_tensors(len(types))} stored quantised ({summary(types)}): converting "
            "dequantises them",
            remedy="say so: --dtype float32 (the dequantised values exactly) or "
            "--dtype bfloat16 (half the size)",
        )
    metadata = {k: v for k, v in ckpt.metadata.items() if k != QUANT_KEY}
    metadata[DEQUANTIZED_KEY] = json.dumps(types, separators=(",", ":"))
    return replace(ckpt, metadata=metadata)


def _tensors(n: int) -> str:
    return f"{n:,} tensor{'s are' if n != 1 else ' is'}"


# --- verify -------------------------------------------------------------------


def compare_parameters(
    ref: Checkpoint, cand: Checkpoint, *, tolerances: Any, report: CandidateReport
) -> tuple[list[TensorCheck], list[str]]:
    """:func:`compare.compare_parameters`, or by error when one side is a quantised or
    llama.cpp-named GGUF file (rows in ``report.quantization``, a note in its notes)."""
    plan = _plan(ref, cand)
    if plan is None:
        return compare.compare_parameters(ref, cand, tolerances=tolerances)
    gguf_side, pairs, extra = plan
    checks: list[TensorCheck] = []
    for r, c in pairs:
        check, row = _compare(ref, cand, r, c, gguf_side)
        checks.append(check)
        if row is not None:
            report.quantization.append(row)
    for name in extra:  # only in the GGUF file
        generated = bool(GENERATED.match(name))
        ref_name, cand_name = (name, None) if gguf_side is ref else ("", name)
        status = (
            "not a parameter" if generated else ("missing" if cand_name is None else "unexpected")
        )
        note = "computed by llama.cpp's converter" if generated else "only in the GGUF file"
        checks.append(TensorCheck(ref_name, cand_name, status, generated, how=HOW, note=note))
    types = quantized(gguf_side)
    arch = gguf_side.metadata.get("general.architecture")
    said = [f"quantised ({summary(types)})"] if types else []
    if any(r != c and r and c for r, c in pairs):
        said.append(f"names mapped through gguf's tensor map for {arch}")
    said.append("values compared by error, not bit identity")
    report.notes.append(
        f"{gguf_side.source}: {'; '.join(said)}; a tensor passes at cosine >= {MIN_COSINE}"
    )
    return checks, []


Pairs = list[tuple[str | None, str | None]]  # (reference name, candidate name)


def _plan(ref: Checkpoint, cand: Checkpoint) -> tuple[Checkpoint, Pairs, list[str]] | None:
    """(GGUF side, [(reference name, candidate name)], GGUF-only names), or None when
    neither side needs comparing by error."""
    for side, other in ((cand, ref), (ref, cand)):  # a side with gguf's names or types
        mapped = _name_map(side, [*other.tensors, *other.aliases])
        if not (quantized(side) or mapped):
            continue
        pairs: Pairs = []
        taken: set[str] = set()
        for name in [*other.tensors, *other.aliases]:
            target = name if name in side.tensors else mapped.get(name)
            if name in other.aliases and (target is None or target in taken):
                continue  # a tied name the GGUF file leaves out (llama.cpp drops output.weight)
            if target is not None:
                taken.add(target)
            pairs.append((name, target) if side is cand else (target, name))
        extra = [n for n in side.tensors if n not in taken]
        return side, pairs, extra
    return None


def _name_map(side: Checkpoint, names: Iterable[str]) -> dict[str, str]:
    """{other name: GGUF name} through gguf's tensor map of the file's architecture."""
    import gguf

    arch = side.metadata.get("general.architecture")
    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        return {}
    blocks = [int(m.group(1)) + 1 for n in side.tensors if (m := BLOCK.match(n))]
    count = _number(side, f"{arch}.block_count", None)
    table = gguf.get_tensor_name_map(arch_id, max([*blocks, count or 0, 1]))
    out = {}
    for name in names:
        if name not in side.tensors:
            target = table.get_name(name, try_suffixes=(".weight", ".bias"))
            if target is not None and target in side.tensors:
                out[name] = target
    return out


def _number(side: Checkpoint, key: str, block: int | None) -> int | None:
    """An integer key/value (a per-block list answers for ``block``)."""
    try:
        value = json.loads(side.metadata.get(key, "null"))
    except ValueError:
        return None
    if isinstance(value, list) and block is not None and block < len(value):
        value = value[block]
    return value if type(value) is int and value > 0 else None


def _compare(
    ref: Checkpoint, cand: Checkpoint, r: str | None, c: str | None, side: Checkpoint
) -> tuple[TensorCheck, QuantError | None]:
    rl = ref.lazy(r) if r is not None else None
    cl = cand.lazy(c) if c is not None else None
    check = TensorCheck(r or "", c, "identical", True, how=HOW if r != c else "name")
    if rl is None or cl is None:
        check.status, check.passed = ("missing" if cl is None else "unexpected"), False
        check.note = f"not in the {'candidate' if cl is None else 'reference'}"
        if BUFFERS.search((r if cl is None else c) or ""):
            check.status, check.passed = "not a parameter", True
            check.note = "a rotary-embedding buffer llama.cpp recomputes"
        return check, None
    check.dtype, check.shape = rl.dtype, list(rl.shape)
    check.candidate_dtype, check.candidate_shape = cl.dtype, list(cl.shape)
    if rl.shape != cl.shape:
        check.status, check.passed = "shape", False
        check.note = f"shape {list(rl.shape)} in the reference, {list(cl.shape)} in the candidate"
        return check, None
    gguf_name = c if side is cand else r
    assert gguf_name is not None
    kind = quantized(side).get(gguf_name) or side.tensors[gguf_name].dtype  # as stored
    a, b = cl.load(), rl.load()
    stats, layout = error_stats(b, a), "as stored"
    heads = _heads(side, gguf_name, rl.shape)
    if heads:
        if side is cand:
            other = error_stats(b, unpermute(a, heads))
        else:
            other = error_stats(unpermute(b, heads), a)
        if other[2] > stats[2]:
            stats, layout = other, PERMUTED
    max_abs, rel_rms, cosine, identical = stats
    passed = identical or cosine >= MIN_COSINE
    row = QuantError(
        r or "", c or "", kind, list(rl.shape), max_abs, rel_rms, cosine, layout, passed
    )
    check.max_abs = max_abs
    numbers = f"max_abs {max_abs:.3g}, rel RMS {rel_rms:.3g}, cosine {cosine:.6f}"
    if layout == PERMUTED:
        numbers += f" ({PERMUTED})"
    if identical:
        check.note = f"{kind}, {PERMUTED}" if layout == PERMUTED else None
    elif passed:
        check.status, check.note = "close", f"{kind}, compared by error: {numbers}"
    else:
        check.status, check.passed = "different", False
        check.note = (
            f"{kind}: {numbers}: cosine below {MIN_COSINE}, not the reference's values "
            "(another tensor, or a layout nnconv does not undo)"
        )
    return check, row


def _heads(side: Checkpoint, name: str, shape: tuple[int, ...]) -> int | None:
    """The head count llama.cpp permuted a Q/K projection by, when ``name`` is one."""
    match = QK.match(name)
    arch = side.metadata.get("general.architecture")
    if match is None or not shape or not arch:
        return None
    block = int(match.group(1))
    n = _number(side, f"{arch}.attention.head_count", block)
    if match.group(2) == "k":
        n = _number(side, f"{arch}.attention.head_count_kv", block) or n
    return n if n and shape[0] % (2 * n) == 0 else None


def unpermute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``LlamaModel.permute`` (rows of each head: halves interleaved)."""
    rows = t.shape[0]
    return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def error_stats(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, float, float, bool]:
    """(max |a - b|, ||a - b|| / ||b||, cosine, all equal) in float64, chunk by chunk."""
    import torch

    b_all, a_all = ref.detach().reshape(-1), cand.detach().reshape(-1)
    max_abs = sq_diff = sq_a = sq_b = dot = 0.0
    for start in range(0, b_all.numel(), CHUNK):
        b = b_all[start : start + CHUNK].to(torch.float64)
        a = a_all[start : start + CHUNK].to(torch.float64)
        d = a - b
        worst = float(d.abs().max())  # NaN or inf where either side is not finite
        if not math.isfinite(worst):
            return math.inf, math.inf, math.nan, False
        max_abs = max(max_abs, worst)
        sq_diff += float(torch.dot(d, d))
        sq_a, sq_b, dot = (
            sq_a + float(torch.dot(a, a)),
            sq_b + float(torch.dot(b, b)),
            dot + float(torch.dot(a, b)),
        )
    if max_abs == 0:
        return 0.0, 0.0, 1.0, True
    rel_rms = math.sqrt(sq_diff / sq_b) if sq_b else math.inf
    cosine = dot / math.sqrt(sq_a * sq_b) if sq_a and sq_b else 0.0
    return max_abs, rel_rms, max(-1.0, min(1.0, cosine)), False


def render(rows: list[QuantError]) -> list[str]:
    """The per-tensor table ``nnconv verify`` prints, then one line per GGML type."""
    if not rows:
        return []
    width = min(48, max(len(r.name) for r in rows))
    gwidth = min(32, max(len(r.candidate_name) for r in rows))
    lines = [
        f"  quantisation error (a tensor passes at cosine >= {MIN_COSINE}):",
        f"        {'reference':<{width}}  {'candidate':<{gwidth}}  {'type':<7} "
        f"{'max_abs':>9}  {'rel_rms':>9}  {'cosine':>9}",
    ]
    for r in rows:
        flag = "  unpermuted" if r.layout == PERMUTED else ""
        lines.append(
            f"  {'PASS' if r.passed else 'FAIL'}  {r.name:<{width}}  {r.candidate_name:<{gwidth}}  "
            f"{r.quant_type:<7} {r.max_abs:>9.3g}  {r.rel_rms:>9.3g}  {r.cosine:>9.6f}{flag}"
        )
    for kind in dict.fromkeys(r.quant_type for r in rows):
        mine = [r for r in rows if r.quant_type == kind]
        worst = min(mine, key=lambda r: r.cosine if not math.isnan(r.cosine) else -2)
        rms = math.sqrt(sum(r.rel_rms**2 for r in mine) / len(mine))
        lines.append(
            f"  {kind}: {len(mine)} tensors, overall rel RMS {rms:.3g}, "
            f"lowest cosine {worst.cosine:.6f} ({worst.name})"
        )
    return lines
