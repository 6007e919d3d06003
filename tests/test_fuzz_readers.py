"""Seeded, bounded mutation fuzzing of the data readers (rahf.testing_fuzz): only values, documented corruption items
or documented ValueErrors may come out; anything else, or a hang, fails with the seed and input to reproduce it.

`benchmarks/fuzz_readers.py` runs the same harness on 100,000+ inputs per target.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rahf.data.tfrecord
from rahf.data.consolidate import consolidate
from rahf.data.schema import load_rich_feedback
from rahf.testing_fuzz import TARGETS, Fuzzer, replay

SEED = 20240612
# A few seconds in all on a 2-core machine; the benchmark script runs the long version.
INPUTS = {"tfrecord": 1200, "tfrecord_gzip": 1200, "example": 2500, "jsonl": 700}


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzer]:
    yield Fuzzer(tmp_path_factory.mktemp("fuzz"), time_limit_s=10.0)


def _failures(result) -> str:
    return f"{result.crashes} crashes, {result.hangs} hangs in {result.inputs} inputs:\n" + "\n\n".join(
        finding.describe() for finding in result.findings[:3]
    )


@pytest.mark.parametrize("target", TARGETS)
def test_fuzzed_inputs_give_only_documented_outcomes(fuzzer: Fuzzer, target: str) -> None:
    result = fuzzer.run(target, INPUTS[target], SEED)
    assert result.crashes == 0 and result.hangs == 0, _failures(result)
    assert result.inputs == INPUTS[target]
    # The mutations reach every path that matters, not only the first check of each reader.
    expected = {
        "tfrecord": {"records", "truncated", "bad length CRC", "bad data CRC"},
        "tfrecord_gzip": {"records", "truncated", "over max_record_bytes", "damaged gzip", "bad data CRC"},
        "example": {"ValueError", "skipped", "value"},
        "jsonl": {"reported", "valid"},
    }[target]
    assert expected <= set(result.outcomes), result.outcomes


def _old_reader_without_bounds() -> object:
    """A copy of rahf.data.tfrecord with the gzip read sized from the declared length again (the bug fixed)."""
    spec = importlib.util.spec_from_file_location("_unbounded_tfrecord", rahf.data.tfrecord.__file__)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module._read_up_to = lambda stream, length, chunked: stream.read(length)
    module.DEFAULT_MAX_RECORD_BYTES = 2**64  # read as a default below: no cap
    scan = module.scan_tfrecords
    module.scan_tfrecords = lambda path, **kwargs: scan(path, max_record_bytes=2**64, **kwargs)
    return module


def test_the_fuzz_finds_an_allocation_sized_from_a_declared_length(tmp_path: Path) -> None:
    # The harness must be able to fail: against a reader that trusts the length again, it reports crashes, each with
    # what reruns it.
    fuzzer = Fuzzer(tmp_path, tfrecord_module=_old_reader_without_bounds())
    try:
        result = fuzzer.run("tfrecord_gzip", 300, SEED)
    finally:
        sys.modules.pop("_unbounded_tfrecord", None)
    assert result.crashes > 0
    errors = {finding.error.split(":")[0] for finding in result.findings}
    assert errors & {"MemoryError", "OverflowError"}, errors
    finding = next(f for f in result.findings if f.error.startswith(("MemoryError", "OverflowError")))
    assert finding.options["declared_length"] >= 2**36
    text = finding.describe()
    assert f"replay('tfrecord_gzip', {SEED}, {finding.index})" in text and finding.data[:16].hex() in text
    # The same (target, seed, index) is the same input in a new fuzzer: the rerun line is enough.
    assert Fuzzer(tmp_path / "again").case("tfrecord_gzip", SEED, finding.index).data == finding.data


def test_a_hang_is_reported_not_waited_for(tmp_path: Path) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the per-input alarm (SIGALRM) needs the main thread")

    class Slow:
        """A reader that never returns in time."""

        TFRecordCorruption = rahf.data.tfrecord.TFRecordCorruption
        TFRecordCorruptionError = rahf.data.tfrecord.TFRecordCorruptionError

        @staticmethod
        def scan_tfrecords(path: Path, **kwargs: object) -> list:
            time.sleep(30)
            return []

    fuzzer = Fuzzer(tmp_path, tfrecord_module=Slow, time_limit_s=0.2)
    began = time.perf_counter()
    result = fuzzer.run("tfrecord", 2, SEED)
    assert time.perf_counter() - began < 5
    assert result.hangs == 2 and result.crashes == 0
    assert "still running after 0.2 s" in result.findings[0].describe()


def test_replay_reruns_one_input() -> None:
    assert replay("jsonl", SEED, 0) in ("reported", "valid")
    assert replay("example", SEED, 5) in ("ValueError", "skipped", "value")


def test_consolidate_survives_a_whole_file_of_fuzzed_lines(fuzzer: Fuzzer, tmp_path: Path) -> None:
    # The per-line fuzz does not reach what happens after the lines are read (building images, writing Arrow): one
    # whole run over many fuzzed lines does.
    cases = [fuzzer.case("jsonl", SEED + 1, index).data for index in range(150)]
    data = b"\n".join(fuzzer.jsonl_lines) + b"\n" + b"\n".join(cases) + b"\n"  # valid lines first: all kept
    (tmp_path / "ann.jsonl").write_bytes(data)
    report = consolidate(tmp_path / "ann.jsonl", fuzzer.images, tmp_path / "out")
    line_level = [entry for entry in report["invalid"] if entry["line"] is not None]
    assert report["valid_lines"] >= len(fuzzer.jsonl_lines)
    assert report["valid_lines"] + len(line_level) == report["lines"]
    assert json.loads((tmp_path / "out" / "consolidation_report.json").read_text()) == report
    ds = load_rich_feedback(tmp_path / "out")
    assert sum(len(split) for split in ds.values()) == report["images"] > 0
