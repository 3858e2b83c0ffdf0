"""Pairing: each nnconv route alternates with its yardstick, and the paired ratios are reported.

A route and its yardstick run one after the other (A B A B ...), so that each ratio compares
two runs made under the same conditions (page cache, writeback, other load); what is
reported is the median of those per-pair ratios with their min and max, never a ratio of
medians (which mixes runs made minutes apart).  Everything here is pure, given a function
that runs one command (see measure.run_command), so that tests can check it without processes.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from measure import Run

MIB = 1024 * 1024
# kind "ratio": wall (and CPU) of A over B, per pair.  "us": B is A on a one-tensor input:
# (A - B) / count, in µs per tensor.  "per_tensor": A and B, then both on a one-tensor
# input (a_one, b_one): (A - A_one) / (B - B_one) per pair, start-up subtracted from each.
KINDS = ("ratio", "us", "per_tensor")
TARGET_LABELS = {
    "x": "≤ {:g}× {yard} (wall, median of paired ratios)",
    "x_tensor": "≤ {:g}× {yard} per tensor (median of paired ratios)",
    "anon": "peak anon RSS ≤ {:g} MiB",
    "anon_largest": "peak anon RSS ≤ {:.0f} MiB (256 + largest tensor)",
    "us": "≤ {:g} µs/tensor (median over pairs)",
}


@dataclass
class Pair:
    name: str  # the nnconv route
    a: list[str]  # its command
    yardstick: str  # what it is compared with
    b: list[str]  # the yardstick's command
    targets: list[tuple[str, float]] = field(default_factory=list)
    kind: str = "ratio"
    a_one: list[str] | None = None  # "per_tensor": the same commands on a one-tensor input
    b_one: list[str] | None = None

    def roles(self) -> list[tuple[str, list[str]]]:
        """The commands of one pair, in the order they run."""
        out = [("a", self.a), ("b", self.b)]
        if self.kind == "per_tensor":
            assert self.a_one is not None and self.b_one is not None
            out += [("a_one", self.a_one), ("b_one", self.b_one)]
        return out


def schedule(pair: Pair, pairs: int, warmup: bool = False) -> Iterator[tuple[int, str, list]]:
    """(pair number, role, argv) in running order: A B A B ...; pair -1 is the untimed
    warm-up pair."""
    for i in range(-1 if warmup else 0, pairs):
        for role, argv in pair.roles():
            yield i, role, argv


def run_pairs(
    pair: Pair,
    pairs: int,
    runner: Callable[[list[str]], Run],
    *,
    warmup: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[Run]]:
    """Runs the pair's commands alternately; returns each role's timed runs, in order."""
    runs: dict[str, list[Run]] = {role: [] for role, _ in pair.roles()}
    for i, role, argv in schedule(pair, pairs, warmup):
        run = runner(argv)
        if log:
            label = "warm-up" if i < 0 else f"pair {i + 1}/{pairs}"
            what = pair.name if role.startswith("a") else pair.yardstick
            suffix = " (one tensor)" if role.endswith("_one") else ""
            err = "" if run.ok else "  " + run.error
            log(f"{pair.name}: {label}: {what}{suffix}: {run.seconds:.3f} s{err}")
        if i >= 0:
            runs[role].append(run)
    return runs


def paired_stats(a: list[float], b: list[float]) -> dict | None:
    """Median, min and max of the per-pair ratios a[i] / b[i] (None without a usable pair)."""
    ratios = [x / y for x, y in zip(a, b, strict=True) if y > 0]
    if not ratios:
        return None
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "ratios": ratios,
    }


def spread(values: list[float]) -> dict | None:
    """Median, min and max of values (None for none)."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(pair: Pair, runs: dict[str, list[Run]], count: int, largest: int) -> dict:
    """A pair's summary: paired wall and CPU ratios (or µs per tensor), peaks, targets."""
    failed = [f"{role}: {r.error}" for role, rr in runs.items() for r in rr if not r.ok]
    wall = {role: [r.seconds for r in rr] for role, rr in runs.items()}
    cpu = {role: [r.cpu_s for r in rr] for role, rr in runs.items()}
    s: dict = {
        "route": pair.name,
        "yardstick": pair.yardstick,
        "kind": pair.kind,
        "argv": {role: argv for role, argv in pair.roles()},
        "ok": not failed,
        "errors": failed,
        "runs": {role: [vars(r) | {"cpu_s": r.cpu_s} for r in rr] for role, rr in runs.items()},
        "pairs": len(runs["a"]),
        "wall_s": {role: spread(v) for role, v in wall.items()},
        "cpu_s": {role: spread(v) for role, v in cpu.items()},
        "peak_anon_mib": max((r.anon_kib for r in runs["a"]), default=0) / 1024,
        "peak_file_mib": max((r.file_kib for r in runs["a"]), default=0) / 1024,
        "yardstick_peak_anon_mib": max((r.anon_kib for r in runs["b"]), default=0) / 1024,
        "x_wall": None,
        "x_cpu": None,
        "us_per_tensor": None,
    }
    if not failed:
        if pair.kind == "ratio":
            s["x_wall"] = paired_stats(wall["a"], wall["b"])
            s["x_cpu"] = paired_stats(cpu["a"], cpu["b"])
        elif pair.kind == "us":
            s["us_per_tensor"] = spread(per_tensor(wall["a"], wall["b"], count))
            s["cpu_us_per_tensor"] = spread(per_tensor(cpu["a"], cpu["b"], count))
        else:
            a_us = per_tensor(wall["a"], wall["a_one"], count)
            b_us = per_tensor(wall["b"], wall["b_one"], count)
            s["us_per_tensor"] = spread(a_us)
            s["cpu_us_per_tensor"] = spread(per_tensor(cpu["a"], cpu["a_one"], count))
            s["yardstick_us_per_tensor"] = spread(b_us)
            s["x_wall"] = paired_stats(a_us, b_us)
            s["x_cpu"] = paired_stats(
                per_tensor(cpu["a"], cpu["a_one"], count), per_tensor(cpu["b"], cpu["b_one"], count)
            )
            s["x_wall_whole"] = paired_stats(wall["a"], wall["b"])
    s["targets"] = [check(kind, limit, s, pair.yardstick, largest) for kind, limit in pair.targets]
    return s


def per_tensor(many: list[float], one: list[float], count: int) -> list[float]:
    """µs per tensor, per pair: (many - one) / count."""
    return [(m - o) / count * 1e6 for m, o in zip(many, one, strict=True)]


def check(kind: str, limit: float, s: dict, yard: str, largest: int) -> dict:
    """One goal of a route: its value, the bound, PASS or FAIL."""
    median = lambda d: None if d is None else d["median"]  # noqa: E731
    value = {
        "x": median(s["x_wall"]),
        "x_tensor": median(s["x_wall"]),
        "anon": s["peak_anon_mib"],
        "anon_largest": s["peak_anon_mib"],
        "us": median(s["us_per_tensor"]),
    }[kind]
    bound = limit + (largest / MIB if kind == "anon_largest" else 0)
    ok = s["ok"] and value is not None and value <= bound
    label = TARGET_LABELS[kind].format(bound, yard=yard)
    return {"target": label, "kind": kind, "limit": bound, "value": value, "pass": ok}
