"""Decoder LMs exported with their KV cache (``convert --with-past``), as optimum does.

The graph takes ``input_ids``, ``attention_mask`` (covering the past and the new tokens)
and ``past_key_values.{i}.key`` / ``.value`` (batch × kv heads × past length × head dim,
float32), and gives ``logits`` and ``present.{i}.key`` / ``.value``.  The batch, the new
tokens' length (``sequence_length``) and the past length (``past_sequence_length``) are
dynamic, as in optimum's graphs (:func:`dynamic_axes`), so that one graph serves the prompt
(past length 0) and every decoding step (one new token).  One wrapper,
:class:`WithPast`, builds a transformers ``DynamicCache`` from the past tensors and is
both what is exported and what the torch side of ``verify`` runs, so that both sides see
the same past.  The :data:`HF_KEY` record says so (``"past"``) and lists every
input, so that ``verify HF_DIR m.onnx`` feeds the folder's model the same past.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from nnconv.formats.errors import UnsupportedError, UsageError

from . import hf
from .inputs import InputSpec

if TYPE_CHECKING:
    from torch import nn

    from .models import LoadedModel

PAST_KEY = "past"  # in the hf record: {"length": the example's past length, "layers": n}
PAST_LENGTH = 4  # the example the graph is traced with; the graph takes any length
SEQUENCE, PAST = "sequence_length", "past_sequence_length"  # optimum's dimension names
TOTAL = f"{PAST} + {SEQUENCE}"  # the mask and the presents
FLAG_HELP = "ONNX from an HF decoder LM: past key/values as inputs and outputs."


def option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--with-past`` on ``nnconv convert`` (the command passes it to OnnxOptions)."""
    import click

    return click.option("--with-past", is_flag=True, help=FLAG_HELP)(command)


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def output_names(record: dict | None) -> list[str] | None:
    """``logits``, ``present.{i}.key``, ``present.{i}.value``; None without past."""
    past = (record or {}).get(PAST_KEY)
    if not isinstance(past, dict):
        return None
    names = past_names(int(past["layers"]))
    return ["logits", *(n.replace("past_key_values.", "present.") for n in names)]


def dynamic_axes(layers: int) -> dict[str, dict[int, str]]:
    """The dynamic dimensions besides the batch, by input and output name, as optimum
    names them: the new tokens' length, the past length, and past + new for the mask and
    the presents."""
    axes = {"input_ids": {1: SEQUENCE}, "attention_mask": {1: TOTAL}, "logits": {1: SEQUENCE}}
    for name in past_names(layers):
        axes[name] = {2: PAST}
        axes[name.replace("past_key_values.", "present.")] = {2: TOTAL}
    return axes


class _WithPast:
    """Marker base; the module class is made per layer count (see :func:`wrap`)."""


def wrap(model: nn.Module, layers: int) -> nn.Module:
    """``model`` called with a cache built from flat past tensors: positional arguments
    (``input_ids, attention_mask, past_0_key, ...``: what the exporters trace) or by the
    graph's names.  The wrapper's parameters keep the model's own names (it holds the
    model's children, not the model), so that the ONNX initializers are the model's."""
    from torch import nn

    names = ["input_ids", "attention_mask", *past_names(layers)]

    class WithPast(nn.Module, _WithPast):
        def __init__(self) -> None:
            super().__init__()
            object.__setattr__(self, "inner", model)  # not a submodule: no "inner." prefix
            for name, child in model.named_children():
                self.add_module(name, child)
            for name, param in model.named_parameters(recurse=False):
                self.register_parameter(name, param)
            for name, buf in model.named_buffers(recurse=False):
                self.register_buffer(name, buf)
            self.config = model.config
            self.input_names = names
            self.onnx_dynamic_axes = dynamic_axes(layers)  # export_onnx's default

        def forward(self, *args: Any, **named: Any) -> dict[str, Any]:
            if named:
                args = (*args, *(named[n] for n in names[len(args) :]))
            return _run(self.inner, args[0], args[1], args[2:])

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [
        inspect.Parameter(n.replace(".", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for n in names
    ]  # torch.export binds the example inputs to these: one dynamic shape each
    WithPast.forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return WithPast().eval()


def _run(model: Any, input_ids: Any, attention_mask: Any, past: Sequence[Any]) -> dict[str, Any]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(len(past) // 2):
        cache.update(past[2 * i], past[2 * i + 1], i)
    given = {_cache_keyword(model): cache}
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **given)
    result = {"logits": out.logits}
    for i, layer in enumerate(_cache_of(out).layers):
        result[f"present.{i}.key"] = layer.keys
        result[f"present.{i}.value"] = layer.values
    return result


def _cache_keyword(model: Any) -> str:
    """``cache`` (transformers 5.2x), ``past_key_values`` before it."""
    accepted = inspect.signature(model.forward).parameters
    return "cache" if "cache" in accepted else "past_key_values"


def _cache_of(output: Any) -> Any:
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values


def specs(model: nn.Module, base: list[InputSpec], length: int = PAST_LENGTH) -> list[InputSpec]:
    """The inputs with past: the config's token ids, a mask over past + new tokens, and
    past key/values shaped as the model's own cache (found by one short forward pass)."""
    import torch

    ids = next((s for s in base if s.name == "input_ids"), None)
    if ids is None or {s.name for s in base} - {"input_ids", "attention_mask"}:
        raise UsageError(
            None,
            f"--with-past applies to decoder LMs taking input_ids, not {type(model).__name__}",
        )
    batch, new = ids.shape
    try:
        with torch.no_grad(), hf._quiet_transformers():
            probe = torch.zeros((batch, length), dtype=torch.int64)
            cache = _cache_of(model(input_ids=probe, attention_mask=probe + 1, use_cache=True))
        shapes = [(tuple(x.keys.shape), tuple(x.values.shape)) for x in cache.layers]
    except Exception as exc:
        raise UnsupportedError(
            None, f"--with-past: {type(model).__name__} gives no KV cache: {hf._first_line(exc)}"
        ) from None
    out = [ids, hf._ones("attention_mask", (batch, length + new))]
    for i, (key, value) in enumerate(shapes):
        out += [InputSpec(f"past_key_values.{i}.key", key)]
        out += [InputSpec(f"past_key_values.{i}.value", value)]
    return out


def prepare(loaded: LoadedModel, given: bool = False) -> LoadedModel:
    """An HF model as exported with past: the wrapper, and the record saying so.
    ``given``: the caller gave inputs (the past ones come from the config only)."""
    if loaded.source != hf.SOURCE or not loaded.record:
        raise UsageError(None, "--with-past applies to Hugging Face folders (config.json)")
    if given:
        raise UsageError(None, "--with-past takes its inputs from the config: drop --input*")
    base = [InputSpec.from_json(s) for s in loaded.record.get("inputs", [])]
    inputs = specs(loaded.module, base)
    layers = (len(inputs) - 2) // 2
    record = {
        **loaded.record,
        "inputs": [s.to_json() for s in inputs],
        PAST_KEY: {"length": PAST_LENGTH, "layers": layers},
    }
    return dataclasses.replace(loaded, module=wrap(loaded.module, layers), record=record)


# --- verify: the torch side gets the past the ONNX graph takes -------------------------


def recorded(path: Any) -> dict | None:
    """The with-past record of an ONNX file, or None (not ONNX, no record, no past)."""
    found = hf.onnx_record(path)
    return found if found is not None and isinstance(found.get(PAST_KEY), dict) else None


def matching(build: Callable[..., Any], paths: Sequence[Any]) -> Callable[..., Any]:
    """``build`` (path -> runner) whose transformers runners take the past that a
    with-past record among ``paths`` (or their own record) describes."""

    @functools.cache
    def first() -> dict | None:  # read only once a transformers runner needs it
        return next((r for p in paths if (r := recorded(p)) is not None), None)

    @functools.wraps(build)
    def make(path: Any, **kwargs: Any) -> Any:
        from .runner import HFRunner

        runner = build(path, **kwargs)
        if not isinstance(runner, HFRunner) or isinstance(runner.module, _WithPast):
            return runner
        own = runner.model.record or {}
        record = own if isinstance(own.get(PAST_KEY), dict) else first()
        if record is None:
            return runner
        module = wrap(runner.module, int(record[PAST_KEY]["layers"]))
        merged = {**own, "inputs": record["inputs"], PAST_KEY: record[PAST_KEY]}
        loaded = dataclasses.replace(runner.model, module=module, record=merged)
        return HFRunner(loaded, runner.path, runner.notes)

    return make


PLAIN_NOTE = (
    "takes no past: compared with the reference run without the past on the same new tokens"
)


def takes_no_past(runner: Any, ref_runner: Any) -> bool:
    """Whether a candidate declares inputs without past (a plain export) while the
    reference was given the past of a with-past export verified beside it."""
    if runner is None or not isinstance(getattr(ref_runner, "module", None), _WithPast):
        return False
    names = [s.name for s in runner.input_specs() or []]
    return bool(names) and not any(n.startswith("past_key_values.") for n in names)


def without_past(ref_runner: Any, feed: Any) -> tuple[Any, dict[str, Any]]:
    """The reference as a plain export was made from it (the folder's model, no cache)
    and its feed: the same new tokens, their mask without the past's columns."""
    from .runner import HFRunner

    names = [s.name for s in ref_runner.input_specs() or []]
    given = hf.keyword_inputs(names, feed)
    ids = given["input_ids"]
    fed = {"input_ids": ids, "attention_mask": given["attention_mask"][:, -ids.shape[1] :]}
    own = {k: v for k, v in ref_runner.model.record.items() if k != PAST_KEY}
    mask = hf._ones("attention_mask", tuple(fed["attention_mask"].shape))
    own["inputs"] = [own["inputs"][0], mask.to_json()]  # input_ids as recorded
    loaded = dataclasses.replace(ref_runner.model, module=ref_runner.module.inner, record=own)
    return HFRunner(loaded, ref_runner.path, ref_runner.notes), fed
