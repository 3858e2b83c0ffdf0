"""Every crasher the fuzzer found, replayed: success or NnconvError, as for any input.

``corpus/<reader>/<sha1>.bin`` is the input, ``<sha1>.json`` says which seed it
came from (so that it is read under that name, beside that seed's external
data or shards), what it did and what fixed it.  ``"status": "open"`` marks a
crasher whose fix belongs to code this suite does not own: the test is an
``xfail(strict=True)``, so the fix turns it into a failure that asks for the
status to become ``"fixed"``.  Replays run in a fuzz worker, with the same
time and memory limits and the same isolation from hangs and crashes.
"""

from __future__ import annotations

import fuzz_harness as harness
import pytest

ENTRIES = harness.corpus_entries()
SIDECAR_KEYS = {"reader", "seed", "name", "origin", "status", "error", "fix"}


def _param(path, meta):
    marks = []
    if meta.get("status") == "open":
        marks.append(pytest.mark.xfail(strict=True, reason=f"open: {meta['fix']}"))
    return pytest.param(path, id=f"{meta['reader']}-{path.stem[:10]}", marks=marks)


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """Each corpus file's answer, from one worker for the whole module."""
    found = harness.replay([p for p, _ in ENTRIES], tmp_path_factory.mktemp("corpus"))
    return {a["file"]: a for a in found}


@pytest.mark.parametrize("path", [_param(p, m) for p, m in ENTRIES])
def test_crasher_is_now_an_nnconv_error_or_success(answers, path):
    answer = answers[str(path)]
    assert "outcome" in answer, f"{answer['crash']}: {answer['error']}\n{answer['trace']}"


@pytest.mark.parametrize("path", [p for p, _ in ENTRIES], ids=lambda p: p.stem[:10])
def test_sidecar_says_where_it_came_from_and_what_fixes_it(path):
    meta = dict(ENTRIES)[path]
    assert set(meta) >= SIDECAR_KEYS, SIDECAR_KEYS - set(meta)
    assert meta["status"] in ("fixed", "open")
    assert path.parent.name == meta["reader"]
    assert (harness.ROOT / meta["seed"]).is_file(), meta["seed"]
