"""nnconv verify's comparisons: tolerances, closeness statistics, byte identity, alignment of
two files' tensors and the per-parameter verdicts, on real tensors and real files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from nnconv.converter import load, save
from nnconv.converter.compare import (
    Tolerances,
    align,
    bytes_equal,
    compare_outputs,
    compare_parameters,
    compare_values,
    parse_tolerances,
)
from nnconv.formats.errors import UsageError
from nnconv.formats.keys import MAPPING_KEY, OPTIMIZED_KEY
from nnconv.formats.objects import from_object

NONE = Tolerances()


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(4, 6, generator=g),
        "fc.bias": torch.randn(4, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def files(tmp_path: Path, ref: dict, cand: dict, **kwargs):
    """Save both sides as safetensors (in a fresh folder each call) and load them back."""
    folder = tmp_path / str(len(list(tmp_path.iterdir())))
    folder.mkdir()
    save(ref, folder / "ref.safetensors")
    save(cand, folder / "cand.safetensors", **kwargs)
    return load(folder / "ref.safetensors"), load(folder / "cand.safetensors")


def by_name(checks):
    return {c.name or c.candidate_name: c for c in checks}


# --- tolerances -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_default_tolerances_are_torch_testings(dtype):
    from torch.testing._comparison import default_tolerances

    rtol, atol = default_tolerances(dtype)
    assert NONE.for_output("out", dtype) == (atol, rtol)
    assert NONE.for_output("out", str(dtype).removeprefix("torch.")) == (atol, rtol)
    # Same verdicts as assert_close just inside and just outside the bound.
    b = torch.tensor([1.0, -3.0, 0.0], dtype=torch.float64)
    for scale, ok in ((0.9, True), (1.5, False)):
        a = (b + scale * (atol + rtol * b.abs())).to(dtype)
        ref = b.to(dtype)
        try:
            torch.testing.assert_close(a, ref)
            theirs = True
        except AssertionError:
            theirs = False
        stats = compare_values(ref, a, atol=atol, rtol=rtol)
        assert stats.passed == theirs == ok


def test_integers_and_bool_compare_exactly_by_default():
    assert NONE.for_output("x", torch.int64) == (0.0, 0.0)
    assert NONE.for_output("x", "bool") == (0.0, 0.0)
    assert NONE.for_output("x", "float8_e4m3fn") == (1e-3, 0.125)


def test_parse_global_and_named_tolerances():
    tol = parse_tolerances(["1e-3", "encoder.fc.weight:1e-2", "a:b.c:5"], ["encoder:0.5"])
    assert tol.for_output("encoder.fc.weight", "float32") == (1e-2, 0.5)
    assert tol.for_output("encoder.other", "float32") == (1e-3, 0.5)  # dotted parent
    assert tol.for_output("a:b.c", "float32") == (5.0, 1.3e-6)  # split on the last colon
    assert tol.for_output("decoder.x", torch.float16) == (1e-3, 1e-3)
    assert tol.for_parameter("decoder.x", "float32") == (1e-3, 1.3e-6)


def test_parameters_need_identity_unless_tolerances_cover_them():
    assert NONE.for_parameter("fc.weight", "float32") is None
    named = parse_tolerances(["fc.weight:1e-2"], [])
    assert named.for_parameter("fc.weight", "float32") == (1e-2, 1.3e-6)
    assert named.for_parameter("fc.bias", "float32") is None
    assert parse_tolerances([], ["0"]).for_parameter("x", "float16") == (1e-5, 0.0)


@pytest.mark.parametrize("bad", ["abc", "fc.weight:", ":1e-3", "-1", "nan", "x:1e-3e"])
def test_bad_tolerances_name_the_value(bad):
    with pytest.raises(UsageError) as info:
        parse_tolerances([bad], [])
    assert repr(bad) in str(info.value) and "--atol" in info.value.cli_message()
    with pytest.raises(UsageError, match="rtol"):
        parse_tolerances([], [bad])


# --- closeness statistics ---------------------------------------------------------------


def test_one_perturbed_element():
    b = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    a = b.clone()
    a[2, 3] += 1e-3
    s = compare_values(b, a, atol=1e-5, rtol=1.3e-6)
    assert not s.passed and s.differing == 1 and s.violations == 1
    assert s.worst_index == [2, 3]
    assert s.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert s.needed_atol == pytest.approx(1e-3 - 1.3e-6 * abs(float(b[2, 3])), rel=1e-3)
    assert s.reference_value == float(b[2, 3]) and s.candidate_value == float(a[2, 3])
    assert s.fraction_out == pytest.approx(1 / 35) and s.cosine > 0.999999
    assert compare_values(b, a, atol=s.needed_atol, rtol=1.3e-6).passed


def test_nan_negative_zero_and_infinities():
    inf, nan = math.inf, math.nan
    b = torch.tensor([nan, 0.0, inf, -inf, 1.0])
    same = compare_values(b, b.clone(), atol=0, rtol=0)
    assert same.passed and same.differing == 0 and not same.finite and same.max_abs == 0
    signed = compare_values(b, torch.tensor([nan, -0.0, inf, -inf, 1.0]), atol=0, rtol=0)
    assert signed.passed and signed.differing == 1  # -0.0 == 0.0, but not the same bits
    for i, value in [(0, 1.0), (4, nan), (2, -inf), (2, 1e30), (4, inf)]:
        a = b.clone()
        a[i] = value
        s = compare_values(b, a, atol=1e9, rtol=1e9)
        assert not s.passed and s.worst_index == [i] and s.max_abs == inf and s.needed_atol == inf


def test_relative_error_cosine_and_zero_edge_cases():
    zeros = torch.zeros(3)
    s = compare_values(zeros, zeros.clone(), atol=0, rtol=0)
    assert s.cosine == 1.0 and s.max_rel == 0 and s.passed
    s = compare_values(zeros, torch.tensor([0.0, 2.0, 0.0]), atol=0, rtol=0.5)
    assert s.max_rel == math.inf and s.cosine == 0.0 and s.worst_index == [1]
    s = compare_values(torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0]), atol=0, rtol=0)
    assert s.cosine == pytest.approx(-1.0) and s.max_rel == 2.0 and s.mean_abs == 2.0
    empty = compare_values(torch.empty(0, 3), torch.empty(0, 3), atol=0, rtol=0)
    assert empty.passed and empty.worst_index == [] and empty.numel == 0


def test_chunking_gives_the_same_statistics():
    g = torch.Generator().manual_seed(3)
    b = torch.randn(10, 11, generator=g)
    a = b + 1e-4 * torch.randn(10, 11, generator=g)
    whole, chunked = (compare_values(b, a, atol=1e-5, rtol=1e-4, chunk=c) for c in (1 << 20, 7))
    assert whole.worst_index == chunked.worst_index
    for key in ("max_abs", "max_rel", "needed_atol", "cosine", "mean_abs", "fraction_out"):
        assert getattr(whole, key) == pytest.approx(getattr(chunked, key), rel=1e-12), key
    assert (whole.violations, whole.differing) == (chunked.violations, chunked.differing)


def test_low_precision_and_integer_dtypes():
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    a = b.clone()
    a[1] = 2.015625  # one bfloat16 step above 2.0
    atol, rtol = NONE.for_output("x", b.dtype)
    s = compare_values(b, a, atol=atol, rtol=rtol)
    assert s.passed and s.differing == 1 and s.max_abs == pytest.approx(0.015625)
    f8 = torch.tensor([0.5, 1.0], dtype=torch.float8_e4m3fn)
    assert compare_values(f8, f8.clone(), atol=0, rtol=0).differing == 0
    big = torch.tensor([2**60, 5], dtype=torch.int64)
    s = compare_values(big, big + torch.tensor([1, 0]), atol=0, rtol=0)
    assert not s.passed and s.differing == 1 and s.worst_index == [0]  # float64 can't tell
    flags = torch.tensor([True, False, True])
    s = compare_values(flags, ~flags, atol=0, rtol=0)
    assert s.differing == 3 and s.max_abs == 1.0 and not s.passed


def test_compare_values_refuses_different_shapes():
    with pytest.raises(UsageError, match="shapes"):
        compare_values(torch.zeros(2, 3), torch.zeros(3, 2), atol=0, rtol=0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=40),
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=40, max_size=40),
    st.sampled_from([0.0, 1.3e-6, 1e-3, 0.5]),
)
def test_needed_atol_is_the_smallest_passing_atol(values, noise, rtol):
    b = torch.tensor(values, dtype=torch.float32)
    same = compare_values(b, b.clone(), atol=0, rtol=0)
    assert same.passed and same.max_abs == 0 and same.differing == 0 and same.needed_atol == 0
    a = b + torch.tensor(noise[: len(values)], dtype=torch.float32) * 1e-3
    needed = compare_values(b, a, atol=0, rtol=rtol).needed_atol
    assert compare_values(b, a, atol=needed, rtol=rtol).passed
    if needed > 0:
        assert not compare_values(b, a, atol=needed * (1 - 1e-4), rtol=rtol).passed


# --- byte identity ------------------------------------------------------------------------


def test_bytes_equal():
    x = torch.arange(40, dtype=torch.float32)
    assert bytes_equal(x, x.clone()) and bytes_equal(x, x)
    assert bytes_equal(x[1:], x.clone()[1:])  # storage not 8-byte aligned: the slow path
    y = x.clone()
    y[-1] = -y[-1]
    assert not bytes_equal(x, y) and not bytes_equal(x[1:], y[1:])
    assert not bytes_equal(x, x.double()) and not bytes_equal(x, x.reshape(5, 8))
    m = torch.randn(6, 9)
    assert bytes_equal(m.t(), m.t().contiguous())  # non-contiguous views compare by value
    assert not bytes_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    nan = torch.tensor([math.nan])
    assert bytes_equal(nan, nan.clone())


# --- parameters from real files ---------------------------------------------------------


def test_identical_files_in_two_formats(tmp_path):
    save(state(), tmp_path / "ref.pt")
    save(state(), tmp_path / "cand.safetensors")
    seen = []
    checks, tied = compare_parameters(
        load(tmp_path / "ref.pt"),
        load(tmp_path / "cand.safetensors"),
        tolerances=NONE,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert [c.status for c in checks] == ["identical"] * 4 and all(c.passed for c in checks)
    assert [c.how for c in checks] == ["name"] * 4 and tied == []
    assert seen[-1][0] == seen[-1][1] == 2 * (24 + 4 + 4) * 4 + 2 * 8


def test_a_perturbed_element_is_different_then_close_with_atol(tmp_path):
    cand = state()
    cand["fc.weight"][2, 3] += 1e-3
    ref, cand = files(tmp_path, state(), cand)
    check = by_name(compare_parameters(ref, cand, tolerances=NONE)[0])["fc.weight"]
    assert check.status == "different" and not check.passed
    assert check.differing == 1 and check.worst_index == [2, 3]
    assert check.max_abs == pytest.approx(1e-3, rel=1e-3) and "[2, 3]" in check.note
    close = compare_parameters(ref, cand, tolerances=parse_tolerances(["1e-2"], []))[0]
    check = by_name(close)["fc.weight"]
    assert check.status == "close" and check.passed and check.differing == 1
    assert "not identical" in check.note
    named = parse_tolerances(["fc.bias:1"], [])  # a tolerance for another name: no help
    assert by_name(compare_parameters(ref, cand, tolerances=named)[0])["fc.weight"].status == (
        "different"
    )


def test_missing_unexpected_and_transposed_under_the_same_name(tmp_path):
    cand = state()
    del cand["bn.running_mean"]
    cand["extra"] = torch.ones(3, dtype=torch.float16)
    cand["fc.weight"] = cand["fc.weight"].t().contiguous()
    ref, cand = files(tmp_path, state(), cand)
    checks = by_name(compare_parameters(ref, cand, tolerances=NONE)[0])
    missing, extra, flipped = checks["bn.running_mean"], checks["extra"], checks["fc.weight"]
    assert (missing.status, missing.passed, missing.candidate_name) == ("missing", False, None)
    assert (extra.status, extra.passed, extra.name) == ("unexpected", False, "")
    assert extra.candidate_dtype == "float16" and extra.candidate_shape == [3]
    assert flipped.status == "shape" and not flipped.passed and "transposed?" in flipped.note
    assert flipped.shape == [4, 6] and flipped.candidate_shape == [6, 4]


def test_wrapper_prefixes(tmp_path):
    wrapped = {f"module._orig_mod.{k}": v for k, v in state().items()}
    ref, cand = files(tmp_path, state(), wrapped)
    checks = compare_parameters(ref, cand, tolerances=NONE)[0]
    assert {(c.status, c.how) for c in checks} == {("identical", "prefix")}
    assert checks[0].candidate_name == "module._orig_mod.fc.weight"


def test_alignment_by_value_renamed_and_transposed(tmp_path):
    s = state()
    s["zeros.a"], s["zeros.b"] = torch.zeros(4), torch.zeros(4)
    renamed = {"dense/kernel": s["fc.weight"].t().contiguous(), "dense/bias": s["fc.bias"]}
    renamed |= {"mean": s["bn.running_mean"], "count": s["bn.num_batches_tracked"]}
    renamed |= {"z1": torch.zeros(4), "z2": torch.zeros(4)}
    ref, cand = files(tmp_path, s, renamed)
    pairs = {p.ref: p for p in align(ref, cand)}
    assert (pairs["fc.weight"].cand, pairs["fc.weight"].how) == (
        "dense/kernel",
        "value, transposed",
    )
    assert (pairs["fc.bias"].cand, pairs["fc.bias"].how) == ("dense/bias", "value")
    assert [pairs["zeros.a"].cand, pairs["zeros.b"].cand] == ["z1", "z2"]
    assert "ambiguous" in pairs["zeros.a"].note and pairs["fc.bias"].note is None
    checks = compare_parameters(ref, cand, tolerances=NONE)[0]
    assert all(c.status == "identical" for c in checks), [(c.name, c.status) for c in checks]
    assert len(checks) == 6 and "ambiguous" in by_name(checks)["zeros.b"].note


def test_recorded_cast_passes_and_unrecorded_dtype_change_fails(tmp_path):
    ref, cand = files(tmp_path, state(), state(), dtype="float16")
    checks = by_name(compare_parameters(ref, cand, tolerances=NONE)[0])
    assert checks["fc.weight"].status == "cast" and checks["fc.weight"].passed
    assert checks["fc.weight"].note == "intended cast to float16"
    assert checks["bn.num_batches_tracked"].status == "identical"  # ints are not cast
    halved = {k: (v.half() if v.is_floating_point() else v) for k, v in state().items()}
    ref, cand = files(tmp_path, state(), halved)
    check = by_name(compare_parameters(ref, cand, tolerances=NONE)[0])["fc.weight"]
    assert check.status == "dtype" and not check.passed and "no recorded cast" in check.note


def test_cast_that_is_not_the_reference_rounded_is_compared_with_tolerance(tmp_path):
    cand = {k: (v.half() if v.is_floating_point() else v) for k, v in state().items()}
    cand["fc.bias"][0] = cand["fc.bias"][0] + 0.5  # far outside float16's tolerance
    ckpt = from_object(cand)
    ckpt.metadata["nnconv.cast"] = "float16"
    save(ckpt, tmp_path / "cand.safetensors")
    save(state(), tmp_path / "ref.safetensors")
    ref, cand = load(tmp_path / "ref.safetensors"), load(tmp_path / "cand.safetensors")
    check = by_name(compare_parameters(ref, cand, tolerances=NONE)[0])["fc.bias"]
    assert check.status == "cast" and not check.passed and check.worst_index == [0]


def onnx_file(path: Path, inits: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """A real ONNX model: ``y = x`` plus ``inits`` as initializers and ``meta`` as props."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    tensors = [numpy_helper.from_array(v.numpy(), name=k) for k, v in inits.items()]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y], tensors)
    model = helper.make_model(graph)
    helper.set_model_props(model, meta)
    onnx.save(model, str(path))
    return path


def test_optimized_onnx_export_is_transformed(tmp_path):
    s = state()
    folded = {k: v + 0.25 if k == "fc.bias" else v for k, v in s.items()}
    save(s, tmp_path / "ref.safetensors")
    for flag, status in (("1", "transformed"), ("0", "different")):
        onnx_file(tmp_path / f"m{flag}.onnx", folded, {OPTIMIZED_KEY: flag})
        cand = load(tmp_path / f"m{flag}.onnx")
        checks = compare_parameters(load(tmp_path / "ref.safetensors"), cand, tolerances=NONE)[0]
        check = by_name(checks)["fc.bias"]
        assert check.status == status and check.passed == (flag == "1")
        assert check.max_abs == pytest.approx(0.25)
        assert by_name(checks)["fc.weight"].status == "identical"


def test_optimized_onnx_export_may_fold_tensors_away(tmp_path):
    s = state()
    save(s, tmp_path / "ref.safetensors")
    kept = {k: v for k, v in s.items() if k != "bn.running_mean"}
    for flag, status in (("1", "transformed"), ("0", "missing")):
        onnx_file(tmp_path / f"m{flag}.onnx", kept, {OPTIMIZED_KEY: flag})
        cand = load(tmp_path / f"m{flag}.onnx")
        checks = compare_parameters(load(tmp_path / "ref.safetensors"), cand, tolerances=NONE)[0]
        check = by_name(checks)["bn.running_mean"]
        assert (check.status, check.passed) == (status, flag == "1"), check


def test_onnx_merged_initializers_and_dropped_counters(tmp_path):
    """Exporters store equal initializers once and drop num_batches_tracked."""
    s = state()
    s["a.bias"], s["b.bias"] = torch.zeros(4), torch.zeros(4)
    save(s, tmp_path / "ref.safetensors")
    merged = {k: v for k, v in s.items() if k not in ("b.bias", "bn.num_batches_tracked")}
    onnx_file(tmp_path / "m.onnx", merged, {OPTIMIZED_KEY: "0"})
    st_ckpt, onnx_ckpt = load(tmp_path / "ref.safetensors"), load(tmp_path / "m.onnx")
    for ref, cand in ((st_ckpt, onnx_ckpt), (onnx_ckpt, st_ckpt)):
        checks, tied = compare_parameters(ref, cand, tolerances=NONE)
        assert all(c.status == "identical" for c in checks), checks
        assert tied == [] and "bn.num_batches_tracked" not in by_name(checks)
        pair = next(c for c in checks if "b.bias" in (c.name, c.candidate_name))
        assert pair.how == "value" and "stored once" in pair.note
    save(merged, tmp_path / "merged.safetensors")  # in any other format, b.bias is missing
    checks = compare_parameters(st_ckpt, load(tmp_path / "merged.safetensors"), tolerances=NONE)
    statuses = {c.name: c.status for c in checks[0]}
    assert statuses["b.bias"] == statuses["bn.num_batches_tracked"] == "missing"


def test_recorded_onnx_mapping_aligns_both_ways(tmp_path):
    s = state()
    inits = {"onnx::MatMul_7": s["fc.weight"].t().contiguous(), "val_3": s["fc.bias"]}
    onnx_path = onnx_file(tmp_path / "m.onnx", inits, {})
    table = {
        "fc.weight": {"initializer": "onnx::MatMul_7", "how": "value", "transform": "transposed"},
        "fc.bias": {"initializer": "val_3", "how": "value", "transform": "identity"},
    }
    imported = from_object({k: s[k] for k in ("fc.weight", "fc.bias")})
    imported.metadata[MAPPING_KEY] = json.dumps(table)
    save(imported, tmp_path / "imported.safetensors")
    onnx_ckpt, st_ckpt = load(onnx_path), load(tmp_path / "imported.safetensors")
    for ref, cand in ((onnx_ckpt, st_ckpt), (st_ckpt, onnx_ckpt)):
        checks = compare_parameters(ref, cand, tolerances=NONE)[0]
        assert {(c.status, c.how) for c in checks} == {("identical", "mapping")}, checks
        assert len(checks) == 2


def test_tied_sharing_differences_both_ways(tmp_path):
    emb = torch.randn(5, 3)
    tied = {"emb.weight": emb, "head.weight": emb}
    split = {"emb.weight": emb.clone(), "head.weight": emb.clone()}
    ref, cand = files(tmp_path, tied, split)
    checks, diffs = compare_parameters(ref, cand, tolerances=NONE)
    assert all(c.status == "identical" for c in checks) and len(checks) == 2
    assert diffs == ["head.weight shares emb.weight in the reference but not in the candidate"]
    _, diffs = compare_parameters(cand, ref, tolerances=NONE)
    assert diffs == ["head.weight shares emb.weight in the candidate but not in the reference"]
    ref, cand = files(tmp_path, tied, dict(tied))
    assert compare_parameters(ref, cand, tolerances=NONE)[1] == []
    ref, cand = files(tmp_path, tied, {"emb.weight": emb})
    assert "absent from the candidate" in compare_parameters(ref, cand, tolerances=NONE)[1][0]


# --- outputs ------------------------------------------------------------------------------


def test_compare_outputs():
    b = torch.randn(2, 3)
    ok = compare_outputs("output.logits", b, b + 1e-7, tolerances=NONE, device="cpu")
    assert ok.passed and (ok.atol, ok.rtol) == (1e-5, 1.3e-6) and ok.dtype == "float32"
    loose = parse_tolerances(["output:1"], [])
    worse = compare_outputs("output.logits", b, b + 0.5, tolerances=loose, device="cpu")
    assert worse.passed and worse.needed_atol == pytest.approx(0.5, rel=1e-3)
    bad = compare_outputs("output", b, b + 0.5, tolerances=NONE, device="cpu vs cuda")
    assert not bad.passed and bad.fraction_out == 1.0 and bad.device == "cpu vs cuda"
    shape = compare_outputs("output", b, b.t(), tolerances=NONE, device="cpu")
    assert not shape.passed and "shape" in shape.note and math.isnan(shape.max_abs)
    dtype = compare_outputs("output", b, b.double(), tolerances=NONE, device="cpu")
    assert not dtype.passed and "dtype" in dtype.note and dtype.max_abs < 1e-6


def test_int_and_bool_outputs_are_exact():
    ids = torch.tensor([[1, 2], [3, 4]])
    assert compare_outputs("ids", ids, ids.clone(), tolerances=NONE, device="cpu").passed
    off = compare_outputs("ids", ids, ids + 1, tolerances=NONE, device="cpu")
    assert not off.passed and off.worst_index == [0, 0] and off.max_abs == 1.0
    assert np.isfinite(off.cosine)
