"""Hugging Face model folders as self-describing models.

A folder ``save_pretrained`` wrote (``config.json`` beside ``model.safetensors``, its
shards and index, or ``pytorch_model*.bin``) says what it is: ``architectures[0]``
names a transformers class, and transformers' own loading (``from_pretrained``,
offline) rebuilds it, so tied weights and key renames are handled the way transformers
handles them.  Only classes transformers itself defines are built without trust; a
config with ``auto_map`` (code the folder ships) needs ``trust_code``.  The inputs come
from the config (:func:`input_specs`) and the model is called by keyword, without the
KV cache (``use_cache=False``: logits only).  ONNX files exported from such a folder
carry the config under :data:`HF_KEY`, so that their initializers map back to
the model's names without ``--model``.

transformers is an optional extra (``pip install 'nnconv[hf]'``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnconv.formats import paths, pickle_gate, trust
from nnconv.formats.errors import FormatError, NnconvError, UsageError
from nnconv.formats.keys import HF_KEY
from nnconv.formats.source import Source, open_source

from .inputs import InputSpec
from .state_dicts import _first_line

if TYPE_CHECKING:
    from torch import nn

CONFIG_NAME = "config.json"
INSTALL = "pip install 'nnconv[hf]'"
SOURCE = "hf"  # LoadedModel.source for a model rebuilt by transformers
MAX_CONFIG_BYTES = 16 << 20
PT_INDEX = "pytorch_model.bin.index.json"  # sharded .bin weights (transformers 4)
BATCH, LENGTH = 2, 16  # text inputs; images and audio use batch 1
WEIGHTS = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def is_folder(path: str | os.PathLike[str]) -> bool:
    """A folder holding ``config.json`` and weights in one of transformers' layouts;
    never raises."""
    try:
        path = Path(path)
        return (
            path.is_dir()
            and (path / CONFIG_NAME).is_file()
            and any(WEIGHTS.match(n) for n in os.listdir(path))
        )
    except OSError:
        return False


def folder_of(source: str | os.PathLike[str] | None) -> Path | None:
    """The HF folder a checkpoint was read from (the folder, or one of its weight files)."""
    if not source:
        return None
    path = Path(source)
    if is_folder(path):
        return path
    if WEIGHTS.match(path.name) and is_folder(path.parent):
        return path.parent
    return None


def read_config(folder: Path) -> dict:
    """``config.json`` as a dict, bounded in size; malformed is a FormatError."""
    path = folder / CONFIG_NAME
    st = paths.check_input(path, folder_ok=False)
    if st.st_size > MAX_CONFIG_BYTES:
        raise FormatError(
            path, "config.json is too large", value=st.st_size, limit=MAX_CONFIG_BYTES
        )
    try:
        with os.fdopen(paths.open_regular(path, st), "rb") as fh:
            config = json.loads(fh.read())
    except (OSError, ValueError) as exc:
        raise FormatError(path, f"not a readable JSON config: {_first_line(exc)}") from None
    if not isinstance(config, dict):
        raise FormatError(path, "not a JSON object")
    return config


def transformers_module():
    """``import transformers``; its absence is one UsageError line.  Nothing is downloaded:
    every load passes ``local_files_only=True`` (the process's HF_HUB_OFFLINE is the user's
    to set, not a library's)."""
    try:
        import transformers
    except ImportError:
        raise UsageError(
            None,
            "Hugging Face folders need transformers, which is not installed",
            remedy=f"install it: {INSTALL}",
        ) from None
    return transformers


def _architecture(config: dict, subject, trust_code: bool) -> tuple[str, str | None]:
    """(class name, Auto class for custom code or None); refuses untrusted ``auto_map``."""
    names = config.get("architectures")
    if not (isinstance(names, list) and names and isinstance(names[0], str)):
        raise UsageError(
            subject, "config.json names no architecture", remedy="pass --model path.py:Class"
        )
    name, auto_map = names[0], config.get("auto_map")
    if auto_map is not None:
        shown = sorted(str(v) for v in (auto_map.values() if isinstance(auto_map, dict) else []))
        if not trust_code:
            raise trust.refuse(
                subject, "config.json asks for code the folder ships (auto_map)", names=shown
            )
        auto = next((k for k, v in auto_map.items() if str(v).endswith(f".{name}")), None)
        if auto is not None:
            return name, auto
    transformers = transformers_module()
    cls = getattr(transformers, name, None) if re.fullmatch(r"[A-Za-z_]\w*", name) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UsageError(
            subject,
            f"architecture {name!r} is not a model class of transformers "
            f"{transformers.__version__}",
            remedy="upgrade transformers, or pass --model path.py:Class",
        )
    return name, None


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs warnings and shows progress bars; the library prints nothing."""
    from transformers.utils import logging as hf_logging

    from .export import quiet

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with quiet():
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _check_pickles(folder: Path) -> None:
    """``pytorch_model*.bin`` files pass nnconv's pickle gate before transformers reads
    them (when no safetensors file is there to be preferred)."""
    names = os.listdir(folder)
    if any(n.endswith(".safetensors") for n in names if WEIGHTS.match(n)):
        return
    if PT_INDEX in names:  # the shards transformers will open: index and shards checked
        with open_source(folder) as source:
            source.checkpoint()
    for name in sorted(n for n in names if WEIGHTS.match(n) and n.endswith(".bin")):
        path = folder / name
        paths.check_input(path, folder_ok=False)
        with open_source(path) as source:  # plain tensors need no gate: nothing to resolve
            if source.kind == "torchscript":
                raise FormatError(path, "is a TorchScript archive, not the model's weights")
            pickle_gate.check(str(path), list(source.pickle_globals or ()))


def load(folder: str | os.PathLike[str], *, trust_code: bool = False) -> tuple[nn.Module, dict]:
    """(the model in eval mode, its :data:`HF_KEY` description) for an HF folder."""
    folder = Path(folder)
    config = read_config(folder)
    name, auto = _architecture(config, folder, trust_code)
    if not trust_code:
        _check_pickles(folder)
    transformers = transformers_module()
    options = dict(local_files_only=True, trust_remote_code=trust_code)
    try:
        with _quiet_transformers():
            cfg = transformers.AutoConfig.from_pretrained(str(folder), **options)
            _no_cache(cfg)
            cls = getattr(transformers, auto or name)
            module = cls.from_pretrained(str(folder), config=cfg, **options)
    except NnconvError:
        raise
    except Exception as exc:
        raise FormatError(
            folder, f"transformers cannot load this folder as {name}: {_first_line(exc)}"
        ) from None
    return module.eval(), describe(module, name)


def _no_cache(cfg) -> None:
    """Logits only: no KV cache among the outputs (the exporters cannot return one)."""
    for sub in (cfg, *(getattr(cfg, k, None) for k in ("text_config", "decoder"))):
        if sub is not None and hasattr(sub, "use_cache"):
            sub.use_cache = False


def describe(module: nn.Module, name: str) -> dict:
    """What an export records: the architecture, its config and the inputs."""
    specs = input_specs(module)
    return {
        "architecture": name,
        "config": module.config.to_dict(),
        "inputs": [s.to_json() for s in specs],
    }


def from_metadata(metadata: dict, subject, *, trust_code: bool = False) -> nn.Module | None:
    """The model a file's :data:`HF_KEY` describes, with random weights (for mapping
    ONNX initializers back to its names); None when the file has no such record."""
    text = metadata.get(HF_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
        config, name = dict(record["config"]), str(record["architecture"])
    except (ValueError, TypeError, KeyError) as exc:
        raise FormatError(subject, f"malformed {HF_KEY} metadata: {exc}") from None
    return build(config, name, subject, trust_code=trust_code)


def build(config: dict, name: str, subject, *, trust_code: bool = False, meta: bool = False):
    """``name`` built from ``config`` with random weights (on the meta device: no memory)."""
    config = {**config, "architectures": [name]}
    _, auto = _architecture(config, subject, trust_code)
    if auto is not None:
        raise UsageError(
            subject,
            "code the folder ships cannot be rebuilt from a record",
            remedy="pass --model path.py:Class",
        )
    transformers = transformers_module()
    import torch

    try:
        with _quiet_transformers(), torch.device("meta") if meta else contextlib.nullcontext():
            cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items()})
            _no_cache(cfg)
            module = getattr(transformers, name)._from_config(cfg)
    except Exception as exc:
        raise FormatError(
            subject, f"transformers cannot build {name}: {_first_line(exc)}"
        ) from None
    return module.eval()


def is_model(module: Any) -> bool:
    """Whether ``module`` is a transformers model (called by keyword)."""
    return any(c.__module__.startswith("transformers.") for c in type(module).__mro__[:-1]) and (
        hasattr(module, "config")
    )


# --- inputs from the config -----------------------------------------------------------


def input_specs(module: nn.Module) -> list[InputSpec]:
    """The inputs the model's config implies: token ids below ``vocab_size`` and a mask of
    ones for text, ``pixel_values`` at ``image_size``, audio features at the config's
    sizes, and ``decoder_input_ids`` for encoder-decoders; only those ``forward`` takes."""
    config = module.config
    text = getattr(config, "text_config", None) or config
    accepted = set(inspect.signature(module.forward).parameters)
    main = getattr(module, "main_input_name", "input_ids")
    vocab = getattr(text, "vocab_size", None)
    length = min(LENGTH, _positions(text) or LENGTH)
    specs: list[InputSpec] = []
    if main == "input_ids" and vocab:
        specs.append(InputSpec("input_ids", (BATCH, length), "int64", int(vocab)))
        if "attention_mask" in accepted:
            specs.append(_ones("attention_mask", (BATCH, length)))
    elif main == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        specs.append(InputSpec("pixel_values", (1, getattr(vision, "num_channels", 3), h, w)))
    elif main == "input_features" and getattr(config, "num_mel_bins", None):
        frames = 2 * int(getattr(config, "max_source_positions", 1500))
        specs.append(InputSpec("input_features", (1, int(config.num_mel_bins), frames)))
    else:
        raise UsageError(
            None,
            f"cannot tell {type(module).__name__}'s inputs ({main}) from its config",
            remedy="pass --input-shape and --model",
        )
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in accepted:
        batch = specs[0].shape[0]
        high = int(getattr(text, "vocab_size", None) or 10)
        specs.append(InputSpec("decoder_input_ids", (batch, length), "int64", high))
    return specs


def _ones(name: str, shape: tuple[int, ...]) -> InputSpec:
    """An integer input of ones (values in [1, 2)): an attention mask hiding nothing."""
    return InputSpec(name, shape, "int64", high=2, low=1)


def _positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_target_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def keyword_inputs(names: list[str], inputs) -> dict:
    """Inputs by name: a mapping as it is, a sequence zipped with ``names``."""
    from collections.abc import Mapping

    if isinstance(inputs, Mapping):
        return dict(inputs)
    if len(inputs) != len(names):
        raise UsageError(
            None, f"the model takes {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}"
        )
    return dict(zip(names, inputs, strict=True))


# --- ties per the config --------------------------------------------------------------


def config_ties(source: str | os.PathLike[str] | None) -> list[tuple[str, ...]]:
    """For a checkpoint read from an HF folder: the groups of state_dict names that share
    one tensor in the model its config builds (transformers ties them; ``save_pretrained``
    keeps one: ``lm_head.weight``, T5's embeddings are dropped).  [] when the source is
    not such a folder or transformers cannot build it (or is absent)."""
    folder = folder_of(source)
    if folder is None:
        return []
    try:
        stamp = (folder / CONFIG_NAME).stat().st_mtime_ns
    except OSError:
        return []
    return list(_ties(str(folder.resolve()), stamp))


@functools.lru_cache(maxsize=8)
def _ties(folder: str, _stamp: int) -> tuple[tuple[str, ...], ...]:
    try:
        config = read_config(Path(folder))
        name = config["architectures"][0]
        if config.get("auto_map") is not None:
            return ()
        module = build(config, name, folder, meta=True)  # shapes only: no memory
    except (NnconvError, KeyError, IndexError, TypeError):
        return ()
    return tuple(tie_groups(module.state_dict(keep_vars=True)))


def tie_groups(state: dict) -> list[tuple[str, ...]]:
    """Names of ``state`` that are one tensor (tied weights), in order, groups of 2 or more:
    the same object, or the same storage, offset, shape and strides."""
    groups: dict[tuple, list[str]] = {}
    for key, value in state.items():
        if value.device.type == "meta" or not value.numel():
            where: tuple = (id(value),)
        else:
            where = (value.untyped_storage().data_ptr(), value.storage_offset(), value.dtype)
        groups.setdefault((*where, tuple(value.shape), value.stride()), []).append(key)
    return [tuple(names) for names in groups.values() if len(names) > 1]


def recorded_inputs(metadata: dict) -> list[InputSpec] | None:
    """The inputs a file's :data:`HF_KEY` record lists; None without one."""
    try:
        return [InputSpec.from_json(s) for s in json.loads(metadata[HF_KEY])["inputs"]]
    except (KeyError, ValueError, TypeError):
        return None


def onnx_describes(path: str | os.PathLike[str] | Source) -> bool:
    """Whether an ONNX file records the transformers model it was exported from."""
    return onnx_record(path) is not None


def onnx_record(path: str | os.PathLike[str] | Source) -> dict | None:
    """The record a graph file carries of the transformers model it was exported from;
    None for anything else (not a graph, unreadable, no record)."""
    with contextlib.suppress(NnconvError, OSError):
        source = open_source(path)
        try:
            return record(source.checkpoint().metadata) if source.kind == "graph" else None
        finally:
            if source is not path:
                source.close()
    return None


def record(metadata: dict) -> dict | None:
    """A file's :data:`HF_KEY` record (architecture, config, inputs), or None."""
    with contextlib.suppress(KeyError, ValueError, TypeError):
        found = json.loads(metadata[HF_KEY])
        return found if isinstance(found, dict) else None
    return None
