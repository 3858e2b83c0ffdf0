"""Safe writes: ``atomic_output`` and conversions that fail part of the way through.

Library tests drive :func:`nnconv.formats.atomic.atomic_output` directly; the
end-to-end ones run ``nnconv convert`` in subprocesses (started together, so
the torch imports overlap on the two cores) and check that a failure --
a corrupt source found while writing, a file-size limit hit part way --
exits 2 with one ``Error:`` line and leaves nothing in the destination folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nnconv.converter.convert import convert
from nnconv.formats import atomic, rawio
from nnconv.formats.atomic import TMP_MARK, atomic_output
from nnconv.formats.errors import DestinationError

NNCONV = [sys.executable, "-m", "nnconv.converter"]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if TMP_MARK in p.name]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dead_pid() -> int:
    """A PID no process has (999999 unless it happens to be alive)."""
    for pid in range(999_999, 999_000, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free PID found")


# --- atomic_output ------------------------------------------------------------


@pytest.mark.parametrize("directory", [False, True], ids=["file", "folder"])
def test_exception_in_block_leaves_nothing(directory, tmp_path):
    dst = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"), atomic_output(dst, directory=directory) as tmp:
        if directory:
            (tmp / "part-1").write_bytes(b"x" * 100)
        else:
            tmp.write_bytes(b"x" * 100)
        assert tmp.parent == tmp_path and TMP_MARK in tmp.name
        raise RuntimeError("boom")
    assert listing(tmp_path) == []


def test_exception_in_block_keeps_existing_destination(tmp_path):
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_output(dst, force=True) as tmp:
        tmp.write_bytes(b"new, half written")
        raise KeyboardInterrupt
    assert dst.read_bytes() == b"old"
    assert listing(tmp_path) == ["out.bin"]


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "space"),
        (errno.EFBIG, "too large"),
        (errno.EACCES, "permission"),
        (errno.EROFS, "permission"),
        (errno.EIO, "cannot write"),
    ],
    ids=["ENOSPC", "EFBIG", "EACCES", "EROFS", "EIO"],
)
def test_os_error_in_block_is_a_destination_error(code, words, tmp_path):
    dst = tmp_path / "out.bin"
    with pytest.raises(DestinationError) as info, atomic_output(dst) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError(code, os.strerror(code))
    message = str(info.value)
    assert message.startswith(f"{dst}: "), message
    assert words in message.lower(), message
    assert TMP_MARK not in message
    assert listing(tmp_path) == []


def test_new_destination_is_written(tmp_path):
    dst = tmp_path / "out.bin"
    with atomic_output(dst) as tmp:
        assert not dst.exists()
        tmp.write_bytes(b"new")
    assert dst.read_bytes() == b"new"
    assert listing(tmp_path) == ["out.bin"]


def test_existing_destination_is_replaced_only_with_force(tmp_path):
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")
    ran = False
    with pytest.raises(DestinationError, match="force=True"), atomic_output(dst) as tmp:
        ran = True
        tmp.write_bytes(b"new")
    assert not ran, "the block ran although the destination exists"
    assert dst.read_bytes() == b"old"
    assert listing(tmp_path) == ["out.bin"]

    with atomic_output(dst, force=True) as tmp:
        tmp.write_bytes(b"new")
    assert dst.read_bytes() == b"new"
    assert listing(tmp_path) == ["out.bin"]


def test_missing_destination_folder(tmp_path):
    with (
        pytest.raises(DestinationError, match="does not exist"),
        atomic_output(tmp_path / "no" / "out.bin"),
    ):
        pytest.fail("the block ran")
    assert listing(tmp_path) == []


def _old_folder(dst: Path) -> None:
    """An earlier sharded output: the index and the shards it lists, nothing else."""
    dst.mkdir(parents=True)
    (dst / "model-00001-of-00001.safetensors").write_bytes(b"old")
    index = {"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


OLD_FOLDER = ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]


def _user_folder(dst: Path) -> None:
    (dst / "sub").mkdir(parents=True)
    (dst / "old.txt").write_text("old")
    (dst / "sub" / "old.bin").write_bytes(b"old")


def test_directory_destination_replaces_existing_folder(tmp_path):
    dst = tmp_path / "out.safetensors"
    _old_folder(dst)
    with pytest.raises(DestinationError), atomic_output(dst, directory=True):
        pytest.fail("the block ran")
    assert listing(dst) == OLD_FOLDER

    with atomic_output(dst, force=True, directory=True) as tmp:
        assert tmp.is_dir() and list(tmp.iterdir()) == []
        (tmp / "new.txt").write_text("new")
        assert (dst / OLD_FOLDER[0]).exists(), "the old folder went before the new one was complete"
    assert listing(dst) == ["new.txt"]
    assert (dst / "new.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_file_destination_replaces_existing_folder(tmp_path):
    dst = tmp_path / "out.safetensors"
    _old_folder(dst)
    with atomic_output(dst, force=True) as tmp:
        tmp.write_bytes(b"single file")
    assert dst.read_bytes() == b"single file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


@pytest.mark.parametrize("directory", [False, True], ids=["file", "folder"])
def test_force_never_replaces_a_folder_holding_other_files(directory, tmp_path):
    """--force replaces a file or an earlier sharded output, never a folder of the user's."""
    dst = tmp_path / "out.safetensors"
    _user_folder(dst)
    with (
        pytest.raises(DestinationError, match="holding other files"),
        atomic_output(dst, force=True, directory=directory),
    ):
        pytest.fail("the block ran")
    assert listing(dst) == ["old.txt", "sub", "sub/old.bin"]
    dst = tmp_path / "sharded"
    _old_folder(dst)
    (dst / "notes.md").write_text("mine")  # an earlier output plus a file of the user's
    with pytest.raises(DestinationError), atomic_output(dst, force=True, directory=directory):
        pytest.fail("the block ran")
    assert listing(dst) == sorted([*OLD_FOLDER, "notes.md"])


def test_folder_that_gains_a_file_while_written_is_kept(tmp_path):
    dst = tmp_path / "out.safetensors"
    _old_folder(dst)
    with pytest.raises(DestinationError), atomic_output(dst, force=True) as tmp:
        tmp.write_bytes(b"new")
        (dst / "notes.md").write_text("written meanwhile")
    assert listing(dst) == sorted([*OLD_FOLDER, "notes.md"])
    assert temporaries(tmp_path) == []


def test_directory_destination_replaces_existing_file(tmp_path):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"old single file")
    with atomic_output(dst, force=True, directory=True) as tmp:
        (tmp / "shard").write_bytes(b"new")
    assert dst.is_dir() and listing(dst) == ["shard"]


def test_failed_folder_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    dst = tmp_path / "out.safetensors"
    _old_folder(dst)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, target):
        calls.append((src, target))
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, target)

    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    with pytest.raises(DestinationError), atomic_output(dst, force=True, directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert len(calls) >= 2
    assert listing(dst) == OLD_FOLDER


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dst = tmp_path / "out.safetensors"
    dead, live = dead_pid(), os.getpid()
    stale_file = tmp_path / f".out.safetensors{TMP_MARK}{dead}-0badf00d"
    stale_dir = tmp_path / f".out.safetensors{TMP_MARK}{dead}-deadbeef"
    stale_old = tmp_path / f".out.safetensors{TMP_MARK}{dead}-cafecafe-old"
    live_file = tmp_path / f".out.safetensors{TMP_MARK}{live}-11111111"
    other = tmp_path / f".other.safetensors{TMP_MARK}{dead}-22222222"  # another destination's
    stale_file.write_bytes(b"partial")
    for folder in (stale_dir, stale_old):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "shard").write_bytes(b"partial")
    live_file.write_bytes(b"being written by a live process")
    other.write_bytes(b"partial")

    with atomic_output(dst) as tmp:
        tmp.write_bytes(b"new")
    assert dst.read_bytes() == b"new"
    assert not stale_file.exists() and not stale_dir.exists() and not stale_old.exists()
    assert live_file.read_bytes() == b"being written by a live process"
    assert other.exists()


def test_stale_temporaries_are_removed_even_when_the_write_fails(tmp_path):
    dst = tmp_path / "out.bin"
    stale = tmp_path / f".out.bin{TMP_MARK}{dead_pid()}-0badf00d"
    stale.write_bytes(b"partial")
    with pytest.raises(ValueError), atomic_output(dst):
        raise ValueError
    assert listing(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_destination_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for directory in (False, True):
            with (
                pytest.raises(DestinationError) as info,
                atomic_output(folder / "out.bin", directory=directory) as tmp,
            ):
                tmp.write_bytes(b"x")
            assert "permission" in str(info.value).lower()
            assert str(folder / "out.bin") in str(info.value)
            assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_permission_denied_on_rename(tmp_path, monkeypatch):
    """What a read-only folder does to the final rename (simulated: the tests may run as root)."""

    def denied(src, target):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.os, "replace", denied)
    dst = tmp_path / "out.bin"
    with pytest.raises(DestinationError, match="permission"), atomic_output(dst) as tmp:
        tmp.write_bytes(b"x")
    monkeypatch.undo()
    assert listing(tmp_path) == []


# --- conversions that fail part way (library) ----------------------------------------


@pytest.fixture
def safetensors_source(tmp_path) -> Path:
    src = tmp_path / "src" / "model.safetensors"
    src.parent.mkdir()
    save_file({f"layer{i}.weight": torch.full((64, 64), float(i)) for i in range(4)}, src)
    return src


def _fail_on_read(monkeypatch, n: int) -> list:
    """Make the ``n``-th source read fail, whichever route reads it: bytes of a span
    (mapped or copied in the kernel) or a load of a tensor's values.  Reads count once
    per place in the source, however many calls a route makes for it."""
    reads = []

    def failing(real, where):
        def read(self, *args, **kwargs):
            key = where(self, *args, **kwargs)
            if key not in reads:
                reads.append(key)
                if len(reads) == n:
                    raise RuntimeError("simulated read failure of a source tensor")
            return real(self, *args, **kwargs)

        return read

    def span_key(self, span, *args, **kwargs):
        return (span.path, span.offset)

    def load_key(self, dtype, shape, offset, *args, **kwargs):
        return (str(self.path), offset)

    monkeypatch.setattr(rawio.SpanReader, "mapping", failing(rawio.SpanReader.mapping, span_key))
    monkeypatch.setattr(rawio.SpanReader, "_open", failing(rawio.SpanReader._open, span_key))
    monkeypatch.setattr(rawio.MappedFile, "tensor", failing(rawio.MappedFile.tensor, load_key))
    return reads


@pytest.mark.parametrize(
    "dst, options",
    [
        ("out.safetensors", {}),
        ("out.safetensors", {"shard_size": 20_000}),
        ("out.h5", {}),
        ("out.h5", {"compression": "gzip"}),
        ("out.pt", {}),
    ],
    ids=["safetensors", "sharded", "hdf5", "hdf5-gzip", "pt"],
)
def test_conversion_failing_midway_leaves_nothing(
    dst, options, safetensors_source, tmp_path, monkeypatch
):
    """The second tensor of a valid source fails to load while the destination is written."""
    loads = _fail_on_read(monkeypatch, 2)
    before = sha256(safetensors_source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("unrelated")
    with pytest.raises(RuntimeError, match="simulated"):
        convert(safetensors_source, out / dst, **options)
    assert len(loads) == 2
    assert listing(out) == ["keep.txt"]
    assert sha256(safetensors_source) == before
    assert listing(safetensors_source.parent) == ["model.safetensors"]


def test_conversion_failing_midway_keeps_existing_destination(
    safetensors_source, tmp_path, monkeypatch
):
    _fail_on_read(monkeypatch, 3)
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"the old destination")
    with pytest.raises(RuntimeError, match="simulated"):
        convert(safetensors_source, dst, force=True)
    assert dst.read_bytes() == b"the old destination"
    assert temporaries(tmp_path) == []


# --- end to end: the CLI in subprocesses ----------------------------------------------

DESTINATIONS = ["out.safetensors", "out.h5", "out.pt"]
FSIZE_LIMIT = 200_000  # bytes: the source is ~1 MB, so every writer hits it part way


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as the CLI does: EFBIG instead of a kill


def _corrupt_hdf5(path: Path) -> None:
    """An HDF5 file whose second dataset's compressed chunk is garbage (found only on read)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=np.arange(4096, dtype="f4"), compression="gzip")
        ds = f.create_dataset("b", data=np.arange(4096, dtype="f4"), compression="gzip")
        chunk = ds.id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset : chunk.byte_offset + chunk.size] = b"\xff" * chunk.size
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Start every end-to-end case at once; return {case: (proc result, folder, src hash)}."""
    root = tmp_path_factory.mktemp("cli")
    big = {"w1": torch.randn(256, 512), "w2": torch.randn(256, 512)}  # 1 MiB of float32
    cases = {}
    for dst in DESTINATIONS + ["sharded"]:
        folder = root / f"full-{dst}"
        folder.mkdir()
        torch.save(big, folder / "big.pt")
        argv = ["convert", "big.pt", dst]
        if dst == "sharded":
            argv = ["convert", "big.pt", "out.safetensors", "--shard-size", "300KB"]
        cases[f"disk-full-{dst}"] = (folder, argv, _limit_file_size)
    for dst in DESTINATIONS:
        folder = root / f"corrupt-{dst}"
        folder.mkdir()
        _corrupt_hdf5(folder / "corrupt.h5")
        cases[f"corrupt-source-{dst}"] = (folder, ["convert", "corrupt.h5", dst], None)
    env = {k: v for k, v in os.environ.items() if k != "NNCONV_DEBUG"}
    hashes = {k: {p.name: sha256(p) for p in f.iterdir()} for k, (f, _, _) in cases.items()}
    procs = {
        key: subprocess.Popen(
            [*NNCONV, *argv],
            cwd=folder,
            env=env,
            preexec_fn=pre,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key, (folder, argv, pre) in cases.items()
    }
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[key] = (proc.returncode, out, err, cases[key][0], hashes[key])
    return results


def _check_nothing_left(result) -> str:
    rc, out, err, folder, hashes = result
    assert rc == 2, f"exit {rc}: {out!r} {err!r}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert {p.name: sha256(p) for p in folder.iterdir()} == hashes, "left behind or changed"
    return lines[0]


@pytest.mark.parametrize("dst", ["out.safetensors", "sharded", "out.h5", "out.pt"])
def test_disk_full_leaves_nothing(dst, cli_runs):
    _check_nothing_left(cli_runs[f"disk-full-{dst}"])


@pytest.mark.parametrize(
    "dst",
    [
        "out.safetensors",
        "sharded",
        "out.h5",
        "out.pt",
    ],
)
def test_disk_full_error_names_destination_and_size(dst, cli_runs):
    line = _check_nothing_left(cli_runs[f"disk-full-{dst}"])
    assert not line.startswith("Error: unexpected "), line
    assert line.startswith(f"Error: {'out.safetensors' if dst == 'sharded' else dst}: "), line
    assert any(w in line.lower() for w in ("too large", "space", "size", "limit")), line


@pytest.mark.parametrize("dst", DESTINATIONS)
def test_corrupt_source_found_midway_leaves_nothing(dst, cli_runs):
    _check_nothing_left(cli_runs[f"corrupt-source-{dst}"])


@pytest.mark.parametrize("dst", DESTINATIONS)
def test_corrupt_source_found_midway_names_the_source(dst, cli_runs):
    line = _check_nothing_left(cli_runs[f"corrupt-source-{dst}"])
    assert line.startswith("Error: corrupt.h5: "), line


@pytest.mark.parametrize("fsync", [False, True])
def test_fsync_only_when_asked(safetensors_source, tmp_path, monkeypatch, fsync):
    """A rename alone survives a killed process; ``fsync`` also flushes the file and the
    folder to disk (a power cut), which cp and torch.save do not do."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    for name in ("out.pt", "out.safetensors", "out.h5"):
        convert(safetensors_source, tmp_path / name, fsync=fsync)
    assert len(synced) == (6 if fsync else 0)  # the file, then its folder, per write
