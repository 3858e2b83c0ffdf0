"""The pickle gate: malicious pickles are refused before any of their code runs.

Every payload is made at test time and, if it ran, would create a marker file
(``open(MARKER, 'w')`` through ``exec``/``eval``, or a child Python doing it
through ``os.system``, ``subprocess.call`` or ``copyreg._reconstructor`` on
``subprocess.Popen``).  Each is placed in a torch zip archive next to a
legitimate tensor and in a legacy-format (pre-1.6) file; hand-written protocol
0/1/4 pickles (INST, OBJ, GLOBAL chains, STACK_GLOBAL) are put in both
containers by hand.  ``nnconv convert`` and ``nnconv inspect`` must exit 2 with
one ``Error:`` line naming the offending globals and ``--trust-code``, and the
marker must never appear.

Positive controls unpickle the payloads in-process (never through nnconv) to
prove each one really creates its marker, so a refusal is not vacuous.

The many CLI runs go through one driver process that imports torch once and
forks a child per command: each child runs the console script's ``main()``,
takes the exit status from its ``sys.exit`` and runs what shutdown could print
(garbage collection, atexit handlers, flushing) before ``os._exit``; stdout
and stderr are files.  A run costs ~0.05 s instead of ~2.5 s.  One file is
also run in a fresh process and must give the same result.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import copyreg
import hashlib
import io
import json
import os
import pickle
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nnconv.formats import pickle_gate
from nnconv.formats.errors import LazyParameterError, NnconvError, UnsafePickleError
from nnconv.formats.pt import pt_format

NNCONV = [sys.executable, "-m", "nnconv.converter"]


class CustomNet(torch.nn.Module):
    """A user class: its whole-module pickle names it, which no allowlist admits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)


# --- payloads -----------------------------------------------------------------


def _code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


class Reduce:
    """Pickles as ``func(*args)``; callable, so it can be another Reduce's ``func``."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # pragma: no cover - never called
        raise AssertionError


def _python(marker: Path) -> list[str]:
    return [sys.executable, "-c", _code(marker)]


# name -> (object builder, globals it needs as (module, name))
REDUCE_PAYLOADS = {
    "builtins.exec": (
        lambda m: Reduce(builtins.exec, (_code(m),)),
        [("builtins", "exec")],
    ),
    "builtins.eval": (
        lambda m: Reduce(builtins.eval, (_code(m),)),
        [("builtins", "eval")],
    ),
    "os.system": (
        lambda m: Reduce(os.system, (shlex.join(_python(m)),)),
        [(os.system.__module__, "system")],
    ),
    "subprocess.call": (
        lambda m: Reduce(subprocess.call, (_python(m),)),
        [("subprocess", "call")],
    ),
    "getattr-chain": (  # getattr(__import__("os"), "system")(command)
        lambda m: Reduce(
            Reduce(builtins.getattr, (Reduce(builtins.__import__, ("os",)), "system")),
            (shlex.join(_python(m)),),
        ),
        [("builtins", "getattr"), ("builtins", "__import__")],
    ),
    "__import__": (
        lambda m: Reduce(builtins.__import__, ("os",)),
        [("builtins", "__import__")],
    ),
    "copyreg": (  # copyreg._reconstructor(Popen, Popen, argv) runs Popen.__init__(argv)
        lambda m: Reduce(copyreg._reconstructor, (subprocess.Popen, subprocess.Popen, _python(m))),
        [("copyreg", "_reconstructor"), ("subprocess", "Popen")],
    ),
}


def _u(text: str | bytes) -> bytes:
    """SHORT_BINUNICODE."""
    raw = text.encode() if isinstance(text, str) else text
    return b"\x8c" + bytes([len(raw)]) + raw


def _v(text: str) -> bytes:
    """Protocol 0 UNICODE argument (raw-unicode-escape, newline-terminated)."""
    return text.encode("raw_unicode_escape") + b"\n"


# Hand-written pickles: name -> (bytes builder, globals the gate must list, runnable?)
RAW_PAYLOADS = {
    "INST": (  # protocol 0: MARK, argument, INST builtins exec
        lambda m: b"(V" + _v(_code(m)) + b"ibuiltins\nexec\n.",
        ["builtins.exec"],
    ),
    "OBJ": (  # protocol 1: MARK, GLOBAL builtins exec, argument, OBJ
        lambda m: b"(cbuiltins\nexec\nV" + _v(_code(m)) + b"o.",
        ["builtins.exec"],
    ),
    "GLOBAL-getattr-chain": (  # getattr(__import__('builtins'), 'exec')(code), protocol 0
        lambda m: (
            b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vbuiltins\ntRVexec\ntR(V"
            + _v(_code(m))
            + b"tR."
        ),
        ["builtins.getattr", "builtins.__import__"],
    ),
    "STACK_GLOBAL": (  # protocol 4, literal operands
        lambda m: b"\x80\x04" + _u("builtins") + _u("exec") + b"\x93" + _u(_code(m)) + b"\x85R.",
        ["builtins.exec"],
    ),
}


def _computed_stack_global(marker: Path) -> bytes:
    """STACK_GLOBAL whose module name is computed (str('builtins')), not a literal."""
    return (
        b"\x80\x04cbuiltins\nstr\n"
        + _u("builtins")
        + b"\x85R"
        + _u("exec")
        + b"\x93"
        + _u(_code(marker))
        + b"\x85R."
    )


def _memo_confusion(marker: Path) -> bytes:
    """STACK_GLOBAL builtins.exec whose operands come from the memo after MEMOIZE follows
    explicit BINPUTs: the unpickler's MEMOIZE writes slot len(memo), so slots 0/1 keep
    'builtins'/'exec' while later MEMOIZEs hold 'torch'/'Size'."""
    binput_pop = [_u("builtins") + b"q\x00" + b"0", _u("exec") + b"q\x01" + b"0"]
    memoize_pop = [_u("torch") + b"\x94" + b"0", _u("Size") + b"\x94" + b"0"]  # slots 2, 3
    call = b"h\x00h\x01\x93" + _u(_code(marker)) + b"\x85R."  # BINGET 0, 1, STACK_GLOBAL
    return b"\x80\x04" + b"".join(binput_pop + memoize_pop) + call


EXT1 = b"\x80\x02\x82\x01)R."  # EXT1 code 1 from the copyreg extension registry, called


def spellings(dotted: str) -> set[str]:
    """``builtins.exec`` and the Python 2 spelling protocol-2 pickles store (``__builtin__``)."""
    module, name = dotted.rsplit(".", 1)
    if (module, name) in _compat_pickle.REVERSE_NAME_MAPPING:
        old = ".".join(_compat_pickle.REVERSE_NAME_MAPPING[(module, name)])
    else:
        old = f"{_compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module)}.{name}"
    return {dotted, old}


def _names(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{m}.{n}" for m, n in pairs]


# --- containers -------------------------------------------------------------------


def zip_with_pickle(data_pkl: bytes) -> bytes:
    """A torch zip archive (as torch.save writes it) whose data.pkl is ``data_pkl``."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, data_pkl if name.endswith("data.pkl") else src.read(name))
    return out.getvalue()


def legacy_with_pickle(obj_pkl: bytes) -> bytes:
    """A legacy torch file: magic, protocol, sys info, the object pickle, storage keys."""
    sys_info = {
        "protocol_version": 1001,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    head = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, sys_info))
    assert head.startswith(pt_format.LEGACY_MAGIC)
    return head + obj_pkl + pickle.dumps([], protocol=2)


# --- the batch of CLI runs ----------------------------------------------------------

DRIVER = Path(__file__).with_name("cli_driver.py")


@dataclass
class Run:
    rc: int
    out: str
    err: str


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "NNCONV_DEBUG"}


def run_batch(cases: list[tuple[Path, list[str]]], logs: Path) -> list[Run]:
    """Run ``nnconv ARGV`` in CWD for every case; one driver process, one fork each."""
    logs.mkdir()
    spec = [
        {
            "cwd": str(cwd),
            "argv": argv,
            "out": str(logs / f"{i}.out"),
            "err": str(logs / f"{i}.err"),
        }
        for i, (cwd, argv) in enumerate(cases)
    ]
    (logs / "cases.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(logs / "cases.json"), str(logs / "codes.json")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((logs / "codes.json").read_text())
    return [
        Run(r["rc"], Path(s["out"]).read_text(), Path(s["err"]).read_text())
        for r, s in zip(results, spec, strict=True)
    ]


def nnconv(*args: str, cwd: Path) -> Run:
    proc = subprocess.run(
        [*NNCONV, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): "<dir>"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def error_line(run: Run) -> str:
    assert run.rc == 2, f"exit {run.rc}: stdout={run.out!r} stderr={run.err!r}"
    assert "Traceback" not in run.err, run.err
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line: {run.err!r}"
    assert lines[0].startswith("Error: "), lines[0]
    assert not lines[0].startswith("Error: unexpected "), lines[0]
    return lines[0]


def assert_names_globals(line: str, dotted: list[str]) -> None:
    for name in dotted:
        assert spellings(name) & {w.strip(",()") for w in line.split()}, f"{name} not in {line}"
    assert "--trust-code" in line, line


# --- the corpus: every file, every command, run once per module -------------------


@dataclass
class Entry:
    folder: Path  # holds the file (and nothing else): the "nothing left behind" check
    file: str
    marker: Path
    globals: list[str]  # what the Error line must name
    before: dict


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Entry]:
    root = tmp_path_factory.mktemp("corpus")
    markers = root / "markers"
    markers.mkdir()
    entries: dict[str, Entry] = {}

    def add(key: str, file: str, data: bytes | None, globals_: list[str], obj=None, **save):
        folder = root / "files" / key.replace("/", "_")
        folder.mkdir(parents=True)
        if data is None:
            torch.save(obj, folder / file, **save)
        else:
            (folder / file).write_bytes(data)
        entries[key] = Entry(folder, file, markers / key.replace("/", "_"), globals_, {})

    tensor = torch.arange(6.0).reshape(2, 3)
    for name, (build, needs) in REDUCE_PAYLOADS.items():
        marker = markers / f"{name}.zip".replace("/", "_")
        add(
            f"{name}.zip",
            "model.pt",
            None,
            _names(needs),
            {"encoder.weight": tensor, "evil": build(markers / f"{name}.zip")},
        )
        add(
            f"{name}.legacy",
            "model.pt",
            None,
            _names(needs),
            {"encoder.weight": tensor, "evil": build(markers / f"{name}.legacy")},
            _use_new_zipfile_serialization=False,
        )
        assert entries[f"{name}.zip"].marker == marker
    for name, (build, needs) in RAW_PAYLOADS.items():
        add(f"{name}.zip", "model.pt", zip_with_pickle(build(markers / f"{name}.zip")), needs)
        add(
            f"{name}.legacy",
            "model.pt",
            legacy_with_pickle(build(markers / f"{name}.legacy")),
            needs,
        )
    add(
        "computed.zip",
        "model.pt",
        zip_with_pickle(_computed_stack_global(markers / "computed.zip")),
        ["builtins.str"],
    )
    everything = {n: build(markers / "all.zip") for n, (build, _) in REDUCE_PAYLOADS.items()}
    add(
        "all.zip",
        "model.pt",
        None,
        sorted({g for _, needs in REDUCE_PAYLOADS.values() for g in _names(needs)}),
        {"encoder.weight": tensor, **everything},
    )
    add(
        "memo.zip",
        "model.pt",
        zip_with_pickle(_memo_confusion(markers / "memo.zip")),
        ["builtins.exec"],
    )
    add("raw.pkl", "model.pkl", RAW_PAYLOADS["INST"][0](markers / "raw.pkl"), [])
    # Not malicious.
    add("lazy.zip", "lazy.pt", None, [], torch.nn.LazyLinear(3).state_dict())
    add(
        "lazy.legacy",
        "lazy.pt",
        None,
        [],
        torch.nn.LazyLinear(3).state_dict(),
        _use_new_zipfile_serialization=False,
    )
    legit = torch.nn.Linear(3, 2).state_dict()
    add("legit.legacy", "legacy.pt", None, [], legit, _use_new_zipfile_serialization=False)
    add(
        "dict.zip",
        "model.pt",
        None,
        ["builtins.dict"],
        Reduce(builtins.dict, ([("w", tensor), ("n", 3)],)),
    )
    add(
        "counter.zip",
        "model.pt",
        None,
        ["collections.Counter"],
        {"w": tensor, "counts": collections.Counter(a=1)},
    )
    # A whole module of a class outside torch.nn: refused (torch.nn built-ins alone load).
    add("module.zip", "model.pt", None, [f"{__name__}.CustomNet"], CustomNet())
    for entry in entries.values():
        entry.before = snapshot(entry.folder)
    return entries


TRUSTED = {"dict.zip", "counter.zip", "module.zip"}  # harmless: also run with --trust-code


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[tuple[str, str], Run]:
    """(key, command) -> Run, for every file: convert, inspect (and convert --trust-code)."""
    cases, keys = [], []
    for key, entry in corpus.items():
        out = entry.folder.parent.parent / "out" / key.replace("/", "_")
        out.mkdir(parents=True)
        for command, argv in (
            ("convert", ["convert", str(entry.folder / entry.file), str(out / "out.safetensors")]),
            ("inspect", ["inspect", entry.file]),
            (
                "trusted",
                [
                    "convert",
                    str(entry.folder / entry.file),
                    str(out / "trusted.safetensors"),
                    "--trust-code",
                ],
            ),
        ):
            if command == "trusted" and key not in TRUSTED:
                continue
            cases.append((entry.folder, argv))
            keys.append((key, command))
    results = run_batch(cases, tmp_path_factory.mktemp("logs") / "logs")
    return dict(zip(keys, results, strict=True))


def _out_folder(entry: Entry, key: str) -> Path:
    return entry.folder.parent.parent / "out" / key.replace("/", "_")


MALICIOUS = (
    [f"{n}.{c}" for n in REDUCE_PAYLOADS for c in ("zip", "legacy")]
    + [f"{n}.{c}" for n in RAW_PAYLOADS for c in ("zip", "legacy")]
    + ["computed.zip", "all.zip"]
)


@pytest.mark.parametrize("key", MALICIOUS)
def test_convert_refuses_malicious_pickle(key, corpus, runs):
    entry = corpus[key]
    run = runs[(key, "convert")]
    assert not entry.marker.exists(), "THE PAYLOAD RAN"
    line = error_line(run)
    assert entry.file in line, line
    assert_names_globals(line, entry.globals)
    assert snapshot(entry.folder) == entry.before, "the source folder changed"
    assert list(_out_folder(entry, key).iterdir()) == [], "output left behind"


@pytest.mark.parametrize("key", MALICIOUS)
def test_inspect_refuses_malicious_pickle(key, corpus, runs):
    entry = corpus[key]
    run = runs[(key, "inspect")]
    assert not entry.marker.exists(), "THE PAYLOAD RAN"
    assert run.rc == 2, run.err
    assert "Traceback" not in run.err, run.err
    if "NotImplementedError" in run.err:
        pytest.skip("nnconv inspect is not implemented yet")
    line = error_line(run)
    assert entry.file in line, line
    assert_names_globals(line, entry.globals)
    assert snapshot(entry.folder) == entry.before


def test_no_marker_anywhere(corpus, runs):
    markers = next(iter(corpus.values())).marker.parent
    assert list(markers.iterdir()) == []


def test_error_names_every_offending_global(corpus, runs):
    """One file with all payloads: one line naming all of them, not only the first."""
    line = error_line(runs[("all.zip", "convert")])
    assert_names_globals(line, corpus["all.zip"].globals)
    assert len(corpus["all.zip"].globals) >= 8


def test_fresh_process_agrees_with_the_batch(corpus, runs, tmp_path):
    """The fork-per-run driver gives what a fresh ``python -m nnconv.converter`` gives."""
    entry = corpus["builtins.exec.legacy"]
    fresh = nnconv(
        "convert",
        str(entry.folder / entry.file),
        str(tmp_path / "out.safetensors"),
        cwd=entry.folder,
    )
    batch = runs[("builtins.exec.legacy", "convert")]
    assert not entry.marker.exists()
    assert (fresh.rc, fresh.out) == (batch.rc, batch.out)
    assert fresh.err.replace(str(tmp_path), "") == batch.err.replace(
        str(_out_folder(entry, "builtins.exec.legacy")), ""
    )
    assert list(tmp_path.iterdir()) == []


def test_plain_pickle_file_is_refused_without_running(corpus, runs):
    """A bare pickle (not a torch.save file) with a .pkl extension."""
    entry = corpus["raw.pkl"]
    for command in ("convert", "inspect"):
        run = runs[("raw.pkl", command)]
        assert not entry.marker.exists(), "THE PAYLOAD RAN"
        assert run.rc == 2 and "Traceback" not in run.err, run.err
        if command == "inspect" and "NotImplementedError" in run.err:
            continue
        assert entry.file in error_line(run)
    assert snapshot(entry.folder) == entry.before
    assert list(_out_folder(entry, "raw.pkl").iterdir()) == []


def test_memo_confusion_never_runs(corpus, runs):
    """Even if the gate is fooled, weights-only loading must refuse: exit 2, no marker."""
    entry = corpus["memo.zip"]
    run = runs[("memo.zip", "convert")]
    assert not entry.marker.exists(), "THE PAYLOAD RAN"
    assert run.rc == 2 and "Traceback" not in run.err, run.err
    assert snapshot(entry.folder) == entry.before
    assert list(_out_folder(entry, "memo.zip").iterdir()) == []


def test_memo_confusion_is_named_by_the_gate(corpus, runs):
    line = error_line(runs[("memo.zip", "convert")])
    assert_names_globals(line, ["builtins.exec"])


# --- lazy parameters, legitimate legacy files, --trust-code --------------------------


@pytest.mark.parametrize("key", ["lazy.zip", "lazy.legacy"])
def test_lazy_parameters_get_a_clear_error(key, corpus, runs):
    entry = corpus[key]
    line = error_line(runs[(key, "convert")])
    assert entry.file in line
    assert "lazy" in line.lower() and "uninitiali" in line.lower(), line
    assert "run the model once" in line.lower(), line
    assert list(_out_folder(entry, key).iterdir()) == []


def test_legitimate_legacy_state_dict_converts(corpus, runs):
    entry = corpus["legit.legacy"]
    run = runs[("legit.legacy", "convert")]
    assert run.rc == 0, run.err
    assert run.err == ""
    out = _out_folder(entry, "legit.legacy")
    assert sorted(p.name for p in out.iterdir()) == ["out.safetensors"]
    expected = torch.load(entry.folder / entry.file, weights_only=True)
    loaded = load_file(out / "out.safetensors")
    assert set(loaded) == set(expected)
    for name, t in expected.items():
        assert torch.equal(loaded[name], t), name


@pytest.mark.parametrize("key", sorted(TRUSTED))
def test_harmless_foreign_global_is_refused_without_trust(key, corpus, runs):
    entry = corpus[key]
    line = error_line(runs[(key, "convert")])
    assert_names_globals(line, entry.globals)


def test_trust_code_loads_a_harmless_global(corpus, runs):
    """builtins.dict called by the pickle: loads and converts with --trust-code."""
    entry = corpus["dict.zip"]
    run = runs[("dict.zip", "trusted")]
    assert run.rc == 0, run.err
    loaded = load_file(_out_folder(entry, "dict.zip") / "trusted.safetensors")
    assert torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize(
    "key, words", [("counter.zip", ["collections.Counter"]), ("module.zip", ["module"])]
)
def test_trust_code_unsupported_object_is_a_clear_error(key, words, corpus, runs):
    entry = corpus[key]
    line = error_line(runs[(key, "trusted")])
    assert entry.file in line
    for word in words:
        assert word in line, line
    assert list(_out_folder(entry, key).iterdir()) == []


# --- library level: scan and check ----------------------------------------------------


def _scan(data: bytes) -> list[str]:
    return pickle_gate.scan(io.BytesIO(data))


@pytest.mark.parametrize("name", list(RAW_PAYLOADS))
def test_scan_lists_globals_of_hand_written_pickles(name, tmp_path):
    build, needs = RAW_PAYLOADS[name]
    assert _scan(build(tmp_path / "marker")) == needs
    with pytest.raises(UnsafePickleError) as info:
        pickle_gate.check("f.pt", _scan(build(tmp_path / "marker")))
    assert sorted(set(needs)) == info.value.globals


@pytest.mark.parametrize("name", list(RAW_PAYLOADS))
def test_hand_written_payloads_are_live(name, tmp_path):
    """Positive control: plain pickle.loads of the payload creates the marker."""
    marker = tmp_path / "marker"
    pickle.loads(RAW_PAYLOADS[name][0](marker))
    assert marker.exists()


@pytest.mark.parametrize("name", list(REDUCE_PAYLOADS))
def test_reduce_payloads_are_live(name, tmp_path):
    """Positive control for the torch.save'd payloads (unpickled in-process, not by nnconv)."""
    marker = tmp_path / "marker"
    result = pickle.loads(pickle.dumps(REDUCE_PAYLOADS[name][0](marker), protocol=2))
    if isinstance(result, subprocess.Popen):
        result.wait(timeout=60)
    if name == "__import__":
        assert result is os  # imports only; nothing to mark
    else:
        assert marker.exists()


def test_scan_lists_globals_of_torch_files(corpus):
    for name, (_, needs) in REDUCE_PAYLOADS.items():
        for container in ("zip", "legacy"):
            entry = corpus[f"{name}.{container}"]
            found = pt_format.globals_in(entry.folder / entry.file)
            for dotted in _names(needs):
                assert spellings(dotted) & set(found), (name, container, found)
            assert any(g.startswith("torch.") for g in found), found  # the legitimate tensor


def test_computed_stack_global_is_refused(tmp_path):
    data = _computed_stack_global(tmp_path / "marker")
    found = _scan(data)
    assert found[0] == "builtins.str"
    computed = [g for g in found[1:] if g != "builtins.exec"]
    assert computed, f"the computed STACK_GLOBAL is not reported: {found}"
    with pytest.raises(UnsafePickleError) as info:
        pickle_gate.check("f.pt", found)
    assert set(computed) <= set(info.value.globals)
    pickle.loads(data)  # positive control: the computed name resolves to builtins.exec
    assert (tmp_path / "marker").exists()


def test_copyreg_extension_is_refused():
    found = _scan(EXT1)
    assert len(found) == 1 and "1" in found[0], found
    with pytest.raises(UnsafePickleError):
        pickle_gate.check("f.pt", found)


def test_scan_is_not_fooled_by_memo_slots(tmp_path):
    data = _memo_confusion(tmp_path / "marker")
    pickle.loads(data)  # positive control: this pickle runs builtins.exec
    assert (tmp_path / "marker").exists()
    with pytest.raises(UnsafePickleError):
        pickle_gate.check("f.pt", _scan(data))


def test_check_names_every_offending_global():
    found = [
        "torch._utils._rebuild_tensor_v2",
        "builtins.exec",
        "posix.system",
        "collections.OrderedDict",
        "builtins.exec",
        "subprocess.call",
    ]
    with pytest.raises(UnsafePickleError) as info:
        pickle_gate.check("model.pt", found)
    assert info.value.globals == ["builtins.exec", "posix.system", "subprocess.call"]
    message = str(info.value)
    assert message.startswith("model.pt: ")
    for name in info.value.globals:
        assert name in message
    assert "torch._utils" not in message and "OrderedDict" not in message
    assert "trust_code=True" in message and "--trust-code" in info.value.cli_message()


def test_check_passes_allowlisted_globals():
    pickle_gate.check(
        "model.pt",
        [
            "collections.OrderedDict",
            "torch._utils._rebuild_tensor_v2",
            "torch.FloatStorage",
            "torch.bfloat16",
        ],
    )


def test_check_lazy_parameters():
    with pytest.raises(LazyParameterError):
        pickle_gate.check("m.pt", ["torch.nn.parameter.UninitializedParameter"])
    with pytest.raises(UnsafePickleError):  # lazy plus something else: the unsafe error wins
        pickle_gate.check("m.pt", ["torch.nn.parameter.UninitializedParameter", "builtins.exec"])


def test_read_refuses_before_unpickling(corpus):
    entry = corpus["all.zip"]
    with pytest.raises(UnsafePickleError) as info:
        pt_format.read(entry.folder / entry.file)
    for dotted in entry.globals:
        assert spellings(dotted) & set(info.value.globals), dotted
    assert not entry.marker.exists()


def test_malformed_pickle_is_a_format_error():
    with pytest.raises(NnconvError):
        pickle_gate.scan_bytes("bad.pt", b"\x80\x02}q\x00(X")  # cut short


def test_error_uses_python3_names(corpus):
    entry = corpus["all.zip"]
    with pytest.raises(UnsafePickleError) as info:
        pt_format.read(entry.folder / entry.file)
    assert "builtins.exec" in info.value.globals
    assert "subprocess.call" in info.value.globals
