"""Mutation fuzzing of every reader, and of ``nnconv inspect``, in the default test run.

Each reader gets :data:`fuzz_harness.EXAMPLES` distinct mutated inputs (100,000
with ``NNCONV_FUZZ_LONG=1``) from a fixed hypothesis seed, so a run is
reproducible and a failure is the same on every machine.  The runs are child
processes started together (the machine's cores share them); each test waits
for its own.  New crashers are written under a temporary folder (or
``$NNCONV_FUZZ_OUT``), never into the repository: the failure message says
where, so that a human can commit them to ``tests/fuzz/corpus``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fuzz_harness as harness
import pytest

from nnconv.formats import registry

READERS = sorted(harness.SEEDS)
SCRIPT = str(Path(harness.__file__))
TIMEOUT_S = 6 * 3600 if harness.long_mode() else 900


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every fuzz run at once; yield (reader or "cli") -> (process, out folder)."""
    out = Path(os.environ.get("NNCONV_FUZZ_OUT") or tmp_path_factory.mktemp("fuzz"))
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name in [*READERS, "cli"]:
        if name == "cli":
            args = ["cli", "--examples", str(harness.CLI_EXAMPLES)]
        else:
            args = ["fuzz", name, "--examples", str(harness.examples_per_reader())]
        with open(out / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, SCRIPT, *args, "--out", str(out)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=harness.ROOT,
            )
    yield procs, out
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _summary(runs, name: str) -> tuple[dict, Path]:
    procs, out = runs
    procs[name].wait(timeout=TIMEOUT_S)
    path = out / f"{name}.summary.json"
    log = (out / f"{name}.log").read_text(errors="replace")[-4000:]
    assert path.exists(), (
        f"the {name} fuzz run wrote no summary (exit {procs[name].returncode}):\n{log}"
    )
    return json.loads(path.read_text()), out


def test_every_reader_has_seeds():
    """A reader added to the registry must get fuzz seeds (and so is fuzzed)."""
    assert set(harness.SEEDS) == set(registry.ADAPTERS)
    for reader, seeds in harness.SEEDS.items():
        assert seeds and all(s.reader == reader and s.path.is_file() for s in seeds)


@pytest.mark.parametrize("reader", READERS)
def test_reader_survives_mutations(runs, reader):
    """Success or NnconvError for every input; no hang, no crash, no allocation over the bound."""
    summary, out = _summary(runs, reader)
    crashers = "\n".join(
        f"  {c['origin']}: {c['error'][:300]}\n    {c['file']}" for c in summary["crashers"]
    )
    assert not summary["crashers"], (
        f"{len(summary['crashers'])} new crasher(s) for {reader}, saved under {out / reader} "
        f"(add them to tests/fuzz/corpus/{reader}/ once fixed):\n{crashers}\n\n{summary['report']}"
    )
    assert summary["distinct"] >= summary["examples"], summary


def test_cli_never_prints_a_traceback(runs):
    """``nnconv inspect`` on mutated files: exit 0, or exit 2 with one ``Error:`` line."""
    summary, out = _summary(runs, "cli")
    failures = "\n".join(
        f"  {f['seed']} {f['ops']}: exit {f['exit']}\n{f['stderr'][-600:]}\n    {f['file']}"
        for f in summary["failures"]
    )
    assert not summary["failures"], (
        f"nnconv inspect misbehaved (inputs under {out}/cli):\n{failures}"
    )
    assert summary["inputs"] >= harness.CLI_EXAMPLES * len(READERS), summary
