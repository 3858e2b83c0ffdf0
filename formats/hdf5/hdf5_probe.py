"""HDF5 metadata read in a worker process: libhdf5 must not hang or crash nnconv.

libhdf5 spins forever in C on some corrupt global heaps and dies with SIGSEGV on
some corrupt attribute types; no Python signal interrupts C code and nothing
catches a segfault.  So every metadata read of an untrusted file (opening it,
walking groups and links, reading attributes, dataset types, shapes, layouts and
offsets, Keras layout detection) runs here, in a persistent worker started with
``sys.executable`` on first use, and comes back as a plain description.

The worker runs under limits: :data:`STEP_CPU_S` seconds of CPU time for each
step of at most :data:`BATCH` links or datasets (``RLIMIT_CPU``, renewed at each
step: the kernel kills a spinning worker), and an address space of what it has
plus :data:`MEMORY_HEADROOM` plus :data:`FILE_FACTOR` times the file's size, up
to :data:`MEMORY_FILE_CAP` (``RLIMIT_AS``).
The parent waits at most :data:`STEP_WALL_S` seconds for each step.  A worker
that dies, exceeds a limit or stops answering is killed and :class:`Crash` is
raised; the next request starts a fresh one.  The worker exits when its stdin
closes (its parent is gone), a forked child never shares its parent's worker,
and the worker is stopped at interpreter exit.

The worker itself (:mod:`hdf5_worker`) reads only the attributes nnconv needs,
and only when libhdf5 says they are strings (the crashes came from non-string
types); it imports neither torch nor nnconv.  This module is the parent's side.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading

from .hdf5_worker import BATCH, H5_ERRORS, MEMORY_FILE_CAP, Refusal

__all__ = ["BATCH", "H5_ERRORS", "MEMORY_FILE_CAP", "Crash", "Refusal", "describe", "shutdown"]

STEP_CPU_S = 2  # CPU seconds per step (at most BATCH links or datasets), kernel-enforced
STEP_WALL_S = 30.0  # wall seconds the parent waits for a step (a blocked worker)
START_WALL_S = 60.0  # wall seconds for the worker to start (imports numpy and h5py)
MEMORY_HEADROOM = 512 << 20  # address space a request may add, plus FILE_FACTOR times
FILE_FACTOR = 8  # the file's size (libhdf5 reading a large string record needs ~6 copies)


class Crash(Exception):
    """libhdf5 crashed, hung or exceeded a limit in the worker, which is gone: what
    happened ("libhdf5 crashed") and how it showed ("SIGSEGV")."""

    def __init__(self, what: str, detail: str, *, startup: bool = False) -> None:
        super().__init__(f"{what} ({detail})")
        self.what, self.detail = what, detail
        self.startup = startup  # the worker never started: this Python's fault, not the file's


class _Worker:
    """One worker process and the pipe to it."""

    def __init__(self) -> None:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nnconv.formats.hdf5.hdf5_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                bufsize=0,
                env=env,
                cwd="/",
            )
        except OSError as exc:
            raise Crash("nnconv's HDF5 worker could not start", str(exc), startup=True) from None
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf known to hold no newline
        self.seq = 0
        ready = self.message(START_WALL_S)
        if not isinstance(ready, dict) or "ready" not in ready:
            crash = self.end(ready, START_WALL_S)
            raise Crash("nnconv's HDF5 worker did not start", crash.detail, startup=True)

    def message(self, timeout: float):
        """The next message; "eof" when the worker is gone, None after ``timeout``."""
        fd = self.proc.stdout.fileno()
        poller = select.poll()  # not select.select: descriptors may be past FD_SETSIZE
        poller.register(fd, select.POLLIN)
        while (end := self.buf.find(b"\n", self.scanned)) < 0:
            self.scanned = len(self.buf)  # a large message comes in pipe-sized pieces
            if not poller.poll(timeout * 1000):
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return "eof"
            self.buf += chunk
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        self.scanned = 0
        try:
            return json.loads(line)
        except ValueError:
            return {}  # a torn line: not an answer to anything

    def end(self, why, waited: float) -> Crash:
        """Make sure the worker is gone; say what happened to libhdf5 in it."""
        if why is None:
            self.kill()
            return Crash("libhdf5 hung", f"no answer in {waited:.0f} s")
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            return Crash("libhdf5 hung", "its worker closed its output")
        self.close_pipes()
        if code >= 0:
            return Crash("nnconv's HDF5 worker exited", f"status {code}")
        if -code == signal.SIGXCPU:
            return Crash("libhdf5 hung", f"looping: over {STEP_CPU_S} s of CPU time in one step")
        return Crash("libhdf5 crashed", signal.Signals(-code).name)

    def request(self, payload: dict, wall_s: float) -> tuple[dict, list]:
        """The worker's description of a file, or Refusal, or Crash (the worker killed)."""
        self.seq += 1
        rid = f"{os.getpid()}-{self.seq}"
        line = (json.dumps({"id": rid, **payload}) + "\n").encode()
        view = memoryview(line)
        while view:
            view = view[os.write(self.proc.stdin.fileno(), view) :]
        entries: list = []
        while True:
            msg = self.message(wall_s)
            if msg is None or msg == "eof":
                raise self.end(msg, wall_s)
            if msg.get("id") != rid:
                continue
            if "entries" in msg:
                entries.extend(msg["entries"])
                continue
            if msg.get("retire"):
                self.stop()
            error = msg.get("error")
            if error is None:
                return msg["done"], entries
            if error["kind"] == "memory":
                limit = f"{payload['memory'] >> 20} MiB plus {payload['file_factor']}x its size"
                raise Crash("nnconv's HDF5 worker ran out of memory", f"over {limit}")
            if error["kind"] == "bug":
                raise RuntimeError(f"nnconv's HDF5 worker failed: {error['problem']}")
            raise Refusal(**error)

    def alive(self) -> bool:
        return self.proc.returncode is None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.close_pipes()

    def close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()

    def stop(self, timeout: float = 2.0) -> None:
        """Close stdin (the worker exits), then kill what does not exit in time."""
        self.close_pipes()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


_LOCK = threading.Lock()
_STATE: dict = {"worker": None, "started": 0}
_INHERITED: list = []  # workers of the parent process, kept (never collected) after a fork


def describe(path: str, *, max_links: int, max_tensors: int) -> tuple[dict, list]:
    """(root info, entries) of an HDF5 file, read by the worker; Refusal or Crash."""
    payload = {
        "path": os.path.abspath(path),
        "cpu_s": STEP_CPU_S,
        "memory": MEMORY_HEADROOM,
        "file_factor": FILE_FACTOR,
        "max_links": max_links,
        "max_tensors": max_tensors,
    }
    with _LOCK:
        for attempt in (1, 2):
            worker = _STATE["worker"]
            if worker is None or not worker.alive():
                if worker is not None:
                    worker.kill()
                _STATE["worker"] = None
                _STATE["started"] += 1
                worker = _STATE["worker"] = _Worker()
            try:
                return worker.request(payload, STEP_WALL_S)
            except BrokenPipeError:  # it died between requests (killed from outside)
                worker.kill()
                _STATE["worker"] = None
                if attempt == 2:
                    raise Crash("nnconv's HDF5 worker exited", "between requests") from None
            except Crash:
                _STATE["worker"] = None
                raise
            except (Refusal, RuntimeError):
                raise  # the worker answered: it is ready for the next request
            except BaseException:  # interrupted mid-request: its answer would be stale
                worker.kill()
                _STATE["worker"] = None
                raise
    raise AssertionError("unreachable")


def worker_pid() -> int | None:
    """The running worker's process id (tests)."""
    worker = _STATE["worker"]
    return worker.proc.pid if worker is not None and worker.alive() else None


def workers_started() -> int:
    """How many workers this process has started (tests)."""
    return _STATE["started"]


def shutdown() -> None:
    """Stop this process's worker (at interpreter exit; harmless any time)."""
    worker, _STATE["worker"] = _STATE["worker"], None
    if worker is not None:
        worker.stop()


def _after_fork_in_child() -> None:
    """A forked child must not talk to (or wait for) its parent's worker: it starts its own."""
    global _LOCK
    _LOCK = threading.Lock()
    worker, _STATE["worker"] = _STATE["worker"], None
    if worker is not None:
        worker.close_pipes()  # the parent's worker still sees EOF when the parent exits
        _INHERITED.append(worker)


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
