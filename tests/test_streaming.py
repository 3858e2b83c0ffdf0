"""The streaming properties: memory that does not grow with the model, and no torch,
onnx or onnxruntime import where no tensor has to be materialised.

Each check runs in a fresh interpreter, so what it imports and allocates is its own.
The speed numbers are not tested here: ``python benchmarks/run.py`` measures them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import PEAK_ANON

from nnconv.converter.convert import convert

HEAVY = ("torch", "onnx", "onnxruntime")
SIZE_MB = 200
GROWTH_LIMIT_MIB = 64


def _run(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A ~200 MB state_dict as pt, safetensors and hdf5 (large matrices, small vectors)."""
    folder = tmp_path_factory.mktemp("streaming")
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(SIZE_MB // 16):
        state[f"layers.{i}.weight"] = torch.randn(2048, 2048, generator=g)  # 16 MiB each
        state[f"layers.{i}.norm"] = torch.randn(2048, generator=g)
    torch.save(state, folder / "model.pt")
    convert(folder / "model.pt", folder / "model.safetensors")
    convert(folder / "model.pt", folder / "model.h5")
    return folder


@pytest.mark.parametrize(
    "src, dst",
    [
        ("model.pt", "out.safetensors"),
        ("model.safetensors", "out.pt"),
        ("model.safetensors", "out.h5"),
        ("model.h5", "out.safetensors"),
    ],
)
def test_anonymous_memory_does_not_grow_with_the_model(sources, src, dst):
    """Peak RssAnon while converting, sampled every millisecond, over the process's own
    before the conversion: the bytes go through file mappings and kernel copies."""
    result = _run(
        PEAK_ANON
        + f"""
import json
from nnconv.converter.convert import convert

_, growth = peak_anon(lambda: convert({str(sources / src)!r}, {str(sources / dst)!r}, force=True))
print(json.dumps({{"growth": growth}}))
"""
    )
    growth_mib = result["growth"] / 2**20
    assert growth_mib < GROWTH_LIMIT_MIB, f"{src} -> {dst}: anonymous RSS grew {growth_mib:.0f} MiB"


def test_no_torch_for_listing_converting_and_comparing_weights(sources, tmp_path):
    """``nnconv --help`` and ``formats``, inspect of pt/safetensors/hdf5, byte-moving
    conversions and a weights-only verify never import torch (~1.5 s), onnx or onnxruntime."""
    result = _run(
        f"""
        import json, sys
        from click.testing import CliRunner
        from nnconv.converter.cli import cli
        from nnconv.converter.convert import convert
        from nnconv.converter.inspect import inspect
        from nnconv.converter.verify import verify

        steps = {{}}
        def heavy():
            return [m for m in {HEAVY!r} if m in sys.modules]

        assert CliRunner().invoke(cli, ["--help"]).exit_code == 0
        steps["help"] = heavy()
        assert CliRunner().invoke(cli, ["formats"]).exit_code == 0
        steps["formats"] = heavy()
        for name in ("model.pt", "model.safetensors", "model.h5"):
            inspect({str(sources)!r} + "/" + name)
            steps["inspect " + name] = heavy()
        convert({str(sources / "model.pt")!r}, {str(tmp_path / "a.safetensors")!r})
        steps["pt -> safetensors"] = heavy()
        convert({str(sources / "model.safetensors")!r}, {str(tmp_path / "b.pt")!r})
        steps["safetensors -> pt"] = heavy()
        convert({str(sources / "model.safetensors")!r}, {str(tmp_path / "c.h5")!r})
        steps["safetensors -> hdf5"] = heavy()
        report = verify({str(sources / "model.pt")!r}, {str(tmp_path / "a.safetensors")!r})
        assert report, "equal weights must verify"
        steps["verify pt vs safetensors"] = heavy()
        print(json.dumps(steps))
        """
    )
    assert result == {step: [] for step in result}, result
    assert len(result) == 9
