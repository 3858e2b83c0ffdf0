"""``convert --with-past``: decoder LMs exported with their KV cache (issue 12, point 2).

A tiny GPT-2 and a tiny Llama-style model (random weights, from configs, nothing
downloaded) are exported with past key/values as named graph inputs and outputs, as
optimum names them, with the batch, the new tokens' length and the past length dynamic
(run at other lengths than the export's, a past of 0 and one new token included, against
torch given the same cache); ``verify DIR m.onnx`` then feeds the folder's model the same
past (a transformers cache built from the past tensors) and compares logits and presents,
and a plain export verified beside it is fed its own inputs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from nnconv.converter import past
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


@pytest.fixture(scope="module")
def exported(transformers, tmp_path_factory):
    """arch -> (model, kv heads, head dim, folder, with-past ONNX), made once per module:
    GPT-2 through the command line, Llama through the library."""
    made: dict = {}

    def get(arch: str):
        if arch not in made:
            model, heads, head_dim = tiny(transformers, arch)
            folder = tmp_path_factory.mktemp(arch)
            model.save_pretrained(folder / "hf")
            path = folder / "past.onnx"
            if arch == "gpt2":
                from click.testing import CliRunner

                from nnconv.converter.cli import cli

                argv = ["convert", str(folder / "hf"), str(path), "--with-past"]
                run = CliRunner().invoke(cli, argv)
                assert run.exit_code == 0, run.output
            else:
                assert convert(folder / "hf", path, with_past=True).export is not None
            made[arch] = (model, heads, head_dim, folder / "hf", path)
        return made[arch]

    return get


def dims(values) -> dict[str, list]:
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values
    }


def torch_with_cache(model, feed: dict[str, np.ndarray], layers: int) -> list[np.ndarray]:
    """logits and presents of the model itself, given the same past as a transformers cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(layers):
        kv = [torch.from_numpy(feed[f"past_key_values.{i}.{n}"]) for n in ("key", "value")]
        cache.update(*kv, i)
    given = {past._cache_keyword(model): cache}
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(feed["input_ids"]),
            attention_mask=torch.from_numpy(feed["attention_mask"]),
            use_cache=True,
            **given,
        )
    layers_out = past._cache_of(out).layers
    presents = [t for layer in layers_out for t in (layer.keys, layer.values)]
    return [t.numpy() for t in (out.logits, *presents)]


def run_at_lengths(path, model, heads: int, head_dim: int) -> None:
    """The graph at lengths other than the example's (past 4, 16 new tokens, batch 2): past
    7 with 3 new tokens at batch 3, a prompt with no past, one decoding step; each against
    torch given the same cache."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch, past_len, new in [(3, 7, 3), (1, 0, 5), (2, 5, 1)]:
        feed = {
            "input_ids": rng.integers(0, 99, (batch, new), dtype=np.int64),
            "attention_mask": np.ones((batch, past_len + new), dtype=np.int64),
        }
        for name in past.past_names(2):
            shape = (batch, heads, past_len, head_dim)
            feed[name] = rng.standard_normal(shape, dtype=np.float32)
        got = session.run(None, feed)
        want = torch_with_cache(model, feed, 2)
        assert got[0].shape == (batch, new, 99)
        assert got[1].shape == (batch, heads, past_len + new, head_dim)
        np.testing.assert_array_equal(got[1][:, :, :past_len], feed["past_key_values.0.key"])
        for name, a, b in zip(["logits", *PRESENT], got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{name} {feed.keys()}")


PAST_NAMES = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
PRESENT = [n.replace("past_key_values", "present") for n in PAST_NAMES]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_with_past_export_and_verify(arch, exported, tmp_path):
    model, heads, head_dim, folder, path = exported(arch)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", *PAST_NAMES]
    assert [o.name for o in proto.graph.output] == ["logits", *PRESENT]
    shapes = dims(proto.graph.input)  # dynamic as in optimum's graphs
    total = "past_sequence_length + sequence_length"
    assert shapes["input_ids"] == ["batch", "sequence_length"]
    assert shapes["attention_mask"] == ["batch", total]
    assert shapes["past_key_values.0.key"] == ["batch", heads, "past_sequence_length", head_dim]
    outputs = dims(proto.graph.output)
    assert outputs["logits"] == ["batch", "sequence_length", 99]
    assert outputs["present.1.value"] == ["batch", heads, total, head_dim]
    record = json.loads({p.key: p.value for p in proto.metadata_props}["nnconv.hf"])
    assert record[PAST_KEY] == {"length": PAST_LENGTH, "layers": 2}
    assert [s["name"] for s in record["inputs"]] == list(shapes)
    # the initializers keep the model's own names (the wrapper adds no prefix)
    names = set(model.state_dict()) | {n for n, _ in model.named_buffers()}
    assert {t.name for t in proto.graph.initializer} <= names

    report = verify(folder, path)
    assert report, report.to_json() if hasattr(report, "to_json") else report
    (cand,) = report.candidates
    assert cand.outputs_checked
    assert [o.name for o in cand.outputs] == ["output.logits"] + [f"output.{n}" for n in PRESENT]
    assert all(o.passed for o in cand.outputs)

    run_at_lengths(path, model, heads, head_dim)


def test_the_torchscript_exporter_makes_the_same_lengths_dynamic(exported, tmp_path):
    model, heads, head_dim, folder, _ = exported("gpt2")
    path = tmp_path / "ts.onnx"
    result = convert(folder, path, with_past=True, exporter="torchscript")
    assert result.export is not None and result.export.exporter == "torchscript"
    proto = onnx.load(str(path))
    assert dims(proto.graph.input) == dims(onnx.load(str(exported("gpt2")[4])).graph.input)
    assert dims(proto.graph.output)["present.0.key"][2] == "past_sequence_length + sequence_length"
    run_at_lengths(path, model, heads, head_dim)


def test_a_plain_and_a_with_past_export_in_one_verify(exported, tmp_path):
    """Each ONNX candidate is fed by its own inputs: the plain export gets the new tokens
    only and is compared with the model run without the past (logits); the with-past one
    gets the past and is compared on logits and presents."""
    _, _, _, folder, with_past = exported("gpt2")
    plain = tmp_path / "plain.onnx"
    convert(folder, plain)  # no past
    for order in ([with_past, plain], [plain, with_past]):
        report = verify(folder, *order)
        assert report, [(c.path, c.notes, [o.note for o in c.outputs]) for c in report.candidates]
        by_path = {c.path: c for c in report.candidates}
        cand_past, cand_plain = by_path[str(with_past)], by_path[str(plain)]
        assert [o.name for o in cand_plain.outputs] == ["output.logits"]
        assert past.PLAIN_NOTE in cand_plain.notes and past.PLAIN_NOTE not in cand_past.notes
        assert [o.name for o in cand_past.outputs][1:] == [f"output.{n}" for n in PRESENT]
        assert all(c.outputs_checked and c.parameters for c in report.candidates)


def test_with_past_needs_a_folder(tmp_path):
    from nnconv.formats.errors import UsageError

    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(UsageError, match="with-past"):
        convert(
            tmp_path / "w.pt", tmp_path / "m.onnx", model="torch.nn:Linear",
            model_args='{"in_features": 2, "out_features": 2}', input_shapes=["1,2"],
            with_past=True,
        )  # fmt: skip
