"""Hugging Face vision and speech folders: inputs from the config (issue 12).

A tiny ViT image classifier and a tiny Whisper are built from configs with seeded
random weights (nothing is downloaded) and saved with ``save_pretrained``; then, with
no ``--model`` and no ``--input-shape``, ``convert DIR m.onnx`` and ``verify DIR
m.onnx`` pass with the outputs compared, and so do ``convert m.onnx back.safetensors``
and ``verify DIR back.safetensors``.  The inputs are the config's: ``pixel_values``
1×num_channels×image_size², and Whisper's ``input_features`` 1×num_mel_bins×
(2×max_source_positions) with ``decoder_input_ids``.  The CLI runs in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from helpers import cli

from nnconv.converter import load


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def tiny_vit(t):
    config = t.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=37, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return t.ViTForImageClassification(config).eval()


def tiny_whisper(t):
    config = t.WhisperConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37,
        decoder_ffn_dim=37, num_mel_bins=80, max_source_positions=30,
        max_target_positions=40, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return t.WhisperForConditionalGeneration(config).eval()


CASES = {
    # exported shapes; a dynamic dimension (the batch) reads as 1
    "vit": (tiny_vit, {"pixel_values": [1, 3, 32, 32]}, "output.logits"),
    "whisper": (
        tiny_whisper,
        {"input_features": [1, 80, 60], "decoder_input_ids": [1, 16]},
        "output.logits",
    ),
}


def check_report(path: Path, output: str) -> None:
    report = json.loads(path.read_text())
    assert report["passed"] and report["outputs_checked"], report
    for cand in report["candidates"]:
        assert cand["outputs_checked"], cand
        assert output in {o["name"] for o in cand["outputs"]}, cand["outputs"]
        # judged by the noise rule: the reference ran in float64 (ViT's embeddings cast
        # pixel_values to the projection's dtype before it runs: whole-model widening)
        assert all(o["rule"] == "noise" for o in cand["outputs"]), report["notes"]


@pytest.mark.parametrize("arch", sorted(CASES))
def test_folder_round_trip_with_config_inputs(arch, transformers, tmp_path, capfd):
    build, shapes, output = CASES[arch]
    model = build(transformers)
    folder = tmp_path / arch
    model.save_pretrained(folder)
    onnx_path, back = tmp_path / "m.onnx", tmp_path / "back.safetensors"

    run = cli(capfd, "convert", folder, onnx_path)
    assert run.rc == 0, run.err
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    got = {i.name: [d.dim_value or 1 for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert got == shapes  # the keywords the model was called with, at the config's sizes
    run = cli(capfd, "verify", folder, onnx_path, "--json", tmp_path / "r1.json")
    assert run.rc == 0, run.out + run.err
    check_report(tmp_path / "r1.json", output)

    run = cli(capfd, "convert", onnx_path, back)
    assert run.rc == 0, run.err
    with load(back) as ckpt:  # every state_dict name, tied ones written once as aliases
        assert set(ckpt.names()) == set(model.state_dict())
    run = cli(capfd, "verify", folder, back, "--json", tmp_path / "r2.json")
    assert run.rc == 0, run.out + run.err
    check_report(tmp_path / "r2.json", output)
