"""A sharded folder nnconv writes loads with transformers' from_pretrained (when installed)."""

from __future__ import annotations

import shutil

import pytest
import torch

from nnconv import convert


def test_from_pretrained_loads_nnconv_shards(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    out = tmp_path / "sharded"
    convert(tmp_path / "pytorch_model.bin", out, dst_format="safetensors", shard_size="40KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 3
    config.save_pretrained(tmp_path / "cfg")
    shutil.copy(tmp_path / "cfg" / "config.json", out / "config.json")

    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    for (name, a), (name2, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert name == name2 and torch.equal(a, b), name
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
