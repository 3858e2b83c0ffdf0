"""The fuzzing property, the processes that check it, and the command line.

The property, per mutated input: ``registry.detect`` and the reader either
succeed (every tensor loads with the dtype, shape and byte count the reader
announced) or raise an :class:`NnconvError`, within :data:`CPU_LIMIT_S` of CPU
time and :data:`MEMORY_BOUND` bytes of address space beyond the warmed-up
process.  Anything else is a *crasher*: another exception, a hang, a fatal
signal, or an allocation that failed under the bound (even one a reader turned
into an NnconvError: the file asked for too much).

Processes.  Hypothesis runs in a light process (no torch).  Inputs are checked
by a *worker*: a zygote that imports torch and every reader once, then forks a
*server* that answers one request at a time over a pipe, under ``RLIMIT_AS``.
A hang in C code (libhdf5 loops on some corrupt heaps, and no Python signal
interrupts C) is seen by the supervisor through the server's CPU time; it
asks ``faulthandler`` for the stack, kills the server, and the zygote forks a
fresh one in milliseconds.  A crash (SIGSEGV, SIGBUS) is handled the same way.

Each crasher is told apart by its *origin*: the kind of failure and the
innermost nnconv function it went through (``"TypeError in hdf5_format.py:
_layout"``).  New ones are saved as ``<out>/<reader>/<sha1>.bin`` with a
``.json`` sidecar (seed, mutations, error, traceback).  Corpus sidecars with
``"status": "open"`` are crashers whose fix belongs to code this suite may
not change yet: their origin counts as known, not as a new failure.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import hashlib
import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from fuzz_seeds import ALL_SEEDS, ROOT, SEED_BY_NAME, SEEDS, Seed, apply, mutations, stage

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
NNCONV_CODE = (ROOT / "formats", ROOT / "converter")

EXAMPLES = 5_600  # distinct mutated inputs in the default test run, shared by the readers
LONG_EXAMPLES = 100_000  # ... with NNCONV_FUZZ_LONG=1
CLI_EXAMPLES = 30  # mutated files per reader run through ``nnconv inspect``
BATCH = 2_000  # examples per hypothesis run; each run has its own fixed seed
CPU_LIMIT_S = 2.0  # CPU seconds one input may take (detect + read + load every tensor)
C_HANG_S = CPU_LIMIT_S + 0.5  # CPU seconds after which the supervisor stops waiting
WALL_LIMIT_S = 60.0  # wall seconds after which a blocked (not spinning) input is a hang
MEMORY_BOUND = 256 * 2**20  # address space an input may add beyond the warmed-up process
RECYCLE_EVERY = 2_000  # inputs per server: fragmentation must not eat the bound


def long_mode() -> bool:
    return os.environ.get("NNCONV_FUZZ_LONG") == "1"


def examples_per_reader() -> int:
    """The default run's budget split over the readers (at least 800 each), so that a new
    format adds its share of coverage, not its share of CI time; long mode: each its own."""
    return LONG_EXAMPLES if long_mode() else max(800, EXAMPLES // len(SEEDS))


# --- the property (runs in the worker) ---------------------------------------


class Hang(BaseException):
    """Raised by the CPU-time alarm; a BaseException so that no reader's
    ``except Exception`` turns it into an ordinary error."""


class FuzzFailure(Exception):
    """A property violation that is not an exception a reader raised."""


class TimeLimitExceeded(FuzzFailure):
    pass


class MemoryBoundExceeded(FuzzFailure):
    pass


class InconsistentTensor(FuzzFailure):
    pass


_ALLOCATION = re.compile(
    r"can't allocate memory|Cannot allocate memory|Unable to allocate|bad_alloc|out of memory"
)


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``from None`` hides, not drops, them)."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _allocation_failure(exc: BaseException) -> bool:
    return any(isinstance(e, MemoryError) or _ALLOCATION.search(str(e)) for e in _chain(exc))


@contextlib.contextmanager
def cpu_limit(seconds: float):
    """Raise :class:`Hang` in the main thread after ``seconds`` of process CPU time."""

    def alarm(signum, frame):
        raise Hang

    previous = signal.signal(signal.SIGPROF, alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def exercise(reader: str, path: Path) -> str:
    """Detect, read and load every tensor of ``path`` with ``reader``, as ``convert`` would.

    Returns ``"ok"`` or the name of the NnconvError raised; raises anything
    else, or :class:`TimeLimitExceeded`, :class:`MemoryBoundExceeded`,
    :class:`InconsistentTensor`.
    """
    try:
        with cpu_limit(CPU_LIMIT_S):
            return _exercise(reader, path)
    except Hang as exc:
        raise TimeLimitExceeded(f"over {CPU_LIMIT_S} s of CPU time") from exc


def _exercise(reader: str, path: Path) -> str:
    from nnconv.formats import NnconvError, registry
    from nnconv.formats.checkpoint import tensor_bytes

    try:
        with contextlib.suppress(NnconvError):
            registry.detect(path)
        with registry.get(reader).read(path) as ckpt:
            for name, lazy in ckpt.tensors.items():
                t = lazy.load()
                data = tensor_bytes(t)
                got = (str(t.dtype).removeprefix("torch."), tuple(t.shape), len(data))
                if got != (lazy.dtype, lazy.shape, lazy.nbytes):
                    raise InconsistentTensor(
                        f"tensor {name!r}: announced {(lazy.dtype, lazy.shape, lazy.nbytes)}, "
                        f"loaded {got}"
                    )
                hashlib.blake2b(data)  # touch every byte: a map past the file's end faults here
            ckpt.names()
            _exercise_record(ckpt)
    except NnconvError as exc:
        if _allocation_failure(exc):
            raise MemoryBoundExceeded(f"an allocation failed: {exc}") from exc
        return type(exc).__name__
    return "ok"


def _exercise_record(ckpt) -> None:
    """An architecture record in the file is rebuilt as ``verify`` would, untrusted: only
    torch.nn built-ins, on the meta device, then the file's own tensors assigned."""
    from nnconv.converter import models, record

    if record.ARCHITECTURE_KEY in ckpt.metadata:
        models.load_model(ckpt)


def _ours(filename: str) -> bool:
    return any(Path(filename).is_relative_to(code) for code in NNCONV_CODE)


def origin(exc: BaseException) -> str:
    """What makes two crashers the same bug: the failure's kind and the innermost nnconv
    function it went through (function names survive edits that move lines)."""
    kind = type(exc).__qualname__
    if isinstance(exc, TimeLimitExceeded):
        kind = "Hang"
    elif isinstance(exc, MemoryBoundExceeded):
        kind = "MemoryBoundExceeded"
    frames = [f for e in reversed(_chain(exc)) for f in traceback.extract_tb(e.__traceback__)]
    frames = [f for f in frames if _ours(f.filename)] or frames
    where = f" in {Path(frames[-1].filename).name}:{frames[-1].name}" if frames else ""
    return f"{kind}{where}"


def _dump_origin(kind: str, dump: str) -> str:
    """An origin from a faulthandler dump (most recent call first)."""
    frames = re.findall(r'File "([^"]+)", line \d+ in (\S+)', dump)
    ours = [f for f in frames if _ours(f[0])] or frames
    return f"{kind} in {Path(ours[0][0]).name}:{ours[0][1]}" if ours else kind


# --- the worker: a zygote and the server it forks -----------------------------


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def bound_memory() -> int:
    """Cap this process's address space at its current size + MEMORY_BOUND."""
    cap = _vm_size() + MEMORY_BOUND
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return cap


def _quiet_process() -> None:
    """One thread and no warnings: CPU limits are per input, stderr is for dumps."""
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")


def _send(message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def _serve() -> int:
    """Answer requests on stdin until EOF (exit 0) or a recycle request (exit 3)."""
    faulthandler.enable()  # fatal signals dump the stack on stderr
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the supervisor asks for it
    cap = bound_memory()
    _send({"ready": os.getpid(), "cap": cap})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        if request.get("recycle"):
            return 3
        try:
            _send({"outcome": exercise(request["reader"], Path(request["path"]))})
        except Exception as exc:
            kind = "hang" if isinstance(exc, TimeLimitExceeded) else "exception"
            text = "".join(traceback.format_exception(exc))
            error = f"{type(exc).__name__}: {exc}"
            _send({"crash": origin(exc), "kind": kind, "error": error[:800], "trace": text[-2500:]})
    return 0


def worker_main() -> int:
    """The zygote: import and warm up once, then fork servers one after the other."""
    _quiet_process()
    # The heavy imports first, outside the per-input CPU limit that warming up runs under
    # (on a loaded machine, importing onnx alone came close to it).
    import onnx  # noqa: F401

    from nnconv.converter import models, record  # noqa: F401

    for seed in ALL_SEEDS:  # imports, first-call caches; and every seed must read
        outcome = exercise(seed.reader, seed.path)
        if outcome != "ok":
            raise RuntimeError(f"seed {seed.name} does not read: {outcome}")
    while True:
        pid = _fork(_serve)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code == 0:
            return 0
        _send({"died": code})


def _fork(child) -> int:
    """Fork; the child runs ``child()`` and exits with its code (70 if it raised), never
    returning into the parent's code.  Returns the child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = child()
        finally:
            os._exit(code)
    return pid


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Worker:
    """The supervisor's handle on a worker: ask it about one input at a time."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self._buf = b""
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__)), "worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
            )
        self.served = 0
        self.pid = self._expect("ready", timeout=300)["ready"]

    def _line(self, timeout: float) -> dict | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the fuzz worker exited: {self.proc.wait()}\n{tail}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _expect(self, key: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._line(max(0.0, deadline - time.monotonic()))
            if message is not None and key in message:
                return message
        raise RuntimeError(f"the fuzz worker sent no {key!r} in {timeout} s")

    def _dump(self, offset: int) -> str:
        with open(self.log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")[-6000:]

    def ask(self, reader: str, path: Path) -> dict:
        """``{"outcome": name}`` or ``{"crash": origin, "kind", "error", "trace"}``."""
        if self.served >= RECYCLE_EVERY:
            self.proc.stdin.write(b'{"recycle": true}\n')
            self.proc.stdin.flush()
            self._expect("died")
            self.pid, self.served = self._expect("ready")["ready"], 0
        self.served += 1
        offset = self.log.stat().st_size
        self.proc.stdin.write((json.dumps({"reader": reader, "path": str(path)}) + "\n").encode())
        self.proc.stdin.flush()
        cpu, started = _cpu_seconds(self.pid), time.monotonic()
        while True:
            message = self._line(0.1)
            if message is None:
                used, waited = _cpu_seconds(self.pid) - cpu, time.monotonic() - started
                if used < C_HANG_S and waited < WALL_LIMIT_S:
                    continue
                os.kill(self.pid, signal.SIGUSR1)  # faulthandler: where is it stuck?
                time.sleep(0.3)
                os.kill(self.pid, signal.SIGKILL)
                self._expect("died")
                dump = self._dump(offset)
                self.pid, self.served = self._expect("ready")["ready"], 0
                return {
                    "crash": _dump_origin("Hang", dump),
                    "kind": "hang",
                    "error": f"no answer after {used:.1f} s CPU, {waited:.1f} s wall (in C code)",
                    "trace": dump,
                }
            if "died" in message:
                code = message["died"]
                name = signal.Signals(-code).name if code < 0 else f"exit {code}"
                dump = self._dump(offset)
                self.pid, self.served = self._expect("ready")["ready"], 0
                return {
                    "crash": _dump_origin(name, dump),
                    "kind": "signal",
                    "error": f"the process died: {name}",
                    "trace": dump,
                }
            return message

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the corpus ----------------------------------------------------------------


def corpus_entries() -> list[tuple[Path, dict]]:
    """Every committed crasher and its sidecar, in a stable order."""
    return [
        (path, json.loads(path.with_suffix(".json").read_text()))
        for path in sorted(CORPUS.glob("*/*.bin"))
    ]


def open_origins() -> dict[str, set[str]]:
    """Reader -> origins of crashers recorded as open (their fix belongs to other code)."""
    out: dict[str, set[str]] = {}
    for _, meta in corpus_entries():
        if meta.get("status") == "open":
            out.setdefault(meta["reader"], set()).add(meta["origin"])
    return out


def save_crasher(folder: Path, reader: str, seed: Seed, data: bytes, meta: dict) -> Path:
    """``folder/<reader>/<sha1>.bin`` and its sidecar; an existing file is kept as it is."""
    target = folder / reader / f"{hashlib.sha1(data).hexdigest()}.bin"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        sidecar = {"reader": reader, "seed": seed.name, "name": seed.path.name, **meta}
        target.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return target


def stage_corpus_file(path: Path, meta: dict, work: Path) -> Path:
    """A corpus file under its seed's name, beside the seed's siblings."""
    seed = SEED_BY_NAME.get(meta["seed"]) or Seed(meta["reader"], ROOT / meta["seed"])
    target = stage(seed, work / path.stem)
    target.write_bytes(path.read_bytes())
    return target


# --- runners ---------------------------------------------------------------------


def _settings(examples: int, *, shrink: bool = True):
    from hypothesis import HealthCheck, Phase, Verbosity, settings

    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=(Phase.generate, Phase.shrink) if shrink else (Phase.generate,),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        print_blob=False,
    )


def fuzz(reader: str, examples: int, out: Path, *, corpus: bool = False) -> dict:
    """Fuzz one reader with ``examples`` distinct inputs; write and return its summary."""
    from hypothesis import given, note
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    seeds = SEEDS[reader]
    work = Path(tempfile.mkdtemp(prefix=f"nnconv-fuzz-{reader}-"))
    slots = {s: stage(s, work / str(i)) for i, s in enumerate(seeds)}
    worker = Worker(out / f"{reader}.worker.log")
    known = open_origins().get(reader, set())
    stats: dict = {"inputs": 0, "outcomes": {}, "known": {}, "repeats": {}}
    distinct: set[bytes] = set()
    found: dict[str, dict] = {}  # origin -> its last input: after shrinking, the smallest
    classes: dict[str, type] = {}
    reported: set[str] = set()

    def count(bucket: str, key: str) -> None:
        stats[bucket][key] = stats[bucket].get(key, 0) + 1

    def body(seed: Seed, raw: list[tuple]) -> None:
        blob, ops = apply(seed, raw)
        note(f"mutations: {ops}")
        slots[seed].write_bytes(blob)
        stats["inputs"] += 1
        distinct.add(hashlib.sha1(blob).digest())
        answer = worker.ask(reader, slots[seed])
        if "outcome" in answer:
            count("outcomes", answer["outcome"])
            return
        key = answer["crash"]
        if key in known or key in reported:
            count("known" if key in known else "repeats", key)
            return
        found[key] = {"seed": seed, "data": blob, "ops": repr(ops), **answer}
        if answer["kind"] == "hang":  # each try costs seconds: kept as found, not shrunk
            reported.add(key)
            return
        # One class per origin: hypothesis tells bugs apart by exception type and line.
        raise classes.setdefault(key, type("Crasher", (FuzzFailure,), {}))(key)

    saved: dict[str, Path] = {}

    def save(key: str, info: dict) -> Path:
        meta = {"origin": key, "status": "new", "kind": info["kind"], "ops": info["ops"]}
        meta.update(error=info["error"], traceback=info["trace"])
        return save_crasher(CORPUS if corpus else out, reader, info["seed"], info["data"], meta)

    started = time.monotonic()
    reports: list[str] = []
    batch = 0
    try:
        # Different mutations can make the same file: run until that many distinct inputs.
        while len(distinct) < examples and batch < 10 + 4 * examples // BATCH:
            n = min(BATCH, max(100, 3 * (examples - len(distinct)) // 2))
            test = given(seed=st.sampled_from(seeds), raw=mutations())(body)
            test = _settings(n)(hypothesis_seed(batch)(test))
            before = len(found)
            try:
                test()
            except Exception as exc:
                if len(found) == before:  # not a crasher: the harness itself is broken
                    raise
                reports.append("".join(traceback.format_exception(exc))[-8000:])
            reported.update(found)
            batch += 1
            for key in found.keys() - saved.keys():  # at once: a long run may be stopped early
                saved[key] = save(key, found[key])
            print(
                f"[{reader}] batch {batch}: {len(distinct)} distinct inputs of "
                f"{stats['inputs']}, {len(found)} crashers, {time.monotonic() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        worker.close()
        shutil.rmtree(work, ignore_errors=True)
    crashers = [
        {"origin": key, "file": str(saved[key]), "error": info["error"]}
        for key, info in found.items()
    ]
    summary = {
        "reader": reader,
        "examples": examples,
        "distinct": len(distinct),
        "inputs": stats["inputs"],
        "seconds": round(time.monotonic() - started, 1),
        "cpu_seconds": {
            "hypothesis": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 1),
            "worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime, 1),
        },
        "outcomes": stats["outcomes"],
        "known": stats["known"],
        "repeats": stats["repeats"],
        "crashers": crashers,
        "report": "\n".join(reports)[-12000:],
    }
    (out / f"{reader}.summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _cli_verdict(code: int, err: str) -> bool:
    """Exit 0 with a quiet stderr, or exit 2 with one ``Error:`` line that is not a bug's."""
    lines = err.strip().splitlines()
    if code == 0:
        return not lines
    return (
        code == 2
        and len(lines) == 1
        and lines[0].startswith("Error: ")
        and not lines[0].startswith("Error: unexpected ")
    )


def _inspect_in_fork(path: Path, err_path: Path) -> tuple[int, str]:
    """``nnconv inspect PATH`` in a forked child of this (torch-loaded) process."""
    from nnconv.converter import cli

    def child() -> int:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        resource.setrlimit(resource.RLIMIT_CPU, (5, 5))
        bound_memory()
        sys.argv = ["nnconv", "inspect", str(path)]
        code = 70
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        return code

    pid = _fork(child)
    deadline = time.monotonic() + WALL_LIMIT_S
    while not (status := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGKILL, f"killed after {WALL_LIMIT_S} s"
        time.sleep(0.002)
    return os.waitstatus_to_exitcode(status[1]), err_path.read_text(errors="replace")[-3000:]


def cli_fuzz(examples: int, out: Path) -> dict:
    """``nnconv inspect`` on ``examples`` mutated files per reader, each in a forked child.

    A failing input that the reader fuzz already knows as an open crasher
    (checked by a worker, started only then) is counted as known.
    """
    from hypothesis import given, note
    from hypothesis import seed as hypothesis_seed

    _quiet_process()
    for s in ALL_SEEDS:
        exercise(s.reader, s.path)  # warm up the imports every reader needs
    work = Path(tempfile.mkdtemp(prefix="nnconv-fuzz-cli-"))
    known = open_origins()
    stats: dict = {"inputs": 0, "exits": {}, "known": {}, "failures": []}
    checker: list[Worker] = []
    started = time.monotonic()

    def body(seed: Seed, slot: Path, raw: list[tuple]) -> None:
        blob, ops = apply(seed, raw)
        note(f"mutations: {ops}")
        slot.write_bytes(blob)
        stats["inputs"] += 1
        code, err = _inspect_in_fork(slot, slot.with_name("stderr.txt"))
        stats["exits"][str(code)] = stats["exits"].get(str(code), 0) + 1
        if _cli_verdict(code, err):
            return
        if not checker:
            checker.append(Worker(out / "cli.worker.log"))
        answer = checker[0].ask(seed.reader, slot)
        if answer.get("crash") in known.get(seed.reader, ()):
            stats["known"][answer["crash"]] = stats["known"].get(answer["crash"], 0) + 1
            return
        kept = out / "cli" / f"{hashlib.sha1(blob).hexdigest()}-{slot.name}"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_bytes(blob)
        failure = {"seed": seed.name, "ops": repr(ops), "exit": code, "stderr": err}
        stats["failures"].append({**failure, "file": str(kept), "reader_check": answer})
        raise FuzzFailure(f"nnconv inspect {seed.name} (mutated): exit {code}: {err[-500:]}")

    def check(seed: Seed, slot: Path):
        def run(raw: list[tuple]) -> None:
            body(seed, slot, raw)

        return given(raw=mutations())(run)

    reports = []
    try:
        for i, seed in enumerate(ALL_SEEDS):
            per_seed = -(-examples // len(SEEDS[seed.reader]))
            test = _settings(per_seed, shrink=False)(check(seed, stage(seed, work / str(i))))
            before = len(stats["failures"])
            try:
                hypothesis_seed(i)(test)()
            except Exception as exc:
                if len(stats["failures"]) == before:  # not a failing input: a broken harness
                    raise
                reports.append("".join(traceback.format_exception_only(exc))[-2000:])
    finally:
        for w in checker:
            w.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = {**stats, "seconds": round(time.monotonic() - started, 1), "report": reports}
    (out / "cli.summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def replay(files: list[Path], out: Path) -> list[dict]:
    """Each corpus file's answer from a worker (same isolation as the fuzz run)."""
    work = Path(tempfile.mkdtemp(prefix="nnconv-fuzz-corpus-"))
    worker = Worker(out / "replay.worker.log")
    try:
        answers = []
        for path in files:
            meta = json.loads(path.with_suffix(".json").read_text())
            target = stage_corpus_file(path, meta, work)
            answers.append({"file": str(path), **worker.ask(meta["reader"], target)})
        return answers
    finally:
        worker.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="nnconv's reader fuzzer (see README.md)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fuzz", help="fuzz readers, one after the other")
    p.add_argument("readers", nargs="+", choices=list(SEEDS))
    p.add_argument("--examples", type=int, default=examples_per_reader())
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--corpus", action="store_true", help="save new crashers in tests/fuzz/corpus")
    p = sub.add_parser("cli", help="nnconv inspect on mutated files of every reader")
    p.add_argument("--examples", type=int, default=CLI_EXAMPLES)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("replay", help="replay corpus files (default: all of them)")
    p.add_argument("files", nargs="*", type=Path)
    sub.add_parser("worker", help="(internal) the worker process")
    args = parser.parse_args(argv)
    if args.command == "worker":
        return worker_main()
    if args.command == "replay":
        with tempfile.TemporaryDirectory() as tmp:
            answers = replay(args.files or [p for p, _ in corpus_entries()], Path(tmp))
        for answer in answers:
            print(json.dumps(answer))
        return 1 if any("crash" in a for a in answers) else 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "cli":
        summary = cli_fuzz(args.examples, args.out)
        print(json.dumps({k: v for k, v in summary.items() if k != "report"}, indent=2))
        return 1 if summary["failures"] else 0
    found = 0
    for reader in args.readers:
        summary = fuzz(reader, args.examples, args.out, corpus=args.corpus)
        found += len(summary["crashers"])
        print(json.dumps({k: v for k, v in summary.items() if k != "report"}, indent=2))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
