"""``nnconv`` error paths, run as real subprocesses.

The contract every bad input must keep: exit status 2, exactly one non-empty
line on stderr, starting with ``Error: `` and naming the file, no traceback,
nothing written or left behind in the destination folder (temporaries
included) and the source's bytes unchanged.  Success is exit 0.

Each case runs in its own folder, and a snapshot (every path and its sha256)
taken before the run must equal the one taken after it: that one comparison
checks "source unchanged", "existing destination unchanged" and "no output or
temporary file left" at once.  Cases that fail before torch is imported cost
about 0.3 s; the few that need torch about 2.5 s.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

NNCONV = [sys.executable, "-m", "nnconv.converter"]


# --- running the CLI and checking the contract ------------------------------


@dataclass
class Run:
    rc: int
    out: str
    err: str


def nnconv(*args: str, cwd: Path, timeout: float = 120) -> Run:
    env = {k: v for k, v in os.environ.items() if k != "NNCONV_DEBUG"}
    proc = subprocess.run(
        [*NNCONV, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (hidden ones included) with its sha256."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "<dir>"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def error_line(run: Run) -> str:
    """The one ``Error:`` line of a failed run (exit 2, no traceback, nothing else)."""
    assert run.rc == 2, f"exit {run.rc}, stdout={run.out!r}, stderr={run.err!r}"
    assert "Traceback" not in run.err, run.err
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {run.err!r}"
    line = lines[0]
    assert line.startswith("Error: "), line
    assert run.err.count("Error:") == 1, run.err
    assert not line.startswith("Error: unexpected "), f"an unhandled exception: {line}"
    assert ".nnconv-tmp-" not in line, f"the error names a temporary file: {line}"
    assert run.out == "", f"stdout should be empty on error: {run.out!r}"
    return line


def check_refused(run: Run, before: dict, after: dict, names: str | None, contains=()) -> str:
    line = error_line(run)
    if names is not None:
        assert names in line, f"{names!r} not named in: {line}"
    for word in contains:
        assert word.lower() in line.lower(), f"{word!r} not in: {line}"
    added = sorted(set(after) - set(before))
    assert not added, f"left behind: {added}"
    assert after == before, "a file changed (source or existing destination)"
    return line


# --- sources ----------------------------------------------------------------


def _state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "encoder.weight": torch.randn(64, 64, generator=gen),
        "encoder.bias": torch.randn(64, generator=gen),
        "head.weight": torch.randn(10, 64, generator=gen),
    }


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> dict[str, bytes]:
    """Bytes of valid files of each format, made once per module."""
    folder = tmp_path_factory.mktemp("blobs")
    sd = _state_dict()
    torch.save(sd, folder / "model.pt")
    torch.save(sd, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(sd, folder / "model.safetensors")
    with h5py.File(folder / "model.h5", "w") as f:
        for name, t in sd.items():
            f.create_dataset(name.replace(".", "/"), data=t.numpy())
    torch.save({"x": torch.zeros(4, dtype=torch.float8_e4m3fnuz)}, folder / "f8.pt")
    torch.save(sd, folder / "proto4.pt", pickle_protocol=4)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
LFS = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 123\n"
)


def _sharded(folder: Path, *, ghost: bool) -> None:
    """A Hugging Face sharded folder (written with the safetensors library)."""
    folder.mkdir()
    a = {"a.weight": np.ones((4, 4), np.float32)}
    b = {"b.weight": np.zeros((2,), np.float32)}
    save_numpy(a, str(folder / "model-00001-of-00002.safetensors"))
    save_numpy(b, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {"a.weight": "model-00001-of-00002.safetensors"}
    weight_map["b.weight"] = "model-00002-of-00002.safetensors"
    if ghost:
        weight_map["ghost.weight"] = "model-00001-of-00002.safetensors"
    index = {"metadata": {"total_size": 72}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@dataclass
class Case:
    files: Callable[[Path, dict[str, bytes]], None]  # makes the inputs in the case folder
    argv: list[str]
    names: str | None  # the path the Error line must name
    contains: tuple[str, ...] = ()


def _put(**files: bytes | str) -> Callable[[Path, dict[str, bytes]], None]:
    """Files to create.  Keywords spell dots as ``__`` (``model__pt`` is ``model.pt``); a
    value is the bytes, the name of a blob to copy, or a function of the blobs."""

    def make(folder: Path, blobs: dict[str, bytes]) -> None:
        for name, value in files.items():
            name = name.replace("__", ".")
            data = blobs[value] if isinstance(value, str) else value
            if callable(data):
                data = data(blobs)
            (folder / name).write_bytes(data)

    return make


def _half(blob: str) -> Callable[[dict[str, bytes]], bytes]:
    return lambda blobs: blobs[blob][: len(blobs[blob]) // 2]


def _noise(n: int = 4096) -> bytes:
    return random.Random(1234).randbytes(n)


def _with_link(folder: Path, blobs: dict[str, bytes]) -> None:
    (folder / "model.pt").write_bytes(blobs["model.pt"])
    os.link(folder / "model.pt", folder / "alias.pt")


def _with_sharded(ghost: bool) -> Callable[[Path, dict[str, bytes]], None]:
    return lambda folder, blobs: _sharded(folder / "sharded", ghost=ghost)


def _with_existing(folder: Path, blobs: dict[str, bytes]) -> None:
    (folder / "model.pt").write_bytes(blobs["model.pt"])
    (folder / "out.safetensors").write_bytes(b"the old destination")


CASES = {
    # --- the source is missing, empty or unrecognised
    "missing-file": Case(
        _put(), ["convert", "missing.pt", "out.safetensors"], "missing.pt", ("no such",)
    ),
    "empty-file": Case(
        _put(empty__pt=b""), ["convert", "empty.pt", "out.safetensors"], "empty.pt", ("empty",)
    ),
    "random-bytes-no-extension": Case(
        _put(blob=_noise()), ["convert", "blob", "out.pt"], "blob", ("format",)
    ),
    "random-bytes-odd-extension": Case(
        _put(weights__xyz=_noise()),
        ["convert", "weights.xyz", "out.pt"],
        "weights.xyz",
        ("format",),
    ),
    "random-bytes-safetensors-extension": Case(
        _put(noise__safetensors=_noise()),
        ["convert", "noise.safetensors", "out.pt"],
        "noise.safetensors",
    ),
    # --- formats given or implied wrongly
    "from-contradicts-content-pt": Case(
        _put(model__pt="model.pt"),
        ["convert", "model.pt", "out.h5", "--from", "hdf5"],
        "model.pt",
        ("hdf5", "pt"),
    ),
    "from-contradicts-content-safetensors": Case(
        _put(model__safetensors="model.safetensors"),
        ["convert", "model.safetensors", "out.h5", "--from", "pt"],
        "model.safetensors",
        ("safetensors",),
    ),
    "unknown-from": Case(
        _put(model__pt="model.pt"),
        ["convert", "model.pt", "out.h5", "--from", "keras"],
        None,
        ("--from", "keras"),
    ),
    "unknown-to": Case(
        _put(model__pt="model.pt"),
        ["convert", "model.pt", "out.tflite", "--to", "tflite"],
        None,
        ("--to", "onnx"),
    ),
    "unknown-dtype-option": Case(
        _put(model__pt="model.pt"),
        ["convert", "model.pt", "out.h5", "--dtype", "float7"],
        None,
        ("--dtype", "float7"),
    ),
    "destination-extension-unknown": Case(
        _put(model__safetensors="model.safetensors"),
        ["convert", "model.safetensors", "out.weights"],
        "out.weights",
        ("--to",),
    ),
    # --- truncated files of each format
    "truncated-pt-zip": Case(
        _put(cut__pt=_half("model.pt")), ["convert", "cut.pt", "out.h5"], "cut.pt"
    ),
    "truncated-pt-legacy": Case(
        _put(cut__pt=_half("legacy.pt")), ["convert", "cut.pt", "out.h5"], "cut.pt"
    ),
    "truncated-safetensors": Case(
        _put(cut__safetensors=_half("model.safetensors")),
        ["convert", "cut.safetensors", "out.h5"],
        "cut.safetensors",
        ("truncated",),
    ),
    "truncated-safetensors-in-header": Case(
        _put(cut__safetensors=lambda b: b["model.safetensors"][:40]),
        ["convert", "cut.safetensors", "out.h5"],
        "cut.safetensors",
    ),
    "truncated-hdf5": Case(
        _put(cut__h5=_half("model.h5")), ["convert", "cut.h5", "out.pt"], "cut.h5"
    ),
    # --- corrupt safetensors headers
    "header-not-json": Case(
        _put(bad__safetensors=_safetensors(b"{not json}      ")),
        ["convert", "bad.safetensors", "out.pt"],
        "bad.safetensors",
        ("json",),
    ),
    "header-absurd-length": Case(
        _put(bad__safetensors=_safetensors({"a": F32x4}, bytes(16), length=2**60)),
        ["convert", "bad.safetensors", "out.pt"],
        "bad.safetensors",
        ("limit", "100"),
    ),
    "header-longer-than-file": Case(
        _put(bad__safetensors=_safetensors({"a": F32x4}, bytes(16), length=4096)),
        ["convert", "bad.safetensors", "out.pt"],
        "bad.safetensors",
    ),
    "offsets-outside-file": Case(
        _put(bad__safetensors=_safetensors({"a": F32x4}, bytes(8))),
        ["convert", "bad.safetensors", "out.pt"],
        "bad.safetensors",
        ("offsets",),
    ),
    "offsets-overlap": Case(
        _put(
            bad__safetensors=_safetensors(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                bytes(12),
            )
        ),
        ["convert", "bad.safetensors", "out.pt"],
        "bad.safetensors",
        ("overlap",),
    ),
    "unknown-dtype-code": Case(
        _put(
            bad__safetensors=_safetensors(
                {"a": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)
            )
        ),
        ["convert", "bad.safetensors", "out.pt"],
        "bad.safetensors",
        ("F99",),
    ),
    "git-lfs-pointer": Case(
        _put(model__safetensors=LFS),
        ["convert", "model.safetensors", "out.pt"],
        "model.safetensors",
        ("git lfs",),
    ),
    "git-lfs-pointer-pt": Case(
        _put(model__pt=LFS), ["convert", "model.pt", "out.h5"], "model.pt", ("git lfs",)
    ),
    "sharded-index-names-absent-tensor": Case(
        _with_sharded(ghost=True), ["convert", "sharded", "out.pt"], "sharded", ("ghost.weight",)
    ),
    # --- destinations
    "destination-is-source": Case(
        _put(model__pt="model.pt"), ["convert", "model.pt", "model.pt"], "model.pt", ("source",)
    ),
    "destination-is-source-force": Case(
        _put(model__pt="model.pt"),
        ["convert", "model.pt", "model.pt", "--force"],
        "model.pt",
        ("source",),
    ),
    "destination-is-source-other-spelling": Case(
        _put(model__pt="model.pt"),
        ["convert", "model.pt", "./model.pt", "--force"],
        "model.pt",
        ("source",),
    ),
    "destination-is-hard-link-to-source": Case(
        _with_link, ["convert", "model.pt", "alias.pt", "--force"], "alias.pt", ("source",)
    ),
    "destination-inside-source-folder": Case(
        _with_sharded(ghost=False),
        ["convert", "sharded", "sharded/out.pt"],
        "sharded/out.pt",
        ("inside",),
    ),
    "destination-exists": Case(
        _with_existing, ["convert", "model.pt", "out.safetensors"], "out.safetensors", ("--force",)
    ),
    "destination-folder-missing": Case(
        _put(model__pt="model.pt"),
        ["convert", "model.pt", "no/such/out.safetensors"],
        "no/such/out.safetensors",
        ("does not exist",),
    ),
    # --- options for another format, junk option values
    "shard-size-junk": Case(
        _put(model__pt="model.pt"),
        ["convert", "model.pt", "out.safetensors", "--shard-size", "5XB"],
        None,
        ("5XB",),
    ),
    "shard-size-pt-destination": Case(
        _put(model__pt="model.pt"),
        ["convert", "model.pt", "out.pt", "--to", "pt", "--shard-size", "1MB"],
        "out.pt",
        ("--shard-size",),
    ),
    "shard-size-hdf5-destination": Case(
        _put(model__pt="model.pt"),
        ["convert", "model.pt", "out.h5", "--shard-size", "1MB"],
        "out.h5",
        ("--shard-size",),
    ),
    "compression-safetensors-destination": Case(
        _put(model__pt="model.pt"),
        ["convert", "model.pt", "out.safetensors", "--compression", "gzip"],
        "out.safetensors",
        ("--compression",),
    ),
    "compression-pt-destination": Case(
        _put(model__pt="model.pt"),
        ["convert", "model.pt", "out.pt", "--compression", "lzf"],
        "out.pt",
        ("--compression",),
    ),
    # --- inspect refuses the same inputs (its output text is not checked here)
    "inspect-missing-file": Case(_put(), ["inspect", "missing.pt"], "missing.pt", ("no such",)),
    "inspect-empty-file": Case(_put(empty__pt=b""), ["inspect", "empty.pt"], "empty.pt"),
    "inspect-git-lfs-pointer": Case(
        _put(model__safetensors=LFS),
        ["inspect", "model.safetensors"],
        "model.safetensors",
        ("git lfs",),
    ),
    "inspect-header-absurd-length": Case(
        _put(bad__safetensors=_safetensors({"a": F32x4}, bytes(16), length=2**60)),
        ["inspect", "bad.safetensors"],
        "bad.safetensors",
        ("limit",),
    ),
    "inspect-truncated-hdf5": Case(
        _put(cut__h5=_half("model.h5")), ["inspect", "cut.h5"], "cut.h5"
    ),
    "inspect-from-contradicts-content": Case(
        _put(model__safetensors="model.safetensors"),
        ["inspect", "model.safetensors", "--from", "hdf5"],
        "model.safetensors",
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_refused(case: Case, blobs, tmp_path):
    case.files(tmp_path, blobs)
    before = snapshot(tmp_path)
    run = nnconv(*case.argv, cwd=tmp_path)
    check_refused(run, before, snapshot(tmp_path), case.names, case.contains)


def test_existing_destination_folder_is_kept(blobs, tmp_path):
    """A sharded destination that exists is a folder: refused without --force, untouched."""
    (tmp_path / "model.pt").write_bytes(blobs["model.pt"])
    _sharded(tmp_path / "out.safetensors", ghost=False)
    before = snapshot(tmp_path)
    run = nnconv("convert", "model.pt", "out.safetensors", "--shard-size", "1KB", cwd=tmp_path)
    check_refused(run, before, snapshot(tmp_path), "out.safetensors", ("--force",))


# --- a dtype the target cannot hold -----------------------------------------


@pytest.fixture(scope="module")
def float8_run(blobs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("f8")
    (folder / "f8.pt").write_bytes(blobs["f8.pt"])
    before = snapshot(folder)
    run = nnconv("convert", "f8.pt", "out.safetensors", cwd=folder)
    return run, before, snapshot(folder)


def test_dtype_the_target_cannot_hold(float8_run):
    run, before, after = float8_run
    assert run.rc == 2 and "Traceback" not in run.err, run.err
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), run.err
    assert "float8_e4m3fnuz" in lines[0]
    assert "out.safetensors" in lines[0]
    assert after == before, f"left behind: {sorted(set(after) - set(before))}"


def test_dtype_error_names_the_destination_not_the_temporary(float8_run):
    run, _, _ = float8_run
    line = error_line(run)
    assert line.startswith("Error: out.safetensors: "), line


# --- stray warnings ----------------------------------------------------------


def test_protocol_4_pickle_gives_one_stderr_line(blobs, tmp_path):
    (tmp_path / "model.pt").write_bytes(blobs["proto4.pt"])
    run = nnconv("convert", "model.pt", "out.safetensors", cwd=tmp_path)
    lines = [line for line in run.err.splitlines() if line.strip()]
    if run.rc == 0:
        assert lines == [], run.err
    else:
        assert len(lines) == 1 and lines[0].startswith("Error: model.pt: "), run.err


# --- success -----------------------------------------------------------------


def test_formats_lists_every_format(tmp_path):
    run = nnconv("formats", cwd=tmp_path)
    assert run.rc == 0, run.err
    assert run.err == ""
    listed = {line.split()[0] for line in run.out.splitlines() if line and not line[0].isspace()}
    assert {"pt", "safetensors", "hdf5"} <= listed, run.out


def test_help(tmp_path):
    run = nnconv("--help", cwd=tmp_path)
    assert run.rc == 0, run.err
    assert "convert" in run.out and "inspect" in run.out and "formats" in run.out
    script = shutil.which("nnconv")
    if script is None:
        pytest.skip("the nnconv console script is not on PATH")
    proc = subprocess.run([script, "convert", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--trust-code" in proc.stdout


@pytest.mark.parametrize("replace", [False, True], ids=["new", "replace-with-force"])
def test_convert_prints_one_summary_line(replace, blobs, tmp_path):
    (tmp_path / "a.pt").write_bytes(blobs["model.pt"])
    if replace:
        (tmp_path / "b.safetensors").write_bytes(b"the old destination")
    before = snapshot(tmp_path)
    run = nnconv(
        "convert", "a.pt", "b.safetensors", *(["--force"] if replace else []), cwd=tmp_path
    )
    assert run.rc == 0, run.err
    assert run.err == ""
    lines = run.out.splitlines()
    assert len(lines) == 1, run.out
    assert "a.pt" in lines[0] and "b.safetensors" in lines[0] and "3 tensors" in lines[0]
    after = snapshot(tmp_path)
    assert set(after) == set(before) | {"b.safetensors"}, "a temporary file was left behind"
    assert after["a.pt"] == before["a.pt"]
    loaded = load_file(tmp_path / "b.safetensors")
    expected = _state_dict()
    assert set(loaded) == set(expected)
    for name, t in expected.items():
        assert torch.equal(loaded[name], t), name


def test_truncated_zip_is_a_zip(blobs):
    """The truncated pt case above really is a cut torch zip (not an empty file)."""
    cut = blobs["model.pt"][: len(blobs["model.pt"]) // 2]
    assert cut.startswith(b"PK\x03\x04") and len(cut) > 1000
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(cut))
