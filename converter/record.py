"""nnconv's architecture record: enough of a module tree to rebuild it without a pickle.

A checkpoint carries only tensors; the record (stored as JSON under the
metadata key :data:`ARCHITECTURE_KEY`) names every module's class and, for
torch.nn built-ins, the constructor arguments read back from the module, so a
later ``nnconv`` run can rebuild a runnable model from a safetensors or HDF5
file alone.  User classes are recorded by import path; rebuilding imports and
calls them only with ``--trust-code`` (:mod:`nnconv.formats.trust`): a record
names, it does not import.  Built-ins are built on the ``meta`` device and
get the file's own tensors, so a record cannot make nnconv allocate memory.

Only :func:`build` and :func:`rebuild` import torch: ``inspect`` can show a
record (:func:`loads`, :func:`summary`) without paying for it.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import warnings
from typing import TYPE_CHECKING, Any

from nnconv.formats import trust
from nnconv.formats.errors import FormatError, UsageError
from nnconv.formats.keys import ARCHITECTURE_KEY

from . import locate
from .inputs import InputSpec

if TYPE_CHECKING:
    from torch import nn

VERSION = 1
BUILTIN_PREFIX = "torch.nn.modules."
MAX_DEPTH = 100  # a crafted record must not exhaust the recursion limit
CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")
_CLASS = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.<>]*$")
_SKIP_PARAMS = {"device", "dtype"}
_NOT_JSON = object()


# --- build --------------------------------------------------------------------


def build(
    module: nn.Module,
    inputs: list[InputSpec],
    *,
    model_args: dict[str, Any] | None = None,
    folder: str | os.PathLike[str] | None = None,
) -> dict:
    """The record of ``module`` (``model_args``: the keyword arguments its class was called
    with, needed to rebuild a user class at the root).  ``folder``: where the file that
    will hold the record lives; a class loaded from a ``.py`` file is then recorded with
    that file's path relative to it (``module_file``), so the record finds it again from
    any working folder."""
    if model_args is not None:
        try:
            json.dumps(model_args, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UsageError(None, f"--model-args must be plain JSON values: {exc}") from None
    return {
        "version": VERSION,
        "root": _node(module, "", model_args, folder),
        "inputs": [spec.to_json() for spec in inputs],
    }


def _node(module: nn.Module, path: str, model_args: dict | None, folder=None) -> dict:
    cls = type(module)
    node: dict[str, Any] = {"path": path, "class": f"{_import_name(cls)}:{cls.__qualname__}"}
    if cls.__module__.startswith(BUILTIN_PREFIX):
        if cls.__name__ not in CONTAINERS:
            args, child_args = _builtin_args(module)
            node["args"] = args
            if child_args:
                node["child_args"] = child_args
    else:
        if path == "" and model_args is not None:
            node["args"] = dict(model_args)
        node.update(locate.recorded_file(sys.modules.get(cls.__module__), folder))
    children = [
        _node(child, f"{path}.{name}" if path else name, None, folder)
        for name, child in module.named_children()
    ]
    if children:
        node["children"] = children
    return node


def _import_name(cls: type) -> str:
    """The module name another process would import: files that ``--model path.py:Class``
    loaded under a private name record the dotted name ``instantiate`` worked out."""
    return getattr(sys.modules.get(cls.__module__), "__nnconv_import_name__", cls.__module__)


def _json(value: Any) -> Any:
    import torch

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else _NOT_JSON
    if isinstance(value, (tuple, list, torch.Size)):
        items = [_json(v) for v in value]
        return _NOT_JSON if any(v is _NOT_JSON for v in items) else items
    return _NOT_JSON


def _builtin_args(module: nn.Module) -> tuple[dict | None, dict[str, str]]:
    """Constructor arguments of a torch.nn built-in, or None where they cannot be read."""
    special = _SPECIAL.get(type(module).__name__)
    if special is not None:
        return special(module)
    args: dict[str, Any] = {}
    params = list(inspect.signature(type(module).__init__).parameters.values())[1:]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _SKIP_PARAMS:
            continue
        required = p.default is p.empty
        if p.name.startswith("_") or not hasattr(module, p.name):
            if required:
                return None, {}
            continue
        value = getattr(module, p.name)
        if isinstance(p.default, bool) and not isinstance(value, bool):
            value = value is not None  # bias=True is stored as a Parameter (or None)
        value = _json(value)
        if value is _NOT_JSON:
            if required:
                return None, {}
            continue
        args[p.name] = value
    return args, {}


def _attention_args(m: Any) -> tuple[dict, dict]:
    return {
        "embed_dim": m.embed_dim,
        "num_heads": m.num_heads,
        "dropout": m.dropout,
        "bias": m.in_proj_bias is not None,
        "add_bias_kv": m.bias_k is not None,
        "add_zero_attn": m.add_zero_attn,
        "kdim": m.kdim,
        "vdim": m.vdim,
        "batch_first": m.batch_first,
    }, {}


def _transformer_layer_args(m: Any) -> tuple[dict | None, dict]:
    import torch.nn.functional as F

    args = {
        "d_model": m.self_attn.embed_dim,
        "nhead": m.self_attn.num_heads,
        "dim_feedforward": m.linear1.out_features,
        "dropout": m.dropout.p,
        "layer_norm_eps": m.norm1.eps,
        "batch_first": m.self_attn.batch_first,
        "norm_first": m.norm_first,
        "bias": m.linear1.bias is not None,
    }
    child_args = {}
    if m.activation is F.relu:
        args["activation"] = "relu"
    elif m.activation is F.gelu:
        args["activation"] = "gelu"
    elif "activation" in m._modules:
        child_args["activation"] = "activation"  # an nn.Module activation: its own node
    else:
        return None, {}  # a free function: nothing to record it by
    return args, child_args


def _stack_args(m: Any) -> tuple[dict, dict]:
    """TransformerEncoder/Decoder deep-copy one layer ``num_layers`` times."""
    args: dict[str, Any] = {"num_layers": m.num_layers}
    for name in ("enable_nested_tensor", "mask_check"):
        if hasattr(m, name):
            args[name] = bool(getattr(m, name))
    child_args = {"encoder_layer" if "Encoder" in type(m).__name__ else "decoder_layer": "layers.0"}
    if m.norm is not None:
        child_args["norm"] = "norm"
    return args, child_args


def _rnn_args(m: Any) -> tuple[dict, dict]:
    names = "input_size hidden_size num_layers bias batch_first dropout bidirectional"
    args = {name: getattr(m, name) for name in names.split()}
    if m.mode == "LSTM":
        args["proj_size"] = m.proj_size
    elif m.mode.startswith("RNN_"):
        args["nonlinearity"] = m.nonlinearity
    return args, {}


_SPECIAL = {
    "MultiheadAttention": _attention_args,
    "TransformerEncoderLayer": _transformer_layer_args,
    "TransformerDecoderLayer": _transformer_layer_args,
    "TransformerEncoder": _stack_args,
    "TransformerDecoder": _stack_args,
    # Not rebuildable from attributes: rebuilding needs --model.
    **{name: lambda m: (None, {}) for name in ("Transformer", "ParameterList", "ParameterDict")},
    "RNN": _rnn_args,
    "LSTM": _rnn_args,
    "GRU": _rnn_args,
}


# --- text ---------------------------------------------------------------------


def dumps(record: dict) -> str:
    """The record as compact JSON, the way metadata stores it."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads(text: str, subject: str | None = None) -> dict:
    """Parse and validate a stored record; FormatError naming ``subject`` on junk."""
    try:
        record = json.loads(text)
    except (ValueError, RecursionError, TypeError) as exc:
        raise FormatError(subject, f"{ARCHITECTURE_KEY} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("version") != VERSION:
        version = record.get("version") if isinstance(record, dict) else None
        raise FormatError(
            subject,
            f"{ARCHITECTURE_KEY} is not a version-{VERSION} architecture record "
            f"(version {version!r})",
        )
    _check_node(subject, record.get("root"), "", 0)
    inputs = record.get("inputs", [])
    try:
        if not isinstance(inputs, list):
            raise TypeError("not a list")
        for spec in inputs:
            InputSpec.from_json(spec)
    except (TypeError, ValueError, KeyError) as exc:
        raise FormatError(subject, f"{ARCHITECTURE_KEY}: malformed inputs ({exc})") from None
    return record


def _check_node(subject: str | None, node: Any, path: str, depth: int) -> None:
    def bad(problem: str) -> FormatError:
        return FormatError(subject, f"{ARCHITECTURE_KEY}: {problem} at {path or 'the root'!r}")

    if depth > MAX_DEPTH:
        raise bad(f"modules nested more than {MAX_DEPTH} deep")
    if not isinstance(node, dict) or node.get("path") != path:
        raise bad("malformed module entry")
    if not isinstance(node.get("class"), str) or not _CLASS.match(node["class"]):
        raise bad(f"invalid class name {node.get('class')!r}")
    if not isinstance(node.get("args", {}), (dict, type(None))):
        raise bad("args is not a map")
    if not all(isinstance(node.get(k, ""), str) for k in ("file", "module_file")):
        raise bad("file is not a path")
    child_args = node.get("child_args", {})
    if not isinstance(child_args, dict) or not all(isinstance(v, str) for v in child_args.values()):
        raise bad("child_args is not a map of names")
    children = node.get("children", [])
    if not isinstance(children, list):
        raise bad("children is not a list")
    for child in children:
        name = child.get("path", "").rsplit(".", 1)[-1] if isinstance(child, dict) else ""
        if not name:
            raise bad("a child has no name")
        _check_node(subject, child, f"{path}.{name}" if path else name, depth + 1)


# --- rebuild ------------------------------------------------------------------


def rebuild(record: dict, *, trust_code: bool = False, subject: str | None = None) -> nn.Module:
    """A module of the recorded architecture, to load the file's weights into.

    Without ``trust_code`` only torch.nn built-ins are called (never imported by a
    name the file chose) and on the ``meta`` device: nothing is allocated until
    the file's own tensors are assigned (``load_state_dict(assign=True)``).  A
    record naming any other class is refused, naming the classes.
    """
    import torch

    foreign = untrusted_classes(record)
    if foreign and not trust_code:
        raise trust.refuse(
            subject, "the architecture record names classes nnconv does not import", names=foreign
        )
    base = locate.base_folder(subject)
    with warnings.catch_warnings():  # e.g. TransformerEncoder's nested-tensor advice
        warnings.simplefilter("ignore")
        if foreign:  # trusted user classes: their constructors may not work on meta
            return _rebuild(record["root"], base)
        with torch.device("meta"):
            return _rebuild(record["root"], base)


def untrusted_classes(record: dict) -> list[str]:
    """The record's classes that are not torch.nn built-ins nnconv may call unasked."""
    names = {node["class"] for node, _ in _walk(record["root"], 0)}
    return sorted(n for n in names if n.replace(":", ".", 1) not in trust.NN_BUILTINS)


def _children(node: dict) -> dict[str, dict]:
    return {c["path"].rsplit(".", 1)[-1]: c for c in node.get("children", [])}


def _descendant(node: dict, relative: str) -> dict:
    for part in relative.split("."):
        found = _children(node).get(part)
        if found is None:
            raise FormatError(None, f"{ARCHITECTURE_KEY}: {node['class']} lacks child {part!r}")
        node = found
    return node


def _rebuild(node: dict, base=None) -> nn.Module:
    from collections import OrderedDict

    from torch import nn

    cls = _resolve(node, base)
    name = node["class"].rsplit(":", 1)[1]
    where = node["path"] or "the root"
    if not node["class"].startswith(BUILTIN_PREFIX):
        return _call(cls, node.get("args") or {}, node)
    if name in ("Sequential", "ModuleDict"):
        built = OrderedDict((key, _rebuild(c, base)) for key, c in _children(node).items())
        return nn.Sequential(built) if name == "Sequential" else nn.ModuleDict(built)
    if name == "ModuleList":
        return nn.ModuleList([_rebuild(c, base) for c in node.get("children", [])])
    if node.get("args") is None:
        raise UsageError(
            None,
            f"the architecture record cannot rebuild {where}: nnconv does not record "
            f"the constructor arguments of {name}",
            remedy="pass --model path.py:Class",
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in node["args"].items()}
    for arg, relative in node.get("child_args", {}).items():
        kwargs[arg] = _rebuild(_descendant(node, relative), base)
    return _call(cls, kwargs, node)


def _call(cls: type, kwargs: dict, node: dict) -> nn.Module:
    try:
        return cls(**kwargs)
    except Exception as exc:  # the constructor's own complaint, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            None,
            f"rebuilding {node['class']} at {node['path'] or 'the root'} failed: {first}",
            remedy="pass --model path.py:Class (and --model-args)",
        ) from None


def _resolve(node: dict, base=None) -> type:
    """Import the recorded class (trusted records only, see :func:`.locate.class_module`);
    only nn.Module subclasses are accepted."""
    from torch import nn

    qualname = node["class"].split(":", 1)[1]
    obj, hint = locate.class_module(node, base)

    def fail(problem: str) -> UsageError:
        return UsageError(None, problem, remedy=f"pass --model {hint}")

    if obj is None:
        where = f" and {locate.file_name(node)} is not where the record says"
        where = where if node.keys() & {"file", "module_file"} else ""
        raise fail(f"cannot rebuild the model: class {node['class']} is not importable{where}")
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise fail(f"cannot rebuild the model: {node['class']} is not a torch.nn.Module class")
    return obj


# --- summary ------------------------------------------------------------------


def summary(record: dict, *, max_lines: int = 40) -> list[str]:
    """Short lines describing the record, for ``nnconv inspect``."""
    lines: list[str] = []
    nodes = list(_walk(record["root"], 0))
    for node, depth in nodes[:max_lines]:
        module_name, name = node["class"].rsplit(":", 1)
        if not module_name.startswith(BUILTIN_PREFIX):
            label = f"{name.rsplit('.', 1)[-1]} ({node['class']})"
        elif node.get("args"):
            label = f"{name}({', '.join(f'{k}={_show(v)}' for k, v in node['args'].items())})"
        else:
            label = name
        own = node["path"].rsplit(".", 1)[-1]
        lines.append(f"{'  ' * depth}{own}: {label}" if node["path"] else label)
    if len(nodes) > max_lines:
        lines.append(f"... and {len(nodes) - max_lines} more modules")
    inputs = [InputSpec.from_json(s) for s in record.get("inputs", [])]
    shown = ", ".join(f"{s.name} {s.dtype}[{', '.join(map(str, s.shape))}]" for s in inputs)
    lines.append(f"inputs: {shown or 'none recorded'}")
    return lines


def _walk(node: dict, depth: int):
    yield node, depth
    for child in node.get("children", []):
        yield from _walk(child, depth + 1)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return f"({', '.join(_show(v) for v in value)}{',' if len(value) == 1 else ''})"
    return repr(value)
