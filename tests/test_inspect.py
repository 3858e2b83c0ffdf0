"""nnconv inspect: report contents, layer kinds, module tree, JSON contract, torch-free reads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from zoo import fixture_models

from nnconv import inspect, save
from nnconv.converter.inspect import InspectReport, TensorRow, human_bytes
from nnconv.converter.layers import MAX_DEPTH, build_tree, infer_kind
from nnconv.formats.errors import NnconvError

MLP = fixture_models().MLP


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(100, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 100, bias=False)
        self.head.weight = self.tok_emb.weight


def tree_lines(report: InspectReport) -> list[str]:
    text = report.render()
    return text[text.index("(root)") :].splitlines()


@pytest.fixture
def mlp_pt(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(MLP().state_dict(), path)
    return path


# --- reports from real files --------------------------------------------------------


def test_mlp_state_dict(mlp_pt):
    report = inspect(mlp_pt)
    assert report.format == "pt"
    assert report.path == str(mlp_pt)
    assert [r.name for r in report.tensors] == [
        "hidden.weight",
        "hidden.bias",
        "output.weight",
        "output.bias",
    ]
    assert report.tensors[0] == TensorRow("hidden.weight", "float32", (256, 20), 20480, None)
    assert report.parameters == 20 * 256 + 256 + 256 * 10 + 10
    assert report.nbytes == report.parameters * 4
    text = report.render()
    assert "hidden: Linear(20 → 256)" in text
    assert tree_lines(report) == [
        "(root)",
        "├── hidden: Linear(20 → 256)",
        "└── output: Linear(256 → 10)",
    ]
    assert "Parameters:  7,946" in text
    assert "31.0 KiB" in text
    assert "Format:      pt" in text


def test_inspect_never_loads_values(mlp_pt, tmp_path, monkeypatch):
    from nnconv.formats.checkpoint import LazyTensor

    st = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.zeros(3, 2)}, str(st))

    def refuse(self):
        raise AssertionError("inspect loaded tensor values")

    monkeypatch.setattr(LazyTensor, "load", refuse)
    assert inspect(mlp_pt).parameters == 7946
    assert inspect(st).tensors[0].shape == (3, 2)


def test_conv_batchnorm_kinds(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 7),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv1d(8, 4, 3, bias=False),
        nn.BatchNorm1d(4),
        nn.Conv3d(4, 2, (1, 2, 3)),
        nn.BatchNorm3d(2),
    )
    path = tmp_path / "conv.pt"
    torch.save(model.state_dict(), path)
    assert tree_lines(inspect(path)) == [
        "(root)",
        "├── 0: Conv2d(3 → 8, 7×7)",
        "├── 1: BatchNorm2d(8)",
        "├── 3: Conv1d(8 → 4, 3)",
        "├── 4: BatchNorm1d(4)",
        "├── 5: Conv3d(4 → 2, 1×2×3)",
        "└── 6: BatchNorm3d(2)",
    ]


def test_embedding_layernorm_and_tied_alias(tmp_path):
    path = tmp_path / "lm.pt"
    torch.save(TiedLM().state_dict(), path)
    for source in (path, tmp_path / "lm.safetensors"):
        if source.suffix == ".safetensors":
            save(TiedLM().state_dict(), source)
        report = inspect(source)
        rows = {r.name: r for r in report.tensors}
        assert rows["head.weight"].alias_of == "tok_emb.weight"
        assert rows["tok_emb.weight"].alias_of is None
        assert report.parameters == 100 * 16 + 16 + 16  # the tied weight counted once
        text = report.render()
        assert "(+1 tied name)" in text
        assert "= tok_emb.weight" in text
        assert tree_lines(report) == [
            "(root)",
            "├── tok_emb: Embedding(100, 16)",
            "├── norm: LayerNorm(16)",
            "└── head: Linear(16 → 100, bias=False)",
        ]
        assert report.to_json()["tensors"][3]["alias_of"] == "tok_emb.weight"


def test_transformer_encoder_layer(tmp_path):
    path = tmp_path / "enc.pt"
    torch.save({"enc": nn.TransformerEncoderLayer(16, 2, 32).state_dict()}, path)
    assert tree_lines(inspect(path)) == [
        "(root)",
        "└── enc",
        "    ├── self_attn: MultiheadAttention(16)",
        "    │   └── out_proj: Linear(16 → 16)",
        "    ├── linear1: Linear(16 → 32)",
        "    ├── linear2: Linear(32 → 16)",
        "    ├── norm1: LayerNorm(16)",
        "    └── norm2: LayerNorm(16)",
    ]


def test_recurrent_kinds(tmp_path):
    model = nn.ModuleDict(
        {
            "lstm": nn.LSTM(10, 20, num_layers=2),
            "bi": nn.LSTM(4, 6, bidirectional=True, proj_size=3),
            "gru": nn.GRU(4, 5, bias=False),
            "rnn": nn.RNN(3, 7, num_layers=3),
        }
    )
    path = tmp_path / "rnn.pt"
    torch.save(model.state_dict(), path)
    assert tree_lines(inspect(path)) == [
        "(root)",
        "├── lstm: LSTM(10 → 20, layers=2)",
        "├── bi: LSTM(4 → 6, layers=1, bidirectional, proj=3)",
        "├── gru: GRU(4 → 5, layers=1, bias=False)",
        "└── rnn: RNN(3 → 7, layers=3)",
    ]


def test_nested_training_checkpoint(tmp_path):
    model = MLP()
    opt = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 20)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                "x": torch.zeros(3)}, path)  # fmt: skip
    report = inspect(path)
    lines = tree_lines(report)
    assert lines[:6] == [
        "(root)",
        "├── model",
        "│   ├── hidden: Linear(20 → 256)",
        "│   └── output: Linear(256 → 10)",
        "├── optimizer",
        "│   └── state",
    ]
    assert "│       ├── 0" in lines
    assert "│       │   ├── exp_avg [256, 20] float32" in lines
    assert "│       │   └── exp_avg_sq [256, 20] float32" in lines
    assert lines[-1] == "└── x [3] float32"
    tree = report.to_json()["tree"]
    assert tree["name"] == "" and tree["kind"] is None and tree["tensors"] == ["x"]
    assert [c["name"] for c in tree["children"]] == ["model", "optimizer"]
    model_node = tree["children"][0]
    assert model_node["children"][0] == {
        "name": "hidden",
        "path": "model.hidden",
        "kind": "Linear(20 → 256)",
        "tensors": ["model.hidden.weight", "model.hidden.bias"],
        "children": [],
    }
    state = tree["children"][1]["children"][0]
    assert [c["name"] for c in state["children"]] == ["0", "1", "2", "3"]


def test_sequential_children_keep_file_order(tmp_path):
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    path = tmp_path / "seq.pt"
    torch.save(model.state_dict(), path)
    names = [line[4:].split(":")[0] for line in tree_lines(inspect(path))[1:]]
    assert names == [str(i) for i in range(12)]  # 10 after 9, not after 1


def test_json_contract_bfloat16(tmp_path):
    path = tmp_path / "bf16.safetensors"
    save_file(
        {"emb.weight": torch.zeros(8, 4, dtype=torch.bfloat16), "scale": torch.ones(())},
        str(path),
        metadata={"note": "hello"},
    )
    data = json.loads(json.dumps(inspect(path).to_json()))
    assert data["format"] == "safetensors"
    assert data["path"] == str(path)
    assert data["metadata"] == {"note": "hello"}
    assert sorted(data["tensors"], key=lambda t: t["name"]) == [
        {"name": "emb.weight", "dtype": "bfloat16", "shape": [8, 4], "nbytes": 64,
         "alias_of": None},
        {"name": "scale", "dtype": "float32", "shape": [], "nbytes": 4, "alias_of": None},
    ]  # fmt: skip
    assert data["parameters"] == 33 and data["nbytes"] == 68
    assert data["tree"]["children"][0]["kind"] == "Embedding(8, 4)"


def test_hdf5_report(tmp_path):
    path = tmp_path / "mlp.h5"
    save(MLP().state_dict(), path)
    report = inspect(path)
    assert report.format == "hdf5"
    assert "hidden: Linear(20 → 256)" in report.render()


def test_hdf5_tied_weights(tmp_path):
    path = tmp_path / "lm.h5"
    save(TiedLM().state_dict(), path)
    rows = {r.name: r for r in inspect(path).tensors}
    assert rows["head.weight"].alias_of == "tok_emb.weight"


def test_foreign_hdf5_without_structure(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("dense/kernel", data=np.zeros((3, 5), dtype="<f4"))
        f.create_dataset("dense/bias", data=np.zeros(5, dtype="<f4"))
    report = inspect(path)
    assert [r.name for r in report.tensors] == ["dense.bias", "dense.kernel"]
    assert "├── bias [5] float32" in report.render()  # no kind for Keras' kernel layout


def test_metadata_rendering(tmp_path):
    path = tmp_path / "meta.safetensors"
    save({"w": torch.zeros(2)}, path)
    long = "x" * 500
    save_file({"w": torch.zeros(2)}, str(tmp_path / "long.safetensors"),
              metadata={"long": long, "evil": "a\x1b[2Jb\nc"})  # fmt: skip
    text = inspect(tmp_path / "long.safetensors").render()
    line = next(ln for ln in text.splitlines() if ln.startswith("  long: "))
    assert len(line) < 110 and "(500 chars)" in line
    assert "\x1b" not in text and "a\\x1b[2Jb\\nc" in text
    assert inspect(tmp_path / "long.safetensors").metadata["long"] == long
    rendered = inspect(path).render()
    assert '{"d"' not in rendered  # nnconv's structure record is never dumped


def test_control_characters_in_names_are_escaped(tmp_path):
    path = tmp_path / "evil.safetensors"
    save_file({"evil\x1b[31m.weight": torch.zeros(2, 3)}, str(path))
    text = inspect(path).render()
    assert "\x1b" not in text
    assert "evil\\x1b[31m: Linear(3 → 2, bias=False)" in text


def test_root_tensor_and_empty_checkpoint(tmp_path):
    torch.save(torch.zeros(2, 3), tmp_path / "t.pt")
    report = inspect(tmp_path / "t.pt")
    assert [r.name for r in report.tensors] == ["tensor"]
    assert tree_lines(report) == ["(root)", "└── tensor [2, 3] float32"]
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    empty = inspect(tmp_path / "empty.pt")
    assert empty.tensors == [] and empty.parameters == 0
    assert "No tensors." in empty.render()


def test_plain_linear_state_dict_kind_on_root(tmp_path):
    torch.save(nn.Linear(3, 4).state_dict(), tmp_path / "lin.pt")
    assert tree_lines(inspect(tmp_path / "lin.pt")) == ["(root): Linear(3 → 4)"]


def test_table_columns_aligned(mlp_pt):
    text = inspect(mlp_pt).render(tree=False)
    table = [ln for ln in text.splitlines() if ln.startswith("  ") and "float32" in ln]
    assert len(table) == 4
    assert len({ln.index("float32") for ln in table}) == 1
    assert len({len(ln) for ln in table}) == 1  # bytes right-aligned
    assert "(root)" not in text


def test_missing_file_is_an_nnconv_error(tmp_path):
    with pytest.raises(NnconvError):
        inspect(tmp_path / "nope.safetensors")


def test_format_override_mismatch(mlp_pt):
    with pytest.raises(NnconvError, match="safetensors"):
        inspect(mlp_pt, format="safetensors")


# --- torch-free ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "sharded", "hdf5"])
def test_inspect_does_not_import_torch(tmp_path, kind):
    tensors = {"fc.weight": torch.zeros(4, 3, dtype=torch.bfloat16), "x": torch.zeros(64)}
    path = tmp_path / f"model.{kind}"
    if kind == "safetensors":
        save_file(tensors, str(path))
    elif kind == "sharded":
        save(tensors, path, format="safetensors", shard_size=100)
    else:
        save(tensors, path, format="hdf5")
    code = textwrap.dedent(
        f"""
        import json, sys
        from nnconv import inspect
        report = inspect({str(path)!r})
        assert 'fc: Linear(3 → 4, bias=False)' in report.render()
        json.dumps(report.to_json())
        assert 'torch' not in sys.modules, 'torch was imported'
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- pure inference --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "previous", "kind"),
    [
        ("fc", {"weight": (4, 3), "bias": (4,)}, None, "Linear(3 → 4)"),
        ("fc", {"weight": (4, 3), "bias": (5,)}, None, None),
        ("wte", {"weight": (50, 8)}, None, "Embedding(50, 8)"),
        ("word_embeddings", {"weight": (50, 8), "bias": (50,)}, None, "Linear(8 → 50)"),
        ("norm", {"weight": (8,)}, None, None),
        ("bn", {"weight": (8,), "bias": (8,), "running_mean": (8,), "running_var": (8,)},
         None, "BatchNorm(8)"),
        ("bn", {"weight": (8,), "bias": (8,), "running_mean": (8,), "running_var": (8,)},
         "Linear(3 → 8)", "BatchNorm1d(8)"),
        ("bn", {"weight": (8,), "bias": (8,), "running_mean": (8,), "running_var": (8,)},
         "Conv2d(3 → 16, 3×3)", "BatchNorm(8)"),
        ("bn", {"weight": (8,), "bias": (8,), "running_mean": (8,), "running_var": (9,)},
         None, None),
        ("attn", {"in_proj_weight": (48, 16), "in_proj_bias": (48,)}, None,
         "MultiheadAttention(16)"),
        ("attn", {"in_proj_weight": (47, 16)}, None, None),
        ("attn", {"q_proj_weight": (16, 16), "k_proj_weight": (16, 8),
                  "v_proj_weight": (16, 6), "in_proj_bias": (48,)}, None,
         "MultiheadAttention(16, kdim=8, vdim=6)"),
        ("rnn", {"weight_ih_l0": (10, 3), "weight_hh_l0": (10, 4)}, None, None),
        ("rnn", {"weight_ih_l0": (12, 3), "weight_hh_l0": (12, 4), "extra": (1,)}, None, None),
        ("x", {"weight": (1, 2, 3, 4, 5, 6)}, None, None),
        ("x", {"pos_embedding": (1, 197, 768)}, None, None),
        ("x", {}, None, None),
    ],
)  # fmt: skip
def test_infer_kind(name, params, previous, kind):
    assert infer_kind(name, params, previous) == kind


def test_build_tree_bounds_depth():
    name = ".".join(["a"] * 500) + ".weight"
    root = build_tree([(name, "float32", (2,))])
    node, depth = root, 0
    while node.children:
        node, depth = node.children[0], depth + 1
    assert depth == MAX_DEPTH
    assert node.tensors == (name,)
    assert node.local(name).endswith("a.weight")


def test_human_bytes():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(int(1.2 * 2**20)) == "1.2 MiB"
    assert human_bytes(3 * 2**40) == "3.0 TiB"


def test_grouped_depthwise_and_transposed_conv1d_kinds():
    """A depthwise convolution's weight holds one input channel per group, and
    transformers' Conv1D stores a Linear transposed: neither is what its shape first says
    (#12: labelled ``Conv2d(1 → C)`` and ``Linear`` before)."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3),
        torch.nn.Conv2d(32, 32, 3, groups=32),
        torch.nn.Conv2d(32, 64, 1),
        torch.nn.Conv2d(64, 64, 3, groups=4),
    )
    rows = [(k, "float32", tuple(v.shape)) for k, v in net.state_dict().items()]
    rows += [("attn.c_attn.weight", "float32", (64, 192)), ("attn.c_attn.bias", "float32", (192,))]
    kinds = {n.path: n.kind for n in _nodes(build_tree(rows))}
    assert kinds["0"] == "Conv2d(3 → 32, 3×3)"
    assert kinds["1"] == "Conv2d(32 → 32, 3×3, groups=32, depthwise)"
    assert kinds["2"] == "Conv2d(32 → 64, 1×1)"
    assert kinds["3"] == "Conv2d(64 → 64, 3×3, groups=4)"
    assert kinds["attn.c_attn"] == "Conv1D(64 → 192, transposed)"


def _nodes(node):
    yield node
    for child in node.children:
        yield from _nodes(child)
