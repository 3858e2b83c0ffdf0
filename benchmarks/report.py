"""The machine's description and the markdown table and PASS/FAIL lines of a paired run."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024


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


def fmt_spread(d: dict | None, spec: str = ".2f", unit: str = "×") -> str:
    """``1.05× (0.98–1.20)``: median of paired ratios (min–max)."""
    if d is None:
        return "-"
    return f"{d['median']:{spec}}{unit} ({d['min']:{spec}}–{d['max']:{spec}})"


def render(result: dict) -> str:
    m, d, c = result["machine"], result["dataset"], result["config"]
    lines = [
        f"machine: {m['cpus']} cores ({m['cpus_usable']} usable), {m['ram_gib']} GiB RAM, "
        f"Python {m['python']}, torch {m['versions']['torch']}, "
        f"nnconv {m['versions']['nnconv']} ({m['git_commit'][:10]})",
        f"src.pt: {d['src_pt_bytes'] / MIB:.1f} MiB, {d['tensors']} tensors "
        f"({d['bfloat16_tensors']} bfloat16), largest {d['largest_tensor_bytes'] / MIB:.1f} "
        f"MiB; small case {d['small_tensors']} tensors; {c['pairs']} pairs per route"
        f"{', after a warm-up pair' if c['warmup'] else ''}",
        "",
        "| route | yardstick | nnconv s | yardstick s | wall ×, median of pairs (min–max) "
        "| CPU × (min–max) | nnconv CPU s | peak anon MiB |",
        "|---|---|---:|---:|---|---|---:|---:|",
    ]
    for s in result["routes"]:
        w, cpu = s["wall_s"], s["cpu_s"]
        if not s["ok"]:
            lines.append(f"| {s['route']} | {s['yardstick']} | FAILED: {s['errors'][0]} |||||")
            continue
        cpu_x = fmt_spread(s["x_cpu"])
        if s["kind"] == "us":
            wall_x = fmt_spread(s["us_per_tensor"], ".1f", " µs/tensor")
            cpu_x = fmt_spread(s["cpu_us_per_tensor"], ".1f", " µs/tensor")
        elif s["kind"] == "per_tensor":
            wall_x = fmt_spread(s["x_wall"]) + " per tensor"
        else:
            wall_x = fmt_spread(s["x_wall"])
        lines.append(
            f"| {s['route']} | {s['yardstick']} | {fmt(w['a'] and w['a']['median'], '.3f')} "
            f"| {fmt(w['b'] and w['b']['median'], '.3f')} | {wall_x} | {cpu_x} "
            f"| {fmt(cpu['a'] and cpu['a']['median'], '.2f')} | {s['peak_anon_mib']:.0f} |"
        )
    lines.append("")
    for s in result["routes"]:
        if s["kind"] == "per_tensor" and s["ok"]:
            lines.append(
                f"{s['route']}: {fmt_spread(s['us_per_tensor'], '.1f', ' µs')} per tensor "
                f"(CPU {fmt_spread(s['cpu_us_per_tensor'], '.1f', ' µs')}), "
                f"{s['yardstick']} {fmt_spread(s['yardstick_us_per_tensor'], '.1f', ' µs')} "
                f"(each minus its one-tensor run); whole process "
                f"{fmt_spread(s['x_wall_whole'])}"
            )
    lines.append("")
    lines += goal_lines(result)
    return "\n".join(lines)


def goal_lines(result: dict) -> list[str]:
    """One PASS/FAIL line per goal."""
    out = []
    for s in result["routes"]:
        for t in s["targets"]:
            if t["kind"] in ("x", "x_tensor"):
                value = fmt_spread(s["x_wall"])
            elif t["kind"] == "us":
                value = fmt_spread(s["us_per_tensor"], ".1f", " µs")
            else:
                value = f"{fmt(t['value'], '.0f')} MiB"
            verdict = "PASS" if t["pass"] else "FAIL"
            why = "" if s["ok"] else f" ({s['errors'][0]})"
            out.append(f"{verdict}  {s['route']}: {t['target']}: {value}{why}")
    return out
