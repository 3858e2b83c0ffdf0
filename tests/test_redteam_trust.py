"""Red team: files that try to make nnconv import, construct or run what they name.

Each hostile file is built here, then the real CLI runs in a child process
(``redteam.nnconv``): nothing the file names is imported or constructed
without ``--trust-code``, marker files are never created, memory stays bounded.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from nnconv.formats.errors import UntrustedCodeError

sys.path.insert(0, str(Path(__file__).parent))
from redteam import nnconv  # noqa: E402

ARCH = "nnconv.architecture"


def _record(root: dict, inputs: list | None = None) -> str:
    return json.dumps({"version": 1, "root": root, "inputs": inputs or []})


def _weights_with_record(path: Path, root: dict, inputs: list | None = None) -> Path:
    tensors = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={ARCH: _record(root, inputs)})
    return path


def _payload_module(folder: Path, name: str, marker: Path) -> None:
    """A module that, if ever imported, creates ``marker`` (and defines an nn.Module)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            import pathlib
            pathlib.Path({str(marker)!r}).write_text("imported")
            import torch
            class Net(torch.nn.Linear):
                def __init__(self):
                    super().__init__(2, 2)
            """
        )
    )


@pytest.mark.parametrize("where", ["beside", "pythonpath"])
def test_record_never_imports_the_class_it_names(tmp_path, where):
    model_dir, lib = tmp_path / "model", tmp_path / "lib"
    marker = tmp_path / "IMPORTED"
    _payload_module(model_dir if where == "beside" else lib, "evilmod", marker)
    src = _weights_with_record(model_dir / "w.safetensors", {"path": "", "class": "evilmod:Net"})
    env = {"PYTHONPATH": str(lib)} if where == "pythonpath" else {}
    for args in (
        ["verify", src, src],
        ["verify", src, src, "--json", "-"],
        ["inspect", src],
    ):
        run = nnconv(*args, cwd=model_dir, env=env)
        assert run.rc == 0, run.stderr
        assert not marker.exists(), f"THE MODULE WAS IMPORTED by {args}"
    run = nnconv("verify", src, src, "--json", "-", cwd=model_dir, env=env)
    report = json.loads(run.stdout)  # stdout is the JSON only: nothing printed by an import
    assert report["outputs_checked"] is False and report["trust_code"] is False
    assert any("evilmod:Net" in n and "--trust-code" in n for n in report["notes"])
    out = model_dir / "w.onnx"
    run = nnconv("convert", src, out, cwd=model_dir, env=env)
    run.assert_refused(src)
    assert "evilmod:Net" in run.error_line and "--trust-code" in run.error_line
    assert not marker.exists() and not out.exists()


def test_record_naming_the_this_module_prints_nothing(tmp_path):
    src = _weights_with_record(tmp_path / "w.safetensors", {"path": "", "class": "this:Net"})
    run = nnconv("verify", src, src, "--json", "-", cwd=tmp_path)
    assert run.rc == 0, run.stderr
    assert "Zen of Python" not in run.stdout + run.stderr
    json.loads(run.stdout)


def test_record_naming_a_module_main_runs_nothing(tmp_path):
    root = {"path": "", "class": "torch.utils.model_dump.__main__:Net"}
    src = _weights_with_record(tmp_path / "w.safetensors", root)
    run = nnconv("verify", src, src, cwd=tmp_path)
    assert run.rc == 0, run.stderr
    assert "usage:" not in run.stdout + run.stderr


def _linear(tmp_path: Path, features: int, input_shape: list[int]) -> Path:
    """Weights of a 2x2 Linear whose record claims ``Linear(features, features)`` and
    declares an input of ``input_shape``."""
    args = {"in_features": features, "out_features": features, "bias": True}
    root = {"path": "", "class": "torch.nn.modules.linear:Linear", "args": args}
    inputs = [{"name": "input", "shape": input_shape, "dtype": "float32"}]
    return _weights_with_record(tmp_path / "w.safetensors", root, inputs)


def test_record_asking_for_a_huge_builtin_allocates_nothing(tmp_path):
    src = _linear(tmp_path, 20000, [1, 20000])
    for args in (["verify", src, src], ["convert", src, tmp_path / "w.onnx"]):
        run = nnconv(*args, cwd=tmp_path)
        run.assert_bounded()
        run.assert_refused(src)
        assert "does not fit" in run.error_line and "20000" in run.error_line
    assert not (tmp_path / "w.onnx").exists()


def test_record_declaring_huge_inputs_is_refused(tmp_path):
    src = _linear(tmp_path, 2, [100000, 100000, 2])
    for args in (["verify", src, src], ["convert", src, tmp_path / "w.onnx"]):  # both paths
        run = nnconv(*args, cwd=tmp_path)
        run.assert_bounded()
        run.assert_refused()
        assert "--input-shape" in run.error_line
    assert not (tmp_path / "w.onnx").exists()


class _Reduce:
    """Pickles as a call of ``target(*args)``: what a crafted whole-module file does."""

    def __init__(self, target, *args):
        self.target, self.args = target, args

    def __reduce__(self):
        return self.target, self.args


def test_module_pickle_cannot_call_a_constructor(tmp_path):
    src = tmp_path / "m.pt"
    torch.save(_Reduce(nn.Linear, 20000, 20000), src)
    for args in (["convert", src, tmp_path / "o.safetensors"], ["verify", src, src]):
        run = nnconv(*args, cwd=tmp_path)
        run.assert_bounded()
        assert "without its state" in run.assert_refused(src)
    # A real whole-module file still loads, without the constructor being called.
    seq = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    torch.save(seq, tmp_path / "seq.pt")
    run = nnconv("convert", tmp_path / "seq.pt", tmp_path / "seq.safetensors", cwd=tmp_path)
    assert run.rc == 0, run.stderr


def test_trusted_record_still_rebuilds_user_classes(tmp_path, monkeypatch):
    from nnconv.converter import models, record

    module_dir = tmp_path / "lib"
    _payload_module(module_dir, "goodmod", tmp_path / "imported")
    monkeypatch.syspath_prepend(str(module_dir))
    src = _weights_with_record(tmp_path / "w.safetensors", {"path": "", "class": "goodmod:Net"})
    with pytest.raises(UntrustedCodeError, match="goodmod:Net"):
        models.load_model(src)
    assert not (tmp_path / "imported").exists()
    loaded = models.load_model(src, trust_code=True)
    assert loaded.source == "record" and (tmp_path / "imported").exists()
    assert record.untrusted_classes(loaded.record) == ["goodmod:Net"]


def test_builtin_record_builds_on_meta_and_takes_the_files_tensors(tmp_path):
    from nnconv.converter import models, record
    from nnconv.converter.inputs import InputSpec

    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU())
    net.eval()
    rec = record.build(net, [InputSpec("input", (2, 4))])
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "n.safetensors"
    save_file(sd, str(path), metadata={ARCH: record.dumps(rec)})
    loaded = models.load_model(path)
    assert loaded.source == "record"
    for name, t in loaded.module.state_dict().items():
        assert not t.is_meta and torch.equal(t, sd[name]), name
    x = torch.randn(2, 4)
    assert torch.equal(loaded.module(x), net(x))


_SCRIPTED_PAYLOAD = '''
import torch


class Evil(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.ones(2, 2))

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        self.weight = state[0]
        self.training = state[1]
        # TorchScript can map any file and write through the mapping
        t = torch.from_file(MARKER, shared=True, size=4, dtype=torch.uint8)
        t.fill_(88)
        self.weight = self.weight + t[0].to(torch.float32) * 0

    def forward(self, x):
        return x @ self.weight
'''


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_payload_never_runs(tmp_path, monkeypatch):
    """An archive whose ``__setstate__`` writes into a file outside its folder: no
    command runs it without --trust-code (with it, torch.jit.load does)."""
    outside, model_dir = tmp_path / "outside.bin", tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "scripted_payload.py").write_text(
        _SCRIPTED_PAYLOAD.replace("MARKER", repr(str(outside)))
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import scripted_payload

    src = model_dir / "evil.pt"
    torch.jit.save(torch.jit.script(scripted_payload.Evil()), src)
    outside.write_bytes(b"\0" * 4)
    for args in (
        ["inspect", src],
        ["convert", src, model_dir / "w.safetensors"],
        ["convert", src, model_dir / "w.onnx", "--input-shape", "2,2"],
        ["verify", src, src],
    ):
        run = nnconv(*args, cwd=model_dir)
        assert outside.read_bytes() == b"\0" * 4, f"THE PAYLOAD RAN on {args}"
        assert "--trust-code" in run.assert_refused(src)
    assert sorted(p.name for p in model_dir.iterdir()) == ["evil.pt"]
    run = nnconv("inspect", src, "--trust-code", cwd=model_dir)  # the flag is the one way in
    assert run.rc == 0 and outside.read_bytes() == b"XXXX", run.stderr
