"""Sharded ``torch.save`` folders: ``pytorch_model-00001-of-00003.bin`` shards and
``pytorch_model.bin.index.json``, the layout ``save_pretrained`` wrote before safetensors.

The folder is one checkpoint.  Its index is checked by the rules of the sharded
safetensors reader (bounded size, a ``weight_map`` of names to shard files, every shard
a regular file inside the folder, symlinks resolved); each shard is read by the pt
reader, weights only (plain tensors without torch, anything else through the pickle
gate and a memory-mapped ``torch.load``), lazily: tensors load one at a time when asked,
never copied into the joined checkpoint.  Every name the index lists must be in the
shard it names, and no shard may hold a name the index puts elsewhere or leaves out.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import sharding
from ..checkpoint import Checkpoint, check_count, flat_structure, paused_gc
from ..errors import FormatError

INDEX_NAME = "pytorch_model.bin.index.json"


def is_index(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a sharded ``.bin`` folder's index (by its name)."""
    return Path(path).name == INDEX_NAME


def index_of(folder: Path) -> Path | None:
    """The index of a folder of ``.bin`` shards (present, even as a broken link, and no
    safetensors file beside it, which transformers would prefer); else None."""
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    if INDEX_NAME not in names or any(n.endswith(".safetensors") for n in names):
        return None
    return folder / INDEX_NAME


def shards(path: str | os.PathLike[str]) -> tuple[Path, dict[str, str], dict[str, Path]]:
    """(the index's path, its weight_map, each shard's checked real file by its name) for
    the index at ``path`` or in the folder ``path``: nothing is opened but the index."""
    index_path = Path(path)
    if index_path.is_dir():
        index_path = index_path / INDEX_NAME
    folder = index_path.parent
    real, st = sharding.member(folder, INDEX_NAME, index_path, "index")
    _, index = sharding.read_index(real, st)
    weight_map: dict[str, str] = index["weight_map"]
    check_count(str(index_path), len(weight_map))
    files = {
        shard: sharding.member(folder, shard, index_path, "shard")[0]
        for shard in sorted(set(weight_map.values()))
    }
    return index_path, weight_map, files


@paused_gc()
def read(path: str | os.PathLike[str], *, trust_code: bool = False) -> Checkpoint:
    """The shards the index at ``path`` (or in the folder ``path``) names, as one
    checkpoint in the shards' order; the shards stay open until it is closed."""
    from . import pt_format

    index_path, weight_map, files = shards(path)
    folder = index_path.parent
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    ckpt = Checkpoint(tensors={}, structure=None, format=pt_format.NAME, source=str(index_path))
    order: list[str] = []  # the shards' own order (transformers 4 sorted the index's keys)
    try:
        for shard, names in sorted(by_shard.items()):
            found = pt_format.classify(files[shard])
            if found.kind != "weights":
                raise FormatError(folder / shard, f"is a {found.kind} file, not weights")
            part = found.checkpoint or found.reader(trust_code)  # type: ignore[misc]
            ckpt._closers.append(part.close)
            _join(ckpt, part, folder / shard, shard, weight_map)
            order += part.names()
            absent = sorted(set(names) - set(part.tensors) - set(part.aliases))
            if absent:
                raise FormatError(
                    index_path,
                    f"index puts tensor {absent[0]!r} in shard {shard!r}, which does not hold it",
                )
    except BaseException:
        ckpt.close()
        raise
    ckpt.tensors = {n: ckpt.tensors[n] for n in order if n in ckpt.tensors}
    ckpt.structure = flat_structure(order)
    return ckpt


def _join(
    ckpt: Checkpoint, part: Checkpoint, subject: Path, shard: str, weight_map: dict[str, str]
) -> None:
    """One shard's tensors and ties into ``ckpt``, each where the index says it is."""
    for name in (*part.tensors, *part.aliases):
        where = weight_map.get(name)
        if where != shard:
            problem = f"the index puts it in {where!r}" if where else "the index does not list it"
            raise FormatError(subject, f"tensor {name!r} is in this shard but {problem}")
        if name in ckpt.tensors or name in ckpt.aliases:
            raise FormatError(subject, f"tensor {name!r} appears in more than one shard")
    ckpt.tensors.update(part.tensors)
    ckpt.aliases.update(part.aliases)
