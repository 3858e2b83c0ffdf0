"""The house's design, enforced: formats reach the engine only through the registry.

- ``converter/`` never imports a format's folder and never branches on a format name
  (an AST walk); what a format can do is asked of its declared capabilities.
- each format folder imports only the shared core and itself; the core imports no
  format folder except the registry, one line per adapter.
- a fake format registered at run time (``tests/fake_format.py``) works in
  ``convert``, ``inspect``, ``verify``, ``nnconv formats`` and the round-trip
  properties with no other change.
- a source is classified once: one ``convert`` and one ``verify`` of a whole-module
  pickle detect each source and scan each pickle exactly once.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

import fake_format
import pytest
import torch
from helpers import assert_same, cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnconv import convert, inspect, load, save, verify
from nnconv.formats import registry, to_object
from nnconv.formats.adapter import Capabilities

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ROOT / "formats"
FOLDERS = sorted(p.name for p in FORMATS.iterdir() if (p / "__init__.py").is_file())
CORE = sorted(p.stem for p in FORMATS.glob("*.py") if p.stem != "__init__")


def _module_names(path: Path, package: str) -> set[str]:
    """Every module an import in ``path`` names, relative imports resolved against
    ``package`` (``nnconv.formats.pt`` for ``formats/pt/x.py``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _folder_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["nnconv", "formats"] and len(parts) > 2 and parts[2] in FOLDERS:
        return parts[2]
    return None


@pytest.mark.parametrize(
    "path", sorted((ROOT / "converter").rglob("*.py")), ids=lambda p: p.name
)
def test_converter_imports_no_format_folder(path):
    package = "nnconv.converter"
    reached = {m for m in _module_names(path, package) if _folder_of(m)}
    assert not reached, f"{path.name} reaches a format directly: {sorted(reached)}"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "converter").rglob("*.py")), ids=lambda p: p.name
)
def test_converter_never_branches_on_a_format_name(path):
    names = set(registry.ADAPTERS) | set(FOLDERS)
    bad = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            literals = [
                c.value
                for o in operands
                for c in ([o, *getattr(o, "elts", [])])
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            ]
            named = any(isinstance(o, ast.Attribute) and o.attr == "NAME" for o in operands)
            if named or set(literals) & names:
                bad.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).endswith("registry.get")
            and any(isinstance(a, ast.Constant) for a in node.args)
        ):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not bad, f"{path.name} branches on format names: {bad}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_format_folders_are_self_contained(folder):
    for path in sorted((FORMATS / folder).rglob("*.py")):
        for module in _module_names(path, f"nnconv.formats.{folder}"):
            other = _folder_of(module)
            assert other in (None, folder), f"{folder}/{path.name} imports {module}"
            assert "converter" not in module, f"{folder}/{path.name} imports {module}"


@pytest.mark.parametrize("name", CORE)
def test_core_imports_no_format_but_the_registry(name):
    modules = _module_names(FORMATS / f"{name}.py", "nnconv.formats")
    reached = {_folder_of(m) for m in modules} - {None}
    assert "converter" not in " ".join(modules)
    if name == "registry":  # one import per adapter: the registry is the only door
        assert reached == set(FOLDERS)
    else:
        assert not reached, f"formats/{name}.py imports {reached}"


def test_every_adapter_declares_the_protocol():
    for name, adapter in registry.ADAPTERS.items():
        assert name == adapter.NAME
        assert isinstance(adapter.CAPABILITIES, Capabilities)
        assert adapter.__name__ == f"nnconv.formats.{name}.{name}_format"
        for attr in registry.REQUIRED:
            assert hasattr(adapter, attr), f"{name} lacks {attr}"
        if "graph" in adapter.CAPABILITIES.holds:
            assert hasattr(adapter, "load_graph") and hasattr(adapter, "from_graph")
    with pytest.raises(TypeError):
        registry.register(object())
    with pytest.raises(TypeError):
        registry.ADAPTERS["x"] = fake_format  # read-only: register() is the door


def test_write_options_are_checked_once_against_capabilities(tmp_path):
    sd = {"w": torch.ones(2)}
    save(sd, tmp_path / "a.pt")
    for option, value in (("shard_size", "1KB"), ("compression", "gzip")):
        takers = [a.NAME for a in registry.taking(option)]
        assert takers, option
        with pytest.raises(Exception, match="applies to .* destinations only") as info:
            convert(tmp_path / "a.pt", tmp_path / "b.pt", **{option: value})
        assert all(t in str(info.value) for t in takers)


# --- a fake format, registered at run time ---------------------------------------------


@pytest.fixture
def fake():
    registry.register(fake_format)
    try:
        yield fake_format
    finally:
        registry.unregister(fake_format.NAME)


def test_fake_format_converts_inspects_and_verifies(fake, tmp_path, capfd):
    sd = {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3).to(torch.bfloat16)}
    sd["tied"] = sd["a.weight"]
    torch.save(sd, tmp_path / "sd.pt")
    result = convert(tmp_path / "sd.pt", tmp_path / "sd.fake")
    assert (result.source_format, result.destination_format) == ("pt", "fake")
    with load(tmp_path / "sd.fake") as ckpt:
        assert ckpt.format == "fake" and ckpt.aliases == {"tied": "a.weight"}
        assert_same(to_object(ckpt), sd)
    convert(tmp_path / "sd.fake", tmp_path / "back.safetensors")
    with load(tmp_path / "back.safetensors") as ckpt:
        assert_same(to_object(ckpt), sd)
    assert inspect(tmp_path / "sd.fake").format == "fake"
    assert verify(tmp_path / "sd.pt", tmp_path / "sd.fake", tmp_path / "back.safetensors")
    listed = cli(capfd, "formats")
    assert listed.rc == 0 and "fake" in listed.out and ".fake" in listed.out
    shown = cli(capfd, "inspect", str(tmp_path / "sd.fake"))
    assert shown.rc == 0 and "a.weight" in shown.out


TENSORS = st.builds(
    lambda dtype, shape, seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    .to(dtype),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64]),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.integers(0, 2**31),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=st.dictionaries(st.text(min_size=1, max_size=8), TENSORS, min_size=1, max_size=4))
def test_fake_format_round_trips_with_every_writable_format(obj, tmp_path_factory):
    registry.register(fake_format)
    try:
        tmp = tmp_path_factory.mktemp("rt")
        save(obj, tmp / "src.fake")
        for adapter in list(registry.ADAPTERS.values()):
            if not adapter.CAPABILITIES.writes:
                continue
            there = tmp / f"there{adapter.EXTENSIONS[0]}"
            convert(tmp / "src.fake", there, force=True)
            convert(there, tmp / "back.fake", force=True)
            with load(tmp / "back.fake") as ckpt:
                assert_same(to_object(ckpt), obj)
    finally:
        registry.unregister(fake_format.NAME)


# --- one classification per source --------------------------------------------------


def test_a_source_is_detected_and_scanned_once(tmp_path, monkeypatch):
    from nnconv.formats import pickle_gate
    from nnconv.formats import source as source_module

    calls: Counter[str] = Counter()

    def counting(owner, name):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    counting(registry, "detect")
    counting(pickle_gate, "scan")
    assert source_module.registry is registry  # the one detect() every caller goes through
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    torch.save(model, tmp_path / "whole.pt")
    convert(tmp_path / "whole.pt", tmp_path / "out.safetensors")
    assert calls == {"detect": 1, "scan": 1}, calls
    calls.clear()
    report = verify(tmp_path / "whole.pt", tmp_path / "out.safetensors")
    assert report and report.outputs_checked
    assert calls == {"detect": 2, "scan": 1}, calls  # two sources, one pickle


def test_the_fake_adapter_is_unknown_once_unregistered(tmp_path):
    assert "fake" not in registry.ADAPTERS
    (tmp_path / "x.fake").write_bytes(fake_format.MAGIC + b"\0" * 8)
    with pytest.raises(Exception, match="unrecognised|does not support"):
        load(tmp_path / "x.fake")
    assert "tests" in sys.modules["fake_format"].__file__
