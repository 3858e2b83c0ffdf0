"""Folders of ``pytorch_model-0000N-of-0000M.bin`` shards (issue 12): the sharded layout
``save_pretrained(safe_serialization=False)`` wrote before transformers 5, which writes
safetensors whatever it is asked, so the shards and ``pytorch_model.bin.index.json``
are written here as transformers 4 wrote them (``torch.save`` of each shard's dict,
tied names dropped).  Such a folder is one pt checkpoint: ``convert`` gives the
state_dict bit for bit, ``verify`` compares its parameters (and, transformers loading
the shards, its outputs), ``inspect`` lists it; a
hostile index is refused in one ``Error:`` line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_tensor_same, cli
from safetensors.torch import load_file

from nnconv.converter import load
from nnconv.formats import sharding

INDEX = "pytorch_model.bin.index.json"


def write_bin_shards(state: dict[str, torch.Tensor], folder: Path, max_bytes: int) -> list[str]:
    """``state`` as transformers 4 sharded it: consecutive shards of at most ``max_bytes``,
    each a ``torch.save``'d dict, and the index naming each tensor's shard."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(k, v.numel() * v.element_size()) for k, v in state.items()]
    shards = sharding.plan(sizes, max_bytes)
    names = [f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin" for i in range(len(shards))]
    for name, keys in zip(names, shards, strict=True):
        torch.save({k: state[k] for k in keys}, folder / name)
    weight_map = {k: name for name, keys in zip(names, shards, strict=True) for k in keys}
    total = sum(n for _, n in sizes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(folder of .bin shards with config.json, the state_dict it holds)."""
    t = pytest.importorskip("transformers")
    config = t.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=99, bos_token_id=0,
        eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = t.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("bin") / "hf"
    model.save_pretrained(folder)  # config.json naming the architecture
    (folder / "model.safetensors").unlink()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert len(write_bin_shards(state, folder, 20_000)) >= 3
    return folder, state


def test_a_sharded_bin_folder_converts_verifies_and_inspects(gpt2, tmp_path, capfd):
    folder, state = gpt2
    out = tmp_path / "out.safetensors"
    run = cli(capfd, "convert", folder, out)
    assert run.rc == 0, run.err
    written = load_file(out)
    assert list(written) == list(state)
    for name, tensor in state.items():
        assert_tensor_same(written[name], tensor, name)
    with load(folder) as ckpt:  # lazily: byte spans into the shards, nothing read yet
        assert ckpt.format == "pt" and list(ckpt.tensors) == list(state)
        assert all(t.span and t.span.path.endswith(".bin") for t in ckpt.tensors.values())

    # verify against the conversion beside the same config.json (a safetensors HF folder:
    # lm_head.weight is tied by the config on both sides), parameters and outputs
    (tmp_path / "st").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "st")
    shutil.copy(out, tmp_path / "st" / "model.safetensors")
    run = cli(capfd, "verify", folder, tmp_path / "st", "--json", tmp_path / "r.json")
    assert run.rc == 0, run.out + run.err
    (cand,) = json.loads((tmp_path / "r.json").read_text())["candidates"]
    assert len(cand["parameters"]) == len(state) and not cand["tied"]
    assert all(c["passed"] for c in cand["parameters"]) and cand["outputs_checked"]

    # and against the bare conversion: the folder's config ties hold for both sides (the
    # output dropped lm_head.weight as save_pretrained did), parameters only
    run = cli(capfd, "verify", folder, out, "--params-only", "--json", tmp_path / "r2.json")
    assert run.rc == 0, run.out + run.err
    (cand,) = json.loads((tmp_path / "r2.json").read_text())["candidates"]
    assert not cand["tied"] and all(c["passed"] for c in cand["parameters"])

    run = cli(capfd, "verify", folder)  # transformers loads the shards (gated) and runs
    assert run.rc == 0 and "runs with torch (hf)" in run.out, run.out + run.err

    run = cli(capfd, "inspect", folder)
    assert run.rc == 0, run.err
    assert "transformer.h.1.mlp.c_proj.weight" in run.out and "pt" in run.out


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A folder of three .bin shards of a small state_dict (no transformers needed)."""
    torch.manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(8, 8) for i in range(6)}
    folder = tmp_path_factory.mktemp("plain") / "m"
    names = write_bin_shards(state, folder, 600)
    assert len(names) == 3
    return folder, state, names


def edit_index(folder: Path, change) -> None:
    index = json.loads((folder / INDEX).read_text())
    change(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def hostile(case: str, folder: Path, names: list[str]) -> None:
    if case == "outside":
        shutil.copy(folder / names[1], folder.parent / "x.bin")
        edit_index(
            folder, lambda m: m.update({k: "../x.bin" for k, v in m.items() if v == names[1]})
        )
    elif case == "missing":
        (folder / names[2]).unlink()
    elif case == "absent":
        edit_index(folder, lambda m: m.update({"ghost.weight": names[0]}))
    elif case == "unlisted":
        edit_index(folder, lambda m: m.pop("layer0.weight"))
    elif case == "symlink":
        outside = folder.parent / "elsewhere.bin"
        (folder / names[1]).rename(outside)
        (folder / names[1]).symlink_to(outside)


@pytest.mark.parametrize(
    "case, says",
    [
        ("outside", "'../x.bin' contains a '..' component"),
        ("missing", "does not exist"),
        ("absent", "index puts tensor 'ghost.weight' in shard"),
        ("unlisted", "tensor 'layer0.weight' is in this shard but the index does not list it"),
        ("symlink", "outside the model's folder"),
    ],
)
def test_a_hostile_index_is_refused_in_one_line(plain, case, says, tmp_path, capfd):
    src, state, names = plain
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    with load(folder) as ckpt:  # the copy reads before it is spoilt
        assert list(ckpt.tensors) == list(state)
    hostile(case, folder, names)
    out = tmp_path / "out.safetensors"
    for command in (("convert", folder, out), ("inspect", folder)):
        run = cli(capfd, *command)
        assert run.rc == 2, run.out + run.err
        assert run.err.startswith("Error: ") and run.err.count("\n") == 1, run.err
        assert says in run.err, run.err
    assert not out.exists()


def test_transformers_never_opens_a_shard_outside_the_folder(gpt2, tmp_path, capfd):
    """The model route too: transformers follows the index wherever it points, so the
    index is checked before transformers reads it (each shard then passes the gate)."""
    src, _ = gpt2
    folder = tmp_path / "hf"
    shutil.copytree(src, folder)
    names = sorted(p.name for p in folder.glob("pytorch_model-*.bin"))
    hostile("outside", folder, names)
    run = cli(capfd, "verify", folder)  # compatibility mode: loads the model and runs it
    assert run.rc == 2 and run.err.count("\n") == 1, run.out + run.err
    assert "'../x.bin' contains a '..' component" in run.err
