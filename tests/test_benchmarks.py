"""benchmarks/run.py runs end to end at a tiny size and writes its JSON (no timing assertions);
its pairing alternates each route with its yardstick and reports medians of per-pair ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from measure import Run  # noqa: E402
from pairing import Pair, paired_stats, run_pairs, schedule, summarize  # noqa: E402

ROUTES = {
    "pt→safetensors": "cp src.pt",
    "safetensors→pt": "cp src.safetensors",
    "safetensors→hdf5": "cp src.safetensors",
    "hdf5→safetensors": "cp src.h5",
    "pt→sharded safetensors": "cp src.pt",
    "pt→safetensors --dtype bfloat16": "cp src.pt",
    "naive torch.load+save_file": "cp src.pt",
    "verify pt vs safetensors": "sha256 src.pt",
    "small pt→safetensors": "one pt→safetensors",
    "small safetensors→hdf5": "h5py loop",
}


def fake_runner(times: dict[str, list[float]], cpu: dict[str, list[float]] | None = None):
    """A runner that hands out the given wall (and CPU) seconds per command, in call order."""
    calls: list[str] = []

    def run(argv: list[str]) -> Run:
        key = argv[0]
        i = sum(c == key for c in calls)
        calls.append(key)
        user = (cpu or times)[key][i]
        return Run(True, times[key][i], 1024, 2048, user_s=user, sys_s=0.0)

    return run, calls


def test_runs_alternate_pair_by_pair():
    pair = Pair("route", ["A"], "yard", ["B"])
    assert [(i, role) for i, role, _ in schedule(pair, 3, warmup=True)] == [
        (-1, "a"), (-1, "b"), (0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"), (2, "b"),
    ]  # fmt: skip
    runner, calls = fake_runner({"A": [9.0, 1, 2, 3], "B": [9.0, 1, 1, 1]})
    runs = run_pairs(pair, 3, runner, warmup=True)
    assert calls == ["A", "B"] * 4
    assert [r.seconds for r in runs["a"]] == [1, 2, 3], "the warm-up pair is not timed"
    per_tensor = Pair("small", ["A"], "loop", ["B"], kind="per_tensor", a_one=["a"], b_one=["b"])
    runner, calls = fake_runner({k: [1.0, 1.0] for k in "ABab"})
    run_pairs(per_tensor, 2, runner)
    assert calls == ["A", "B", "a", "b"] * 2


def test_reports_the_median_of_per_pair_ratios_not_the_ratio_of_medians():
    # Pair by pair the route takes 1×, 2× and 0.5× its yardstick: the median of those is 1.0.
    # The medians of each side (10 s and 5 s) would say 2.0×.
    a, b = [1.0, 10.0, 10.0], [1.0, 5.0, 20.0]
    stats = paired_stats(a, b)
    assert stats["median"] == pytest.approx(1.0)
    assert (stats["min"], stats["max"]) == (pytest.approx(0.5), pytest.approx(2.0))
    pair = Pair("route", ["A"], "yard", ["B"], [("x", 1.15), ("anon", 256)])
    cpu = {"A": [2.0, 2.0, 2.0], "B": [1.0, 4.0, 4.0]}  # CPU ratios 2, 0.5, 0.5: median 0.5
    runner, _ = fake_runner({"A": a, "B": b}, cpu)
    s = summarize(pair, run_pairs(pair, 3, runner), count=1, largest=0)
    assert s["x_wall"]["median"] == pytest.approx(1.0)
    assert s["x_cpu"]["median"] == pytest.approx(0.5)
    assert s["wall_s"]["a"]["median"] / s["wall_s"]["b"]["median"] == pytest.approx(2.0)
    assert [t["pass"] for t in s["targets"]] == [True, True]
    # Per tensor: each side minus its own one-tensor run, then the ratio pair by pair.
    pair = Pair("small", ["A"], "loop", ["B"], [("x_tensor", 1.0)], "per_tensor", ["a"], ["b"])
    times = {"A": [3.0, 5.0, 9.0], "a": [1.0, 1.0, 1.0], "B": [5.0, 3.0, 5.0], "b": [1.0] * 3}
    runner, _ = fake_runner(times)
    s = summarize(pair, run_pairs(pair, 3, runner), count=10**6, largest=0)
    assert s["x_wall"]["ratios"] == pytest.approx([0.5, 2.0, 2.0])
    assert s["x_wall"]["median"] == pytest.approx(2.0)
    assert s["us_per_tensor"]["median"] == pytest.approx(4.0)
    assert s["targets"][0]["pass"] is False


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
    assert {s["route"]: s["yardstick"] for s in result["routes"]} == ROUTES
    assert result["config"]["pairs"] == 1
    assert result["dataset"]["small_tensors"] == 500
    for s in result["routes"]:
        assert s["ok"], (s["route"], s["errors"])
        assert s["pairs"] == 1, s["route"]
        assert {"x_wall", "x_cpu", "peak_anon_mib", "wall_s", "cpu_s"} <= set(s), s["route"]
        assert s["runs"]["a"][0]["cpu_s"] > 0, s["route"]
    assert "| route | yardstick |" in done.stdout
    assert "PASS  pt→safetensors: peak anon RSS" in done.stdout
    assert not work.exists(), "the work folder is removed without --keep"
