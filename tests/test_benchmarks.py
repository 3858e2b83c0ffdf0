"""benchmarks/run.py runs end to end at a tiny size and writes its JSON (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUTES = {
    "cp",
    "naive torch.load+save_file",
    "pt→safetensors",
    "safetensors→pt",
    "safetensors→hdf5",
    "hdf5→safetensors",
    "pt→sharded safetensors",
    "pt→safetensors --dtype bfloat16",
    "sha256 src.pt",
    "verify pt vs safetensors",
    "small pt→safetensors",
    "one pt→safetensors",
    "small safetensors→hdf5",
    "one safetensors→hdf5",
}


def test_quick_benchmark_writes_json_with_every_route(tmp_path):
    work, out = tmp_path / "work", tmp_path / "results.json"
    argv = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        "--quick",
        "--size",
        "4MB",
        "--small-count",
        "500",
        "--workdir",
        str(work),
        "--json",
        str(out),
    ]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text("utf-8"))
    assert set(result["routes"]) == ROUTES
    assert result["config"]["rounds"] == 1
    assert result["dataset"]["small_tensors"] == 500
    for name, route in result["routes"].items():
        assert len(route["rounds"]) == 1, name
        assert {"median_s", "median_x_cp", "peak_anon_mib", "peak_file_mib"} <= set(route), name
    assert result["routes"]["cp"]["ok"], result["routes"]["cp"]["errors"]
    assert "| route | median s |" in done.stdout
    assert not work.exists(), "the work folder is removed without --keep"
