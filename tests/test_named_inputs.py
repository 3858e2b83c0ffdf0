"""Named, typed inputs (#12 point 3): ``--input NAME=SHAPE[:DTYPE]`` drives a whole-module
T5-style encoder-decoder by keyword in torch and by name in onnxruntime, each input with
its own dtype, in any order."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from nnconv import NnconvError, UsageError
from nnconv.converter.cli import cli
from nnconv.converter.inputs import named_specs

INPUTS = ["--input", "decoder_input_ids=2,3:int64", "--input", "input_ids=2,7:int64"]


class Seq2Seq(nn.Module):
    """T5-shaped: token ids for the encoder and the decoder, called by keyword."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(50, 16)
        self.encoder, self.decoder = nn.Linear(16, 16), nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 50)

    def forward(self, input_ids, decoder_input_ids, attention_mask=None):
        states = self.encoder(self.shared(input_ids))
        if attention_mask is not None:
            states = states * attention_mask[..., None]
        context = states.mean(1, keepdim=True)
        return {"logits": self.lm_head(self.decoder(self.shared(decoder_input_ids)) + context)}


def nnconv(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def whole(tmp_path):
    torch.manual_seed(0)
    torch.save(Seq2Seq(), tmp_path / "s2s.pt")  # a whole-module pickle of our own class
    return tmp_path / "s2s.pt"


def test_named_inputs_drive_a_whole_module_encoder_decoder(whole, tmp_path):
    onnx_file = tmp_path / "s2s.onnx"
    rc, out = nnconv("convert", whole, onnx_file, "--trust-code", *INPUTS)
    assert rc == 0, out
    import onnx

    graph = onnx.load(onnx_file).graph
    assert [i.name for i in graph.input] == ["decoder_input_ids", "input_ids"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.input)
    rc, out = nnconv("verify", whole, onnx_file, "--trust-code", *INPUTS)
    assert rc == 0, out
    assert "output output.logits [cpu]" in out and "PASSED (parameters and outputs)" in out
    rc, out = nnconv("verify", whole, "--trust-code", *INPUTS)  # CI mode, by keyword too
    assert rc == 0 and "2×3×50 float32" in out, out


def test_positional_inputs_would_not_fit(whole):
    """The same shapes in signature order but passed positionally go to the wrong names:
    the encoder gets 3 tokens and the decoder 7, so the logits come out 2×7×50."""
    rc, out = nnconv(
        "verify", whole, "--trust-code", "--input-shape", "2,3", "--input-shape", "2,7",
        "--input-dtype", "int64",
    )  # fmt: skip
    assert rc == 0 and "2×7×50" in out, out


def test_named_inputs_are_checked():
    assert [(s.name, s.shape, s.dtype) for s in named_specs(["a=2,3", "b=4:int32"])] == [
        ("a", (2, 3), "float32"),
        ("b", (4,), "int32"),
    ]
    for bad in ["a", "a=", "=2,3", "a=2 3", "a=2:notadtype", "a b=2"]:
        with pytest.raises(NnconvError):
            named_specs([bad])
    with pytest.raises(UsageError, match="repeat"):
        named_specs(["a=2", "a=3"])
    rc, out = nnconv("verify", "x.pt", "--input", "x=2", "--input-shape", "2")
    assert rc == 2
