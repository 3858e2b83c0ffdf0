"""Hugging Face folders are models (issue 12, points 1, 2 and 4).

Tiny BERT, GPT-2, Llama-style and T5-style models are built from configs with seeded
random weights (nothing is downloaded) and saved with ``save_pretrained``; then, with
no ``--model`` and no ``--input-shape``, ``convert DIR m.onnx``, ``convert m.onnx
back.safetensors`` and ``verify DIR m.onnx back.safetensors`` pass, and a weight moved
by 1e-3 fails, named.  The CLI runs in this process (transformers is imported once:
a fresh interpreter would pay ~5 s of imports per command).  Alignment tests at the end
need no transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
import torch
from helpers import cli
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file, save_file

from nnconv.converter import load, save
from nnconv.converter.compare import Tolerances, compare_parameters
from nnconv.formats.keys import OPTIMIZED_KEY


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def tiny(transformers, arch: str):
    """(model, the weight to perturb) for a tiny seeded model of ``arch``."""
    t = transformers
    small = dict(vocab_size=99, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "bert":
        config = t.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=64, **small,
        )  # fmt: skip
        cls, weight = t.BertForMaskedLM, "bert.encoder.layer.0.intermediate.dense.weight"
    elif arch == "gpt2":
        config = t.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, **small)
        cls, weight = t.GPT2LMHeadModel, "transformer.h.0.mlp.c_fc.weight"
    elif arch == "llama":
        config = t.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=37, max_position_embeddings=64, **small,
        )  # fmt: skip
        cls, weight = t.LlamaForCausalLM, "model.layers.0.mlp.up_proj.weight"
    else:
        config = t.T5Config(
            d_model=32, d_ff=37, d_kv=16, num_layers=2, num_heads=2, decoder_start_token_id=0,
            **small,
        )  # fmt: skip
        cls, weight = (
            t.T5ForConditionalGeneration,
            "encoder.block.0.layer.1.DenseReluDense.wi.weight",
        )
    torch.manual_seed(0)
    return cls(config).eval(), weight


def save_folder(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def perturbed_copy(folder: Path, dst: Path, name: str) -> Path:
    """A copy of ``folder`` with ``name`` moved by 1e-3 (the other files unchanged)."""
    dst.mkdir()
    for f in folder.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(dst / "model.safetensors")
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_folder_round_trip_without_model(arch, transformers, tmp_path, capfd):
    model, weight = tiny(transformers, arch)
    folder = save_folder(model, tmp_path / arch)
    onnx_path, back = tmp_path / "m.onnx", tmp_path / "back.safetensors"

    run = cli(capfd, "convert", folder, onnx_path)
    assert run.rc == 0, run.err
    names = [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input]
    expected = ["input_ids", "attention_mask"] + (["decoder_input_ids"] if arch == "t5" else [])
    assert names == expected  # the keywords the model was called with
    run = cli(capfd, "convert", onnx_path, back)
    assert run.rc == 0, run.err
    with load(back) as ckpt:  # every state_dict name, tied ones written once as aliases
        assert set(ckpt.names()) == set(model.state_dict())

    run = cli(capfd, "verify", folder, onnx_path, back, "--json", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert run.rc == 0, run.out + run.err
    assert report["passed"] and report["outputs_checked"]
    for cand in report["candidates"]:
        assert cand["outputs_checked"] and not cand["tied"], cand
        assert {o["name"] for o in cand["outputs"]} >= {"output.logits"}
    onnx_params = report["candidates"][0]["parameters"]
    constants = [c["candidate_name"] for c in onnx_params if c["status"] == "not a parameter"]
    if arch == "bert":
        assert constants == ["bert.embeddings.position_ids", "bert.embeddings.token_type_ids"]
    if arch == "llama":
        assert constants == ["model.rotary_emb.inv_freq"]

    bad = perturbed_copy(folder, tmp_path / "bad", weight)
    run = cli(capfd, "verify", bad, onnx_path, back, "--json", tmp_path / "bad.json")
    assert run.rc == 1, run.out + run.err
    report = json.loads((tmp_path / "bad.json").read_text())
    for cand in report["candidates"]:
        failed = [c["name"] for c in cand["parameters"] if not c["passed"]]
        assert failed == [weight], failed
    assert weight in run.out
    divergence = report["candidates"][1]["first_divergence"]  # torch vs torch: hooks see it
    assert divergence and divergence.startswith(weight.rsplit(".", 1)[0]), divergence


def test_sharded_folder_and_a_state_dict_missing_tied_names(transformers, tmp_path, capfd):
    """``verify sd.pt DIR``: names save_pretrained drops are tied per the config, not missing;
    a sharded folder is a model too."""
    model, _ = tiny(transformers, "gpt2")
    model.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    torch.save(model.state_dict(), tmp_path / "sd.pt")  # lm_head.weight included
    run = cli(capfd, "verify", tmp_path / "sd.pt", tmp_path / "hf")
    assert run.rc == 0, run.out + run.err
    assert "tied" not in run.out and "missing" not in run.out
    run = cli(capfd, "verify", tmp_path / "hf")  # compatibility mode: loads and runs
    assert run.rc == 0 and "runs with torch (hf)" in run.out, run.out + run.err
    old = tmp_path / "old"  # the older layout: pytorch_model.bin, tied names dropped
    old.mkdir()
    (old / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, old / "pytorch_model.bin")
    run = cli(capfd, "verify", old, tmp_path / "hf")
    assert run.rc == 0 and "runs with torch (hf)" in run.out, run.out + run.err


def test_custom_code_needs_trust(transformers, tmp_path, capfd):
    model, _ = tiny(transformers, "bert")
    folder = save_folder(model, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForMaskedLM": "modeling_evil.BertForMaskedLM"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    run = cli(capfd, "convert", folder, tmp_path / "m.onnx")
    assert run.rc == 2 and run.err.count("\n") == 1, run.err
    assert "auto_map" in run.err and "--trust-code" in run.err and "modeling_evil" in run.err
    run = cli(capfd, "verify", folder, folder / "model.safetensors")
    assert run.rc == 0 and "--trust-code" in run.out, run.out + run.err  # parameters only
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_without_transformers_one_line_says_how_to_install(transformers, tmp_path, capfd):
    model, _ = tiny(transformers, "bert")
    folder = save_folder(model, tmp_path / "hf")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "transformers"}
    for name in saved:
        sys.modules[name] = None  # import transformers now raises ImportError
    try:
        run = cli(capfd, "convert", folder, tmp_path / "m.onnx")
    finally:
        sys.modules.update(saved)
    assert run.rc == 2 and run.err.count("\n") == 1, run.err
    assert "transformers" in run.err and "pip install 'nnconv[hf]'" in run.err


# --- alignment (no transformers needed) ---------------------------------------------


def onnx_file(path: Path, inits: dict[str, torch.Tensor]) -> Path:
    """A real ONNX model (``y = x``) holding ``inits`` as initializers."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    tensors = [numpy_helper.from_array(t.numpy(), name=n) for n, t in inits.items()]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y], tensors)
    model = helper.make_model(graph)
    model.metadata_props.add(key=OPTIMIZED_KEY, value="0")
    onnx.save(model, str(path))
    return path


def test_onnx_constants_are_not_parameters_both_ways(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(4, 3)
    save({"fc.weight": weight}, tmp_path / "ref.safetensors")
    constants = {"pos.position_ids": torch.arange(8)[None], "rotary.inv_freq": torch.rand(4)}
    onnx_file(tmp_path / "m.onnx", {"fc.weight": weight, **constants})
    st, ox = load(tmp_path / "ref.safetensors"), load(tmp_path / "m.onnx")
    for ref, cand in ((st, ox), (ox, st)):
        checks, tied = compare_parameters(ref, cand, tolerances=Tolerances())
        assert tied == [] and all(c.passed for c in checks)
        extra = sorted(c.name or c.candidate_name for c in checks if c.status != "identical")
        assert extra == sorted(constants)
        assert {c.status for c in checks} == {"identical", "not a parameter"}
    save({"fc.weight": weight, "extra": torch.ones(2)}, tmp_path / "other.safetensors")
    checks, _ = compare_parameters(
        st, load(tmp_path / "other.safetensors"), tolerances=Tolerances()
    )
    assert [c.status for c in checks if not c.passed] == ["unexpected"]  # not ONNX: a failure
    from nnconv import verify

    table = verify(tmp_path / "ref.safetensors", tmp_path / "m.onnx").render()
    assert "2 tensor(s) of one file only were taken as constants" in table  # nothing ran


def test_a_tie_of_three_names_against_onnx_passes(tmp_path):
    torch.manual_seed(0)
    shared = torch.randn(6, 4)
    tied = {n: shared for n in ("shared.weight", "enc.embed.weight", "dec.embed.weight")}
    save({**tied, "lm_head.weight": shared}, tmp_path / "ref.safetensors")
    onnx_file(tmp_path / "m.onnx", {"enc.embed.weight": shared})
    st, ox = load(tmp_path / "ref.safetensors"), load(tmp_path / "m.onnx")
    assert len(st.aliases) == 3
    for ref, cand in ((st, ox), (ox, st)):
        checks, tied_diffs = compare_parameters(ref, cand, tolerances=Tolerances())
        assert tied_diffs == [] and all(c.passed for c in checks), (tied_diffs, checks)
    split = {"shared.weight": shared, "enc.embed.weight": shared.clone()}
    save(split, tmp_path / "split.safetensors")  # not ONNX: a broken tie still fails
    tied_diffs = compare_parameters(
        st, load(tmp_path / "split.safetensors"), tolerances=Tolerances()
    )[1]
    assert any("not in the candidate" in t for t in tied_diffs), tied_diffs


def test_when_every_exporter_fails_each_error_is_shown(tmp_path):
    from nnconv.converter.export import export_onnx
    from nnconv.converter.inputs import input_specs
    from nnconv.formats.errors import UnsupportedError

    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x)[0].real  # no ONNX operator for eig

    with pytest.raises(UnsupportedError) as info:
        export_onnx(Bad(), tmp_path / "bad.onnx", inputs=input_specs(["3,3"]))
    problem = info.value.problem
    assert "the dynamo exporter failed" in problem and "the TorchScript exporter failed" in problem


@pytest.mark.parametrize(
    ("claims", "command"),
    [
        ({"hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 64}, "verify"),
        ({"vocab_size": 10**9, "num_hidden_layers": 64}, "convert"),
        ({"max_position_embeddings": 10**9}, "verify"),
    ],
)
def test_a_config_claiming_a_huge_model_costs_what_the_files_hold(
    transformers, tmp_path, claims, command
):
    """A hostile config.json over tiny weights: one error line, bounded memory and time
    (transformers builds on the meta device and checks the weights' shapes)."""
    from redteam import nnconv

    folder = save_folder(tiny(transformers, "bert")[0], tmp_path / "bert")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **claims}))
    other = folder / "model.safetensors" if command == "verify" else tmp_path / "m.onnx"
    run = nnconv(command, folder, other, cwd=tmp_path)
    run.assert_bounded()
    run.assert_refused(folder)
    assert not (tmp_path / "m.onnx").exists()


SPEC = """
import transformers
from torch import nn


class Bert(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=37,
                                      max_position_embeddings=64)
        self.bert = transformers.BertModel(cfg, add_pooling_layer=False)

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids).last_hidden_state
"""


def test_a_foreign_export_with_folding_maps_back(transformers, tmp_path, capfd):
    """An ONNX file nnconv did not write (torch's TorchScript exporter with constant
    folding, as optimum runs it: transposed weights under ``onnx::MatMul_N`` names, equal
    initializers merged) maps back to every state_dict name by value, transposes included."""
    import warnings

    (tmp_path / "spec.py").write_text(SPEC)
    sys.path.insert(0, str(tmp_path))
    try:
        import spec
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    model = spec.Bert().eval()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randint(0, 99, (2, 16)),), str(tmp_path / "foreign.onnx"),
            dynamo=False, do_constant_folding=True, input_names=["input_ids"], opset_version=17,
        )  # fmt: skip
    names = [i.name for i in onnx.load(str(tmp_path / "foreign.onnx")).graph.initializer]
    assert any(n.startswith("onnx::MatMul_") for n in names) and len(names) < 37
    model_spec = f"{tmp_path / 'spec.py'}:Bert"
    run = cli(capfd, "convert", tmp_path / "foreign.onnx", tmp_path / "back.safetensors",
              "--model", model_spec)  # fmt: skip
    assert run.rc == 0, run.err
    assert sorted(load(tmp_path / "back.safetensors").names()) == sorted(model.state_dict())
    run = cli(capfd, "verify", tmp_path / "sd.pt", tmp_path / "back.safetensors",
              tmp_path / "foreign.onnx", "--model", model_spec,
              "--input", "input_ids=2,16:int64")  # fmt: skip
    assert run.rc == 0, run.out
    assert "37 compared: 37 identical" in run.out
