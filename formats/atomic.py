"""Atomic writes: a temporary file (or folder) beside the destination, then rename.

A crash, a kill or an error never leaves a partial destination.  Temporary
names are recognisable (``.NAME.nnconv-tmp-PID-RANDOM``) and a later write to
the same destination removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import DestinationError

TMP_MARK = ".nnconv-tmp-"


def check_destination(dst: Path, *, force: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse writing over a source, or over an existing file without ``force``."""
    for src in sources:
        same = dst.resolve() == src.resolve()
        if not same and dst.exists() and src.exists():
            same = os.path.samefile(dst, src)
        if same:
            raise DestinationError(
                dst, "destination is the source file", remedy="pick another path"
            )
        if src.is_dir() and dst.resolve().is_relative_to(src.resolve()):
            raise DestinationError(dst, f"destination is inside the source folder {src}")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise DestinationError(dst, "destination exists", remedy="pass --force to replace it")
    if not dst.parent.is_dir():
        raise DestinationError(dst, f"folder {dst.parent} does not exist")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(dst: Path) -> None:
    """Remove temporaries a killed nnconv left for ``dst`` (their process is gone)."""
    prefix = f".{dst.name}{TMP_MARK}"
    with contextlib.suppress(OSError):
        for entry in dst.parent.iterdir():
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                _remove(entry)


def _remove(path: Path) -> None:
    """Best effort: a cleanup must never hide the error that caused it (on a read-only
    file system, unlink fails with EROFS even for a name that does not exist)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _fsync(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _fsync(child)
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    else:
        flags = os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a power cut must not undo it); best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(
    dst: Path, *, force: bool = False, directory: bool = False, fsync: bool = False
) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``dst`` in one rename.

    ``directory=True`` yields an empty temporary folder (sharded outputs).  The
    rename alone means a killed process never leaves a partial destination;
    ``fsync=True`` also makes the new file survive a power cut (flushing the
    data and the folder to disk first), as ``cp`` and ``torch.save`` do not.
    """
    dst = Path(dst)
    check_destination(dst, force=force)
    remove_stale(dst)
    tmp = dst.parent / f".{dst.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        if fsync:
            _fsync(tmp)
        if (dst.is_dir() and not dst.is_symlink()) or (directory and dst.exists()):
            # os.replace cannot put a folder over a folder or a file: move the old one
            # aside, and back again if the swap fails.
            old = tmp.with_name(tmp.name + "-old")
            os.replace(dst, old)
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old, dst)
                raise
            _remove(old)
        else:
            os.replace(tmp, dst)
        if fsync:
            _fsync_folder(dst.parent)
    except OSError as exc:
        _remove(tmp)
        raise _destination_error(dst, exc) from None
    except BaseException:
        _remove(tmp)
        raise


def _destination_error(dst: Path, exc: OSError) -> DestinationError:
    if exc.errno == errno.ENOSPC:
        return DestinationError(dst, "no space left on the device", remedy="free some space")
    if exc.errno == errno.EROFS:
        return DestinationError(dst, "permission denied: the folder is on a read-only file system")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DestinationError(dst, "permission denied writing the destination")
    if exc.errno == errno.EFBIG:
        return DestinationError(dst, "file too large for this file system or limit")
    return DestinationError(dst, f"cannot write: {exc.strerror or exc}")
