"""Hugging Face-style sharded safetensors: reading transformers' layout, writing shards."""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import assert_same, assert_shares_storage
from safetensors.torch import load_file, save_file

from nnconv import convert, load, save
from nnconv.formats import FormatError, UsageError, to_object
from nnconv.formats.sharding import INDEX_NAME, parse_size

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def hf_tensors() -> dict[str, dict[str, torch.Tensor]]:
    """Two shards' worth of tensors, of several dtypes, with awkward float values."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    return {
        SHARD1: {
            "model.embed_tokens.weight": torch.randn(32, 8, generator=g),
            "model.layers.0.attn.q_proj.weight": torch.randn(8, 8, generator=g).bfloat16(),
            "model.layers.0.attn.q_proj.bias": special,
        },
        SHARD2: {
            "model.layers.1.mlp.weight": torch.randn(16, 8, generator=g).half(),
            "model.norm.weight": torch.ones(8, dtype=torch.float64),
            "model.position_ids": torch.arange(12).reshape(1, 12),
            "lm_head.weight": torch.randn(32, 8, generator=g),
        },
    }


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> Path:
    """The index as transformers' save_pretrained writes it (sorted keys, indent 2)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    path = folder / INDEX_NAME
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


@pytest.fixture
def hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    weight_map, total = {}, 0
    for shard, tensors in hf_tensors().items():
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = shard
            total += t.numel() * t.element_size()
    write_index(folder, weight_map, total)
    return folder


def read_index(folder: Path) -> dict:
    return json.loads((folder / INDEX_NAME).read_text())


def all_hf_tensors() -> dict[str, torch.Tensor]:
    return {n: t for tensors in hf_tensors().values() for n, t in tensors.items()}


# --- reading transformers' layout ----------------------------------------------


@pytest.mark.parametrize("entry", ["folder", "index"])
def test_hf_sharded_checkpoint_reads_as_one(hf_folder: Path, entry: str) -> None:
    path = hf_folder if entry == "folder" else hf_folder / INDEX_NAME
    expected = all_hf_tensors()
    with load(path) as ckpt:
        assert ckpt.format == "safetensors"
        assert ckpt.names() == list(read_index(hf_folder)["weight_map"])  # the index's order
        assert sorted(ckpt.names()) == sorted(expected)
        assert not ckpt.aliases
        for name, t in expected.items():
            lazy = ckpt.lazy(name)
            assert lazy.dtype == str(t.dtype).removeprefix("torch.")
            assert lazy.shape == tuple(t.shape)
            assert_same(lazy.load(), t, where=name)
        obj = to_object(ckpt)
    assert type(obj) is dict
    assert_same(obj, {n: expected[n] for n in obj})


def test_hf_sharded_checkpoint_converts_to_pt_and_back(hf_folder: Path, tmp_path: Path) -> None:
    expected = all_hf_tensors()
    convert(hf_folder / INDEX_NAME, tmp_path / "model.pt")
    back = torch.load(tmp_path / "model.pt")
    assert_same(back, {n: expected[n] for n in back})
    convert(tmp_path / "model.pt", tmp_path / "out", dst_format="safetensors", shard_size="1KB")
    with load(tmp_path / "out") as ckpt:
        assert_same(to_object(ckpt), back)


def test_index_names_tensor_absent_from_its_shard(hf_folder: Path) -> None:
    index = read_index(hf_folder)
    index["weight_map"]["model.ghost.weight"] = SHARD1
    write_index(hf_folder, index["weight_map"], index["metadata"]["total_size"])
    for path in (hf_folder, hf_folder / INDEX_NAME):
        with pytest.raises(FormatError) as info:
            load(path)
        assert "model.ghost.weight" in str(info.value)
        assert SHARD1 in str(info.value)


def test_shard_holds_tensor_missing_from_index(hf_folder: Path) -> None:
    index = read_index(hf_folder)
    del index["weight_map"]["model.norm.weight"]
    write_index(hf_folder, index["weight_map"], index["metadata"]["total_size"])
    with pytest.raises(FormatError, match=r"model\.norm\.weight"):
        load(hf_folder)


def test_missing_shard_file(hf_folder: Path) -> None:
    (hf_folder / SHARD2).unlink()
    for path in (hf_folder, hf_folder / INDEX_NAME):
        with pytest.raises(FormatError, match=SHARD2):
            load(path)


@pytest.mark.parametrize("shard", ["../" + SHARD1, "/etc/passwd", "sub/" + SHARD1])
def test_shard_outside_the_folder_is_refused(hf_folder: Path, shard: str) -> None:
    index = read_index(hf_folder)
    index["weight_map"]["model.norm.weight"] = shard
    write_index(hf_folder, index["weight_map"], index["metadata"]["total_size"])
    with pytest.raises(FormatError):
        load(hf_folder)


def test_index_with_null_metadata_reads(hf_folder: Path) -> None:
    index = read_index(hf_folder)
    index["metadata"] = None
    (hf_folder / INDEX_NAME).write_text(json.dumps(index))
    with load(hf_folder) as ckpt:
        assert sorted(ckpt.names()) == sorted(all_hf_tensors())


def test_index_with_non_string_shard_is_a_format_error(hf_folder: Path) -> None:
    index = read_index(hf_folder)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = 2  # the first shard read
    (hf_folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(FormatError):
        load(hf_folder)


def test_index_naming_the_wrong_shard(hf_folder: Path) -> None:
    index = read_index(hf_folder)
    index["weight_map"]["model.norm.weight"] = SHARD1  # it is in SHARD2
    write_index(hf_folder, index["weight_map"], index["metadata"]["total_size"])
    with pytest.raises(FormatError, match=r"model\.norm\.weight"):
        load(hf_folder)


def test_index_without_weight_map(hf_folder: Path) -> None:
    (hf_folder / INDEX_NAME).write_text('{"metadata": {}}')
    with pytest.raises(FormatError, match="weight_map"):
        load(hf_folder)


# --- writing shards ------------------------------------------------------------


def data_bytes(shard: Path) -> int:
    """Bytes of tensor data in a safetensors file (its size less the header)."""
    with open(shard, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
    return shard.stat().st_size - 8 - length


def sharded_model() -> OrderedDict:
    g = torch.Generator().manual_seed(1)
    state = OrderedDict()
    for i in range(8):
        state[f"layers.{i}.weight"] = torch.randn(10, 10, generator=g)  # 400 bytes
        state[f"layers.{i}.bias"] = torch.randn(10, generator=g).half()  # 20 bytes
    state["big"] = torch.randn(600, generator=g)  # 2400 bytes: over the limit alone
    state["steps"] = torch.tensor(7)
    state._metadata = OrderedDict([("", {"version": 1})])
    return state


@pytest.mark.parametrize("limit", ["1KB", 1000, "1KiB"])
def test_sharded_write_reads_back(tmp_path: Path, limit) -> None:
    obj = sharded_model()
    out = tmp_path / "out"
    save(obj, out, format="safetensors", shard_size=limit)
    max_bytes = parse_size(limit) if isinstance(limit, str) else limit
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        + [INDEX_NAME]
    )
    index = read_index(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in obj.values())
    assert list(index["weight_map"]) == list(obj)  # every tensor, in order
    for shard in shards:
        held = load_file(shard)  # plain safetensors reads every shard
        assert held and all(index["weight_map"][n] == shard.name for n in held)
        if len(held) > 1:
            assert data_bytes(shard) <= max_bytes, shard.name
        for name, t in held.items():
            assert_same(t, obj[name], where=name)
    assert sorted(n for s in shards for n in load_file(s)) == sorted(obj)
    with load(out) as ckpt:
        assert ckpt.names() == list(obj)
        assert_same(to_object(ckpt), obj)
    convert(out / INDEX_NAME, tmp_path / "back.pt")
    assert_same(torch.load(tmp_path / "back.pt"), obj)


def test_sharded_write_of_a_fixture_via_convert(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parent.parent / "fixtures" / "checkpoint.pt"
    out = tmp_path / "out_dir"
    convert(src, out, dst_format="safetensors", shard_size="8KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 3
    with load(out) as ckpt:
        assert_same(to_object(ckpt), torch.load(src))


def test_sharded_write_replaces_only_with_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    save(sharded_model(), out, format="safetensors", shard_size="1KB")
    with pytest.raises(Exception, match="exists"):
        save(sharded_model(), out, format="safetensors", shard_size="1KB")
    save({"a": torch.ones(2)}, out, format="safetensors", shard_size="1KB", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00001.safetensors", INDEX_NAME]
    with load(out) as ckpt:
        assert_same(to_object(ckpt), {"a": torch.ones(2)})


class TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 8)
        self.body = torch.nn.Linear(8, 64)  # 2 KB: a shard of its own
        self.head = torch.nn.Linear(8, 64, bias=False)
        self.head.weight = self.embed.weight  # tied


def test_tied_weights_across_a_sharded_write(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = TiedLM().state_dict()
    assert_shares_storage(state["embed.weight"], state["head.weight"])
    out = tmp_path / "out"
    save(state, out, format="safetensors", shard_size="1KB")  # embed alone is 2 KB
    assert len(list(out.glob("*.safetensors"))) >= 3
    with load(out) as ckpt:
        assert ckpt.names() == list(state)
        assert ckpt.aliases == {"head.weight": "embed.weight"}
        back = to_object(ckpt)
    assert_same(back, state)  # includes the sharing pattern
    assert_shares_storage(back["embed.weight"], back["head.weight"])
    assert_shares_storage(back["embed.weight"], back["body.weight"], shared=False)
    convert(out, tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt")
    assert_same(back, state)
    assert_shares_storage(back["embed.weight"], back["head.weight"])


def test_unicode_and_odd_names_survive_sharding(tmp_path: Path) -> None:
    obj = {"poids.été": torch.ones(300), "a/b": torch.zeros(300), "": torch.arange(300)}
    save(obj, tmp_path / "out", format="safetensors", shard_size="1KB")
    with load(tmp_path / "out") as ckpt:
        assert_same(to_object(ckpt), obj)


# --- sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1", 1),
        ("1B", 1),
        ("10B", 10),
        ("1KB", 1000),
        ("1.5KB", 1500),
        ("2MB", 2_000_000),
        ("5GB", 5_000_000_000),
        ("1KiB", 1024),
        ("3MiB", 3 * 2**20),
        ("1GiB", 2**30),
        ("512mib", 512 * 2**20),
        ("1kb", 1000),
        (" 5 GB ", 5_000_000_000),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "KB",
        "abc",
        "1XB",
        "1 K B",
        "-1KB",
        "0",
        "0KB",
        "0.1B",
        "1e3",
        "1.KB",
        "1,000KB",
        "5 GBs",
        "NaNKB",
        "infGB",
    ],
)
def test_parse_size_rejects_junk(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_convert_rejects_junk_shard_size(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parent.parent / "fixtures" / "mydict"
    with pytest.raises(UsageError):
        convert(src, tmp_path / "out", dst_format="safetensors", shard_size="lots")
    assert not (tmp_path / "out").exists()
