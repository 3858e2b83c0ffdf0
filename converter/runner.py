"""Forward passes for ``nnconv verify``: every side run on the same inputs, outputs by name.

Parameters can match while outputs do not (a wrong architecture, a folded
export, an operator that differs between runtimes), so each file that can be
run becomes a :class:`Runner`: a torch module (from ``--model``, the
architecture record, a whole-module pickle or TorchScript) or an onnxruntime
session.  Outputs come back as named leaves on the CPU (:func:`.golden.flatten`)
so that any two runtimes compare leaf by leaf; :func:`capture_modules` and
:func:`first_divergence` point at the first submodule whose output differs.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from nnconv.formats.errors import NnconvError, NoModelError, UnsupportedError, UsageError
from nnconv.formats.source import Source, open_source

from . import hf, models
from .export_pt2 import pt2_runner
from .golden import OutputAlignment, align_outputs, flatten, resolve_inputs
from .inputs import InputSpec, graph_inputs
from .state_dicts import _first_line

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "HFRunner",
    "OnnxRunner",
    "OutputAlignment",
    "Runner",
    "TorchRunner",
    "align_outputs",
    "capture_modules",
    "devices_for",
    "first_divergence",
    "flatten",
    "make_runner",
    "resolve_inputs",
]

PathLike = str | os.PathLike[str]
Feed = Any  # the inputs of a run: tensors in order, or a mapping of input name -> tensor
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


class Runner(Protocol):
    """One side of a verification: something that runs a forward pass."""

    label: str
    is_torch: bool

    def input_specs(self) -> list[InputSpec] | None: ...

    def run(self, inputs: Feed, *, device: str) -> dict[str, torch.Tensor]: ...


# --- runners --------------------------------------------------------------------


@dataclass
class TorchRunner:
    """A torch module in eval mode; moved to the device each run."""

    model: models.LoadedModel
    path: str | None = None
    notes: list[str] = field(default_factory=list)
    is_torch: ClassVar[bool] = True

    @property
    def module(self) -> nn.Module:
        return self.model.module

    @property
    def label(self) -> str:
        return f"torch ({self.model.source})"

    def input_specs(self) -> list[InputSpec] | None:
        specs = [InputSpec.from_json(s) for s in (self.model.record or {}).get("inputs", [])]
        return specs or None

    def run(self, inputs: Feed, *, device: str = "cpu") -> dict[str, torch.Tensor]:
        return call_module(self.module.to(device).eval(), inputs, device, self.path, self.label)


@dataclass
class HFRunner(TorchRunner):
    """A transformers model, called by keyword (``input_ids=...``), without the KV cache."""

    def input_specs(self) -> list[InputSpec] | None:
        return [InputSpec.from_json(s) for s in (self.model.record or {}).get("inputs", [])]

    def run(self, inputs: Feed, *, device: str = "cpu") -> dict[str, torch.Tensor]:
        names = [s.name for s in self.input_specs() or []]
        return super().run(hf.keyword_inputs(names, inputs), device=device)


@dataclass
class OnnxRunner:
    """An onnxruntime session per device, made on first use (CPU, or CUDA when asked
    for and onnxruntime has it).  Outputs are named by position: ``output`` or
    ``output.0``, ``output.1``..., which is how torch names a tensor or a tuple."""

    path: str
    specs: list[InputSpec] | None = None
    notes: list[str] = field(default_factory=list)
    sessions: dict[str, Any] = field(default_factory=dict, repr=False)
    is_torch: ClassVar[bool] = False

    @property
    def label(self) -> str:
        used = [s.get_providers()[0] for s in self.sessions.values()] or [CPU_PROVIDER]
        return f"onnxruntime ({', '.join(dict.fromkeys(used))})"

    def input_specs(self) -> list[InputSpec] | None:
        return list(self.specs) if self.specs else None

    def session(self, device: str = "cpu") -> Any:
        """The session for ``device`` ("cpu", "cuda" or "cuda:N"), created once."""
        import onnxruntime as ort

        key = "cpu" if device == "cpu" else device
        if key in self.sessions:
            return self.sessions[key]
        providers: list[Any] = [CPU_PROVIDER]
        if key != "cpu":
            if CUDA_PROVIDER in ort.get_available_providers():
                index = int(key.partition(":")[2] or 0)
                providers.insert(0, (CUDA_PROVIDER, {"device_id": index}))
            else:
                self.notes.append(f"onnxruntime has no {CUDA_PROVIDER}: the {key} pass ran on CPU")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the library never prints
        try:
            session = ort.InferenceSession(self.path, options, providers=providers)
        except Exception as exc:
            raise UnsupportedError(
                self.path, f"onnxruntime cannot load the model: {_first_line(exc)}"
            ) from None
        if key != "cpu" and len(providers) > 1 and session.get_providers()[0] != CUDA_PROVIDER:
            self.notes.append(f"onnxruntime could not start {CUDA_PROVIDER}: {key} ran on CPU")
        self.sessions[key] = session
        return session

    def run(self, inputs: Feed, *, device: str = "cpu") -> dict[str, torch.Tensor]:
        import numpy as np
        import torch

        session = self.session(device)
        names = [i.name for i in session.get_inputs()]
        if isinstance(inputs, Mapping) and (len(names) > 1 or set(inputs) == set(names)):
            inputs = [inputs[n] if n in inputs else _no_input(self.path, n) for n in names]
        elif isinstance(inputs, Mapping):  # one input: its name in the graph does not matter
            inputs = list(inputs.values())
        if len(inputs) != len(names):
            raise UsageError(
                self.path,
                f"the ONNX graph takes {len(names)} input(s) ({', '.join(names)}), "
                f"got {len(inputs)}",
            )
        feed = {n: _to_numpy(t, self.path, n) for n, t in zip(names, inputs, strict=True)}
        try:
            results = session.run(None, feed)
        except Exception as exc:
            raise _run_failed(self.path, self.label, device, exc) from None
        out: dict[str, torch.Tensor] = {}
        for i, value in enumerate(results):
            if isinstance(value, np.ndarray) and value.dtype != object:
                name = "output" if len(results) == 1 else f"output.{i}"
                out[name] = torch.from_numpy(np.array(value, copy=True, order="C"))
        return out


def _to_numpy(t: torch.Tensor, path: str, name: str):
    try:
        return t.detach().cpu().contiguous().numpy()
    except TypeError:
        raise UnsupportedError(
            path, f"input {name!r}: onnxruntime cannot take {t.dtype} tensors from numpy"
        ) from None


def _no_input(path: str, name: str):
    raise UsageError(path, f"no input named {name!r} for the ONNX graph")


def call_module(
    module: Any, inputs: Feed, device: str, path: str | None, label: str
) -> dict[str, torch.Tensor]:
    """``module`` (already on ``device``) called on ``inputs`` (by keyword when named)
    without autograd at full precision; its outputs as named CPU leaves, a failure as one
    UsageError naming the file."""
    import torch

    named = isinstance(inputs, Mapping)  # --input NAME=...: by keyword
    args = [] if named else [t.to(device) for t in inputs]
    kwargs = {k: v.to(device) for k, v in inputs.items()} if named else {}
    try:
        with torch.no_grad(), _full_precision(device):
            result = module(*args, **kwargs)
    except NnconvError:
        raise
    except Exception as exc:
        raise _run_failed(path, label, device, exc) from None
    return {k: v.detach().cpu() for k, v in flatten(result).items()}


def _run_failed(path: str | None, label: str, device: str, exc: BaseException) -> UsageError:
    return UsageError(
        path,
        f"the forward pass ({label}, {device}) failed: {_first_line(exc)}",
        remedy="check --input-shape and --input-dtype",
    )


@contextlib.contextmanager
def _full_precision(device: str) -> Iterator[None]:
    """No TF32 on CUDA while comparing: it alone moves float32 outputs by ~1e-3."""
    import torch

    owners = [] if device == "cpu" else [torch.backends.cuda.matmul, torch.backends.cudnn]
    saved = [(owner, _set_tf32(owner, False)) for owner in owners]
    try:
        yield
    finally:
        for owner, value in saved:
            if value is not None:
                _set_tf32(owner, value)


def _set_tf32(owner: Any, value: bool) -> bool | None:
    """Set ``allow_tf32``, giving the old value; None where torch deprecates or refuses it."""
    with warnings.catch_warnings(), contextlib.suppress(Exception):
        warnings.simplefilter("ignore")
        old = bool(owner.allow_tf32)
        owner.allow_tf32 = value
        return old
    return None


def make_runner(
    path: PathLike | Source,
    *,
    spec: models.ModelSpec | str | None = None,
    key: str | None = None,
    trust_code: bool = False,
    example_inputs: tuple | None = None,
) -> Runner | None:
    """A runner for ``path``, or None when it holds weights only and no model is known
    (no ``spec``, no architecture record): the caller checks parameters only.  ONNX
    files run in onnxruntime; ``spec`` and ``key`` apply to the other formats."""
    if not isinstance(path, Source) and hf.is_folder(path):
        return _model_runner(path, spec, key, trust_code, example_inputs)
    with contextlib.ExitStack() as stack:
        source = path if isinstance(path, Source) else stack.enter_context(open_source(path))
        run = RUNTIMES.get(source.capabilities.runtime or "")  # a program the file holds
        if run is not None:
            return run(source, trust_code=trust_code)
        return _model_runner(source, spec, key, trust_code, example_inputs)


def _model_runner(
    path: PathLike | Source,
    spec: models.ModelSpec | str | None,
    key: str | None,
    trust_code: bool,
    example_inputs: tuple | None,
) -> Runner | None:
    if isinstance(spec, str):
        spec = models.parse_spec(spec)
    try:
        loaded = models.load_model(
            path, spec=spec, key=key, example_inputs=example_inputs, trust_code=trust_code
        )
    except NoModelError:
        if spec is None:
            return None
        raise
    shown = str(getattr(path, "path", path))
    if loaded.source == hf.SOURCE:
        return HFRunner(loaded, shown)
    return TorchRunner(loaded, shown)


def _graph_runner(source: Source, *, trust_code: bool = False) -> OnnxRunner:
    """onnxruntime on the file.  Reading the initializers first checks external data stays
    inside the model's folder (onnxruntime confines it too); initializers nnconv cannot
    decode are onnxruntime's business."""
    metadata: dict[str, str] = {}
    with contextlib.suppress(UnsupportedError):
        metadata = source.checkpoint().metadata
    try:
        specs = graph_inputs(source.graph().graph)[0]
    except ValueError:
        specs = None
    described = hf.recorded_inputs(metadata)
    if specs and described and [s.name for s in described] == [s.name for s in specs]:
        specs = described  # the exported model's own inputs: token ids in range, mask of ones
    return OnnxRunner(str(source.path), specs)


# The runtime a format declares (Capabilities.runtime) -> the runner for its files; a
# .pt2 program runs only with trust (see export_pt2).
RUNTIMES: dict[str, Callable[..., Runner]] = {
    "onnxruntime": _graph_runner,
    "torch.export": pt2_runner,
}


# --- devices ------------------------------------------------------------------


def devices_for(request: str) -> list[str]:
    """``--device cpu|cuda|all``: the devices to run on; "all" adds CUDA when present."""
    if request not in ("cpu", "cuda", "all"):
        raise UsageError(None, f"unknown --device {request!r}", remedy="use cpu, cuda or all")
    if request == "cpu":  # no torch import: comparing weights alone never needs it
        return ["cpu"]
    import torch

    cuda = torch.cuda.is_available()
    if request == "cuda" and not cuda:
        raise UsageError(None, "--device cuda: CUDA is not available", remedy="use --device cpu")
    if request == "cuda":
        return ["cuda"]
    return ["cpu", "cuda"] if request == "all" and cuda else ["cpu"]


# --- first divergence --------------------------------------------------------------


def capture_modules(
    runner: Runner, inputs: Feed, *, device: str = "cpu"
) -> list[tuple[str, torch.Tensor]]:
    """(module path, first tensor of its output) for every submodule call, in execution
    order, copied to the CPU; [] where hooks cannot see inside (ONNX, TorchScript)."""
    import torch

    module = getattr(runner, "module", None)
    if not runner.is_torch or module is None or isinstance(module, torch.jit.ScriptModule):
        return []
    trace: list[tuple[str, torch.Tensor]] = []

    def hook(name: str):
        def record(_module, _args, output) -> None:
            leaves = flatten(output)
            if leaves:  # a copy: a later in-place op (ReLU(inplace=True)) must not alter it
                trace.append((name, next(iter(leaves.values())).detach().to("cpu", copy=True)))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if n]
    try:
        runner.run(inputs, device=device)
    finally:
        for handle in handles:
            handle.remove()
    return trace


def first_divergence(
    ref_trace: list[tuple[str, torch.Tensor]],
    cand_trace: list[tuple[str, torch.Tensor]],
    *,
    atol: float,
    rtol: float,
) -> str | None:
    """The first module, in the reference's call order, present in both traces with the
    same shape, whose output differs beyond ``|a - b| <= atol + rtol * |b|``."""
    calls: Counter[str] = Counter()
    cand: dict[tuple[str, int], torch.Tensor] = {}
    for name, t in cand_trace:
        cand[(name, calls[name])] = t
        calls[name] += 1
    calls.clear()
    for name, a in ref_trace:
        b = cand.get((name, calls[name]))
        calls[name] += 1
        if b is not None and a.shape == b.shape and not _close(a, b, atol, rtol):
            return name
    return None


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> bool:
    import torch

    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    a, b = a.to(wide), b.to(wide)
    return bool(torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True).all())
