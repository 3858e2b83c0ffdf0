"""The fuzz harness' own pieces, checked in-process: a broken harness finds nothing."""

from __future__ import annotations

import time

import fuzz_harness as harness
import fuzz_seeds as seeds
import pytest

from nnconv.formats import FormatError


@pytest.mark.parametrize("op", seeds.OPS)
def test_every_mutation_changes_some_seed(op):
    """Each op edits the bytes of at least one seed, and the same draw gives the same file."""
    changed = False
    for seed in seeds.ALL_SEEDS:
        for raw in [(op, 5, 3, 0, b"\x01"), (op, 123456, 7, 1, b"\xfe\xff")]:
            first = seeds.apply(seed, [raw])
            assert first == seeds.apply(seed, [raw])
            changed |= first[0] != seeds.seed_bytes(seed)
    assert changed


def test_structure_tables_find_the_fields_that_matter():
    by_name = seeds.SEED_BY_NAME
    assert (0, 8) in seeds.fields(by_name["fixtures/mlp.safetensors"])  # header length
    assert (40, 8) in seeds.fields(by_name["fixtures/mlp.h5"])  # superblock end-of-file address
    assert seeds.varints(by_name["tests/fuzz/seeds/onnx/external/tiny.onnx"])
    index = by_name["tests/fuzz/seeds/safetensors/sharded/model.safetensors.index.json"]
    data = seeds.seed_bytes(index)
    assert b"weight_map" in {data[a:b] for a, b in seeds.words(index)}


def test_an_allocation_failure_behind_an_nnconv_error_is_seen():
    try:
        try:
            raise MemoryError
        except MemoryError:
            raise FormatError("f", "corrupt") from None
    except FormatError as exc:
        assert harness._allocation_failure(exc)
    assert not harness._allocation_failure(FormatError("f", "header length exceeds the file"))


def test_cpu_limit_stops_a_python_loop():
    started = time.process_time()
    with pytest.raises(harness.Hang), harness.cpu_limit(0.2):
        while True:
            pass
    assert time.process_time() - started < 2


def test_origin_names_the_innermost_nnconv_function():
    from nnconv.formats import registry

    try:
        registry.get([])  # an unhashable name: TypeError inside registry.get
    except TypeError as exc:
        assert harness.origin(exc) == "TypeError in registry.py:get"
    dump = (
        "Current thread 0x1 (most recent call first):\n"
        '  File "/usr/lib/h5py/_hl/attrs.py", line 77 in __getitem__\n'
        f'  File "{harness.ROOT}/formats/hdf5/hdf5_format.py", line 177 in _dtype_of\n'
    )
    assert harness._dump_origin("Hang", dump) == "Hang in hdf5_format.py:_dtype_of"


@pytest.mark.parametrize(
    ("code", "stderr", "ok"),
    [
        (0, "", True),
        (2, "Error: x.pt: corrupt pickle\n", True),
        (0, "a warning\n", False),
        (2, "Error: one\nError: two\n", False),
        (2, "Error: unexpected TypeError: boom (set NNCONV_DEBUG=1 for details)\n", False),
        (1, "Traceback (most recent call last):\n", False),
        (-9, "", False),
    ],
)
def test_cli_verdict(code, stderr, ok):
    assert harness._cli_verdict(code, stderr) is ok
