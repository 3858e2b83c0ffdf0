"""libhdf5 runs in a worker process: a file that hangs or crashes it is one FormatError.

The fuzz corpus holds files on which libhdf5 spins forever (a corrupt global heap
read through a variable-length string attribute) and files that crashed it (an
attribute turned into a variable-length sequence).  Reading them must give one
FormatError quickly, and the next read of a good file must work, from a fresh
worker when the old one was killed.  The worker is started once and reused, never
outlives its parent, never serves a forked child and never imports torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from nnconv import inspect, load, save
from nnconv.formats import from_object
from nnconv.formats.errors import FormatError
from nnconv.formats.hdf5 import hdf5_probe

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fuzz" / "corpus" / "hdf5"
HANGS = ["b5806b18283ab44517387c695ce523046df06852", "b25084d2b883982ef5310f340ed10e677d5e3905"]
SEGFAULTS = ["815c4ee124f1b9b266dfb43464fc9c6ba3eaac92", "e31cd0385fa7d2a5912c61dbecbd86a73b6a070a"]
GOOD = ROOT / "fixtures" / "mlp.h5"


def corpus_file(tmp_path: Path, sha: str) -> Path:
    path = tmp_path / f"{sha[:8]}.h5"
    path.write_bytes((CORPUS / f"{sha}.bin").read_bytes())
    return path


def good_read() -> list[str]:
    with load(GOOD) as ckpt:
        names = ckpt.names()
        for name in names:
            ckpt.lazy(name).load()
    return names


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def quick(monkeypatch):
    """One CPU second per step: a hang costs 1-2 s of CPU instead of 2-3."""
    monkeypatch.setattr(hdf5_probe, "STEP_CPU_S", 1)


@pytest.mark.parametrize("sha", HANGS, ids=lambda s: s[:8])
def test_hang_is_one_format_error_then_a_fresh_worker(sha, tmp_path, quick):
    good_read()
    before, pid = hdf5_probe.workers_started(), hdf5_probe.worker_pid()
    started = time.monotonic()
    with pytest.raises(FormatError) as info:
        load(corpus_file(tmp_path, sha))
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert message.startswith(str(tmp_path)) and "\n" not in message
    assert "libhdf5 hung reading this file's metadata" in message
    assert "the file is corrupt or crafted" in message
    assert hdf5_probe.worker_pid() is None and wait_gone(pid)
    assert good_read()  # a fresh worker
    assert hdf5_probe.workers_started() == before + 1
    assert hdf5_probe.worker_pid() not in (None, pid)


def test_crash_is_one_format_error_then_a_fresh_worker(tmp_path):
    """A worker that dies by a signal mid-read (here sent while libhdf5 spins)."""
    good_read()
    hang = corpus_file(tmp_path, HANGS[0])
    errors: list[BaseException] = []

    def read():
        try:
            load(hang)
        except BaseException as exc:  # noqa: BLE001 (the test inspects it)
            errors.append(exc)

    pid = hdf5_probe.worker_pid()
    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)  # the request is sent at once; libhdf5 loops from its first attribute
    os.kill(pid, signal.SIGSEGV)
    reader.join(30)
    assert not reader.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], FormatError), errors
    assert "libhdf5 crashed reading this file's metadata (SIGSEGV)" in str(errors[0])
    assert good_read() and hdf5_probe.worker_pid() not in (None, pid)


def test_memory_bound_is_one_format_error_then_the_worker_goes_on(tmp_path, monkeypatch):
    """A 16 MiB record read under a 1 MiB address-space bound: one FormatError that says
    so; the worker, or a fresh one, reads it with the default bound."""
    path = tmp_path / "big-record.h5"
    ckpt = from_object({"w": torch.ones(2)})
    ckpt.metadata["big"] = "x" * (16 << 20)
    save(ckpt, path)
    monkeypatch.setattr(hdf5_probe, "MEMORY_HEADROOM", 1 << 20)
    monkeypatch.setattr(hdf5_probe, "FILE_FACTOR", 0)
    with pytest.raises(FormatError) as info:
        load(path)
    assert "metadata needing over 1 MiB" in str(info.value) or "out of memory" in str(info.value)
    monkeypatch.undo()
    with load(path) as again:
        assert len(again.metadata["big"]) == 16 << 20
    assert good_read()


@pytest.mark.parametrize("sha", SEGFAULTS, ids=lambda s: s[:8])
def test_former_segfaults_read(sha, tmp_path):
    """Their attribute is a variable-length sequence, not a string: never read now."""
    good_read()
    pid = hdf5_probe.worker_pid()
    with load(corpus_file(tmp_path, sha)) as ckpt:
        for name in ckpt.names():
            ckpt.lazy(name).load()
    assert hdf5_probe.worker_pid() == pid


def test_one_worker_is_reused():
    good_read()
    pid, started = hdf5_probe.worker_pid(), hdf5_probe.workers_started()
    for _ in range(5):
        good_read()
        inspect(GOOD)
    assert (hdf5_probe.worker_pid(), hdf5_probe.workers_started()) == (pid, started)


def test_worker_limits_and_no_torch():
    good_read()
    pid = hdf5_probe.worker_pid()
    limits = Path(f"/proc/{pid}/limits").read_text()
    soft = {line[:26].strip(): line[26:].split()[0] for line in limits.splitlines()[1:]}
    assert soft["Max cpu time"] != "unlimited"
    assert soft["Max address space"] != "unlimited"
    assert soft["Max core file size"] == "0"
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libhdf5" in maps and "torch" not in maps  # a script: stdlib, numpy and h5py


SCRIPT = textwrap.dedent(
    """
    import os, sys
    from nnconv.converter import load
    from nnconv.formats.hdf5 import hdf5_probe

    def read():
        with load(sys.argv[1]) as ckpt:
            ckpt.lazy(ckpt.names()[0]).load()
        return hdf5_probe.worker_pid()

    mine = read()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # a forked child starts its own worker, never its parent's
        os.write(w, str(read()).encode())
        os._exit(0)
    os.close(w)
    theirs = int(os.read(r, 100))
    os.waitpid(child, 0)
    assert read() == mine  # the parent's worker still answers
    print(mine, theirs, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), 9)
    """
)


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_worker_never_outlives_its_parent_nor_serves_a_fork(end):
    """At interpreter exit the worker is stopped; if the parent is killed, the worker
    sees its stdin close and exits.  A forked child's worker is its own."""
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(GOOD), end],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == (0 if end == "exit" else -9), proc.stderr
    mine, theirs = map(int, proc.stdout.split())
    assert mine != theirs
    assert wait_gone(mine) and wait_gone(theirs)
