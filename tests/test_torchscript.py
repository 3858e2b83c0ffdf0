"""TorchScript archives read by nnconv's restricted reader, never by ``torch.jit.load``.

``torch.jit.load`` compiles and runs an archive's code (``__setstate__``,
methods); ``nnconv.formats.torchscript`` reads the weights as data instead.
Checked here: scripted and traced models read as exactly ``state_dict()``
(names, order, dtypes, shapes, bits, tied weights as aliases) without importing
torch; torch.jit is never called; code in ``code/`` is never compiled; what the
reader does not model (a custom ``__setstate__``, a class without source) is
refused with ``--trust-code`` named; corrupt archives are ``FormatError``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import assert_tensor_same
from safetensors.torch import load_file
from torch import nn

from nnconv.formats.errors import FormatError, UntrustedCodeError
from nnconv.formats.pt import pt_format

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's notices


class Block(nn.Module):
    """Its own parameter, buffers (int64 0-d, half, a transposed view) and a child."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.register_buffer("running", torch.arange(4.0))
        self.register_buffer("steps", torch.tensor(3))
        self.register_buffer("h16", torch.randn(2, 3).half())
        self.register_buffer("view", torch.arange(6.0).reshape(2, 3).t())
        self.child = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.child(x) * self.scale + self.running + self.view.sum()


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class Stateful(nn.Module):
    """Rebuilt by its own TorchScript ``__setstate__``: only torch.jit.load can do that."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.w = state[0] * 2
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def _bn() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    net(torch.randn(5, 3))  # running statistics and num_batches_tracked move
    return net.eval()


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (1, 4)),
    "batchnorm": (_bn, (5, 3)),
    "block": (Block, (1, 4)),
    "tied": (Tied, (1, 4)),
}


def _save(tmp_path: Path, name: str, how: str) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    make, shape = MODELS[name]
    net = make()
    scripted = torch.jit.script(net) if how == "script" else torch.jit.trace(net, torch.ones(shape))
    path = tmp_path / f"{name}-{how}.pt"
    torch.jit.save(scripted, path)
    return path, scripted


ROOT_CODE = "code/__torch__/test_torchscript.py"  # this module's classes in an archive


def _rewrite(
    src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None], add: dict | None = None
) -> Path:
    """A copy of a zip archive with members edited (None drops one), compression kept,
    and ``add`` ({name under the archive's folder: bytes}) appended."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)
        folder = zin.namelist()[0].split("/")[0]
        for name, data in (add or {}).items():
            zout.writestr(f"{folder}/{name}", data, zipfile.ZIP_DEFLATED)
    return dst


@pytest.fixture
def no_jit(monkeypatch, tmp_path):
    """torch.jit.load and torch's TorchScript importers leave a marker and fail if called."""
    marker = tmp_path / "JIT_CALLED"

    def called(*args, **kwargs):
        marker.write_text("called")
        raise AssertionError("torch.jit was asked to load the archive")

    monkeypatch.setattr(torch.jit, "load", called)
    monkeypatch.setattr(torch._C, "import_ir_module", called)
    monkeypatch.setattr(torch._C, "import_ir_module_from_buffer", called)
    return marker


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_reads_the_state_dict_bit_for_bit(tmp_path, no_jit, name, how):
    path, scripted = _save(tmp_path, name, how)
    expected = scripted.state_dict()
    assert pt_format.is_torchscript(path)
    ckpt = pt_format.read(path)
    assert ckpt.format == "pt" and ckpt.metadata == {}
    assert ckpt.names() == list(expected)
    for key, value in expected.items():
        assert_tensor_same(ckpt.lazy(key).load(), value, key)
    if name == "tied":
        assert ckpt.aliases == {"b.weight": "a.weight"}
    assert not no_jit.exists()


@pytest.mark.parametrize("name", ["batchnorm", "tied"])
def test_reads_without_importing_torch(tmp_path, name):
    """Contiguous tensors are byte spans: read and written with no torch (a strided view,
    like Block's, is rearranged by torch when it is written, as for any pt file)."""
    path, scripted = _save(tmp_path, name, "script")
    out = tmp_path / "out.safetensors"
    code = (
        "import sys\n"
        "from nnconv.formats.pt import pt_format\n"
        "from nnconv.formats.safetensors import safetensors_format\n"
        "safetensors_format.write(pt_format.read(sys.argv[1]), sys.argv[2])\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import json\n" + code, str(path), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout) == []
    back, expected = load_file(out), scripted.state_dict()
    tied = {"b.weight"} if name == "tied" else set()  # an alias, in safetensors' metadata
    assert list(back) == [k for k in expected if k not in tied]
    for key, value in back.items():
        assert_tensor_same(value, expected[key], key)


def test_globals_listed_without_unpickling(tmp_path):
    path, _ = _save(tmp_path, "block", "script")
    found = pt_format.globals_in(path)
    assert (
        "__torch__.test_torchscript.Block" in found and "torch._utils._rebuild_tensor_v2" in found
    )


def test_custom_setstate_is_refused_without_running(tmp_path, no_jit):
    path = tmp_path / "stateful.pt"
    torch.jit.save(torch.jit.script(Stateful()), path)
    with pytest.raises(UntrustedCodeError, match="trust_code=True.*__setstate__|__getstate__"):
        pt_format.read(path)
    assert not no_jit.exists()


def test_trusted_archive_loads_what_its_code_builds(tmp_path):
    path = tmp_path / "stateful.pt"
    torch.jit.save(torch.jit.script(Stateful()), path)
    ckpt = pt_format.read(path, trust_code=True)  # torch.jit.load: __setstate__ doubles w
    assert ckpt.names() == ["w"]
    assert torch.equal(ckpt.lazy("w").load(), torch.full((2,), 2.0))


def test_code_is_never_compiled(tmp_path, no_jit):
    """A forward that torch cannot compile does not matter: only declarations are read."""
    path, scripted = _save(tmp_path, "block", "script")

    def garble(name: str, data: bytes) -> bytes:
        if name.endswith(ROOT_CODE):
            return data.replace(b"  def forward(", b"  def forward(((( not python")
        return data

    bad = _rewrite(path, tmp_path / "garbled.pt", garble)
    ckpt = pt_format.read(bad)
    for key, value in scripted.state_dict().items():
        assert_tensor_same(ckpt.lazy(key).load(), value, key)
    assert not no_jit.exists()


@pytest.mark.parametrize(
    "what, edit",
    [
        (  # a payload in code/: a __setstate__ added to an ordinary module's class
            "__setstate__",
            lambda name, data: (
                data + b"  def __setstate__(self, state: int) -> None:\n    return None\n"
                if name.endswith(ROOT_CODE)
                else data
            ),
        ),
        (  # a class with no source (what a C++ custom class looks like)
            "no TorchScript source",
            lambda name, data: None if name.endswith(ROOT_CODE) else data,
        ),
    ],
)
def test_unmodelled_archives_need_trust(tmp_path, no_jit, what, edit):
    path, _ = _save(tmp_path, "block", "script")
    bad = _rewrite(path, tmp_path / "bad.pt", edit)
    with pytest.raises(UntrustedCodeError, match=f"needs trust_code=True.*{what}"):
        pt_format.read(bad)
    assert not no_jit.exists()


def _module_pickle(depth: int, *, cyclic: bool = False) -> bytes:
    """data.pkl of ``depth`` modules nested through attribute ``c`` (or one that holds
    itself), of a class declaring no parameters or buffers."""
    body = b"c__torch__\nM\nq\x00)\x81q\x01}(X\x01\x00\x00\x00ch\x01ub" if cyclic else b""
    if not cyclic:
        for _ in range(depth):
            inner = b"X\x01\x00\x00\x00c" + body if body else b""
            body = b"c__torch__\nM\n)\x81}(" + inner + b"ub"
    return b"\x80\x02" + body + b"."


CRAFTED = {  # data.pkl -> (error, what it says), for a class M declaring nothing
    "nested": (_module_pickle(3), None, ""),
    "too-deep": (_module_pickle(150), FormatError, "nested more than 100"),
    "cyclic": (_module_pickle(1, cyclic=True), UntrustedCodeError, "appears twice"),
    "truncated": (b"\x80\x02c__torch__\nM\n)\x81}(X\x01\x00\x00\x00c", FormatError, "corrupt"),
    "bad-memo": (b"\x80\x02c__torch__\nM\n)\x81}h\x07b.", FormatError, "Memo"),
    "foreign-global": (b"\x80\x02cos\nsystem\n)\x81.", UntrustedCodeError, "os.system"),
    # sizes the C unpickler allocates first: bytes (4 GiB, 8 EiB), a memo of 2^32 entries
    "bytes-4G": (b"\x80\x02B\xff\xff\xff\xff.", FormatError, "past"),
    "bytes-8E": (b"\x80\x02\x8e" + b"\xff" * 8 + b".", FormatError, "past"),
    "memo-index": (b"\x80\x02N" + b"r\xff\xff\xff\x7f.", FormatError, "past"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_module_pickles(tmp_path, no_jit, case):
    pickle, error, says = CRAFTED[case]
    path, _ = _save(tmp_path, "block", "script")
    code = b"class M(Module):\n  __parameters__ = []\n  __buffers__ = []\n  training : bool\n"

    def craft(name: str, data: bytes) -> bytes:
        return pickle if name.endswith("/data.pkl") else data

    bad = _rewrite(path, tmp_path / "crafted.pt", craft, {"code/__torch__.py": code})
    if error is None:
        assert pt_format.read(bad).names() == []
    else:
        with pytest.raises(error, match=says):
            pt_format.read(bad)
    assert not no_jit.exists()


def test_corrupt_archives_are_format_errors(tmp_path, no_jit):
    path, _ = _save(tmp_path, "block", "script")
    data = path.read_bytes()
    for cut in (len(data) // 7, len(data) // 2, len(data) - 30, len(data) - 1):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(FormatError):
            pt_format.read(tmp_path / "cut.pt")
    edits = [
        ("data/0", lambda d: d[:4]),  # a storage shorter than its tensor
        (ROOT_CODE, lambda d: d.replace(b'["scale", ]', b'["scale", "ghost", ]')),
        (ROOT_CODE, lambda d: d.replace(b'["scale", ]', b"[scale]")),
    ]
    for member, edit in edits:
        bad = _rewrite(
            path,
            tmp_path / "bad.pt",
            lambda name, d, m=member, e=edit: e(d) if name.endswith("/" + m) else d,
        )
        with pytest.raises(FormatError):
            pt_format.read(bad)
    dropped = _rewrite(path, tmp_path / "dropped.pt", lambda n, d: None if "/data/0" in n else d)
    with pytest.raises(FormatError, match="no data record"):
        pt_format.read(dropped)
    assert not no_jit.exists()


def test_fuzz_seeds_read():
    """The fuzz seeds (tests/fuzz/seeds/pt) are TorchScript archives the reader accepts."""
    seeds = Path(__file__).parent / "fuzz" / "seeds" / "pt"
    for name in ("scripted.pt", "traced.pt"):
        ckpt = pt_format.read(seeds / name)
        assert ckpt.metadata == {} and ckpt.names()


# --- through the command line: convert without trust, verify runs only when trusted -------

_CLI_NO_JIT = """
import sys, torch
from pathlib import Path
MARKER = Path(sys.argv.pop(1))
def called(*args, **kwargs):
    MARKER.write_text("torch.jit loaded the archive")
    raise SystemExit(3)
torch.jit.load = torch._C.import_ir_module = torch._C.import_ir_module_from_buffer = called
from nnconv.converter.cli import main
sys.argv[0] = "nnconv"
main()
"""


def _cli(*args, marker: Path | None = None) -> subprocess.CompletedProcess:
    code, extra = (_CLI_NO_JIT, [str(marker)]) if marker else (_CLI_MAIN, [])
    return subprocess.run(
        [sys.executable, "-c", code, *extra, *map(str, args)], capture_output=True, text=True
    )


_CLI_MAIN = "import sys; from nnconv.converter.cli import main; sys.argv[0] = 'nnconv'; main()"


@pytest.mark.parametrize("name", ["mlp", "batchnorm", "block"])
def test_cli_converts_without_trust_and_runs_only_with_it(tmp_path, name):
    path, scripted = _save(tmp_path, name, "script")
    out, marker = tmp_path / "out.safetensors", tmp_path / "JIT_CALLED"
    run = _cli("convert", path, out, marker=marker)
    assert run.returncode == 0 and not marker.exists(), run.stderr
    back = load_file(out)
    assert list(back) == list(scripted.state_dict())
    for key, value in scripted.state_dict().items():
        assert_tensor_same(back[key], value, key)
    shape = ",".join(map(str, MODELS[name][1]))
    run = _cli("verify", path, out, "--input-shape", shape, "--json", "-", marker=marker)
    assert run.returncode == 0 and not marker.exists(), run.stderr
    report = json.loads(run.stdout)
    assert report["outputs_checked"] is False and report["trust_code"] is False
    assert any("TorchScript" in n and "--trust-code" in n for n in report["notes"])
    run = _cli("verify", path, path, "--input-shape", shape, "--trust-code", "--json", "-")
    report = json.loads(run.stdout)
    assert run.returncode == 0 and report["outputs_checked"] and report["trust_code"], run.stderr
    assert report["reference"]["runner"] == "torch (torchscript)"
