"""Crash safety: ``nnconv convert`` killed at random moments, read-only and full file systems.

A ~32 MiB ``torch.save`` checkpoint is converted to every writable format (pt,
safetensors, sharded safetensors, hdf5) by ``nnconv convert`` subprocesses that
are SIGKILLed at seeded random moments.  The moments are stratified over the
phases a measured run goes through: start-up and reading (timed from the start
of the process), writing (timed from the moment the temporary appears, so the
start-up's jitter cannot push them out of the short write phase) and the final
fsync, rename and exit.  Every other run first finds an *old* destination
(another checkpoint) that it replaces with ``--force``.  After each kill:

- the destination is absent, the old one intact, or complete and equal to the
  source (names, order, dtypes, bytes, tied weights, read back by nnconv);
- the source's sha256 and its folder are unchanged;
- everything else in the destination folder is a ``.NAME.nnconv-tmp-PID-...``
  temporary of a dead process, and once a run has made its own temporary it has
  removed every earlier run's;

and at the end a normal run to the same destination succeeds and leaves no
temporary.  By default 30 moments are spread over the four destinations; the
``slow`` run kills each conversion at 30 moments.

A destination folder on a read-only file system and one on a full file system
(real ENOSPC, not the RLIMIT_FSIZE that test_atomic.py simulates) must each end
in exit 2, one ``Error:`` line naming the destination, and nothing left.  They
use tmpfs mounts in a private mount namespace (``unshare -m``), skipped where
mounting is not permitted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import assert_same

from nnconv.converter import load, save
from nnconv.formats import to_object
from nnconv.formats.atomic import TMP_MARK

NNCONV = [sys.executable, "-m", "nnconv.converter"]
SEED = 20_240_611
DEFAULT_KILLS = {"pt": 8, "safetensors": 8, "sharded": 7, "hdf5": 7}  # 30 moments in all
SLOW_KILLS = 30  # per destination format
# name, extra options, nnconv format: sharded safetensors is a folder of ~8 MiB shards
DESTINATIONS = {
    "pt": ("out.pt", [], "pt"),
    "safetensors": ("out.safetensors", [], "safetensors"),
    "sharded": ("out.safetensors", ["--shard-size", "9MB"], "safetensors"),
    "hdf5": ("out.h5", [], "hdf5"),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "NNCONV_DEBUG"}


@dataclass
class Source:
    path: Path
    obj: dict
    digest: str


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Source:
    """~32 MiB of float32 in a training-checkpoint layout, with a tied weight."""
    gen = torch.Generator().manual_seed(SEED)
    model = {f"layers.{i}.weight": torch.randn(1024, 2048, generator=gen) for i in range(4)}
    model["layers.0.bias"] = torch.randn(1024, generator=gen)
    model["head.weight"] = model["layers.0.weight"]  # tied: one storage, two names
    obj = {"model": model, "step": 1000, "note": "crash-safety source"}
    path = tmp_path_factory.mktemp("source") / "model.pt"
    torch.save(obj, path)
    assert 30 * 2**20 < path.stat().st_size < 40 * 2**20
    return Source(path, torch.load(path, weights_only=True), sha256(path))


# --- one kill campaign per destination -------------------------------------------------


@dataclass
class Phases:
    """Seconds from the start of a normal run: temporary created, renamed, process gone."""

    temp: float
    renamed: float
    end: float


def _entries(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:  # pragma: no cover - the folder is never removed
        return []


def _temp_of(pid: int, dst: Path) -> str:
    return f".{dst.name}{TMP_MARK}{pid}-"


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _run(argv, folder: Path, dst: Path, kill_at: tuple[str, float] | None):
    """Run one conversion, polling the folder; SIGKILL it at ``(anchor, seconds)``.

    The anchor is ``"start"`` (the process started) or ``"temp"`` (its temporary
    appeared).  Returns (process, {"temp": t, "renamed": t, "end": t}, killed?).
    """
    before = _mtime(dst)
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=folder, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    prefix, seen = _temp_of(proc.pid, dst), {"start": 0.0}
    anchor, delay = kill_at or (None, 0.0)
    while proc.poll() is None:
        now = time.monotonic() - start
        if "temp" not in seen and any(n.startswith(prefix) for n in _entries(folder)):
            seen["temp"] = now
        if "renamed" not in seen and _mtime(dst) not in (None, before):
            seen["renamed"] = now
        if anchor in seen and now >= seen[anchor] + delay:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    _, err = proc.communicate(timeout=120)
    seen["end"] = time.monotonic() - start
    killed = proc.returncode == -signal.SIGKILL
    assert killed or proc.returncode == 0, f"exit {proc.returncode}: {err.decode()}"
    return proc, seen, killed


def _plan(rng: random.Random, count: int, phases: Phases) -> list[tuple[str, float]]:
    """Kill moments, stratified: ~1/4 in start-up and reading, ~1/2 while writing, the
    rest around the final rename and exit; shuffled so old and fresh destinations mix."""
    n_start = max(1, round(count / 4))
    n_end = max(1, round(count / 4))
    n_write = count - n_start - n_end
    write = phases.renamed - phases.temp
    moments = []
    for i in range(n_start):
        moments.append(("start", phases.temp * (i + rng.random()) / n_start))
    for i in range(n_write):
        moments.append(("temp", write * (i + rng.random()) / n_write))
    tail_start, tail = write * 0.8, (phases.end - phases.temp) - write * 0.8
    for i in range(n_end):
        moments.append(("temp", tail_start + tail * (i + rng.random()) / n_end))
    rng.shuffle(moments)
    return moments


def _same(path: Path, expected) -> bool:
    with load(path) as ckpt:
        got = to_object(ckpt)
    try:
        assert_same(got, expected)
    except AssertionError:
        return False
    return True


def _place_old(old: Path, dst: Path) -> None:
    """Put the old destination in place without nnconv (its stale cleanup would run)."""
    if dst.is_dir():
        shutil.rmtree(dst)
    elif dst.exists():
        dst.unlink()
    if old.is_dir():
        shutil.copytree(old, dst)
    else:
        shutil.copyfile(old, dst)


def campaign(kind: str, kills: int, source: Source, root: Path) -> Counter:
    """Kill ``kills`` conversions to ``kind`` and check every aftermath (module doc)."""
    name, extra, fmt = DESTINATIONS[kind]
    folder, scratch = root / kind, root / f"{kind}-old"
    folder.mkdir()
    scratch.mkdir()
    dst = folder / name
    argv = [*NNCONV, "convert", str(source.path), str(dst), "--force", *extra]
    old_obj = {"old": torch.arange(6.0), "tag": kind}
    old = scratch / name
    save(old_obj, old, format=fmt, shard_size=16 if kind == "sharded" else None)

    _, seen, _ = _run(argv, folder, dst, None)  # the measured run
    assert "temp" in seen, "the temporary was never seen"
    phases = Phases(seen["temp"], seen.get("renamed", seen["end"]), seen["end"])
    assert _same(dst, source.obj)
    rng = random.Random(f"{SEED}-{kind}-{kills}")
    outcomes: Counter = Counter()
    for i, moment in enumerate(_plan(rng, kills, phases)):
        has_old = i % 2 == 1
        if has_old:
            _place_old(old, dst)
        elif dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        proc, _, killed = _run(argv, folder, dst, moment)
        where = f"{kind} kill #{i} at {moment[0]}+{moment[1]:.3f}s (old: {has_old})"
        assert sha256(source.path) == source.digest, f"{where}: the source changed"
        assert os.listdir(source.path.parent) == [source.path.name], where
        temps = [n for n in os.listdir(folder) if n != dst.name]
        assert all(n.startswith(f".{dst.name}{TMP_MARK}") for n in temps), f"{where}: {temps}"
        own = [n for n in temps if n.startswith(_temp_of(proc.pid, dst))]
        assert not own or own == temps, f"{where}: earlier temporaries not cleaned: {temps}"
        if not dst.exists():
            state = "absent"
        elif _same(dst, source.obj):
            state = "complete"
        else:
            assert has_old and _same(dst, old_obj), f"{where}: destination neither old nor new"
            state = "old"
        assert killed or (state == "complete" and not temps), where
        outcomes[state if killed else "finished"] += 1
        outcomes["mid-write"] += bool(own)
    _run(argv, folder, dst, None)  # the next normal run cleans up
    assert os.listdir(folder) == [dst.name], os.listdir(folder)
    assert _same(dst, source.obj)
    return outcomes


@pytest.mark.parametrize("kind", list(DESTINATIONS))
def test_killed_conversions_leave_old_or_complete_destination(kind, source, tmp_path):
    outcomes = campaign(kind, DEFAULT_KILLS[kind], source, tmp_path)
    assert outcomes["mid-write"] >= 1, f"no kill landed while writing: {outcomes}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DESTINATIONS))
def test_killed_conversions_30_moments_each(kind, source, tmp_path):
    outcomes = campaign(kind, SLOW_KILLS, source, tmp_path)
    assert outcomes["mid-write"] >= 3, f"too few kills landed while writing: {outcomes}"


# --- read-only and full file systems (tmpfs in a private mount namespace) ------------------

DRIVER = Path(__file__).with_name("cli_driver.py")
UNSHARE = ["unshare", "--mount", "--propagation", "private"]
MOUNTS = {"read-only": "ro,size=1m", "full": "size=256k"}  # the source is 1 MiB


def _can_mount(folder: Path) -> str | None:
    """None when a tmpfs can be mounted in a private namespace, else why not."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        [*UNSHARE, "mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        return f"mounting a tmpfs is not permitted here: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def fs_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fs")
    why = _can_mount(root)
    if why:
        pytest.skip(why)
    src = root / "src" / "model.pt"
    src.parent.mkdir()
    gen = torch.Generator().manual_seed(SEED)
    torch.save({"w1": torch.randn(256, 512, generator=gen), "w2": torch.randn(256, 512)}, src)
    before = sha256(src)
    cases, keys, shard = [], [], ["--shard-size", "300KB"]
    for fs, options in MOUNTS.items():
        for kind, (name, extra, _) in DESTINATIONS.items():
            folder = root / f"{fs}-{kind}"
            folder.mkdir()
            cases.append(
                {
                    "dir": str(folder),
                    "mount": options,
                    "argv": ["convert", str(src), str(folder / name)] + shard * bool(extra),
                    "out": str(root / f"{fs}-{kind}.out"),
                    "err": str(root / f"{fs}-{kind}.err"),
                }
            )
            keys.append((fs, kind))
    (root / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [*UNSHARE, sys.executable, str(DRIVER), str(root / "cases.json"), str(root / "r")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((root / "r").read_text())
    out = {}
    for key, case, result in zip(keys, cases, results, strict=True):
        err = Path(case["err"]).read_text()
        out[key] = (result["rc"], err, result["left"], Path(case["dir"]))
    assert sha256(src) == before and os.listdir(src.parent) == ["model.pt"]
    return out


@pytest.mark.parametrize("kind", list(DESTINATIONS))
@pytest.mark.parametrize("fs, words", [("read-only", "read-only"), ("full", "no space")])
def test_unwritable_file_system_is_one_error_line_and_nothing_left(fs, words, kind, fs_runs):
    rc, err, left, folder = fs_runs[(fs, kind)]
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    name = DESTINATIONS[kind][0]
    assert lines[0].startswith(f"Error: {folder / name}: "), lines[0]
    assert words in lines[0] and TMP_MARK not in lines[0], lines[0]
    assert left == [], f"left on the {fs} file system: {left}"
