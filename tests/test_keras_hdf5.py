"""Keras weight files read as checkpoints: Keras 3 ``*.weights.h5`` and legacy Keras ``.h5``.

Keras 3 names are the HDF5 paths (``layers/dense/vars/0``) in natural order
(``vars/2`` before ``vars/10``); legacy Keras names are the ``weight_names``
(``dense/kernel:0``) in the order ``layer_names`` and ``weight_names`` give.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import assert_same

from nnconv import convert, load
from nnconv.formats import to_object

# Keras 3 defaults to TensorFlow; torch is what this project always has.
os.environ.setdefault("KERAS_BACKEND", "torch")


def f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


BF16 = torch.tensor([1.5, -2.0, 3.140625, float("nan"), -0.0, 1e-40], dtype=torch.bfloat16)


def bf16_bits() -> np.ndarray:
    return BF16.view(torch.int16).numpy().view(np.uint16)


def check(ckpt, expected: dict[str, torch.Tensor]) -> None:
    """Names in order, then each tensor's dtype, shape and bytes."""
    assert ckpt.names() == list(expected)
    for name, t in expected.items():
        lazy = ckpt.lazy(name)
        assert lazy.dtype == str(t.dtype).removeprefix("torch."), name
        assert lazy.shape == tuple(t.shape), name
        assert_same(lazy.load(), t, where=name)


# --- Keras 3 ----------------------------------------------------------------------


def keras3_expected() -> dict[str, torch.Tensor]:
    """What the Keras 3 file holds, in the order nnconv must list it."""
    rng = np.random.default_rng(0)
    out = {
        "layers/dense/vars/0": torch.from_numpy(f32(rng, 4, 3)),  # kernel
        "layers/dense/vars/1": torch.from_numpy(f32(rng, 3)),  # bias
        "layers/dense_1/vars/0": torch.from_numpy(f32(rng, 3, 2)),
        "layers/dense_1/vars/1": torch.from_numpy(f32(rng, 2)),
        "layers/dense_2/vars/0": BF16,
    }
    for i in range(12):  # one layer with more than 10 vars: 0, 1, 2, ..., 10, 11
        out[f"layers/dense_10/vars/{i}"] = torch.full((i + 1,), float(i))
    out["optimizer/vars/0"] = torch.tensor(7, dtype=torch.int64)  # iterations, a scalar
    out["optimizer/vars/1"] = torch.tensor(0.001, dtype=torch.float32)  # learning rate
    return out


def write_keras3(path: Path, expected: dict[str, torch.Tensor], *, bf16_attr=str) -> None:
    """Groups and datasets as Keras 3's H5IOStore makes them (no creation-order tracking),
    written in a scrambled order so that only natural sorting gives the expected one."""
    names = sorted(expected, reverse=True)
    with h5py.File(path, "w") as f:
        f.create_group("vars")  # the model's own (empty) variable group
        f.create_group("layers/dropout/vars")  # a layer without weights
        for name in names:
            t = expected[name]
            if t.dtype == torch.bfloat16:
                ds = f.create_dataset(name, data=bf16_bits())
                ds.attrs["dtype"] = bf16_attr("bfloat16")
            else:
                f.create_dataset(name, data=t.numpy())


@pytest.fixture
def keras3_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.weights.h5"
    write_keras3(path, keras3_expected())
    return path


def test_keras3_names_order_dtypes_values(keras3_file: Path) -> None:
    with load(keras3_file) as ckpt:
        assert ckpt.format == "hdf5"
        assert ckpt.metadata.get("nnconv.layout") == "keras3"
        check(ckpt, keras3_expected())
        assert not ckpt.aliases


def test_keras3_var_order_is_numeric(keras3_file: Path) -> None:
    with load(keras3_file) as ckpt:
        vars_ = [n.rsplit("/", 1)[1] for n in ckpt.names() if n.startswith("layers/dense_10/")]
        layers = list(dict.fromkeys(n.split("/")[1] for n in ckpt.names() if "layers/" in n))
    assert vars_ == [str(i) for i in range(12)]
    assert layers == ["dense", "dense_1", "dense_2", "dense_10"]


def test_keras3_model_own_variables_at_the_root(tmp_path: Path) -> None:
    """A subclassed Keras 3 model with ``self.add_weight`` stores them in the root ``vars``."""
    expected = {
        "layers/dense/vars/0": torch.ones(4, 3),
        "vars/0": torch.arange(3, dtype=torch.float32),
    }
    path = tmp_path / "model.weights.h5"
    write_keras3(path, expected)
    with load(path) as ckpt:
        assert ckpt.metadata.get("nnconv.layout") == "keras3"
        check(ckpt, expected)


@pytest.mark.parametrize("attr", [str, np.bytes_], ids=["str", "bytes"])
def test_keras3_bfloat16_bit_pattern(tmp_path: Path, attr) -> None:
    path = tmp_path / "bf.weights.h5"
    write_keras3(path, {"layers/dense/vars/0": BF16}, bf16_attr=attr)
    with load(path) as ckpt:
        check(ckpt, {"layers/dense/vars/0": BF16})


def test_keras3_bfloat16_as_keras_writes_it(tmp_path: Path) -> None:
    """Keras 3 writes bfloat16 as an ml_dtypes array, which h5py stores as HDF5 opaque
    (numpy ``|V2``), plus the ``dtype="bfloat16"`` attribute."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    path = tmp_path / "bf.weights.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_group("layers/dense/vars").create_dataset(
            "0", data=bf16_bits().view(ml_dtypes.bfloat16)
        )
        ds.attrs["dtype"] = "bfloat16"
        assert ds.dtype.kind == "V"
    with load(path) as ckpt:
        check(ckpt, {"layers/dense/vars/0": BF16})


@pytest.mark.parametrize("dst", ["out.safetensors", "out.h5", "out.pt"])
def test_keras3_converts_losslessly(keras3_file: Path, tmp_path: Path, dst: str) -> None:
    expected = keras3_expected()
    convert(keras3_file, tmp_path / dst)
    with load(tmp_path / dst) as ckpt:
        check(ckpt, expected)
        assert_same(to_object(ckpt), expected)


# --- legacy Keras (tf.keras 2 / Keras 3 legacy .h5) -------------------------------------

LEGACY_LAYERS = {  # layer -> weight_names, in Keras' order (kernel before bias)
    "dense": ["dense/kernel:0", "dense/bias:0"],
    "dropout": [],
    "dense_1": ["dense_1/kernel:0", "dense_1/bias:0"],
    "batch_normalization": [
        "batch_normalization/gamma:0",
        "batch_normalization/beta:0",
        "batch_normalization/moving_mean:0",
        "batch_normalization/moving_variance:0",
    ],
}
LEGACY_SHAPES = {
    "dense": [(4, 3), (3,)],
    "dense_1": [(3, 2), (2,)],
    "batch_normalization": [(2,)] * 4,
}


def legacy_expected() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(1)
    return {
        name: torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        for layer, names in LEGACY_LAYERS.items()
        for name, shape in zip(names, LEGACY_SHAPES.get(layer, []), strict=True)
    }


def write_legacy(path: Path, *, nested: bool = True, chunked: bool = False) -> None:
    """What ``model.save("x.h5")`` (``model_weights`` group) or ``model.save_weights``
    (layers at the root) wrote in tf.keras 2."""
    expected = legacy_expected()
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        if nested:
            f.attrs["model_config"] = json.dumps({"class_name": "Sequential"})
            root = f.create_group("model_weights")
            opt = f.create_group("optimizer_weights")  # not model weights: left out
            opt.attrs["weight_names"] = np.array([b"Adam/iter:0"])
            opt.create_dataset("Adam/iter:0", data=np.int64(3))
        else:
            root = f
        layer_names = np.array([n.encode() for n in LEGACY_LAYERS])
        if chunked:  # Keras splits attributes over 64 KB into name0, name1, ...
            root.attrs["layer_names0"] = layer_names[:2]
            root.attrs["layer_names1"] = layer_names[2:]
        else:
            root.attrs["layer_names"] = layer_names
        root.attrs["backend"] = b"tensorflow"
        root.attrs["keras_version"] = b"2.15.0"
        for layer in reversed(LEGACY_LAYERS):  # scrambled creation order
            group = root.create_group(layer)
            names = LEGACY_LAYERS[layer]
            group.attrs["weight_names"] = np.array([n.encode() for n in names])
            for name in reversed(names):
                group.create_dataset(name, data=expected[name].numpy())


@pytest.mark.parametrize("nested", [True, False], ids=["model_weights", "root"])
def test_legacy_keras_names_order_dtypes_values(tmp_path: Path, nested: bool) -> None:
    path = tmp_path / "model.h5"
    write_legacy(path, nested=nested)
    with load(path) as ckpt:
        assert ckpt.metadata.get("nnconv.layout") == "keras-legacy"
        check(ckpt, legacy_expected())
        assert "Adam/iter:0" not in ckpt.names()


def test_legacy_keras_converts_losslessly(tmp_path: Path) -> None:
    write_legacy(tmp_path / "model.h5")
    convert(tmp_path / "model.h5", tmp_path / "model.safetensors")
    convert(tmp_path / "model.safetensors", tmp_path / "model.pt")
    assert_same(torch.load(tmp_path / "model.pt"), legacy_expected())


def test_legacy_keras_chunked_layer_names(tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    write_legacy(path, chunked=True)
    with load(path) as ckpt:
        check(ckpt, legacy_expected())


# --- real Keras, when installed ---------------------------------------------------------


def _keras_model(keras, dtype: str = "float32"):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, name="first", dtype=dtype),
            keras.layers.Dropout(0.1, name="drop"),
            keras.layers.Dense(2, name="second", dtype=dtype),
        ]
    )
    model(np.zeros((1, 4), dtype=np.float32))
    return model


def _keras_expected(keras, model, path: Path) -> dict[str, torch.Tensor]:
    """Keras 3 files key layers by class name (``dense``, ``dense_1``); the layer's own
    name sits in the ``vars`` group's ``name`` attribute. nnconv keeps the file's paths."""
    with h5py.File(path, "r") as f:
        keys = {f[f"layers/{k}/vars"].attrs["name"]: k for k in f["layers"]}
    out = {}
    for layer in model.layers:
        for i, w in enumerate(layer.weights):
            value = keras.ops.convert_to_numpy(w.value)
            if str(value.dtype) == "bfloat16":
                out[f"layers/{keys[layer.name]}/vars/{i}"] = torch.from_numpy(
                    value.view(np.uint16).view(np.int16)
                ).view(torch.bfloat16)
            else:
                out[f"layers/{keys[layer.name]}/vars/{i}"] = torch.from_numpy(value.copy())
    return out


def test_real_keras_weights_file(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3"):
        pytest.skip("needs Keras 3")
    model = _keras_model(keras)
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    expected = _keras_expected(keras, model, path)
    with load(path) as ckpt:
        layer_names = [n for n in ckpt.names() if n.startswith("layers/")]
        assert layer_names == list(expected)
        for name, t in expected.items():
            assert_same(ckpt.lazy(name).load(), t, where=name)


def test_real_keras_bfloat16_weights_file(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3"):
        pytest.skip("needs Keras 3")
    model = _keras_model(keras, dtype="bfloat16")
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    expected = _keras_expected(keras, model, path)
    with load(path) as ckpt:
        for name, t in expected.items():
            assert_same(ckpt.lazy(name).load(), t, where=name)
