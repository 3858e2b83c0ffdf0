"""The models of the ONNX acceptance list, with example input shapes and tolerances."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS_FILE = ROOT / "fixtures" / "models.py"


def fixture_models():
    spec = importlib.util.spec_from_file_location("nnconv_fixture_models", MODELS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# name -> (class name in fixtures/models.py, input shape, atol for onnxruntime vs eager)
ZOO = {
    "sequential": ("SequentialNet", "3,4", 1e-5),
    "mlp": ("MLP", "2,20", 1e-5),
    "custom": ("CustomNet", "2,8", 1e-5),
    "lazy": ("LazyNet", "2,5", 1e-5),
    "cnn": ("SmallCNN", "2,3,16,16", 1e-4),
    "transformer": ("TinyTransformer", "2,6,16", 1e-4),
}


def build(name: str, *, seed: int = 0) -> torch.nn.Module:
    """A fresh, seeded, eval-mode instance; lazy modules materialised by one forward."""
    cls_name, shape, _ = ZOO[name]
    torch.manual_seed(seed)
    model = getattr(fixture_models(), cls_name)()
    if name == "lazy":
        model(torch.randn(*map(int, shape.split(","))))
    if name == "cnn":  # non-trivial running statistics, as a trained model has
        model.train()
        with torch.no_grad():
            model(torch.randn(8, 3, 16, 16) * 2 + 0.5)
    return model.eval()


def spec(name: str) -> str:
    """The ``--model`` spec for a zoo entry."""
    return f"{MODELS_FILE}:{ZOO[name][0]}"
