"""Running one benchmark command as its own process: wall time, CPU time and peak memory.

CPU is user + system time of the process and every descendant it waited for (the change in
``getrusage(RUSAGE_CHILDREN)`` across the run).  Memory is the peak, over samples every
~5 ms, of RssAnon and RssFile summed over the process and its descendants (from
/proc/<pid>/status).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_S = 0.005


@dataclass
class Run:
    ok: bool
    seconds: float
    anon_kib: int
    file_kib: int
    user_s: float = 0.0
    sys_s: float = 0.0
    error: str = ""

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


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


def warm_inputs(argv: list[str], work: str) -> None:
    """Reads every input file of a command (its arguments that are files under ``work``)."""
    for arg in argv:
        if arg.startswith(work) and os.path.isfile(arg):
            with open(arg, "rb") as fh:
                while fh.read(16 << 20):
                    pass


def child_env(work: Path) -> dict[str, str]:
    """The environment of every timed command: Python's bytecode cache on, kept in the work
    folder.  An installed nnconv has its .pyc files (pip compiles them); without the cache
    (PYTHONDONTWRITEBYTECODE set, as on some machines) each run would compile all of nnconv
    and click again, about 0.2 s, which is no part of a conversion."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def run_command(argv: list[str], out_dir: Path, log: Path, timeout: float) -> Run:
    """Runs one command, then empties the output folder (outside timing).

    Before it, outside timing: its input files are read once, so that every route starts
    with its inputs in the page cache (the inputs of all routes do not fit in it at once,
    and a route would otherwise be faster or slower for coming after one that read the
    same file), and the disk is synced, so that no route pays for writing back what an
    earlier one left dirty."""
    warm_inputs(argv, str(out_dir.parent))
    os.sync()
    with open(log, "wb") as sink:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=child_env(out_dir.parent),
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
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
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
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return Run(rc == 0, seconds, sampler.anon, sampler.file, user, system, error)
