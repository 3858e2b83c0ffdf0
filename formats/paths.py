"""Which files a reader may open: regular files only, and inside the model's folder.

A model is the file the user names, or a folder whose index names more files
(sharded safetensors, ONNX external data).  Those names are untrusted input:
a shard symlinked to ``~/.ssh/id_rsa`` must not be read, copied into the
output or quoted in an error, and a FIFO or a device must not be opened at all
(opening a FIFO blocks forever; ``/dev/zero`` never ends).  Every reader asks
the two functions here, so the rule is written once:

- :func:`check_input` for a path the user named (a regular file, or a folder
  where folders are models), stat'ed *before* anything opens it;
- :func:`contained` for every further file a reader opens: a relative name
  without ``..`` that resolves, symlinks followed, to a regular file inside
  the model's folder, and is not an output being written right now.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import FormatError

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_WRITING: list[Path] = []  # outputs (and their temporaries) being written by this process


def kind(mode: int) -> str:
    """What a non-regular file is, in words (for error messages)."""
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def check_input(path: str | os.PathLike[str], *, folder_ok: bool = True) -> os.stat_result:
    """Stat a path the user named before opening it: a regular file (or, when
    ``folder_ok``, a folder), symlinks followed; anything else is a FormatError."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FormatError(path, "no such file or folder") from None
    except (OSError, ValueError) as exc:
        raise FormatError(path, f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode)):
        return st
    wanted = "a regular file or a folder" if folder_ok else "a regular file"
    raise FormatError(
        path, f"is {kind(st.st_mode)}, not {wanted}", remedy="name the model file itself"
    )


def open_regular(path: str | os.PathLike[str], expect: os.stat_result | None = None) -> int:
    """A read-only descriptor of a regular file (the same one ``expect`` describes, when
    given).  Opened non-blocking, so a FIFO swapped in after a check cannot hang us."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(path, f"is {kind(st.st_mode)}, not a regular file")
        if expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
            raise FormatError(path, "changed while it was being opened")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def unsafe_name(name: object) -> str | None:
    """Why a stored file name may not be used inside a model's folder, or None."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\0" in name:
        return "contains a NUL character"
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.drive or pure.root:
            return "is an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "contains a '..' component"
    return None


def contained(
    folder: str | os.PathLike[str],
    name: str,
    *,
    subject: str | os.PathLike[str],
    what: str,
    remedy: str = "it must be a file inside the model's folder",
) -> tuple[Path, os.stat_result]:
    """(resolved path, stat) of the file ``name`` in the model's ``folder``, or a
    FormatError on ``subject`` saying ``<what> 'name' <problem>``.

    The one containment rule for files a reader opens beyond the one it was
    given: relative without ``..``, resolving (symlinks followed, also those
    inside the folder) to a regular file inside the folder, and not an output
    this process is writing.  Nothing is opened here.
    """

    def refuse(problem: str) -> FormatError:
        return FormatError(subject, f"{what} {name!r} {problem}", remedy=remedy)

    why = unsafe_name(name)
    if why:
        raise refuse(why)
    try:
        root = Path(folder).resolve(strict=True)
        target = (root / name).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a bad name
        raise refuse("does not exist") from None
    if target == root or not target.is_relative_to(root):
        raise refuse(f"resolves to {str(target)!r}, outside the model's folder")
    try:
        st = os.stat(target)
    except OSError:
        raise refuse("does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise refuse(f"is {kind(st.st_mode)}, not a regular file")
    if _being_written(target, st):
        raise refuse("is the output being written")
    return target, st


def _being_written(target: Path, st: os.stat_result) -> bool:
    for out in _WRITING:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            if out.resolve() == target:
                return True
            there = os.stat(out)
            if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


@contextlib.contextmanager
def writing(*outputs: Path) -> Iterator[None]:
    """Mark ``outputs`` as being written: :func:`contained` refuses to read them meanwhile
    (a source's index naming the destination would otherwise read a half-written file)."""
    added = [Path(p) for p in outputs]
    _WRITING.extend(added)
    try:
        yield
    finally:
        for p in added:
            _WRITING.remove(p)
