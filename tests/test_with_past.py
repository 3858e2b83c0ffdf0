"""``convert --with-past``: decoder LMs exported with their KV cache (issue 12, point 2).

A tiny GPT-2 and a tiny Llama-style model (random weights, from configs, nothing
downloaded) are exported with past key/values as named graph inputs and outputs, as
optimum names them; ``verify DIR m.onnx`` then feeds the folder's model the same past
(a transformers cache built from the past tensors) and compares logits and presents.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from nnconv.converter.convert import convert
from nnconv.converter.past import PAST_KEY, PAST_LENGTH
from nnconv.converter.verify import verify

SMALL = dict(vocab_size=99, bos_token_id=0, eos_token_id=0, pad_token_id=0)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def tiny(t, arch: str):
    """(model, kv heads, head dim) for a tiny seeded model of ``arch``."""
    torch.manual_seed(0)
    if arch == "gpt2":
        config = t.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, **SMALL)
        return t.GPT2LMHeadModel(config).eval(), 2, 16
    config = t.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=37, max_position_embeddings=64, **SMALL,
    )  # fmt: skip
    return t.LlamaForCausalLM(config).eval(), 1, 16


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_with_past_export_and_verify(arch, transformers, tmp_path):
    model, heads, head_dim = tiny(transformers, arch)
    folder = tmp_path / arch
    model.save_pretrained(folder)
    path = tmp_path / "m.onnx"

    if arch == "gpt2":  # through the command line once
        from click.testing import CliRunner

        from nnconv.converter.cli import cli

        run = CliRunner().invoke(cli, ["convert", str(folder), str(path), "--with-past"])
        assert run.exit_code == 0, run.output
    result = convert(folder, path, with_past=True, force=True)
    assert result.export is not None
    proto = onnx.load(str(path))
    past = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", *past]
    present = [n.replace("past_key_values", "present") for n in past]
    assert [o.name for o in proto.graph.output] == ["logits", *present]
    shapes = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in proto.graph.input
    }
    assert shapes["past_key_values.0.key"] == ["batch", heads, PAST_LENGTH, head_dim]
    assert shapes["attention_mask"][1] == PAST_LENGTH + shapes["input_ids"][1]
    record = json.loads({p.key: p.value for p in proto.metadata_props}["nnconv.hf"])
    assert record[PAST_KEY]["layers"] == 2
    assert [s["name"] for s in record["inputs"]] == list(shapes)
    # the initializers keep the model's own names (the wrapper adds no prefix)
    names = set(model.state_dict()) | {n for n, _ in model.named_buffers()}
    assert {t.name for t in proto.graph.initializer} <= names

    report = verify(folder, path)
    assert report, report.to_json() if hasattr(report, "to_json") else report
    (cand,) = report.candidates
    assert cand.outputs_checked
    assert [o.name for o in cand.outputs] == ["output.logits"] + [f"output.{n}" for n in present]
    assert all(o.passed for o in cand.outputs)

    import onnxruntime as ort  # the graph runs on its own, a new token after the past

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    batch, new = 3, shapes["input_ids"][1]
    feed = {
        "input_ids": rng.integers(0, 99, (batch, new), dtype=np.int64),
        "attention_mask": np.ones((batch, PAST_LENGTH + new), dtype=np.int64),
    }
    for name in past:
        feed[name] = rng.standard_normal((batch, heads, PAST_LENGTH, head_dim), dtype=np.float32)
    logits, *presents = session.run(None, feed)
    assert logits.shape == (batch, new, 99)
    assert presents[0].shape == (batch, heads, PAST_LENGTH + new, head_dim)
    np.testing.assert_array_equal(presents[0][:, :, :PAST_LENGTH], feed[past[0]])


def test_with_past_needs_a_folder(tmp_path):
    from nnconv.formats.errors import UsageError

    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(UsageError, match="with-past"):
        convert(
            tmp_path / "w.pt", tmp_path / "m.onnx", model="torch.nn:Linear",
            model_args='{"in_features": 2, "out_features": 2}', input_shapes=["1,2"],
            with_past=True,
        )  # fmt: skip
