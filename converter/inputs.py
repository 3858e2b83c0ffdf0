"""Example inputs: ``--input-shape 2,20`` / ``--input-dtype`` specs and seeded tensors."""

from __future__ import annotations

import re
from dataclasses import dataclass

from nnconv.formats import dtypes
from nnconv.formats.errors import UsageError

DEFAULT_DTYPE = "float32"


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, a concrete example shape and a torch dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str = DEFAULT_DTYPE

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict) -> InputSpec:
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]))


_SHAPE = re.compile(r"[1-9][0-9]*(?:[,x][1-9][0-9]*)*")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,20"`` or ``"2x3x224x224"`` -> (2, 20): positive integers separated by commas
    or ``x``, nothing else (``"2 20"`` is not ``(220,)``, ``"2,,20"`` not ``(2, 20)``)."""
    if not _SHAPE.fullmatch(str(text).strip()):
        raise UsageError(
            None,
            f"invalid input shape {text!r}",
            remedy="write positive sizes separated by commas, like 2,20 or 1,3,224,224",
        )
    return tuple(int(p) for p in str(text).strip().replace("x", ",").split(","))


def input_specs(shapes: list[str], dtype: str | None = None) -> list[InputSpec]:
    """Specs for ``--input-shape`` (repeatable) and one ``--input-dtype`` for all inputs."""
    dtype = dtype or DEFAULT_DTYPE
    dtypes.get(dtype)
    names = ["input"] if len(shapes) == 1 else [f"input_{i}" for i in range(len(shapes))]
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
            out.append(torch.randint(0, 10, spec.shape, generator=gen).to(torch_dtype))
    return tuple(out)


def graph_inputs(graph) -> tuple[list[InputSpec], dict[str, dict[int, str]], bool]:
    """An ONNX graph's declared inputs: specs (symbolic dims as 2), the symbolic axes, and
    whether initializers are listed as inputs (older exporters do)."""
    from nnconv.formats import onnx_format

    inits = {t.name for t in graph.initializer}
    specs, axes = [], {}
    for inp in graph.input:
        if inp.name in inits:
            continue
        tensor = inp.type.tensor_type
        dtype = onnx_format.ONNX_DTYPES.get(tensor.elem_type)
        if not (inp.type.HasField("tensor_type") and tensor.HasField("shape")) or dtype is None:
            raise ValueError(f"graph input {inp.name!r} is not a tensor of known type and rank")
        dims = tensor.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else 2 for d in dims)
        specs.append(InputSpec(inp.name, shape, dtype))
        symbolic = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
        axes[inp.name] = {i: dims[i].dim_param or f"{inp.name}_{i}" for i in symbolic}
    return specs, axes, any(i.name in inits for i in graph.input)
