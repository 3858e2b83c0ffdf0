"""The committed fixtures: round trips through every format, and old nnconv output.

Each seed fixture (written by plain ``torch.save`` in fixtures/make_fixtures.py)
goes pt -> safetensors -> hdf5 -> pt and must ``torch.load`` exactly as the
original does.  ``mlp.safetensors`` and ``mlp.h5`` were written by an earlier
nnconv and must keep reading back as ``mlp.params``.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import assert_same, assert_shares_storage, tensors_in

from nnconv import convert, load
from nnconv.formats import registry, to_object

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SEEDS = ("x-file", "x-files", "mydict", "mlp.params", "sequential.pt", "checkpoint.pt", "legacy.pt")
WRITTEN_BY_NNCONV = ("mlp.safetensors", "mlp.h5")
MAX_FIXTURE_BYTES = 100_000


def fixture_files() -> list[Path]:
    return sorted(p for p in FIXTURES.iterdir() if p.is_file() and p.suffix != ".py")


def original(name: str):
    return torch.load(FIXTURES / name)


CHAINS = {
    "pt-safetensors-hdf5-pt": ("safetensors", "hdf5", "pt"),
    "pt-hdf5-safetensors-pt": ("hdf5", "safetensors", "pt"),
}
SUFFIX = {"safetensors": ".safetensors", "hdf5": ".h5", "pt": ".pt"}


@pytest.mark.parametrize("chain", list(CHAINS))
@pytest.mark.parametrize("name", SEEDS)
def test_round_trip(name: str, chain: str, tmp_path: Path) -> None:
    """Every step reads back as the original; the final pt ``torch.load``s as it."""
    src = FIXTURES / name
    expected = torch.load(src)
    previous = src
    for i, fmt in enumerate(CHAINS[chain], 1):
        dst = tmp_path / f"step{i}{SUFFIX[fmt]}"
        result = convert(previous, dst)
        assert result.destination_format == fmt
        with load(dst) as ckpt:
            assert ckpt.format == fmt
            assert_same(to_object(ckpt), expected, where=f"{name} as {fmt}")
        previous = dst
    assert_same(torch.load(previous), expected, where=name)


@pytest.mark.parametrize("name", SEEDS)
def test_seed_fixture_holds_what_it_should(name: str) -> None:
    """Guard the fixtures themselves: the object kinds the round trips are meant to cover."""
    obj = original(name)
    if name == "x-file":
        assert_same(obj, torch.arange(4))
    elif name == "x-files":
        assert_same(obj, [torch.arange(4), torch.zeros(4)])
    elif name == "mydict":
        assert_same(obj, {"x": torch.arange(4), "y": torch.zeros(4)})
    elif name == "mlp.params":
        assert type(obj) is OrderedDict and obj._metadata
        assert {k: tuple(v.shape) for k, v in obj.items()} == {
            "hidden.weight": (256, 20),
            "hidden.bias": (256,),
            "output.weight": (10, 256),
            "output.bias": (10,),
        }
    elif name in ("sequential.pt", "legacy.pt"):
        assert type(obj) is OrderedDict
        assert list(obj) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        assert_same(obj, original("sequential.pt"))
    elif name == "checkpoint.pt":
        assert type(obj) is dict
        assert list(obj) == ["model", "optimizer", "epoch", "name", "best", "done", "note"]
        assert (obj["epoch"], obj["name"], obj["best"], obj["done"], obj["note"]) == (
            3,
            "run-1",
            0.25,
            False,
            None,
        )
        opt = obj["optimizer"]
        assert list(opt["state"]) == [1, 2, 3]  # int keys; hidden.weight was frozen
        assert isinstance(opt["param_groups"][0]["betas"], tuple)
        assert opt["state"][1]["step"].item() == 1.0
    for path, t in tensors_in(obj):
        assert t.is_contiguous(), path


def test_legacy_fixture_is_legacy_format() -> None:
    head = (FIXTURES / "legacy.pt").read_bytes()[:4]
    assert head != b"PK\x03\x04"
    assert (FIXTURES / "sequential.pt").read_bytes()[:4] == b"PK\x03\x04"


@pytest.mark.parametrize("name", WRITTEN_BY_NNCONV)
def test_committed_nnconv_output_still_reads(name: str, tmp_path: Path) -> None:
    expected = original("mlp.params")
    with load(FIXTURES / name) as ckpt:
        assert ckpt.format == registry.for_destination(FIXTURES / name).NAME
        assert ckpt.names() == list(expected)
        for key, t in expected.items():
            lazy = ckpt.lazy(key)
            assert (lazy.dtype, lazy.shape) == ("float32", tuple(t.shape))
        assert_same(to_object(ckpt), expected, where=name)
    convert(FIXTURES / name, tmp_path / "back.pt")
    assert_same(torch.load(tmp_path / "back.pt"), expected, where=name)


def test_every_fixture_is_present_and_small() -> None:
    names = {p.name for p in fixture_files()}
    assert names >= set(SEEDS + WRITTEN_BY_NNCONV)
    for path in fixture_files():
        assert path.stat().st_size < MAX_FIXTURE_BYTES, path.name


def _is_unusual(path: Path) -> bool:
    """No extension, or one that no adapter claims or that is not a usual torch one."""
    return path.suffix not in (".pt", ".pth", ".safetensors", ".h5")


@pytest.mark.parametrize("path", [p for p in fixture_files() if _is_unusual(p)], ids=str)
def test_unusual_names_are_detected_as_pt_by_content(path: Path) -> None:
    assert registry.detect(path).NAME == "pt"
    assert registry.ADAPTERS["pt"].sniff(path, registry.read_head(path))


@pytest.mark.parametrize("path", fixture_files(), ids=lambda p: p.name)
def test_every_fixture_is_detected(path: Path) -> None:
    expected = {".safetensors": "safetensors", ".h5": "hdf5"}.get(path.suffix, "pt")
    found = registry.detect(path).NAME
    assert found == expected
    assert registry.ADAPTERS[expected].sniff(path, registry.read_head(path))  # by content


def _skeleton(obj):
    """The object with tensors replaced by (type, dtype, shape): what does not hang on RNG."""
    if isinstance(obj, torch.Tensor):
        return (type(obj).__name__, obj.dtype, tuple(obj.shape))
    if isinstance(obj, dict):
        return (type(obj).__name__, [(k, _skeleton(v)) for k, v in obj.items()])
    if isinstance(obj, list | tuple):
        return (type(obj).__name__, [_skeleton(v) for v in obj])
    return obj


def test_make_fixtures_reproduces_the_committed_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(tmp_path)
    for name in ("x-file", "x-files", "mydict"):  # no randomness: exactly equal
        assert_same(torch.load(tmp_path / name), original(name), where=name)
    for name in SEEDS:  # initialisation may change across torch versions: structure only
        assert _skeleton(torch.load(tmp_path / name)) == _skeleton(original(name)), name
    for name in WRITTEN_BY_NNCONV:
        with load(tmp_path / name) as ckpt:
            assert_same(to_object(ckpt), torch.load(tmp_path / "mlp.params"), where=name)


def _pairs_that_differ():
    t = torch.arange(4.0)
    nan_a = torch.tensor([float("nan")])
    nan_b = nan_a.view(torch.int32).add(1).view(torch.float32)  # another NaN payload
    meta = OrderedDict(a=t)
    meta._metadata = {"": {"version": 1}}
    tied = torch.ones(3)
    return {
        "dict vs OrderedDict": ({"a": t}, OrderedDict(a=t)),
        "key order": ({"a": t, "b": t}, {"b": t, "a": t}),
        "int vs str key": ({0: t}, {"0": t}),
        "_metadata": (meta, OrderedDict(a=t)),
        "list vs tuple": ([t], (t,)),
        "Parameter vs Tensor": (torch.nn.Parameter(t.clone()), t),
        "requires_grad": (t.clone().requires_grad_(), t),
        "dtype": (t, t.double()),
        "shape": (t, t.reshape(2, 2)),
        "values": (t, t + 1),
        "NaN payload": (nan_a, nan_b),
        "-0.0 tensor": (torch.tensor([0.0]), torch.tensor([-0.0])),
        "-0.0 float": (0.0, -0.0),
        "int vs float": (1, 1.0),
        "bool vs int": (True, 1),
        "str": ("a", "b"),
        "length": ([t], [t, t]),
        "sharing": ([tied, tied], [tied, tied.clone()]),
    }


@pytest.mark.parametrize("case", list(_pairs_that_differ()))
def test_assert_same_catches(case: str) -> None:
    a, b = _pairs_that_differ()[case]
    with pytest.raises(AssertionError):
        assert_same(a, b)
    with pytest.raises(AssertionError):
        assert_same(b, a)


def test_assert_same_accepts_equal_objects() -> None:
    nan = torch.tensor([float("nan"), -0.0])
    tied = torch.ones(3)
    a = {"n": nan, "x": [tied, tied], "f": float("nan"), "e": torch.empty(0)}
    b = {"n": nan.clone(), "x": [tied.clone()] * 2, "f": float("nan"), "e": torch.empty(0)}
    assert_same(a, b)
    assert_shares_storage(tied, tied.view(3))
    assert_shares_storage(tied, tied.clone(), shared=False)
