"""Where a recorded class's ``.py`` file is: written relative to the record's file, found
again from any working folder, shown the way the user would type it.

An architecture record names user classes by module name; a class that
``--model path/file.py:Class`` loaded also gets ``module_file``, the file's path
relative to the folder of the file holding the record, so that the record and
the class file can move together.  Older records hold ``file``, relative to the
folder nnconv ran in when it wrote them (or a bare file name).  Nothing here
imports a recorded file: :func:`.record.rebuild` does, with trust.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any


def recorded_file(module: Any, folder: str | os.PathLike[str] | None) -> dict[str, str]:
    """``{"module_file": ...}`` (posix, relative to ``folder``) for a module imported from
    a file; without a folder, the older ``{"file": ...}``; ``{}`` for other modules."""
    origin = getattr(module, "__nnconv_path__", None)
    if origin and folder is not None:
        try:
            relative = os.path.relpath(origin, os.path.abspath(folder))
        except ValueError:  # another drive: no relative path
            relative = ""
        if relative:
            return {"module_file": Path(relative).as_posix()}
    shown_name = getattr(module, "__nnconv_file__", None)
    return {"file": str(shown_name)} if shown_name else {}


def base_folder(subject: str | os.PathLike[str] | None) -> Path | None:
    """The folder ``module_file`` is relative to: the record's file's folder (a sharded
    checkpoint's folder itself, whether named by the folder or by its index)."""
    if not subject:
        return None
    path = Path(subject)
    return path if path.is_dir() else path.parent


def class_module(node: dict, base: Path | None) -> tuple[Any, str]:
    """(the module holding the recorded class, or None; the ``--model`` spec to suggest):
    from the file beside the record (``module_file``), else by its module name, else from
    an older record's ``file``.  Imports: for trusted records only."""
    from .models import ModelSpec, _import_file  # as ``--model path.py:Class`` imports it

    def import_file(path: Path, target: str) -> Any:
        return _import_file(ModelSpec(target), path)

    module_name, qualname = node["class"].split(":", 1)
    found = class_file(node, base)
    hint = f"{shown(found) if found else 'path/to/' + file_name(node)}:{qualname}"
    if found is not None and node.get("module_file"):
        return import_file(found, node["class"]), hint
    module = import_module(module_name)
    if module is None and found is not None:
        module = import_file(found, node["class"])
    return module, hint


def class_file(node: dict, base: Path | None) -> Path | None:
    """The recorded class file, where it exists: ``module_file`` relative to ``base``; an
    older record's ``file`` relative to the working folder, then to ``base``."""
    if node.get("module_file"):
        candidates = [(base or Path()) / node["module_file"]]
    elif node.get("file"):
        candidates = [Path(node["file"]), (base or Path()) / node["file"]]
    else:
        return None
    return next((p for p in candidates if p.suffix == ".py" and p.is_file()), None)


def file_name(node: dict) -> str:
    """The recorded file's own name (``models.py``), or ``file.py`` when none is recorded."""
    recorded = node.get("module_file") or node.get("file") or ""
    name = recorded.replace("\\", "/").rsplit("/", 1)[-1]
    return name if name.endswith(".py") else "file.py"


def shown(path: Path) -> str:
    """``path`` as typed from the working folder: relative (posix) where it can be."""
    try:
        return Path(os.path.relpath(path.resolve())).as_posix()
    except ValueError:  # another drive
        return str(path.resolve())


def import_module(name: str) -> Any:
    """``importlib.import_module(name)``, or None when it is not importable."""
    try:
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            return importlib.import_module(name)
    except Exception:  # a parent package that fails to import, an invalid name
        pass
    return None
