"""Running ``nnconv`` against hostile files, measured by the kernel, not by nnconv.

Each red-team test builds its hostile file at test time, runs the real CLI in a
child process and checks what an attacker must never get: exit 2 with one
``Error: <file>: ...`` line, no marker file created, no output left behind,
peak RSS and wall time bounded (read from ``wait4``'s rusage, not from inside).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RSS_LIMIT_MIB = 512  # what a bomb may cost the nnconv process, imports included
WALL_LIMIT_S = 20.0
KILL_AFTER_S = 60.0  # a hang is killed here and reported as such
# The child reports its own peak RSS (VmHWM, which exec resets: ru_maxrss would count the
# pages a fork copied from this, possibly large, pytest process) to the file named in
# NNCONV_REDTEAM_HWM when it exits; the parent also samples it while the child runs.
_MAIN = """
import atexit, os, sys
def _report(path=os.environ["NNCONV_REDTEAM_HWM"]):
    with open("/proc/self/status") as fh, open(path, "w") as out:
        out.write(next(line for line in fh if line.startswith("VmHWM:")).split()[1])
atexit.register(_report)
from nnconv.converter.cli import main
sys.argv[0] = "nnconv"
main()
"""


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    peak_rss_mib: float
    wall_s: float
    killed: bool

    @property
    def error_line(self) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
        return lines[0]

    def assert_refused(self, subject: str | os.PathLike[str] | None = None) -> str:
        """Exit 2, one ``Error:`` line (naming ``subject`` when given), no traceback."""
        assert not self.killed, f"nnconv hung ({self.wall_s:.0f} s)"
        assert self.rc == 2, f"rc={self.rc}\nstdout={self.stdout}\nstderr={self.stderr}"
        line = self.error_line
        assert line.startswith("Error: "), line
        assert "Traceback" not in self.stderr and "unexpected " not in line, line
        if subject is not None:
            assert str(subject) in line, f"{subject} not named in {line!r}"
        return line

    def assert_bounded(self) -> None:
        assert not self.killed, f"nnconv hung ({self.wall_s:.0f} s)"
        assert self.peak_rss_mib < RSS_LIMIT_MIB, f"peak RSS {self.peak_rss_mib:.0f} MiB"
        assert self.wall_s < WALL_LIMIT_S, f"took {self.wall_s:.1f} s"


def nnconv(*args: str | os.PathLike[str], cwd=None, env=None, timeout=KILL_AFTER_S) -> Run:
    """Run ``nnconv ARGS`` in a fresh interpreter; peak RSS and wall time come from wait4
    (that child's own rusage), a hang is killed after ``timeout`` seconds."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("NNCONV_DEBUG", None)
    with tempfile.TemporaryDirectory(prefix="nnconv-hwm-") as folder:
        hwm = Path(folder) / "vmhwm"
        hwm.write_text("0")
        full_env["NNCONV_REDTEAM_HWM"] = str(hwm)
        return _run(args, cwd, full_env, timeout, hwm)


def _vm_hwm_kib(status: Path) -> int:
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _run(args, cwd, full_env, timeout, hwm: Path) -> Run:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", _MAIN, *map(str, args)],
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        killed, peak = False, 0
        while True:
            pid, status, _usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _vm_hwm_kib(Path(f"/proc/{proc.pid}/status")))
            if time.monotonic() - start > timeout and not killed:
                killed = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.02)
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            max(peak, int(hwm.read_text() or 0)) / 1024,
            wall,
            killed,
        )


def sha_tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes), to prove nothing changed."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }
