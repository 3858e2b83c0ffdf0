"""Atomic writes: a temporary file (or folder) beside the destination, then rename.

A crash, a kill or an error never leaves a partial destination.  Temporary
names are recognisable (``.NAME.nnconv-tmp-PID-RANDOM``) and a later write to
the same destination removes those whose process is gone.

``--force`` replaces a file, or a folder that is exactly an earlier sharded
output (its index, the shards it lists, nnconv temporaries), never a folder
holding anything else: an existing folder named as the destination is written
*into* (:func:`resolve_destination`, :func:`atomic_files`), as ``cp`` and
``save_pretrained`` do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from . import paths
from .errors import DestinationError
from .sharding import INDEX_NAME, MAX_INDEX_BYTES, is_output_name, shard_size_for

TMP_MARK = ".nnconv-tmp-"


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    with contextlib.suppress(OSError, ValueError):
        return os.path.samefile(a, b)
    return False


def _source_folders(src: Path) -> list[Path]:
    """Folders a source is read from as a whole: a sharded folder, an index's folder."""
    if src.is_dir():
        return [src]
    if src.name.endswith(".index.json"):
        return [src.parent]
    return []


def _check_sources(dst: Path, sources: tuple[Path, ...]) -> None:
    for src in sources:
        if _same_file(dst, src):
            what = "folder" if src.is_dir() else "file"
            raise DestinationError(
                dst, f"destination is the source {what}", remedy="pick another path"
            )
        for folder in _source_folders(src):
            if dst.resolve().is_relative_to(folder.resolve()):
                raise DestinationError(dst, f"destination is inside the source folder {folder}")


def check_destination(
    dst: Path, *, force: bool, sources: tuple[Path, ...] = (), into_folder: bool = False
) -> None:
    """Refuse writing over a source or into its folder, over an existing file without
    ``force``, and over a folder holding more than an earlier sharded output, even with
    ``force``.  ``into_folder``: ``dst`` is an existing folder written into, not replaced."""
    _check_sources(dst, sources)
    if into_folder:
        return
    if dst.exists() or dst.is_symlink():
        if not force:
            raise DestinationError(dst, "destination exists", remedy="pass --force to replace it")
        if dst.is_dir() and not dst.is_symlink() and not is_sharded_output(dst):
            raise DestinationError(
                dst,
                "destination is a folder holding other files; --force replaces only a file "
                "or an earlier sharded output",
                remedy="name a file inside it, or remove the folder yourself",
            )
    if not dst.parent.is_dir():
        raise DestinationError(dst, f"folder {dst.parent} does not exist")


def is_sharded_output(folder: Path) -> bool:
    """True when ``folder`` holds exactly a sharded output (its index, the shards the
    index lists, nnconv temporaries) and nothing else: replacing it deletes nothing
    the user put there."""
    try:
        entries = {e.name: e for e in os.scandir(folder)}
        index = entries.get(INDEX_NAME)
        if index is None or not index.is_file(follow_symlinks=False):
            return False
        fd = paths.open_regular(index.path)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_INDEX_BYTES + 1)
        shards = set(json.loads(raw.decode("utf-8"))["weight_map"].values())
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return False
    if len(raw) > MAX_INDEX_BYTES:
        return False
    for name, entry in entries.items():
        if name == INDEX_NAME or _is_temporary(name):
            continue
        if name not in shards or not entry.is_file(follow_symlinks=False):
            return False
    return True


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


def _stem(source: Path) -> str:
    """The name a single-file output takes in a destination folder: the source's,
    without its extension (``model.safetensors.index.json`` -> ``model``)."""
    name = Path(os.path.abspath(source)).name or "model"
    if source.is_dir():
        return name
    name = name.removesuffix(".index.json")
    return Path(name).stem if Path(name).suffix else name


def resolve_destination(
    dst: Path, *, source: Path, extension: str, sharded: bool, force: bool = False
) -> Path:
    """The path a conversion of ``source`` to ``dst`` really writes, every rule checked
    before anything is read (fail fast, and never read a FIFO).

    An existing folder is written into: a single-file output becomes
    ``DIR/<source stem><extension>`` (unless ``force`` and the folder, named with that
    extension, is exactly an earlier sharded output, which is then replaced); a
    sharded output (``sharded``, or a safetensors folder already holding an index, as
    ``save_pretrained`` writes) goes beside what is there, replacing only earlier
    shards and index, which needs ``force``.  Writing over the source or into a
    folder it is read from is refused.
    """
    dst, source = Path(dst), Path(source)
    paths.check_input(source)
    _check_sources(dst, (source,))
    if dst.is_dir():
        if sharded or (extension == ".safetensors" and shard_size_for(dst, None)):
            stale = [e for e in _entries(dst) if is_output_name(e.name)]
            for old in stale:
                if _same_file(old, source):
                    raise DestinationError(dst, f"writing here would replace the source {source}")
            if stale and not force and not is_sharded_output(dst):
                raise DestinationError(
                    dst,
                    f"folder holds an earlier sharded output ({stale[0].name})",
                    remedy="pass --force to replace its shards and index; other files are kept",
                )
            check_destination(dst, force=force, into_folder=not is_sharded_output(dst))
            return dst
        if not (force and dst.name.endswith(extension) and is_sharded_output(dst)):
            dst = dst / f"{_stem(source)}{extension}"
    check_destination(dst, force=force, sources=(source,))
    return dst


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


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
    _remove_stale_where(dst.parent, lambda name: name == dst.name)


def _remove_stale_where(folder: Path, wanted: Callable[[str], bool]) -> None:
    """Remove dead processes' temporaries in ``folder`` for the names ``wanted`` accepts."""
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            name = entry.name
            if not (name.startswith(".") and TMP_MARK in name):
                continue
            target, _, rest = name[1:].partition(TMP_MARK)
            pid = rest.split("-", 1)[0]
            if wanted(target) and pid.isdigit() and not _pid_alive(int(pid)):
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
    tmp = _temporary(dst)
    try:
        if directory:
            tmp.mkdir()
        with paths.writing(dst, tmp):
            yield tmp
        if fsync:
            _fsync(tmp)
        if (dst.is_dir() and not dst.is_symlink()) or (directory and dst.exists()):
            # os.replace cannot put a folder over a folder or a file: move the old one
            # aside, and back again if the swap fails.  A folder is replaced only while it
            # is still exactly an earlier sharded output (files may appear meanwhile).
            check_destination(dst, force=force)
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


def _temporary(dst: Path) -> Path:
    return dst.parent / f".{dst.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_files(
    folder: Path,
    names: list[str],
    *,
    replaces: Callable[[str], bool],
    force: bool = False,
    fsync: bool = False,
) -> Iterator[dict[str, Path]]:
    """Write the files ``names`` into the existing ``folder``, beside what is there.

    Yields {name: temporary path}.  On success the entries ``replaces`` accepts
    (an earlier output's files: they need ``force``) are moved aside, the last of
    ``names`` (the index) first, then each temporary is renamed in, the last of
    ``names`` last; nothing else in the folder is touched.  On failure what was
    written is removed and the moved files put back.  A kill during the renames
    (a few milliseconds) can leave the folder without an index, never an index
    naming a mix of old and new shards.
    """
    folder = Path(folder)
    stale = [e for e in _entries(folder) if replaces(e.name) and not _is_temporary(e.name)]
    if stale and not force:
        raise DestinationError(
            folder,
            f"folder holds an earlier sharded output ({stale[0].name})",
            remedy="pass --force to replace its shards and index; other files are kept",
        )
    for old in stale:
        if old.is_dir() and not old.is_symlink():
            raise DestinationError(old, "is a folder; nnconv replaces only files")
    _remove_stale_where(folder, lambda name: name in names or replaces(name))
    tmps = {name: _temporary(folder / name) for name in names}
    stale.sort(key=lambda p: p.name != names[-1])  # the index goes first
    aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        with paths.writing(*(folder / n for n in names), *tmps.values()):
            yield tmps
        if fsync:
            for tmp in tmps.values():
                _fsync(tmp)
        for old in stale:
            moved = old.with_name(_temporary(old).name + "-old")
            os.replace(old, moved)
            aside.append((moved, old))
        for name in names:
            os.replace(tmps[name], folder / name)
            placed.append(folder / name)
        if fsync:
            _fsync_folder(folder)
    except BaseException as exc:
        for path in placed:
            _remove(path)
        for moved, old in reversed(aside):
            with contextlib.suppress(OSError):
                os.replace(moved, old)
        for tmp in tmps.values():
            _remove(tmp)
        if isinstance(exc, OSError):
            raise _destination_error(folder, exc) from None
        raise
    for moved, _ in aside:
        _remove(moved)


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
