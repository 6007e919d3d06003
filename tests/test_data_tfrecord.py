"""TFRecord framing, CRC32C and tf.train.Example encoding, checked against known vectors and hand-built bytes."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from rahf.data.tfrecord import (
    TFRecordCorruption,
    TFRecordCorruptionError,
    _crc32c_python,
    crc32c,
    decode_example,
    encode_example,
    frame_record,
    masked_crc32c,
    read_tfrecord_at,
    read_tfrecords,
    scan_tfrecords,
    write_tfrecords,
)

# CRC32C test vectors: the classic check value and RFC 3720 (iSCSI) appendix B.4.
CRC_VECTORS = [
    (b"123456789", 0xE3069283),
    (b"", 0x00000000),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("data,expected", CRC_VECTORS)
def test_crc32c_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected
    assert _crc32c_python(data) == expected


def test_crc32c_matches_reference_loop() -> None:
    # The vectorised path (chunks, super-chunks, padding) against the byte-at-a-time loop, around every boundary.
    rng = np.random.default_rng(0)
    for size in [127, 128, 129, 1023, 1024, 1025, 4096 + 3, 256 * 1024, 256 * 1024 + 1, 600_001]:
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc32c(data) == _crc32c_python(data), size
    # Vectors embedded in longer buffers exercise the vectorised path with known values.
    assert crc32c(bytes(4096)) == _crc32c_python(bytes(4096))


def test_masked_crc_formula() -> None:
    crc = 0xE3069283
    expected = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32
    assert masked_crc32c(b"123456789") == expected


def test_frame_layout() -> None:
    data = b"hello tfrecord"
    framed = frame_record(data)
    assert len(framed) == 8 + 4 + len(data) + 4
    assert struct.unpack("<Q", framed[:8])[0] == len(data)
    assert struct.unpack("<I", framed[8:12])[0] == masked_crc32c(framed[:8])
    assert framed[12:-4] == data
    assert struct.unpack("<I", framed[-4:])[0] == masked_crc32c(data)


def test_encode_example_matches_hand_built_bytes() -> None:
    # Example{features{feature{key:"a" value{int64_list{value:[1]}}}}}, written out field by field.
    assert encode_example({"a": [1]}) == bytes.fromhex("0a0c0a0a0a016112051a030a0101")
    # Two entries: bytes_list and float_list (packed float32).
    f = struct.pack("<f", 0.5)
    entry_b = b"\x0a\x01b" + b"\x12\x06" + b"\x0a\x04" + b"\x0a\x02xy"
    entry_f = b"\x0a\x01f" + b"\x12\x08" + b"\x12\x06" + b"\x0a\x04" + f
    features = b"\x0a" + bytes([len(entry_b)]) + entry_b + b"\x0a" + bytes([len(entry_f)]) + entry_f
    expected = b"\x0a" + bytes([len(features)]) + features
    assert encode_example({"b": [b"xy"], "f": [0.5]}) == expected


def test_example_round_trip() -> None:
    features = {
        "filename": [b"abc.jpg"],
        "text": "unicode é",
        "scores": [0.25, 1.5, -2.0],
        "ints": [0, 1, -1, 2**40, -(2**63)],
        "empty_f": np.array([], dtype=np.float32),
        "arr": np.array([[1, 2], [3, 4]], dtype=np.int64),
    }
    decoded = decode_example(encode_example(features))
    assert decoded == {
        "filename": [b"abc.jpg"],
        "text": ["unicode é".encode()],
        "scores": [0.25, 1.5, -2.0],
        "ints": [0, 1, -1, 2**40, -(2**63)],
        "empty_f": [],
        "arr": [1, 2, 3, 4],
    }


def test_decode_accepts_unpacked_lists_and_skips_unknown_fields() -> None:
    float_list = b"\x0d" + struct.pack("<f", 2.5) + b"\x0d" + struct.pack("<f", -1.0)  # field 1, wire type 5, twice
    int_list = b"\x08\x05" + b"\x08" + b"\xff" * 9 + b"\x01"  # field 1 varints: 5 and -1
    unknown = b"\x20\x07"  # field 4 varint: ignored
    feature_f = b"\x12" + bytes([len(float_list)]) + float_list
    feature_i = b"\x1a" + bytes([len(int_list)]) + int_list + unknown
    entry_f = b"\x0a\x01f\x12" + bytes([len(feature_f)]) + feature_f
    entry_i = b"\x0a\x01i\x12" + bytes([len(feature_i)]) + feature_i
    features = b"\x0a" + bytes([len(entry_f)]) + entry_f + b"\x0a" + bytes([len(entry_i)]) + entry_i
    message = b"\x0a" + bytes([len(features)]) + features + b"\x10\x01"  # unknown Example field 2
    assert decode_example(message) == {"f": [2.5, -1.0], "i": [5, -1]}


def test_decode_rejects_malformed_messages() -> None:
    good = encode_example({"a": [b"xyz"]})
    with pytest.raises(ValueError, match="truncated"):
        decode_example(good[:-2])
    with pytest.raises(ValueError, match="wire type"):
        decode_example(b"\x0b")  # field 1, wire type 3 (groups): unsupported


def test_encode_rejects_ambiguous_values() -> None:
    with pytest.raises(ValueError, match="'e'.*empty list"):
        encode_example({"e": []})
    with pytest.raises(ValueError, match="'m'"):
        encode_example({"m": [1, b"x"]})


def _records(n: int) -> list[bytes]:
    return [encode_example({"i": [i], "payload": [bytes([i]) * (100 * i + 1)]}) for i in range(n)]


def test_write_read_round_trip(tmp_path) -> None:
    path = tmp_path / "x.tfrecord"
    records = _records(5)
    assert write_tfrecords(path, records) == 5
    assert list(read_tfrecords(path)) == records
    # Dicts are encoded on the fly; offsets from scan_tfrecords reread single records.
    assert write_tfrecords(path, [{"i": [7]}, {"i": [8]}]) == 2
    scanned = list(scan_tfrecords(path))
    assert [decode_example(read_tfrecord_at(path, offset)) for offset, _ in scanned] == [{"i": [7]}, {"i": [8]}]


def test_gzip_files_are_read(tmp_path) -> None:
    plain = tmp_path / "x.tfrecord"
    records = _records(3)
    write_tfrecords(plain, records)
    packed = tmp_path / "x.tfrecord.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert list(read_tfrecords(packed)) == records


def _offsets(path) -> list[int]:
    return [offset for offset, _ in scan_tfrecords(path)]


def test_bad_data_crc_is_skipped_and_reading_goes_on(tmp_path) -> None:
    path = tmp_path / "x.tfrecord"
    records = _records(4)
    write_tfrecords(path, records)
    offsets = _offsets(path)
    raw = bytearray(path.read_bytes())
    raw[offsets[1] + 12 + 3] ^= 0x40  # one bit of record 1's data
    path.write_bytes(bytes(raw))
    items = list(read_tfrecords(path))
    assert len(items) == 4
    assert items[0] == records[0] and items[2] == records[2] and items[3] == records[3]
    bad = items[1]
    assert isinstance(bad, TFRecordCorruption)
    assert (bad.index, bad.offset, bad.reason, bad.fatal) == (1, offsets[1], "bad data CRC", False)
    with pytest.raises(TFRecordCorruptionError, match="record 1 .*bad data CRC"):
        list(read_tfrecords(path, strict=True))
    # Without CRC checks the damaged bytes come through.
    assert len([i for i in read_tfrecords(path, verify_crc=False) if isinstance(i, bytes)]) == 4


def test_bad_length_crc_stops_the_file(tmp_path) -> None:
    path = tmp_path / "x.tfrecord"
    write_tfrecords(path, _records(4))
    offsets = _offsets(path)
    raw = bytearray(path.read_bytes())
    raw[offsets[2] + 9] ^= 0x01  # record 2's length CRC
    path.write_bytes(bytes(raw))
    items = list(read_tfrecords(path))
    assert len(items) == 3
    assert all(isinstance(i, bytes) for i in items[:2])
    assert isinstance(items[2], TFRecordCorruption)
    assert (items[2].index, items[2].reason, items[2].fatal) == (2, "bad length CRC", True)


@pytest.mark.parametrize("cut", [5, 12 + 10, 3])
def test_truncated_file_is_reported(tmp_path, cut: int) -> None:
    path = tmp_path / "x.tfrecord"
    records = _records(3)
    write_tfrecords(path, records)
    raw = path.read_bytes()
    last = _offsets(path)[2]
    path.write_bytes(raw[: last + cut] if cut != 3 else raw[:-cut])
    items = list(read_tfrecords(path))
    assert items[:2] == records[:2]
    assert len(items) == 3 and isinstance(items[2], TFRecordCorruption)
    assert items[2].fatal and items[2].index == 2 and "truncated" in items[2].reason


def _header(length: int, fix_crc: bool = True) -> bytes:
    """A record header declaring `length`, with its length CRC right (so the length itself must be distrusted)."""
    raw = struct.pack("<Q", length)
    return raw + struct.pack("<I", masked_crc32c(raw) if fix_crc else 0)


@pytest.mark.parametrize("length", [2**36, 2**40, 2**63, 2**64 - 1])
def test_gzip_huge_declared_length_is_a_fatal_corruption_not_an_allocation(tmp_path, length: int) -> None:
    # The gzip path knows no file size: before the fix, read(2**36) raised MemoryError and read(2**64 - 1)
    # OverflowError.
    records = _records(2)
    path = tmp_path / "x.tfrecord.gz"
    path.write_bytes(gzip.compress(b"".join(frame_record(r) for r in records) + _header(length) + b"abc"))
    items = list(read_tfrecords(path))
    assert items[:2] == records and len(items) == 3
    bad = items[2]
    assert isinstance(bad, TFRecordCorruption) and bad.fatal and bad.index == 2
    assert bad.reason.startswith(f"record too large: its declared length of {length:,} bytes is more than the")
    assert "maximum record size of 1,073,741,824 bytes (max_record_bytes)" in bad.reason
    with pytest.raises(TFRecordCorruptionError, match="maximum record size"):
        read_tfrecord_at(path, _offsets(path)[2])
    # The same header in a plain file is a truncation: the file's size bounds it.
    plain = tmp_path / "x.tfrecord"
    plain.write_bytes(gzip.decompress(path.read_bytes()))
    assert "truncated" in list(read_tfrecords(plain))[2].reason


def test_gzip_lying_length_below_the_cap_reads_in_bounded_chunks(tmp_path) -> None:
    import tracemalloc

    path = tmp_path / "x.tfrecord.gz"
    length = 2**30 - 1  # accepted by the cap; the stream holds 1 MiB of it
    path.write_bytes(gzip.compress(_header(length) + bytes(2**20)))
    tracemalloc.start()
    try:
        items = list(read_tfrecords(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(items) == 1 and items[0].fatal
    assert items[0].reason == f"truncated: record of {length} bytes; the stream ends after {2**20} of them"
    assert peak < 16 * 2**20, f"{peak:,} bytes allocated for a stream of 1 MiB"  # read(length) would take 1 GiB


def test_max_record_bytes_applies_to_plain_and_gzip_files(tmp_path) -> None:
    records = _records(3)  # sizes 10, ~110, ~210 bytes
    plain = tmp_path / "x.tfrecord"
    write_tfrecords(plain, records)
    packed = tmp_path / "x.tfrecord.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, packed):
        items = list(read_tfrecords(path, max_record_bytes=150))
        assert items[:2] == records[:2] and len(items) == 3
        assert items[2].fatal and "more than the maximum record size of 150 bytes" in items[2].reason
        assert list(read_tfrecords(path, max_record_bytes=len(records[2]))) == records
    with pytest.raises(ValueError, match="`max_record_bytes` must be a non-negative byte count, got -1"):
        list(read_tfrecords(plain, max_record_bytes=-1))
    with pytest.raises(ValueError, match="`offset` must be a non-negative byte offset.*got -5"):
        read_tfrecord_at(plain, -5)


def test_damaged_gzip_stream_is_a_fatal_corruption(tmp_path) -> None:
    records = _records(3)
    compressed = gzip.compress(b"".join(frame_record(r) for r in records))
    path = tmp_path / "x.tfrecord.gz"
    cases = {
        "cut short": compressed[: len(compressed) // 2],
        "bad deflate data": compressed[:10] + b"\xff" * 20 + compressed[30:],
        "bad trailer": compressed[:-8] + b"\x00" * 8,
    }
    for what, data in cases.items():
        path.write_bytes(data)
        items = list(read_tfrecords(path))  # no EOFError / zlib.error / BadGzipFile escapes
        assert isinstance(items[-1], TFRecordCorruption) and items[-1].fatal, what
        assert all(isinstance(i, bytes) for i in items[:-1]), what
        with pytest.raises(TFRecordCorruptionError):
            list(read_tfrecords(path, strict=True))


def test_decode_example_bounds_the_values_it_builds() -> None:
    ints = encode_example({"i": np.arange(1000, dtype=np.int64)})
    floats = encode_example({"f": np.zeros(1000, dtype=np.float32)})
    assert len(decode_example(ints, max_values=1001)["i"]) == 1000
    for message in (ints, floats, encode_example({"b": [b"x"] * 1000})):
        with pytest.raises(ValueError, match="more than max_values=500 values"):
            decode_example(message, max_values=500)
    many_entries = encode_example({f"k{i}": [i] for i in range(50)})
    with pytest.raises(ValueError, match="max_values=40"):
        decode_example(many_entries, max_values=40)
    assert len(decode_example(many_entries, max_values=100)) == 50
