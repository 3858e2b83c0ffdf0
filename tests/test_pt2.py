"""``.pt2`` (``torch.export``): nnconv exports it, reads it as data, and runs it only trusted.

Checked here: the seed models (an MLP, a CNN with BatchNorm, tied weights with a
constant and a non-persistent buffer) export through ``nnconv convert`` and load in
``torch.export.load``; nnconv's read of a ``torch.export.save`` file is the module's
state_dict bit for bit, in its order, ties as aliases, constants after it, and runs
nothing (torch's loaders patched to fail, torch never imported); ``.pt2`` ->
safetensors keeps the names; ``verify`` runs eager, ``.pt2`` and ONNX side by side
with ``--trust-code`` (parameters only, said why, without it) and fails a perturbed
``.pt2``; hostile archives get one ``Error:`` line and run nothing.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import assert_tensor_same, cli
from safetensors.torch import load_file
from torch import nn

from nnconv.converter.convert import convert
from nnconv.formats import registry
from nnconv.formats.errors import FormatError, UntrustedCodeError
from nnconv.formats.pt import pt_format
from nnconv.formats.pt2 import pt2_archive, pt2_format

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's notices
ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "fixtures" / "models.py"
TIED_SOURCE = '''
import torch
from torch import nn


class Tied(nn.Module):
    """Tied weights, BatchNorm, a non-persistent buffer and a lifted tensor constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("table", torch.arange(4.0), persistent=False)
        self.scale = torch.tensor([2.0, 3.0, 4.0, 5.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.b(self.a(x))) * self.scale + self.table
'''
SHAPES = {"MLP": "2,20", "SmallCNN": "2,3,16,16", "Tied": "2,4"}


def _load_class(path: Path, name: str) -> type[nn.Module]:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"pt2_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Per seed model: its eager module, a weights file, nnconv's ``.pt2`` export, and a
    ``torch.export.save`` file of the same module; plus an ONNX export of the MLP."""
    folder = tmp_path_factory.mktemp("pt2")
    (folder / "tied.py").write_text(TIED_SOURCE)
    torch.manual_seed(0)
    out = {}
    for name, source in (("MLP", MODELS), ("SmallCNN", MODELS), ("Tied", folder / "tied.py")):
        module = _load_class(source, name)().eval()
        for m in module.modules():  # BatchNorm statistics that are not the defaults
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
        weights = folder / f"{name}.safetensors"
        spec = f"{source}:{name}"
        torch.save(module.state_dict(), folder / f"{name}.pt")
        convert(folder / f"{name}.pt", weights, model=spec, input_shapes=[SHAPES[name]])
        exported = folder / f"{name}.pt2"
        if name == "Tied":  # the record route: the weights file names its class
            convert(weights, exported, trust_code=True)
        else:
            convert(weights, exported, model=spec, input_shapes=[SHAPES[name]])
        shape = tuple(int(d) for d in SHAPES[name].split(","))
        program = torch.export.export(module, (torch.randn(shape),))
        saved = folder / f"{name}-torch.pt2"
        torch.export.save(program, saved)
        out[name] = dict(module=module, weights=weights, exported=exported, saved=saved, spec=spec)
    mlp = out["MLP"]
    convert(mlp["weights"], folder / "MLP.onnx", model=mlp["spec"], exporter="torchscript")
    out["folder"] = folder
    return out


def _expected(module: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict, then non-persistent buffers and tensor attributes (the constants)."""
    expected = dict(module.state_dict())
    expected.update((n, b) for n, b in module.named_buffers() if n not in expected)
    expected.update((n, v) for n, v in vars(module).items() if isinstance(v, torch.Tensor))
    return expected


@pytest.fixture
def no_torch_loaders(monkeypatch):
    """Any call of torch's own loaders (which would run code from the file) fails."""

    def refuse(*args, **kwargs):
        raise AssertionError("a torch loader ran")

    for owner, name in ((torch.export, "load"), (torch, "load"), (torch.jit, "load")):
        monkeypatch.setattr(owner, name, refuse)


@pytest.mark.parametrize("name", ["MLP", "SmallCNN", "Tied"])
@pytest.mark.parametrize("which", ["saved", "exported"])
def test_read_is_the_state_dict_bit_for_bit(work, name, which, no_torch_loaders):
    module, path = work[name]["module"], work[name][which]
    expected = _expected(module)
    with pt2_format.read(path) as ckpt:
        assert ckpt.format == "pt2" and registry.detect(path) is pt2_format
        assert ckpt.names() == list(expected)  # state_dict order, constants after it
        for key, tensor in expected.items():
            assert_tensor_same(ckpt.lazy(key).load(), tensor.detach(), key)
        if name == "Tied":
            assert ckpt.aliases == {"b.weight": "a.weight"}
            assert json.loads(ckpt.metadata[pt2_format.CONSTANTS_KEY]) == ["table", "scale"]
        assert all(t.span is not None for t in ckpt.tensors.values())  # byte spans, lazily


def test_read_imports_no_torch(work):
    code = (
        "import sys\nfrom nnconv.formats.pt2 import pt2_format\n"
        f"ckpt = pt2_format.read({str(work['Tied']['saved'])!r})\n"
        "print(len(ckpt.names()), 'torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["10", "False"]


def test_cli_export_loads_in_torch_with_a_dynamic_batch(work, capfd):
    dst = work["folder"] / "cli.pt2"
    run = cli(capfd, "convert", ROOT / "fixtures/mlp.params", dst, "--model", f"{MODELS}:MLP",
              "--input-shape", "2,20")  # fmt: skip
    assert run.rc == 0 and "torch.export exporter" in run.out, run.err
    mlp = _load_class(MODELS, "MLP")()
    mlp.load_state_dict(torch.load(ROOT / "fixtures/mlp.params"))
    x = torch.randn(5, 20)
    assert torch.equal(torch.export.load(dst).module()(x), mlp.eval()(x))


@pytest.mark.parametrize("name", ["SmallCNN", "Tied"])
def test_exports_run_in_torch(work, name):
    program = torch.export.load(work[name]["exported"])
    module = work[name]["module"]
    shape = (3, *(int(d) for d in SHAPES[name].split(",")[1:]))
    x = torch.randn(shape)
    torch.testing.assert_close(program.module()(x), module(x), rtol=0, atol=0)
    assert program.state_dict.keys() == module.state_dict().keys()


def test_pt2_to_safetensors_keeps_names(work):
    dst = work["folder"] / "back.safetensors"
    convert(work["SmallCNN"]["saved"], dst)
    got, state = load_file(dst), work["SmallCNN"]["module"].state_dict()
    assert list(got) == list(state)
    for key, tensor in state.items():
        assert_tensor_same(got[key], tensor, key)


def test_verify_eager_pt2_and_onnx(work, capfd):
    w = work["MLP"]
    onnx = work["folder"] / "MLP.onnx"
    args = ["verify", w["weights"], w["exported"], onnx, "--model", w["spec"]]
    run = cli(capfd, *args, "--trust-code")
    assert run.rc == 0, run.out + run.err
    assert "torch.export (.pt2)" in run.out and "onnxruntime" in run.out
    assert run.out.count("PASS  output") == 2
    untrusted = cli(capfd, *args)  # the .pt2: parameters only, and why
    assert untrusted.rc == 0 and "pass --trust-code to run it" in untrusted.out + untrusted.err
    assert untrusted.out.count("PASS  output") == 1


def test_verify_fails_a_perturbed_pt2(work, capfd):
    w = work["MLP"]
    module = _load_class(MODELS, "MLP")()
    module.load_state_dict(w["module"].state_dict())
    with torch.no_grad():
        module.output.bias += 1e-3
    bad = work["folder"] / "perturbed.pt2"
    torch.export.save(torch.export.export(module.eval(), (torch.randn(2, 20),)), bad)
    run = cli(capfd, "verify", w["weights"], bad, "--model", w["spec"], "--trust-code")
    assert run.rc == 1, run.out + run.err
    assert "FAIL" in run.out


def test_sniff_tells_pt2_from_torch_zips(work, tmp_path):
    saved = work["Tied"]["saved"]
    head = saved.read_bytes()[:64]
    assert pt2_format.sniff(saved, head) and not pt_format.sniff(saved, head)
    odd = tmp_path / "model.bin"  # the content decides, not the extension
    odd.write_bytes(saved.read_bytes())
    assert registry.detect(odd) is pt2_format
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    scripted = tmp_path / "s.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), scripted)
    for other in (tmp_path / "w.pt", scripted):
        assert not pt2_format.sniff(other, other.read_bytes()[:64])


def test_state_dict_order_merges_parameters_and_buffers():
    order = pt2_archive.state_dict_order
    # n holds buffers only: the buffers' order puts it before l
    assert order(["x", "l.w"], ["s", "n.m", "l.m"]) == ["x", "s", "n.m", "l.w", "l.m"]
    params = ["a.w", "a.c.w", "b.w", "d.e.w"]
    buffers = ["a.m", "a.c.m", "d.m", "d.e.m"]
    assert order(params, buffers) == [
        "a.w", "a.m", "a.c.w", "a.c.m", "b.w", "d.m", "d.e.w", "d.e.m"
    ]  # fmt: skip


# --- hostile archives --------------------------------------------------------------


def _rewrite(src: Path, dst: Path, changes: dict[str, bytes | None], deflated: tuple = ()) -> Path:
    """``src`` with members replaced (None: removed) and ``deflated`` ones added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0] + "/"
        for info in zin.infolist():
            name = info.filename[len(root) :]
            data = changes[name] if name in changes else zin.read(info)
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in deflated:
            zout.writestr(root + name, data, zipfile.ZIP_DEFLATED)
    return dst


def _config(path: Path) -> tuple[str, dict]:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("_weights_config.json"))
        return name.split("/", 1)[1], json.loads(z.read(name))


class Evil:
    def __reduce__(self):
        return (exec, ("open('MARKER', 'w').close()",))


def _hostile(base: Path, tmp: Path, kind: str) -> Path:
    name, config = _config(base)
    first = next(iter(config["config"].values()))
    dst = tmp / f"{kind}.pt2"
    if kind == "bad-json":
        return _rewrite(base, dst, {name: b'{"config": {"a": '})
    if kind == "deep-json":
        return _rewrite(base, dst, {name: b"[" * 200_000})
    if kind == "json-bomb":  # 8 MiB of JSON (over a limit of 4) in a deflated record of 8 KB
        return _rewrite(base, dst, {name: None}, ((name, b" " * (8 << 20)),))
    if kind == "missing-weight":
        return _rewrite(base, dst, {f"data/weights/{first['path_name']}": None})
    if kind == "truncated-weight":
        return _rewrite(base, dst, {f"data/weights/{first['path_name']}": b"\0" * 3})
    if kind == "evil-pickle":
        first["use_pickle"] = True
        payload = io.BytesIO()
        torch.save({"x": 1}, payload)  # a torch.save zip whose data.pkl calls exec
        with zipfile.ZipFile(payload) as z:
            members = {n: z.read(n) for n in z.namelist()}
        import pickle

        pkl = next(n for n in members if n.endswith("data.pkl"))
        members[pkl] = pickle.dumps(Evil(), protocol=2)
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as z:
            for n, data in members.items():
                z.writestr(n, data)
        weight = f"data/weights/{first['path_name']}"
        return _rewrite(base, dst, {name: json.dumps(config).encode(), weight: inner.getvalue()})
    raise AssertionError(kind)


HOSTILE = ["bad-json", "deep-json", "json-bomb", "missing-weight", "truncated-weight"]


@pytest.mark.parametrize("kind", [*HOSTILE, "evil-pickle"])
def test_hostile_archives_are_one_clean_error(work, tmp_path, kind, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pt2_archive, "MAX_CONFIG", 4 << 20)  # 64 MiB: the same check
    bad = _hostile(work["MLP"]["saved"], tmp_path, kind)
    error = UntrustedCodeError if kind == "evil-pickle" else FormatError
    with pytest.raises(error) as caught:
        pt2_format.read(bad).close()
    if kind == "evil-pickle":
        message = caught.value.cli_message()
        assert "builtins.exec" in message and "pass --trust-code" in message
    run = cli(capfd, "inspect", bad)
    assert run.rc == 2 and run.err.count("\n") == 1 and run.err.startswith("Error: "), run.err
    assert not (tmp_path / "MARKER").exists()


def test_limits_hold_for_records(work, monkeypatch):
    monkeypatch.setattr(pt2_archive, "MAX_PROGRAM", 1000)
    with pytest.raises(FormatError, match="claims"):
        pt2_format.read(work["MLP"]["saved"])


def test_whole_module_pickle_exports(tmp_path, capfd):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    torch.save(seq, tmp_path / "seq.pt")
    run = cli(capfd, "convert", tmp_path / "seq.pt", tmp_path / "seq.pt2", "--input-shape", "2,4")
    assert run.rc == 0, run.err
    x = torch.randn(3, 4)
    assert torch.equal(torch.export.load(tmp_path / "seq.pt2").module()(x), seq(x))
