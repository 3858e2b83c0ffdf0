"""Byte moving without torch: placed writes, kernel copies and their fallback, comparisons."""

from __future__ import annotations

import errno
import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnconv.formats import rawio
from nnconv.formats.checkpoint import LazyTensor, Span
from nnconv.formats.errors import FormatError


def _lazy(path, offset: int, nbytes: int) -> LazyTensor:
    def fail():
        raise AssertionError("a span is moved as bytes, never loaded")

    return LazyTensor("uint8", (nbytes,), fail, span=Span(str(path), offset, nbytes))


@settings(max_examples=200, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, 3000), st.binary(min_size=1, max_size=700)), max_size=25
    ),
    batch=st.sampled_from([16, 1000, 1 << 20]),
)
def test_placer_writes_exactly_what_was_put(tmp_path_factory, writes, batch):
    """Whatever the order, later puts win, and bytes never put stay unwritten (zeros)."""
    path = tmp_path_factory.mktemp("placer") / "out"
    expected = bytearray()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    old_batch = rawio.BATCH
    rawio.BATCH = batch
    try:
        with rawio.SpanReader() as reader, rawio.Placer(reader, fd) as placer:
            for offset, data in writes:
                placer.put(offset, data)
                expected.extend(bytes(max(0, offset + len(data) - len(expected))))
                expected[offset : offset + len(data)] = data
    finally:
        rawio.BATCH = old_batch
        os.close(fd)
    assert path.read_bytes() == bytes(expected)


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "fallback"])
def test_spans_are_copied_with_crc(tmp_path, monkeypatch, kernel):
    src = tmp_path / "src"
    payload = os.urandom(3 * rawio.SMALL + 12345)
    src.write_bytes(b"head" + payload)
    if not kernel:

        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    dst = tmp_path / "dst"
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT)
    try:
        with rawio.SpanReader() as reader, rawio.Placer(reader, fd) as placer:
            small = placer.tensor(0, _lazy(src, 4, 100), name="small", crc=True)
            big = placer.tensor(100, _lazy(src, 104, len(payload) - 100), name="big", crc=True)
    finally:
        os.close(fd)
    assert dst.read_bytes() == payload
    assert (small, big) == (zlib.crc32(payload[:100]), zlib.crc32(payload[100:]))


def test_equal_compares_bytes_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(rawio, "COMPARE_CHUNK", 1000)
    data = os.urandom(5500)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"xx" + data)
    b.write_bytes(data[:5499] + bytes([data[5499] ^ 1]) + data)
    with rawio.SpanReader() as reader:
        assert reader.equal(Span(str(a), 2, 5500), Span(str(b), 5500, 5500))
        assert not reader.equal(Span(str(a), 2, 5500), Span(str(b), 0, 5500))  # last byte
        assert not reader.equal(Span(str(a), 2, 5500), Span(str(b), 0, 5499))  # sizes
        with pytest.raises(FormatError, match="past the end"):
            reader.equal(Span(str(a), 2, 5500), Span(str(b), 6000, 5500))


def test_sources_are_opened_a_few_at_a_time(tmp_path):
    """A sharded source is read shard by shard: at most MAX_OPEN files stay open."""
    shards = []
    for i in range(rawio.MAX_OPEN + 3):
        shard = tmp_path / f"shard{i}"
        shard.write_bytes(bytes([i]) * 100)
        shards.append(shard)
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        with rawio.SpanReader() as reader:
            for i, shard in enumerate(shards):
                reader.write_at(fd, 100 * i, _lazy(shard, 0, 100))
                assert len(reader._files) <= rawio.MAX_OPEN
            assert reader.equal(Span(str(shards[0]), 0, 50), Span(str(shards[0]), 50, 50))
    finally:
        os.close(fd)
    assert out.read_bytes() == b"".join(bytes([i]) * 100 for i in range(len(shards)))
