"""Speed and memory benchmark of nnconv's conversions, each paired with its yardstick.

Every command runs as its own process; wall time, CPU time (user + sys of the process tree) and
the peak resident memory of the tree (anonymous and file-backed, sampled from /proc every ~5 ms)
are recorded.  Each route alternates with its yardstick (A B A B ...) and the median of the
per-pair ratios is reported, with min and max.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from measure import SAMPLE_S, run_command
from pairing import Pair, run_pairs, summarize
from report import machine, render
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
# The yardstick of HDF5 per tensor: what a user's script (or Keras) does with h5py, into
# nnconv's layout (a group per dotted level, link and attribute order tracked).
H5PY_LOOP = """\
import sys, h5py
from safetensors.numpy import load_file
with h5py.File(sys.argv[2], "w", track_order=True) as f:
    groups = {"": f}
    def group(path):
        g = groups.get(path)
        if g is None:
            up, _, leaf = path.rpartition("/")
            g = groups[path] = group(up).create_group(leaf, track_order=True)
        return g
    for name, value in load_file(sys.argv[1]).items():
        parent, _, leaf = name.replace(".", "/").rpartition("/")
        group(parent).create_dataset(leaf, data=value)
"""


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
def pairs_of(work: Path, out: Path, nn: list[str], size: int) -> list[Pair]:
    """Every route with its yardstick: `cp` of its input for byte routes, sha256 for verify,
    the one-tensor run for the small pt route, a plain h5py loop for small HDF5 writes."""
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

    def cp(src: str) -> tuple[str, list[str]]:
        return f"cp {src}", ["cp", w[src], str(out / "cp.out")]

    io = [("x", 1.3), ("anon", 256)]
    sharded = ["--to", "safetensors", "--shard-size", f"{size // 4}B"]
    return [
        Pair(
            "pt→safetensors",
            [*conv, w["src.pt"], str(out / "out.safetensors")],
            *cp("src.pt"),
            [("x", 1.15), ("anon", 256)],
        ),
        Pair(
            "safetensors→pt",
            [*conv, w["src.safetensors"], str(out / "out.pt")],
            *cp("src.safetensors"),
            [("x", 2.0), ("anon", 256)],
        ),
        Pair(
            "safetensors→hdf5",
            [*conv, w["src.safetensors"], str(out / "out.h5")],
            *cp("src.safetensors"),
            io,
        ),
        Pair(
            "hdf5→safetensors",
            [*conv, w["src.h5"], str(out / "out.safetensors")],
            *cp("src.h5"),
            io,
        ),
        Pair(
            "pt→sharded safetensors",
            [*conv, w["src.pt"], str(out / "sharded"), *sharded],
            *cp("src.pt"),
            io,
        ),
        Pair(
            "pt→safetensors --dtype bfloat16",
            [*conv, w["src.pt"], str(out / "bf16.safetensors"), "--dtype", "bfloat16"],
            *cp("src.pt"),
            [("anon_largest", 256)],
        ),
        Pair(
            "naive torch.load+save_file",
            [sys.executable, "-c", NAIVE, w["src.pt"], str(out / "out.safetensors")],
            *cp("src.pt"),
        ),
        Pair(
            "verify pt vs safetensors",
            [*nn, "verify", w["src.pt"], w["src.safetensors"]],
            "sha256 src.pt",
            [sys.executable, "-c", SHA256, w["src.pt"]],
            [("x", 0.5), ("anon", 256)],
        ),
        Pair(
            "small pt→safetensors",
            [*conv, w["small.pt"], str(out / "s.safetensors")],
            "one pt→safetensors",
            [*conv, w["one.pt"], str(out / "s.safetensors")],
            [("us", 20)],
            kind="us",
        ),
        Pair(
            "small safetensors→hdf5",
            [*conv, w["small.safetensors"], str(out / "s.h5")],
            "h5py loop",
            [sys.executable, "-c", H5PY_LOOP, w["small.safetensors"], str(out / "y.h5")],
            [("x_tensor", 1.0)],
            kind="per_tensor",
            a_one=[*conv, w["one.safetensors"], str(out / "s.h5")],
            b_one=[sys.executable, "-c", H5PY_LOOP, w["one.safetensors"], str(out / "y.h5")],
        ),
    ]


def against(pair: Pair, other: Path) -> Pair:
    """The pair with the same nnconv commands, run from another build, as its yardstick."""

    def old(argv: list[str] | None) -> list[str] | None:
        return argv and ["env", f"PYTHONPATH={other}", *argv]

    yard = f"build {other}"
    if pair.kind == "per_tensor":
        return Pair(
            pair.name, pair.a, yard, old(pair.a), [], "per_tensor", pair.a_one, old(pair.a_one)
        )
    return Pair(pair.name, pair.a, yard, old(pair.a), [], "ratio")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size", type=parse_size, help="checkpoint size (default 2GiB; quick 64MB)")
    ap.add_argument("--pairs", type=int, help="timed pairs per route (default 5; quick 1)")
    ap.add_argument("--small-count", type=int, help="many-tensor case (50000; quick 5000)")
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 pair, no warm-up pair")
    ap.add_argument(
        "--only", action="append", default=[], help="a route (its name, or a word of it)"
    )
    ap.add_argument(
        "--inputs", type=Path, help="reuse the inputs of an earlier --keep run (its run-* folder)"
    )
    ap.add_argument(
        "--against",
        type=Path,
        help="yardstick: the same nnconv commands run with PYTHONPATH=AGAINST (another build, "
        "e.g. git archive HEAD converter formats unpacked under AGAINST/nnconv)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(".bench-tmp"),
        help="folder for the files, on the disk to measure (default ./.bench-tmp)",
    )
    ap.add_argument("--json", type=Path, default=HERE / "results.json")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per command")
    a = ap.parse_args(argv)
    size = a.size or (64 * 10**6 if a.quick else 2 << 30)
    npairs = a.pairs or (1 if a.quick else 5)
    count = a.small_count or (5000 if a.quick else 50000)
    base_existed = a.workdir.exists()
    if a.inputs:
        work = a.inputs.resolve()
        info = json.loads((work / "dataset.json").read_text())
        size, count, a.keep = info["size"], info["small_tensors"], True
    else:
        a.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="run-", dir=a.workdir)).resolve()
    try:
        nn = nnconv_cli()
        if not a.inputs:
            print(f"generating {size / 1e6:.0f} MB in {work} ...", file=sys.stderr)
            info = prepare(work, size, count, nn) | {"size": size}
            (work / "dataset.json").write_text(json.dumps(info) + "\n")
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        log = work / "route.log"
        summaries = []
        rs = pairs_of(work, out, nn, size)
        if a.against:
            rs = [against(p, a.against.resolve()) for p in rs if not p.name.startswith("naive")]
        for pair in rs:
            if a.only and not any(o == pair.name or o in pair.name.split() for o in a.only):
                continue
            runs = run_pairs(
                pair,
                npairs,
                lambda argv: run_command(argv, out, log, a.timeout),
                warmup=not a.quick,
                log=lambda line: print(line, file=sys.stderr, flush=True),
            )
            summaries.append(summarize(pair, runs, count, info["largest_tensor_bytes"]))
        result = {
            "machine": machine(),
            "dataset": info,
            "config": {
                "size": size,
                "pairs": npairs,
                "quick": a.quick,
                "warmup": not a.quick,
                "method": "A B A B per route, sync + inputs read before each run, "
                "median of per-pair ratios",
                "sample_interval_s": SAMPLE_S,
                "workdir": str(work),
                "nnconv_cli": nn,
                "pythonpath": os.environ.get("PYTHONPATH"),
                "against": str(a.against) if a.against else None,
            },
            "routes": summaries,
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
