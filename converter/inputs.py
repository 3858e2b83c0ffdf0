"""Example inputs: ``--input-shape 2,20`` / ``--input-dtype`` specs and seeded tensors."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nnconv.formats import dtypes
from nnconv.formats.errors import FormatError, NnconvError, UsageError

DEFAULT_DTYPE = "float32"


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, a concrete example shape and a torch dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str = DEFAULT_DTYPE
    high: int | None = None  # integer inputs: values below this (an Embedding's size)
    low: int | None = None  # integer inputs: values from this (1 with high 2: a mask of ones)

    def to_json(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        out = {**out, "high": self.high} if self.high is not None else out
        return {**out, "low": self.low} if self.low is not None else out

    @classmethod
    def from_json(cls, data: dict) -> InputSpec:
        high = data.get("high")
        return cls(
            str(data["name"]),
            tuple(int(d) for d in data["shape"]),
            str(data["dtype"]),
            int(high) if high is not None and int(high) > 0 else None,
            int(data["low"]) if data.get("low") is not None else None,
        )

    def describe(self) -> str:
        """``2×20 float32``."""
        return f"{'×'.join(map(str, self.shape))} {self.dtype}"


_SHAPE = re.compile(r"[1-9][0-9]*(?:[,x][1-9][0-9]*)*")


def parse_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"2,20"`` or ``"2x3x224x224"`` -> (2, 20): positive integers separated by commas
    or ``x``, nothing else (``"2 20"`` is not ``(220,)``, ``"2,,20"`` not ``(2, 20)``);
    the library may pass the tuple itself."""
    if not isinstance(text, str) and isinstance(text, Sequence):
        text = ",".join(str(d) if type(d) is int else repr(d) for d in text)
    if not _SHAPE.fullmatch(str(text).strip()):
        raise UsageError(
            None,
            f"invalid input shape {text!r}",
            remedy="write positive sizes separated by commas, like 2,20 or 1,3,224,224",
        )
    return tuple(int(p) for p in str(text).strip().replace("x", ",").split(","))


Shapes = str | Sequence[int] | Sequence[str | Sequence[int]]
ExampleInputs = Any  # a tensor, a sequence of tensors, or a mapping of name -> tensor


def given_inputs(
    inputs: ExampleInputs | None, shapes: Any = (), dtype: str | None = None
) -> tuple[list[InputSpec], tuple | None, bool]:
    """The library's ``example_inputs``: (specs, tensors, by name) from a tensor, a tuple
    or list of them, or a dict by input name; ``([], None, False)`` when not given."""
    if inputs is None:
        return [], None, False
    if shapes or dtype:
        raise UsageError(None, "example_inputs excludes --input-shape and --input-dtype")
    items = tensor_items(inputs, subject="example_inputs", error=UsageError)
    names = [n or d for (n, _), d in zip(items, default_names(len(items)), strict=True)]
    specs = [spec_of(n, t) for n, (_, t) in zip(names, items, strict=True)]
    return specs, tuple(t for _, t in items), isinstance(inputs, Mapping)


def default_names(count: int) -> list[str]:
    """Names for inputs given by position: ``input``, or ``input_0``, ``input_1``..."""
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def spec_of(name: str, tensor: Any) -> InputSpec:
    """The spec of an input given as a tensor."""
    return InputSpec(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))


def tensor_items(
    obj: Any, *, subject: Any, error: type[NnconvError] = FormatError
) -> list[tuple[str | None, Any]]:
    """Inputs given as a tensor, a list or tuple of them, or a mapping by name (an
    inputs file's object or the library's ``example_inputs``): (name or None, tensor)."""
    import torch

    if isinstance(obj, torch.Tensor):
        items: list[tuple[str | None, Any]] = [(None, obj)]
    elif isinstance(obj, Mapping):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(None, v) for v in obj]
    else:
        raise error(
            subject, f"inputs must be a tensor, list, tuple or dict, not {type(obj).__name__}"
        )
    for name, value in items:
        if not isinstance(value, torch.Tensor):
            where = f"input {name!r}" if name else "an input"
            raise error(subject, f"{where} is a {type(value).__name__}, not a tensor")
    if not items:
        raise error(subject, "holds no input tensors")
    return [(n, t.detach()) for n, t in items]


_NAMED = re.compile(r"([A-Za-z_][\w.]*)=([^:]*)(?::(\w+))?")


def named_specs(texts: Sequence[str]) -> list[InputSpec]:
    """``--input NAME=SHAPE[:DTYPE]`` (``input_ids=2,16:int64``): inputs passed to the
    model by keyword and to onnxruntime by name, each with its own dtype."""
    specs = []
    for text in texts:
        found = _NAMED.fullmatch(str(text).strip())
        if found is None:
            raise UsageError(
                None,
                f"invalid --input {str(text)!r}",
                remedy="write NAME=SHAPE[:DTYPE], e.g. --input input_ids=2,16:int64",
            )
        name, shape, dtype = found.groups()
        if dtype:
            dtypes.get(dtype)
        specs.append(InputSpec(name, parse_shape(shape), dtype or DEFAULT_DTYPE))
    if len({s.name for s in specs}) != len(specs):
        raise UsageError(None, "--input names repeat: " + ", ".join(s.name for s in specs))
    return specs


def by_name(specs: Sequence[InputSpec], tensors: Sequence[Any]) -> dict[str, Any]:
    """The inputs as keyword arguments (what a runner takes for named inputs)."""
    return dict(zip((s.name for s in specs), tensors, strict=True))


def shape_list(shapes: Any) -> list:
    """The library's ``input_shapes``: one shape (``"2,20"``, ``(2, 20)``) or several."""
    if shapes is None:
        return []
    if isinstance(shapes, str) or (
        isinstance(shapes, Sequence) and shapes and all(type(d) is int for d in shapes)
    ):
        return [shapes]
    return list(shapes)


def input_specs(shapes: list[str], dtype: str | None = None) -> list[InputSpec]:
    """Specs for ``--input-shape`` (repeatable) and one ``--input-dtype`` for all inputs."""
    dtype = dtype or DEFAULT_DTYPE
    dtypes.get(dtype)
    names = default_names(len(shapes))
    return [InputSpec(n, parse_shape(s), dtype) for n, s in zip(names, shapes, strict=True)]


def example_tensors(specs: list[InputSpec], *, seed: int = 0) -> tuple:
    """Seeded random tensors for ``specs``: normal floats, small non-negative integers."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        torch_dtype = getattr(torch, spec.dtype)
        if torch_dtype.is_floating_point:
            out.append(torch.randn(spec.shape, generator=gen).to(torch_dtype))
        elif torch_dtype == torch.bool:
            out.append(torch.randint(0, 2, spec.shape, generator=gen).bool())
        else:
            high = min(10, spec.high) if spec.high else 10
            low = min(spec.low or 0, high - 1)
            out.append(torch.randint(low, high, spec.shape, generator=gen).to(torch_dtype))
    return tuple(out)


def graph_inputs(graph) -> tuple[list[InputSpec], dict[str, dict[int, str]], bool]:
    """An ONNX graph's declared inputs: specs (symbolic dims as 2), the symbolic axes, and
    whether initializers are listed as inputs (older exporters do)."""
    inits = {t.name for t in graph.initializer}
    specs, axes = [], {}
    for inp in graph.input:
        if inp.name in inits:
            continue
        tensor = inp.type.tensor_type
        known = dtypes.BY_ONNX.get(tensor.elem_type)
        dtype = known and known.name
        if not (inp.type.HasField("tensor_type") and tensor.HasField("shape")) or dtype is None:
            raise ValueError(f"graph input {inp.name!r} is not a tensor of known type and rank")
        dims = tensor.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else 2 for d in dims)
        specs.append(InputSpec(inp.name, shape, dtype))
        symbolic = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
        axes[inp.name] = {i: dims[i].dim_param or f"{inp.name}_{i}" for i in symbolic}
    return specs, axes, any(i.name in inits for i in graph.input)


# --- inputs derived from the model's first layer ------------------------------------

# The first layer's kind -> (shape after the batch and channel/feature size, dtype).
_CONV_SIZES = {"Conv1d": (32,), "Conv2d": (32, 32), "Conv3d": (8, 8, 8)}
EMBEDDING_LENGTH = 16


@dataclass(frozen=True)
class Derivation:
    """What the model's first layer says about its inputs: ``specs`` when they could be
    derived (and ran through the model), else ``why_not``.  ``exact``: every dimension
    but the batch follows from the layer (a Linear), so the shape is the model's own."""

    layer: str | None  # "fc1: Linear(20 → 64)"; None when no parameterised layer
    specs: list[InputSpec] | None = None
    exact: bool = False
    why_not: str | None = None
    example: str | None = None  # an --input-shape to suggest when nothing was derived

    @property
    def note(self) -> str:
        shown = ", ".join(s.describe() for s in self.specs or [])
        return (
            f"inputs: {shown}, derived from the first layer {self.layer}; "
            "pass --input-shape to choose"
        )

    @property
    def remedy(self) -> str:
        if self.example:
            return f"pass --input-shape, e.g. {self.example}"
        return "pass --input-shape with the model's whole input shape, batch first"


def derive_inputs(module) -> list[InputSpec] | None:
    """Input specs derived from ``module``'s first layer, or None where that is ambiguous."""
    return derivation(module).specs


def derivation(module) -> Derivation:
    """Derive example inputs from the first parameterised module in definition order:
    ``Linear(in → …)`` -> 2×in, ``Conv2d(C → …)`` -> 1×C×32×32 (Conv1d 1×C×32, Conv3d
    1×C×8×8×8), ``Embedding(n, d)`` -> int64 2×16 below n.  The inputs must then run
    through the whole model, that layer first; anything else derives nothing."""
    import torch

    if isinstance(module, torch.jit.ScriptModule):
        return Derivation(None, why_not="a TorchScript model does not show its layers")
    found = _first_layer(module)
    if found is None:
        return Derivation(None, why_not="the model has no parameterised layer to tell them")
    names = {id(sub): name for name, sub in module.named_modules()}
    tried: set[int] = set()
    while True:
        name, layer = found
        text = f"{name}: {_kind(layer)}" if name else _kind(layer)
        spec, example = _spec_for(layer)
        if spec is None or next(layer.children(), None) is not None:
            return Derivation(text, why_not=f"the model's first layer ({text}) does not tell them")
        tried.add(id(layer))
        error, ran_first = _trial(module, layer, spec)
        if ran_first is not None and id(ran_first) not in tried:  # execution order decides
            found = names.get(id(ran_first), ""), ran_first
            continue
        if error:
            why = f"{spec.describe()} derived from the first layer {text} did not run: {error}"
            return Derivation(text, why_not=why, example=example)
        return Derivation(text, [spec], exact=type(layer) is torch.nn.Linear, example=example)


def _first_layer(module):
    """(path, module) of the first module holding parameters of its own, or None."""
    for name, sub in module.named_modules():
        if _owns_parameters(sub):
            return name, sub
    return None


def _owns_parameters(module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _kind(layer) -> str:
    kind = type(layer).__name__
    if kind == "Linear":
        return f"Linear({layer.in_features} → {layer.out_features})"
    if kind in _CONV_SIZES:
        size = "×".join(map(str, layer.kernel_size))
        return f"{kind}({layer.in_channels} → {layer.out_channels}, {size})"
    if kind == "Embedding":
        return f"Embedding({layer.num_embeddings}, {layer.embedding_dim})"
    extra = layer.extra_repr().replace("\n", " ")
    return f"{kind}({extra[:57] + '...' if len(extra) > 60 else extra})" if extra else kind


def _spec_for(layer) -> tuple[InputSpec | None, str | None]:
    """The derived spec and an ``--input-shape`` to suggest (a typical size)."""
    from torch import nn

    kind = type(layer)
    if kind is nn.Linear:
        return InputSpec("input", (2, layer.in_features)), f"--input-shape 2,{layer.in_features}"
    if kind.__module__.startswith("torch.nn.") and kind.__name__ in _CONV_SIZES:
        channels = layer.in_channels
        typical = {"Conv1d": "128", "Conv2d": "224,224", "Conv3d": "16,112,112"}[kind.__name__]
        spec = InputSpec("input", (1, channels, *_CONV_SIZES[kind.__name__]))
        return spec, f"--input-shape 1,{channels},{typical}"
    if kind is nn.Embedding:
        spec = InputSpec("input", (2, EMBEDDING_LENGTH), "int64", high=layer.num_embeddings)
        return spec, "--input-shape 2,128 --input-dtype int64"
    return None, None


class _Stop(Exception):
    pass


def _trial(module, layer, spec: InputSpec):
    """Run ``spec`` through ``module`` once: (None, None) when it ran with ``layer`` the
    first parameterised module called; else (why not, the module that ran first)."""
    import torch

    first: list = []

    def pre_hook(sub, _args) -> None:
        if not first:
            first.append(sub)
            if sub is not layer:
                raise _Stop

    handles = [
        m.register_forward_pre_hook(pre_hook) for m in module.modules() if _owns_parameters(m)
    ]
    modes = [(m, m.training) for m in module.modules()]  # eval: no running stats updated
    device = next(layer.parameters()).device
    try:
        module.eval()
        with torch.no_grad():
            module(*(t.to(device) for t in example_tensors([spec])))
    except _Stop:
        return "another layer runs first", first[0]
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return (text[0][:200] if text else type(exc).__name__), None
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    return (None, None) if first else ("the layer never ran", None)
