"""Speed and memory benchmark of nnconv's conversions against `cp` and a naive script.

Every route runs as its own process; wall time and the peak resident memory of the process tree
(anonymous and file-backed, sampled from /proc every ~5 ms) are recorded.  Routes alternate round
by round, so each ratio to `cp` compares runs of the same round.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from measure import SAMPLE_S, Route, Run, run_route
from report import machine, render, summarize
from safetensors.torch import save_file

from nnconv.formats import NnconvError, sharding

HERE = Path(__file__).resolve().parent
LAYERS, MIB = 24, 1024 * 1024
NAIVE = (
    "import sys, torch\nfrom safetensors.torch import save_file\n"
    "save_file(torch.load(sys.argv[1]), sys.argv[2])\n"
)
SHA256 = (
    "import hashlib, sys\nh = hashlib.sha256()\nwith open(sys.argv[1], 'rb') as f:\n"
    "    for block in iter(lambda: f.read(16 << 20), b''):\n        h.update(block)\n"
    "print(h.hexdigest())\n"
)


def parse_size(text: str) -> int:
    """nnconv's own size syntax (5GB, 512MiB), as an argparse type."""
    try:
        return sharding.parse_size(text)
    except NnconvError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ----------------------------------------------------------------------------- inputs
def llm_plan(size: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """A Llama/Qwen-shaped state_dict of about `size` bytes: 24 blocks, mostly float32."""
    d = max(32, int(math.sqrt(size / 4 / (13 * LAYERS + 16))) // 32 * 32)
    f32, bf16 = torch.float32, torch.bfloat16
    blocks: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        blocks.append((p + "input_layernorm.weight", (d,), f32))
        for name in "qkvo":
            blocks.append((p + f"self_attn.{name}_proj.weight", (d, d), f32))
            if name != "o":
                blocks.append((p + f"self_attn.{name}_proj.bias", (d,), f32))
        blocks.append((p + "post_attention_layernorm.weight", (d,), f32))
        blocks.append((p + "mlp.gate_proj.weight", (3 * d, d), f32))
        blocks.append((p + "mlp.up_proj.weight", (3 * d, d), f32))
        blocks.append((p + "mlp.down_proj.weight", (d, 3 * d), bf16 if i % 8 == 7 else f32))
    used = sum(math.prod(s) * t.itemsize for _, s, t in blocks) + d * 2
    vocab = max(256, (size - used) // (8 * d) // 64 * 64)
    return (
        [("model.embed_tokens.weight", (vocab, d), f32)]
        + blocks
        + [("model.norm.weight", (d,), bf16), ("lm_head.weight", (vocab, d), f32)]
    )


def write_llm(path: Path, plan: list, scratch: Path) -> None:
    """torch.save of the plan, with each tensor generated alone and memory-mapped from scratch."""
    scratch.mkdir()
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for i, (name, shape, dtype) in enumerate(plan):
        raw = scratch / f"{i}.bin"
        with open(raw, "wb") as f:
            f.write(torch.randn(shape, dtype=dtype, generator=gen).view(torch.uint8).numpy())
        state[name] = torch.from_file(
            str(raw), shared=True, size=math.prod(shape), dtype=dtype
        ).view(shape)
    torch.save(state, path)
    del state
    shutil.rmtree(scratch)


def write_small(work: Path, count: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for stem, n in (("small", count), ("one", 1)):
        state = {f"state.{i}.exp_avg": torch.randn(256, generator=gen) for i in range(n)}
        torch.save(state, work / f"{stem}.pt")
        save_file(state, str(work / f"{stem}.safetensors"))


def nnconv_cli() -> list[str]:
    script = Path(sys.executable).parent / "nnconv"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nnconv.converter"]


def prepare(work: Path, size: int, count: int, nn: list[str]) -> dict:
    plan = llm_plan(size)
    write_llm(work / "src.pt", plan, work / "gen")
    procs = {
        dst: subprocess.Popen(
            [*nn, "convert", str(work / "src.pt"), str(work / dst)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for dst in ("src.safetensors", "src.h5")
    }  # both at once: only start-up is CPU-bound
    for dst, proc in procs.items():
        _, err = proc.communicate()
        if proc.returncode:
            print(f"warning: preparing {dst} failed: {err.strip()}", file=sys.stderr)
    write_small(work, count)
    sizes = [math.prod(s) * t.itemsize for _, s, t in plan]
    return {
        "src_pt_bytes": (work / "src.pt").stat().st_size,
        "tensor_bytes": sum(sizes),
        "tensors": len(plan),
        "largest_tensor_bytes": max(sizes),
        "bfloat16_tensors": sum(t == torch.bfloat16 for _, _, t in plan),
        "small_tensors": count,
    }


# ----------------------------------------------------------------------------- routes
def routes(work: Path, out: Path, nn: list[str], size: int) -> list[Route]:
    w = {
        n: str(work / n)
        for n in (
            "src.pt",
            "src.safetensors",
            "src.h5",
            "small.pt",
            "small.safetensors",
            "one.pt",
            "one.safetensors",
        )
    }
    conv = [*nn, "convert"]
    io = [("x_cp", 1.3), ("anon", 256)]
    small = [("us", 20)]
    return [
        Route("cp", ["cp", w["src.pt"], str(out / "out.pt")]),
        Route(
            "naive torch.load+save_file",
            [sys.executable, "-c", NAIVE, w["src.pt"], str(out / "out.safetensors")],
        ),
        Route(
            "pt→safetensors",
            [*conv, w["src.pt"], str(out / "out.safetensors")],
            [("x_cp", 1.15), ("anon", 256)],
        ),
        Route(
            "safetensors→pt",
            [*conv, w["src.safetensors"], str(out / "out.pt")],
            [("x_cp", 2.0), ("anon", 256)],
        ),
        Route("safetensors→hdf5", [*conv, w["src.safetensors"], str(out / "out.h5")], io),
        Route("hdf5→safetensors", [*conv, w["src.h5"], str(out / "out.safetensors")], io),
        Route(
            "pt→sharded safetensors",
            [
                *conv,
                w["src.pt"],
                str(out / "sharded"),
                "--to",
                "safetensors",
                "--shard-size",
                f"{size // 4}B",
            ],
            io,
        ),
        Route(
            "pt→safetensors --dtype bfloat16",
            [*conv, w["src.pt"], str(out / "bf16.safetensors"), "--dtype", "bfloat16"],
            [("anon_largest", 256)],
        ),
        Route("sha256 src.pt", [sys.executable, "-c", SHA256, w["src.pt"]]),
        Route(
            "verify pt vs safetensors",
            [*nn, "verify", w["src.pt"], w["src.safetensors"]],
            [("x_sha256", 0.5), ("anon", 256)],
        ),
        Route("small pt→safetensors", [*conv, w["small.pt"], str(out / "s.safetensors")], small),
        Route("one pt→safetensors", [*conv, w["one.pt"], str(out / "s.safetensors")]),
        Route("small safetensors→hdf5", [*conv, w["small.safetensors"], str(out / "s.h5")], small),
        Route("one safetensors→hdf5", [*conv, w["one.safetensors"], str(out / "s.h5")]),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size", type=parse_size, help="checkpoint size (default 4GB; quick 64MB)")
    ap.add_argument("--rounds", type=int, help="timed rounds (default 3; quick 1)")
    ap.add_argument("--small-count", type=int, help="many-tensor case (50000; quick 5000)")
    ap.add_argument("--quick", action="store_true", help="small size, 1 round, no warm-up")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(".bench-tmp"),
        help="folder for the files, on the disk to measure (default ./.bench-tmp)",
    )
    ap.add_argument("--json", type=Path, default=HERE / "results.json")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per route run")
    a = ap.parse_args(argv)
    size = a.size or (64 * 10**6 if a.quick else 4 * 10**9)
    rounds = a.rounds or (1 if a.quick else 3)
    count = a.small_count or (5000 if a.quick else 50000)
    base_existed = a.workdir.exists()
    a.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=a.workdir)).resolve()
    try:
        nn = nnconv_cli()
        print(f"generating {size / 1e6:.0f} MB in {work} ...", file=sys.stderr)
        info = prepare(work, size, count, nn)
        out = work / "out"
        out.mkdir()
        rs = routes(work, out, nn, size)
        runs: dict[str, list[Run]] = {r.name: [] for r in rs}
        for rnd in range(1 if a.quick else 0, rounds + 1):  # 0: warm-up (not with --quick)
            label = "warm-up" if rnd == 0 else f"round {rnd}/{rounds}"
            for route in rs:
                run = run_route(route, out, work / "route.log", a.timeout)
                print(
                    f"{label}: {route.name}: {run.seconds:.3f} s"
                    f"{'' if run.ok else '  ' + run.error}",
                    file=sys.stderr,
                )
                if rnd > 0:
                    runs[route.name].append(run)
        result = {
            "machine": machine(),
            "dataset": info,
            "config": {
                "size": size,
                "rounds": rounds,
                "quick": a.quick,
                "warmup": not a.quick,
                "sample_interval_s": SAMPLE_S,
                "workdir": str(work),
                "nnconv_cli": nn,
            },
            "routes": summarize(rs, runs, info),
        }
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
            if not base_existed:
                with contextlib.suppress(OSError):
                    a.workdir.rmdir()
    print(render(result))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", "utf-8")
    print(f"\nJSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
