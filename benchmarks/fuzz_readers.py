"""A long seeded mutation-fuzz run of the data readers, with the harness of `tests/test_fuzz_readers.py`.

    python benchmarks/fuzz_readers.py --inputs 100000 --seed 0 [--targets tfrecord tfrecord_gzip example jsonl]

Targets and allowed outcomes are those of `rahf.testing_fuzz`: TFRecord files (plain and gzip) through the reader
and the RichHF converter's first pass, `tf.train.Example` bytes through `decode_example` and the converter's
per-record build, JSONL annotation lines through `rahf data consolidate`'s per-line reader and checks. `--inputs` is
per target. The address space is capped at `--address_space_gb` above what the process holds at the start, so an
allocation sized from a declared length fails here as `MemoryError` (a crash) even on a machine with the memory to
grant it. Prints, per target, the inputs, crashes, hangs and seconds, and what the inputs came to; then each
finding with its seed, index and how to rerun it. Exits 1 if anything crashed or hung.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from tqdm.auto import tqdm

from rahf.testing_fuzz import TARGETS, Fuzzer


def _cap_address_space(extra_gb: float) -> str:
    """Caps the address space at what is mapped now plus `extra_gb`; returns a line saying what was set."""
    with open("/proc/self/status") as f:
        mapped_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = mapped_kb * 1024 + int(extra_gb * 2**30)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return f"address space capped at {limit / 2**30:.1f} GiB ({mapped_kb / 2**20:.1f} GiB mapped at the start)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="mutated inputs per target (default: 100000)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed; an input is a function of (seed, index)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="targets to fuzz")
    parser.add_argument("--time_limit_s", type=float, default=5.0, help="an input running longer is a hang")
    parser.add_argument(
        "--address_space_gb", type=float, default=4.0, help="address space allowed beyond the start's (0: no cap)"
    )
    parser.add_argument("--show", type=int, default=5, help="findings printed per target")
    args = parser.parse_args()
    if args.inputs < 1:
        parser.error(f"--inputs must be a positive count, got {args.inputs}")

    print(f"fuzz_readers: {args.inputs:,} inputs per target, seed {args.seed}, targets {', '.join(args.targets)}")
    if args.address_space_gb > 0:
        print(_cap_address_space(args.address_space_gb))
    results = []
    began = time.perf_counter()
    with Fuzzer.in_temporary_folder(time_limit_s=args.time_limit_s) as fuzzer:
        for target in args.targets:
            with tqdm(total=args.inputs, desc=target, unit=" inputs", smoothing=0.05) as bar:
                result = fuzzer.run(target, args.inputs, args.seed, progress=bar.update, max_findings=args.show)
            results.append(result)
            outcomes = ", ".join(f"{name}: {count:,}" for name, count in result.outcomes.most_common())
            print(
                f"{target}: {result.inputs:,} inputs, {result.crashes} crashes, {result.hangs} hangs, "
                f"{result.seconds:.1f} s ({outcomes})",
                flush=True,
            )
    total_crashes = sum(r.crashes for r in results)
    total_hangs = sum(r.hangs for r in results)
    print(
        f"total: {sum(r.inputs for r in results):,} inputs, {total_crashes} crashes, {total_hangs} hangs, "
        f"{time.perf_counter() - began:.1f} s"
    )
    for result in results:
        for finding in result.findings:
            print("\n" + finding.describe())
    return 1 if total_crashes or total_hangs else 0


if __name__ == "__main__":
    sys.exit(main())
