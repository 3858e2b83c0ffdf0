"""Runnable models for a checkpoint: ``--model path.py:Class`` or a self-describing file.

A checkpoint holds weights; exporting or verifying needs the module that runs
them.  It comes from a model spec (a class to instantiate, its state_dict picked
out of the checkpoint and loaded strictly), or from the file itself: a
whole-module pickle (gated like every pickle, with torch.nn built-ins allowed),
a TorchScript archive (run only with ``--trust-code``), or nnconv's architecture
record in the metadata (classes other than torch.nn built-ins: ``--trust-code``).

Picking and loading the state_dict lives in :mod:`.state_dicts` (re-exported
here); a mismatch is one :class:`ModelMismatchError` line.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnconv.formats import pickle_gate, trust
from nnconv.formats.checkpoint import Checkpoint
from nnconv.formats.errors import FormatError, NnconvError, NoModelError, UsageError
from nnconv.formats.keys import ARCHITECTURE_KEY, HF_KEY
from nnconv.formats.source import Source, open_source

from . import hf
from . import record as arch
from .state_dicts import ModelMismatchError, Selection, _first_line, load_weights, select_state_dict

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "LoadedModel",
    "ModelMismatchError",
    "ModelSpec",
    "Selection",
    "instantiate",
    "is_self_describing",
    "is_torchscript",
    "load_model",
    "load_module_pickle",
    "load_torchscript",
    "load_weights",
    "model_spec",
    "parse_spec",
    "select_state_dict",
]

PathLike = str | os.PathLike[str]
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class ModelSpec:
    """A class to instantiate (``path/file.py:Class`` or ``package.module:Class``)
    and the keyword arguments (``--model-args``) to call it with."""

    target: str
    args: dict = field(default_factory=dict)
    factory: Callable[..., nn.Module] | None = field(default=None, compare=False)  # library


@dataclass
class LoadedModel:
    """A runnable module in eval mode and where it came from."""

    module: nn.Module
    source: str  # "spec" | "record" | "module-pickle" | "torchscript"
    selection: Selection | None = None
    record: dict | None = None


# --- specs --------------------------------------------------------------------


def parse_spec(spec: str, args_json: str | None = None) -> ModelSpec:
    """Parse ``--model`` and ``--model-args`` (a JSON object of keyword arguments)."""
    where, sep, qualname = str(spec).rpartition(":")
    if not sep or not where or not _DOTTED.match(qualname):
        raise UsageError(
            None,
            f"invalid --model {spec!r}: expected path/to/file.py:Class or package.module:Class",
        )
    if _is_file_target(where):
        if not Path(where).is_file():
            raise UsageError(None, f"--model {spec!r}: no such file {where!r}")
    elif not _DOTTED.match(where):
        raise UsageError(None, f"--model {spec!r}: {where!r} is neither a .py file nor a module")
    return ModelSpec(str(spec), _parse_args(spec, args_json))


def _parse_args(spec: str, args_json: str | None) -> dict:
    args: Any = {}
    if args_json is not None:
        try:
            args = json.loads(args_json)
        except ValueError as exc:
            raise UsageError(None, f"--model-args for {spec!r} is not valid JSON: {exc}") from None
        if not isinstance(args, dict):
            raise UsageError(
                None, f"--model-args for {spec!r} must be a JSON object of keyword arguments"
            )
    return args


def model_spec(model: Any, model_args: str | Mapping[str, Any] | None = None) -> ModelSpec | None:
    """The library's ``model=``: a spec string, an ``nn.Module`` class (called with
    ``model_args``, a dict or JSON) or an instance (each side gets a deep copy)."""
    if model is None or isinstance(model, ModelSpec):
        return model
    if isinstance(model, str | os.PathLike):  # the CLI's case: no torch import yet
        text = json.dumps(dict(model_args)) if isinstance(model_args, Mapping) else model_args
        return parse_spec(os.fspath(model), text)
    from torch import nn
    cls = model if isinstance(model, type) else type(model)
    if not issubclass(cls, nn.Module):
        raise UsageError(None, f"model={model!r}: expected an nn.Module class or instance")
    target = f"{cls.__module__}:{cls.__qualname__}"
    parsed = isinstance(model_args, Mapping)
    args = dict(model_args) if parsed else _parse_args(target, model_args)  # type: ignore[arg-type]
    if isinstance(model, nn.Module):
        if args:
            raise UsageError(None, "--model-args applies to a class, not to a module instance")
        return ModelSpec(target, {}, factory=lambda: copy.deepcopy(model))
    return ModelSpec(target, args, factory=cls)


def _is_file_target(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def instantiate(spec: ModelSpec) -> nn.Module:
    """Import the spec's class and call it with the spec's arguments."""
    from torch import nn

    if spec.factory is not None:
        return _call(spec, spec.factory)
    where, _, qualname = spec.target.rpartition(":")
    module = _import_file(spec, Path(where)) if _is_file_target(where) else _import(spec, where)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        what = "no class" if obj is None else f"{type(obj).__name__}, not an nn.Module class,"
        raise UsageError(None, f"--model {spec.target!r}: {what} {qualname!r} in {where}")
    return _call(spec, obj)


def _call(spec: ModelSpec, factory: Callable[..., nn.Module]) -> nn.Module:
    try:
        return factory(**spec.args)
    except TypeError as exc:
        raise UsageError(
            None, f"--model {spec.target!r}: {exc}", remedy="check --model-args"
        ) from None


def _import(spec: ModelSpec, name: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise UsageError(None, f"--model {spec.target!r}: cannot import {name}: {exc}") from None


def _import_file(spec: ModelSpec, path: Path):
    """Import a file under a private module name (once per process); its folder is on
    sys.path meanwhile, so that it can import its neighbours."""
    path = path.resolve()
    name = f"nnconv_model_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    module = sys.modules.get(name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise UsageError(None, f"--model {spec.target!r}: cannot import {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent))
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise UsageError(
                None, f"--model {spec.target!r}: importing {path.name} failed: {_first_line(exc)}"
            ) from None
        finally:
            if str(path.parent) in sys.path:
                sys.path.remove(str(path.parent))
    # What another process, started here, would import it as: for the architecture record.
    module.__nnconv_import_name__, module.__nnconv_file__ = _names_for(path)  # type: ignore
    module.__nnconv_path__ = str(path)  # type: ignore  (recorded relative to the output)
    return module


def _names_for(path: Path) -> tuple[str, str]:
    """(``fixtures.models``, ``fixtures/models.py``) for ``./fixtures/models.py``, relative
    to the working folder (records travel: no absolute paths); the bare names elsewhere."""
    try:
        shown = path.relative_to(Path.cwd().resolve())
    except ValueError:
        shown = Path(path.name)
    dotted = ".".join(shown.with_suffix("").parts)
    return (dotted if _DOTTED.match(dotted) else path.stem), str(shown)


# --- self-describing files -----------------------------------------------------


def is_torchscript(path: PathLike | Source) -> bool:
    """A ``torch.jit.save`` archive (its weights read as data; running it needs trust)."""
    return _kind(path) == "torchscript"


def load_torchscript(path: PathLike, *, trust_code: bool = False) -> torch.jit.ScriptModule:
    """``torch.jit.load``: it runs the archive's own TorchScript (``__setstate__``,
    methods), so only with ``trust_code``; the weights alone need no trust
    (the pt adapter reads them with nnconv's restricted reader)."""
    if not trust_code:
        raise trust.refuse(path, "running a TorchScript archive runs the code it holds")
    import torch

    try:
        with warnings.catch_warnings():  # torch.jit's deprecation notice
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise FormatError(path, f"torch.jit.load failed: {_first_line(exc)}") from None
    return module.eval()


def is_self_describing(path: PathLike | Source) -> bool:
    """Whether the file is a model rather than weights: a TorchScript archive or a
    whole-module pickle, which the weight adapters cannot read.  A checkpoint that
    carries an architecture record reads as weights and is not counted.  Never raises:
    a missing or corrupt file is for the reader to report."""
    return _kind(path) in ("module", "torchscript")


def _kind(path: PathLike | Source) -> str | None:
    if isinstance(path, Source):
        return path.kind
    try:
        with open_source(path) as source:
            return source.kind
    except NnconvError:
        return None


def load_module_pickle(path: PathLike | Source, *, trust_code: bool = False) -> Any:
    """Unpickle a ``torch.save(model)`` file: gated by the module allowlist, then
    ``torch.load(weights_only=True)`` with exactly the allowed classes, each behind a
    stand-in that creates the object without calling its constructor (what a real
    ``torch.save(model)`` pickle does): a crafted ``Linear(20000, 20000)`` call
    allocates nothing, the module's tensors are the file's."""
    import torch

    source = open_source(path)
    path, globals_ = source.file, list(source.pickle_globals or ())
    if not trust_code:
        pickle_gate.check_module(str(path), globals_)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if trust_code:
                return torch.load(path, map_location="cpu", weights_only=False)
            allowed = pickle_gate.module_safe_globals(globals_)
            with torch.serialization.safe_globals(_without_constructors(allowed)):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        _check_built(path, obj)
        return obj
    except NnconvError:
        raise
    except Exception as exc:
        raise FormatError(path, f"torch.load failed: {_first_line(exc)}") from None


def _without_constructors(allowed: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """torch.nn classes replaced by stand-ins whose call only allocates the bare object;
    the real class stays registered under a name no pickle can spell, so that torch's
    unpickler accepts BUILD on its instances."""
    from torch import nn

    out = []
    for obj, name in allowed:
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            stand_in = type(obj.__name__, (), {"__new__": _bare(obj)})
            out += [(stand_in, name), (obj, f"<nnconv bare {name}>")]
        else:
            out.append((obj, name))
    return out


def _check_built(path: PathLike, obj: Any) -> None:
    """Every module in the tree got its pickled state (a crafted call of a stand-in
    leaves a bare object that any use would trip over)."""
    from torch import nn

    todo, seen = ([obj] if isinstance(obj, nn.Module) else []), set()
    while todo:
        module = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        state = vars(module)
        if not all(isinstance(state.get(k), dict) for k in ("_parameters", "_buffers", "_modules")):
            raise FormatError(
                path,
                f"holds a {type(module).__name__} module without its state: not a module "
                "torch.save wrote",
            )
        todo += [m for m in state["_modules"].values() if isinstance(m, nn.Module)]


def _bare(cls: type):
    def new(_stand_in, *args, **kwargs):  # NEWOBJ and REDUCE alike: no __init__ runs
        return cls.__new__(cls)

    return new


def _read(source: Source, trust_code: bool) -> tuple[str, Any]:
    """("torchscript" | "module-pickle" | "object", value) or ("checkpoint", Checkpoint).

    A TorchScript archive reads as weights (nnconv's restricted reader) unless
    ``trust_code`` lets torch.jit load and run it.
    """
    if source.kind == "torchscript" and trust_code:
        return "torchscript", load_torchscript(source.file, trust_code=True)
    if source.kind == "module":
        from torch import nn

        obj = load_module_pickle(source, trust_code=trust_code)
        return ("module-pickle" if isinstance(obj, nn.Module) else "object"), obj
    return "checkpoint", source.checkpoint()


def load_model(
    path_or_ckpt: PathLike | Source | Checkpoint,
    *,
    spec: ModelSpec | None = None,
    key: str | None = None,
    example_inputs: tuple | None = None,
    trust_code: bool = False,
) -> LoadedModel:
    """A runnable model (eval mode) with the file's weights.

    With ``spec``: instantiate it and load the selected state_dict strictly.
    Without: the file must describe its model (whole-module pickle, TorchScript
    archive with ``trust_code``, or a checkpoint carrying nnconv's architecture
    record, whose non-built-in classes need ``trust_code`` too).  A path is opened
    here and closed after; a :class:`Source` stays the caller's.
    """
    source = None
    if isinstance(path_or_ckpt, Checkpoint):
        kind, value, subject = "checkpoint", path_or_ckpt, path_or_ckpt.source
    elif spec is None and hf.is_folder(Path(getattr(path_or_ckpt, "path", path_or_ckpt))):
        folder = Path(getattr(path_or_ckpt, "path", path_or_ckpt))  # transformers rebuilds it
        module, described = hf.load(folder, trust_code=trust_code)
        return LoadedModel(module, hf.SOURCE, record=described)
    else:
        source = open_source(path_or_ckpt, trust_code=trust_code)
        subject = str(source.path)
        kind, value = _read(source, trust_code)
    try:
        if kind in ("torchscript", "module-pickle") and spec is None:
            return LoadedModel(value.eval(), kind)
        if spec is not None:
            module = instantiate(spec)
            weights = value.state_dict() if kind in ("torchscript", "module-pickle") else value
            sd, selection = select_state_dict(weights, module, key=key)
            load_weights(module, sd, example_inputs=example_inputs, subject=subject)
            return LoadedModel(module, "spec", selection)
        if source is not None and source.kind == "torchscript":  # running it needs trust
            return LoadedModel(load_torchscript(source.file, trust_code=trust_code), "torchscript")
        text = value.metadata.get(ARCHITECTURE_KEY) if kind == "checkpoint" else None
        if text is None and kind == "checkpoint" and HF_KEY in value.metadata:
            module = hf.from_metadata(value.metadata, subject, trust_code=trust_code)
            sd, selection = select_state_dict(value, module, key=key)
            load_weights(module, sd, example_inputs=example_inputs, subject=subject)
            return LoadedModel(module, hf.SOURCE, selection, hf.record(value.metadata))
        if text is None:
            raise NoModelError(
                subject,
                "no model: the file holds weights only",
                remedy="pass --model path.py:Class",
            )
        rec = arch.loads(text, subject)
        module = arch.rebuild(rec, trust_code=trust_code, subject=subject)
        sd, selection = select_state_dict(value, module, key=key)
        load_weights(module, sd, example_inputs=example_inputs, subject=subject)
        return LoadedModel(module, "record", selection, rec)
    finally:
        if source is not None and source is not path_or_ckpt:
            source.close()  # the module holds the weights it needs
