"""The verify report reads as sentences about the user's model (#11 points 8 and 11):
cast candidates held to the cast's tolerances, ``convert --verify`` with tolerances, the
golden file announced, CI mode and golden replay saying what they checked, parameter lines
without internals.  In-process through click's runner: these are about text, not processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nnconv.converter.cli import cli
from nnconv.converter.tolerances import DEFAULTS, parse_tolerances

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MLP, SPEC = FIXTURES / "mlp.params", f"{FIXTURES / 'models.py'}:MLP"


def nnconv(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_cast_tolerances_cover_outputs_only_where_looser():
    held = parse_tolerances().at_precision("bfloat16")
    assert held.for_output("out", "float32") == DEFAULTS["bfloat16"]
    assert held.for_output("out", "int64") == (0.0, 0.0)  # integers stay exact
    assert parse_tolerances(["1e-7"]).at_precision("bfloat16").for_output("o", "float32") == (
        1e-7,
        DEFAULTS["bfloat16"][1],
    )  # what the user gave still wins
    assert parse_tolerances().at_precision(None).for_output("o", "float32") == DEFAULTS["float32"]


def test_a_bfloat16_conversion_passes_convert_verify(tmp_path):
    rc, out = nnconv(
        "convert", MLP, tmp_path / "b.safetensors", "--dtype", "bfloat16", "--model", SPEC,
        "--input-shape", "2,20", "--verify",
    )  # fmt: skip
    assert rc == 0, out
    assert "4 cast" in out and "cast to bfloat16: outputs are held to bfloat16 tolerances" in out
    assert "rtol 0.016" in out
    assert "PASSED (parameters and outputs)" in out


def test_convert_verify_takes_tolerances(tmp_path):
    rc, out = nnconv(
        "convert", MLP, tmp_path / "b.safetensors", "--dtype", "float16", "--model", SPEC,
        "--input-shape", "2,20", "--verify", "--atol", "0.5", "--rtol", "output:0.25",
    )  # fmt: skip
    assert rc == 0, out
    assert "atol 0.5 rtol 0.25" in out
    rc, out = nnconv("convert", MLP, tmp_path / "c.safetensors", "--atol", "1")
    assert rc == 2 and "--atol and --rtol apply with --verify" in out
    assert not (tmp_path / "c.safetensors").exists()


def test_ci_mode_and_golden_say_what_they_checked(tmp_path):
    golden = tmp_path / "g.safetensors"
    rc, out = nnconv(
        "verify", MLP, "--model", SPEC, "--input-shape", "2,20", "--save-golden", golden
    )
    assert rc == 0, out
    assert f"golden file written: {golden}: 1 input(s) and 1 output(s) of {MLP}" in out
    assert "candidate" not in out and "parameters and outputs" not in out
    assert out.startswith(f"checking   {MLP} (pt)")
    assert f"PASSED (compatibility: loads strictly, runs, outputs finite): {MLP}" in out
    assert "output output [cpu]  finite, 2×10 float32" in out
    rc, out = nnconv("verify", MLP, "--model", SPEC, "--golden", golden)
    assert rc == 0, out
    assert out.startswith(f"golden     {golden}: stored inputs and reference outputs")
    assert "PASSED (outputs against the golden file): 1 checked" in out
    assert "parameters and outputs" not in out


def test_parameter_lines_read_as_sentences(tmp_path):
    sd = torch.load(MLP)
    extra = {**sd, "steps": torch.arange(4)}
    torch.save(extra, tmp_path / "extra.pt")
    rc, out = nnconv("verify", MLP, tmp_path / "extra.pt")
    assert rc == 1
    assert "FAIL  param  steps  unexpected: only in the candidate (int64 [4])" in out
    rc, out = nnconv("verify", tmp_path / "extra.pt", MLP)
    assert "FAIL  param  steps  missing: missing from the candidate (int64 [4])" in out
    wrapped = {f"module.{k}": v + 1 if k == "hidden.bias" else v for k, v in sd.items()}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    rc, out = nnconv("verify", MLP, tmp_path / "wrapped.pt")
    assert rc == 1
    line = next(x for x in out.splitlines() if "param  hidden.bias" in x)
    assert line.endswith("(found in the candidate as module.hidden.bias, under a wrapper prefix)")
    for internal in ("None", "matched :", "(matched"):
        assert internal not in out, out


@pytest.mark.parametrize("shape", ["2,20", (2, 20)])
def test_library_errors_name_arguments_and_the_cli_flags(shape):
    from nnconv import UsageError, verify

    with pytest.raises(UsageError) as err:
        verify(MLP, model=SPEC, input_shapes=shape, params_only=True, outputs_only=True)
    assert str(err.value) == "params_only=True and outputs_only=True exclude each other"
    assert err.value.cli_message() == "--params-only and --outputs-only exclude each other"
    rc, out = nnconv("verify", MLP, "--params-only", "--outputs-only")
    assert rc == 2 and "Error: --params-only and --outputs-only exclude each other" in out


def test_ci_mode_on_a_record_that_needs_trust_says_so(tmp_path):
    out = tmp_path / "m.safetensors"
    assert nnconv("convert", MLP, out, "--model", SPEC)[0] == 0
    rc, text = nnconv("verify", out)
    assert rc == 2 and "weights-only" not in text, text
    assert "names classes nnconv does not import" in text and "--trust-code" in text
    rc, text = nnconv("verify", out, "--trust-code")
    assert rc == 0, text
