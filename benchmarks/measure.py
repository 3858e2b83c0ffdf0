"""Running one benchmark route as its own process: wall time and peak memory.

Memory is the peak, over samples every ~5 ms, of RssAnon and RssFile summed over
the process and its descendants (from /proc/<pid>/status).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_S = 0.005


@dataclass
class Route:
    name: str
    argv: list[str]
    targets: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Run:
    ok: bool
    seconds: float
    anon_kib: int
    file_kib: int
    error: str = ""


def _tree(root: int) -> list[int]:
    """The process and all its descendants (children of every thread)."""
    pids, i = [root], 0
    while i < len(pids):
        task_dir = f"/proc/{pids[i]}/task"
        i += 1
        try:
            for task in os.listdir(task_dir):
                with open(f"{task_dir}/{task}/children") as f:
                    pids.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return pids


def _rss(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) in KiB; zeros for a process that is gone or a zombie."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1])
    except OSError:
        pass
    return anon, file


class Sampler(threading.Thread):
    """Keeps the peak of the summed RssAnon and RssFile of a process tree."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.anon, self.file = pid, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            sums = [_rss(p) for p in _tree(self.pid)]
            self.anon = max(self.anon, sum(a for a, _ in sums))
            self.file = max(self.file, sum(f for _, f in sums))
            self.done.wait(SAMPLE_S)


def run_route(route: Route, out_dir: Path, log: Path, timeout: float) -> Run:
    """Runs one route, then empties the output folder (outside timing).

    Before it, outside timing: its input files are read once, so that every route starts
    with its inputs in the page cache (the inputs of all routes do not fit in it at once,
    and a route would otherwise be faster or slower for coming after one that read the
    same file), and the disk is synced, so that no route pays for writing back what an
    earlier one left dirty."""
    work = str(out_dir.parent)
    for arg in route.argv:
        if arg.startswith(work) and os.path.isfile(arg):
            with open(arg, "rb") as fh:
                while fh.read(16 << 20):
                    pass
    os.sync()
    with open(log, "wb") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(
            route.argv,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        sampler = Sampler(proc.pid)
        sampler.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc, timed_out = proc.wait(), True
        seconds = time.perf_counter() - start
        sampler.done.set()
        sampler.join()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    error = ""
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif rc != 0:
        tail = log.read_text("utf-8", "replace").strip().splitlines()[-1:] or [""]
        error = f"exit {rc}: {tail[0][:300]}" if rc > 0 else f"killed (signal {-rc})"
    return Run(rc == 0, seconds, sampler.anon, sampler.file, error)
