"""Summaries (medians, same-round ratios, targets) and the markdown table of a run."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from importlib import metadata
from pathlib import Path

from measure import Route, Run

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024
TARGET_LABELS = {
    "x_cp": "≤{:g}× cp",
    "anon": "anon ≤{:g} MiB",
    "x_sha256": "≤{:g}× sha256",
    "anon_largest": "anon ≤{:.0f} MiB (256 + largest)",
    "us": "≤{:g} µs/tensor",
}


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(rs: list[Route], runs: dict[str, list[Run]], info: dict) -> dict:
    """Per route: medians over rounds, ratios taken within a round, peaks over rounds, targets."""

    def ratios(name: str, base: str) -> list[float]:
        return [
            r.seconds / b.seconds
            for r, b in zip(runs[name], runs[base], strict=True)
            if r.ok and b.ok and b.seconds > 0
        ]

    out: dict[str, dict] = {}
    for route in rs:
        rr = runs[route.name]
        failed = [r.error for r in rr if not r.ok]
        s = {
            "argv": route.argv,
            "ok": not failed,
            "errors": failed,
            "rounds": [vars(r) for r in rr],
            "median_s": None if failed else median_or_none([r.seconds for r in rr]),
            "median_x_cp": None if failed else median_or_none(ratios(route.name, "cp")),
            "peak_anon_mib": max(r.anon_kib for r in rr) / 1024,
            "peak_file_mib": max(r.file_kib for r in rr) / 1024,
        }
        if route.name.startswith("verify"):
            s["median_x_sha256"] = (
                None if failed else median_or_none(ratios(route.name, "sha256 src.pt"))
            )
        if route.name.startswith("small"):
            one = runs[route.name.replace("small", "one", 1)]
            per = [
                (a.seconds - b.seconds) / info["small_tensors"] * 1e6
                for a, b in zip(rr, one, strict=True)
                if a.ok and b.ok
            ]
            s["us_per_tensor"] = None if failed else median_or_none(per)
        s["targets"] = [check(kind, limit, s, info) for kind, limit in route.targets]
        out[route.name] = s
    return out


def check(kind: str, limit: float, s: dict, info: dict) -> dict:
    value = {
        "x_cp": s["median_x_cp"],
        "anon": s["peak_anon_mib"],
        "us": s.get("us_per_tensor"),
        "x_sha256": s.get("median_x_sha256"),
        "anon_largest": s["peak_anon_mib"],
    }[kind]
    bound = limit + (info["largest_tensor_bytes"] / MIB if kind == "anon_largest" else 0)
    ok = s["ok"] and value is not None and value <= bound
    label = TARGET_LABELS[kind].format(limit if kind != "anon_largest" else bound)
    return {"target": label, "limit": bound, "value": value, "pass": ok}


def machine() -> dict:
    mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    versions = {}
    for pkg in ("nnconv", "torch", "safetensors", "h5py"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(int(mem) / MIB, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": commit,
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict) -> str:
    m, d = result["machine"], result["dataset"]
    lines = [
        f"machine: {m['cpus']} cores ({m['cpus_usable']} usable), {m['ram_gib']} GiB RAM, "
        f"Python {m['python']}, torch {m['versions']['torch']}, "
        f"nnconv {m['versions']['nnconv']} ({m['git_commit'][:10]})",
        f"src.pt: {d['src_pt_bytes'] / MIB:.1f} MiB, {d['tensors']} tensors "
        f"({d['bfloat16_tensors']} bfloat16), largest {d['largest_tensor_bytes'] / MIB:.1f} "
        f"MiB; small case {d['small_tensors']} tensors; rounds {result['config']['rounds']}",
        "",
        "| route | median s | × cp | peak anon MiB | peak file MiB | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, s in result["routes"].items():
        if not s["ok"]:
            note = "FAILED: " + s["errors"][0]
        else:
            note = "; ".join(
                f"{t['target']} {fmt(t['value'], '.2f')}: {'PASS' if t['pass'] else 'FAIL'}"
                for t in s["targets"]
            )
        lines.append(
            f"| {name} | {fmt(s['median_s'], '.3f')} | {fmt(s['median_x_cp'], '.2f')} "
            f"| {s['peak_anon_mib']:.0f} | {s['peak_file_mib']:.0f} | {note} |"
        )
    lines.append("")
    for name, s in result["routes"].items():
        if "us_per_tensor" in s:
            lines.append(
                f"{name}: {fmt(s['us_per_tensor'], '.1f')} µs/tensor "
                f"(minus the 1-tensor run, over {d['small_tensors']} tensors)"
            )
        if "median_x_sha256" in s:
            lines.append(f"{name}: {fmt(s['median_x_sha256'], '.2f')}× sha256 of src.pt")
    return "\n".join(lines)
