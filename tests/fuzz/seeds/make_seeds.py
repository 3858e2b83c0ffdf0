"""Write the fuzz seeds that ``fixtures/`` does not provide (run it from anywhere).

The fixtures cover pt, single-file safetensors and nnconv's HDF5 layout; the
readers have more input shapes than that, and mutation only reaches code that
some seed already gets to: ONNX with inline, typed-field and external data, a
sharded safetensors index, both Keras HDF5 layouts, TorchScript archives, and
.npz files (nnconv's, numpy's stored and compressed).
All are small, so the fuzzer spends its time on structure rather than on tensor
bytes.  The output is deterministic except for the ONNX exporter's own producer
fields (and torch.jit.save's serialization id).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from nnconv.converter import save
from nnconv.converter.export import export_onnx
from nnconv.converter.inputs import InputSpec
from nnconv.formats.objects import from_object

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parents[2] / "fixtures"


def _models():
    spec = importlib.util.spec_from_file_location("nnconv_fixture_models", FIXTURES / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def onnx_seeds() -> None:
    torch.manual_seed(0)
    out = HERE / "onnx"
    shutil.rmtree(out, ignore_errors=True)
    (out / "external").mkdir(parents=True)
    x = [InputSpec("x", (2, 20))]
    export_onnx(_models().MLP(), out / "mlp.onnx", inputs=x, exporter="torchscript")
    tiny = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    export_onnx(
        tiny,
        out / "external" / "tiny.onnx",
        inputs=[InputSpec("x", (1, 4))],
        exporter="torchscript",
        external_data_threshold=0,
    )
    # Values in the typed repeated fields (float_data, int32_data...) rather than raw_data.
    inits = [
        helper.make_tensor("f32", TensorProto.FLOAT, [2, 2], [1.0, -2.0, 0.5, 3.0]),
        helper.make_tensor("f64", TensorProto.DOUBLE, [2], [1.5, -0.25]),
        helper.make_tensor("i64", TensorProto.INT64, [3], [1, -7, 2**40]),
        helper.make_tensor("i8", TensorProto.INT8, [2], [-3, 5]),
        helper.make_tensor("f16", TensorProto.FLOAT16, [2], np.array([1, 2], dtype=np.float16)),
        helper.make_tensor("b", TensorProto.BOOL, [2], [True, False]),
        helper.make_tensor("u64", TensorProto.UINT64, [1], [2**63]),
        helper.make_tensor("c64", TensorProto.COMPLEX64, [1], [complex(1.0, 2.0)]),
    ]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["f32"], ["y"])],
        "typed",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"author": "nnconv fuzz seed", "nnconv.version": "1"})
    onnx.checker.check_model(model)
    onnx.save(model, out / "typed.onnx")


def safetensors_seeds() -> None:
    out = HERE / "safetensors" / "sharded"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(exist_ok=True)
    state = {
        "a.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3),
        "a.bias": torch.arange(3, dtype=torch.float16),
        "b": torch.tensor([1, 2, 3], dtype=torch.int64),
    }
    save(state, out, format="safetensors", shard_size=40)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the seed must have several shards"


def record_seeds() -> None:
    """Weights with nnconv's architecture record, in safetensors and HDF5: the fuzz
    harness rebuilds the record untrusted (torch.nn built-ins on meta, then the weights)."""
    from nnconv.converter import record
    from nnconv.formats.objects import from_object

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU(), torch.nn.Linear(3, 2)
    )
    rec = record.dumps(record.build(net, [InputSpec("input", (2, 4))]))
    for name in ("safetensors/record.safetensors", "hdf5/record.h5"):
        ckpt = from_object(net.state_dict())
        ckpt.metadata[record.ARCHITECTURE_KEY] = rec
        save(ckpt, HERE / name, force=True)


def hdf5_seeds() -> None:
    out = HERE / "hdf5"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    rng = np.random.default_rng(0)
    with h5py.File(out / "model.weights.h5", "w") as f:  # Keras 3 layout
        f.create_group("vars")
        f.create_dataset("layers/dense/vars/0", data=rng.standard_normal((3, 2), np.float32))
        f.create_dataset("layers/dense/vars/1", data=np.zeros(2, np.float32))
        ds = f.create_dataset("layers/dense_1/vars/0", data=np.array([1, 2], np.uint16))
        ds.attrs["dtype"] = "bfloat16"
    with h5py.File(out / "keras_legacy.h5", "w") as f:  # tf.keras 2 model.save layout
        f.attrs["keras_version"] = "2.15.0"
        root = f.create_group("model_weights")
        root.attrs["layer_names"] = np.array([b"dense", b"dropout"])
        group = root.create_group("dense")
        group.attrs["weight_names"] = np.array([b"dense/kernel:0", b"dense/bias:0"])
        group.create_dataset("dense/kernel:0", data=rng.standard_normal((2, 2), np.float32))
        group.create_dataset("dense/bias:0", data=np.ones(2, np.float64))
        root.create_group("dropout").attrs["weight_names"] = np.array([], dtype="S1")


def npz_seeds() -> None:
    """nnconv's own .npz (bfloat16 and float8 bit patterns, a tie, nesting, metadata, an
    escaped name in its __nnconv__ record), and numpy's: stored (Fortran order, big-endian,
    0-d, empty) and compressed (np.savez_compressed: deflated members)."""
    out = HERE / "npz"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    obj = {
        "layer": {"weight": w, "bias": torch.tensor([0.5, -1.0], dtype=torch.bfloat16)},
        "tied": w,
        "fp8": torch.tensor([1.0, -2.0], dtype=torch.float8_e4m3fn),
        "state": [torch.tensor(3), 0.9],
        "../odd": torch.ones(2, dtype=torch.int8),
    }
    ckpt = from_object(obj)
    ckpt.metadata["note"] = "fuzz seed"
    save(ckpt, out / "nnconv.npz")
    arrays = {
        "c": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "be": np.arange(3, dtype=">i4"),
        "b": np.array([True, False]),
        "s": np.float16(1.5).reshape(()),
        "e": np.zeros((0, 2), np.uint8),
    }
    np.savez(out / "numpy.npz", **arrays)
    np.savez_compressed(out / "compressed.npz", **arrays)


def gguf_seeds() -> None:
    """GGUF as llama.cpp writes it (gguf's writer: typed key/values, string and float
    arrays, F32/F16/BF16/I32 tensors, Q8_0 and Q4_0 quantised by gguf, Q4_K and Q6_K blocks
    of fixed bytes, a 3-d tensor) and as nnconv writes it (structure, a tie, bool and 0-d
    tensors stored as bytes with the nnconv.gguf.tensors record)."""
    import gguf

    out = HERE / "gguf"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    rng = np.random.default_rng(0)
    kinds = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(out / "llama.gguf", "llama")
    writer.add_block_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "é"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.0])
    x = rng.standard_normal((2, 256)).astype(np.float32)
    writer.add_tensor("token_embd.weight", x.astype(np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", x[0])
    packed = {"ffn_norm": (x[0], kinds.BF16), "attn_q": (x, kinds.Q8_0), "attn_k": (x, kinds.Q4_0)}
    for name, (values, kind) in packed.items():
        data = gguf.quants.quantize(values, kind)
        writer.add_tensor(f"blk.0.{name}.weight", data, raw_dtype=kind)
    for name, kind in (("blk.0.ffn_up.weight", kinds.Q4_K), ("blk.0.ffn_down.weight", kinds.Q6_K)):
        size = gguf.GGML_QUANT_SIZES[kind][1]
        blocks = rng.integers(0, 256, (2, size), dtype=np.uint8)
        scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        blocks[:, :2] = blocks[:, -2:] = scale  # the scale d (Q4_K: first, Q6_K: last)
        writer.add_tensor(name, blocks, raw_dtype=kind)
    writer.add_tensor("positions", np.arange(24, dtype=np.int32).reshape(2, 3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    obj = {"layer": {"weight": w, "mask": torch.tensor([True, False])}, "tied": w, "step": 3}
    obj["scale"] = torch.tensor(0.5, dtype=torch.bfloat16)
    ckpt = from_object(obj)
    ckpt.metadata["note"] = "fuzz seed"
    save(ckpt, out / "nnconv.gguf")


class _Scripted(torch.nn.Module):
    """What the TorchScript reader models: own parameter and buffers, submodules (an
    int64 buffer in BatchNorm), a tied weight and typed attributes (list, dict, device)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.arange(3, dtype=torch.float32))
        self.register_buffer("steps", torch.tensor([7], dtype=torch.int64))
        self.a = torch.nn.Linear(3, 3, bias=False)
        self.b = torch.nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.norm = torch.nn.BatchNorm1d(3)
        self.sizes = [1, 2]
        self.names = {"x": 1}
        self.device = torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.b(self.a(x)) * self.scale) + self.sizes[0]


def torchscript_seeds() -> None:
    """torch.jit.save archives (their code/ records deflated), scripted and traced."""
    torch.manual_seed(0)
    out = HERE / "pt"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    torch.jit.save(torch.jit.script(_Scripted()), out / "scripted.pt")
    mlp = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    torch.jit.save(torch.jit.trace(mlp, torch.zeros(1, 2)), out / "traced.pt")


class _Tied(torch.nn.Module):
    """What the .pt2 reader models: tied weights, BatchNorm (an int64 0-d buffer), a
    non-persistent buffer and a lifted tensor constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 3, bias=False)
        self.b = torch.nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.norm = torch.nn.BatchNorm1d(3)
        self.register_buffer("table", torch.arange(3.0), persistent=False)
        self.scale = torch.tensor([2.0, 3.0, 4.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.b(self.a(x))) * self.scale + self.table


def pt2_seeds() -> None:
    """torch.export.save of a module with ties and constants, and nnconv's own export of
    built-in layers (its architecture record in extra/, rebuilt untrusted by the harness)."""
    from nnconv.converter.export_pt2 import export_pt2
    from nnconv.converter.record import ARCHITECTURE_KEY, build, dumps

    torch.manual_seed(0)
    out = HERE / "pt2"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    program = torch.export.export(_Tied().eval(), (torch.randn(2, 3),))
    torch.export.save(program, out / "tied.pt2")
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    x = [InputSpec("input", (2, 4))]
    export_pt2(net, out / "record.pt2", inputs=x, metadata={ARCHITECTURE_KEY: dumps(build(net, x))})


if __name__ == "__main__":
    pt2_seeds()
    torchscript_seeds()
    onnx_seeds()
    safetensors_seeds()
    hdf5_seeds()
    record_seeds()
    npz_seeds()
    gguf_seeds()
    for path in sorted(HERE.rglob("*")):
        if path.is_file() and path.suffix != ".py":
            print(f"{path.stat().st_size:>8}  {path.relative_to(HERE)}")
