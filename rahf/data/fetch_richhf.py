"""`rahf data fetch-richhf`: RichHF-18K's 17,760 images and prompts pulled out of Pick-a-Pic v1, then converted.

The release holds labels only; its images and prompts are in Pick-a-Pic v1, about 204 GB of parquet shards on the
model hub. This command reads the release's TFRecords, takes the uids it needs, and reads from each shard only what
finds them: the parquet footer, the `caption` / `image_0_uid` / `image_1_uid` columns of each row group, and the image
column (`jpg_0` or `jpg_1`) of the row groups that hold a needed uid, never a whole shard. One shard at a time, so
memory stays at one row group. The row group is the unit: what is skipped depends on the shards' row-group size.

```bash
rahf data fetch-richhf --tfrecords richhf-18k/ --out data/richhf18k               # from the hub
rahf data fetch-richhf --tfrecords richhf-18k/ --pickapic /data/pickapic_v1 --out data/richhf18k  # a local copy
```

`--pickapic` is a hub dataset repository id (default `yuvalkirstain/pickapic_v1`, read with `huggingface_hub`'s
`HfFileSystem`, ranged HTTP reads) or a local folder laid out like it (`data/{split}-NNNNN-of-NNNNN.parquet`).
RichHF-18K's train and dev uids are looked for in Pick-a-Pic's `train` shards, its test uids in its `test` shards
(`--search_all_shards` looks in every shard for the uids not found there).

What is found goes to `--cache` (default `OUT.fetch/`): `images/{uid}.{jpg,png,webp}`, `images/prompts.jsonl` and
`fetch_state.json` (the shards done, and what was read of each). An interrupted run started again skips the shards done and the uids already
fetched. `CACHE/fetch_report.json` counts the shards, row groups and bytes read, and `CACHE/missing_uids.json` lists, per
split, the uids found in no shard. Then the images folder is converted exactly as `convert-richhf` would
(`OUT/conversion_report.json`).

Examples:
    >>> from rahf.data.fetch_richhf import fetch_richhf
    >>> report = fetch_richhf(["richhf-18k/"], "pickapic_v1_local", "data/richhf18k")
    >>> report["fetch"]["missing"]
    0
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from tqdm.auto import tqdm

from .jsonl import JSONLineError, read_jsonl
from .richhf import SCORE_SCALES, _convert_scanned, _find_source, _scan, expand_tfrecord_paths
from .schema import check_output_dir, prepare_output_dir
from .tfrecord import DEFAULT_MAX_RECORD_BYTES

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PICKAPIC", "PICKAPIC_SPLIT_OF", "fetch_pickapic_images", "fetch_richhf", "register"]

DEFAULT_PICKAPIC = "yuvalkirstain/pickapic_v1"
# RichHF-18K split -> the Pick-a-Pic v1 split its images come from (docs/reference.md, section 2).
PICKAPIC_SPLIT_OF = {"train": "train", "validation": "train", "test": "test"}
STATE_NAME = "fetch_state.json"
REPORT_NAME = "fetch_report.json"
MISSING_NAME = "missing_uids.json"
_INDEX_COLUMNS = ["caption", "image_0_uid", "image_1_uid"]
_SHARD_SPLIT = re.compile(r"^([A-Za-z0-9_]+)-\d+-of-\d+\.parquet$")


class _CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes read through it, so a run can show it never read a shard whole."""

    def __init__(self, raw: BinaryIO, size: int) -> None:
        self.raw = raw
        self.size = size
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bytes_read += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.raw.close()
        super().close()


class _LocalStore:
    """A local folder laid out like the hub repository."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = str(root)

    def shards(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*.parquet"))

    def open(self, shard: str) -> _CountingFile:
        path = self.root / shard
        return _CountingFile(open(path, "rb"), path.stat().st_size)


class _HubStore:
    """A dataset repository on the hub, read through `HfFileSystem` (ranged HTTP reads, nothing downloaded whole)."""

    def __init__(self, repo_id: str, revision: str | None = None) -> None:
        from huggingface_hub import HfFileSystem

        self.fs = HfFileSystem()
        self.repo_id = repo_id
        self.revision = revision
        self.name = f"hub dataset {repo_id}" + (f"@{revision}" if revision else "")
        # HfFileSystem's paths carry the revision: datasets/owner/name@rev, a branch's "/" quoted.
        self.prefix = f"datasets/{repo_id}" + (f"@{quote(revision, safe='')}" if revision else "")

    def shards(self) -> list[str]:
        found = self.fs.glob(f"{self.prefix}/**/*.parquet")
        return sorted(path.split("/", 3)[3] for path in found)  # datasets/owner/name[@rev]/data/... -> data/...

    def open(self, shard: str) -> _CountingFile:
        path = f"{self.prefix}/{shard}"
        size = int(self.fs.info(path)["size"])
        # A small block size: a row group's uid columns are a few hundred kB, its image columns tens of MB.
        raw = self.fs.open(path, "rb", block_size=2**20)
        return _CountingFile(raw, size)


def _open_store(pickapic: str | Path, revision: str | None) -> _LocalStore | _HubStore:
    path = Path(pickapic)
    if path.is_dir():
        return _LocalStore(path)
    if path.exists():
        raise ValueError(f"`pickapic` {str(pickapic)!r} is a file; pass a folder laid out like the hub repository")
    text = str(pickapic)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text):
        raise ValueError(
            f"`pickapic` {text!r} is neither a local folder nor a hub repository id (owner/name); pass "
            f"{DEFAULT_PICKAPIC!r} or a folder of Pick-a-Pic v1 parquet shards (data/train-NNNNN-of-NNNNN.parquet)"
        )
    return _HubStore(text, revision)


def shard_split(shard: str) -> str | None:
    """The Pick-a-Pic split of a shard from its file name (`data/train-00003-of-00645.parquet` -> `train`)."""
    match = _SHARD_SPLIT.match(Path(shard).name)
    return match.group(1) if match else None


def _image_suffix(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".jpg"


class _Cache:
    """The fetched images and prompts (an images folder `convert-richhf` reads) and the shards already done."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.state_path = root / STATE_NAME
        self.state: dict[str, Any] = {"shards_done": []}
        if self.state_path.is_file():
            self.state = json.loads(self.state_path.read_text(encoding="utf-8"))
        # A run killed while appending leaves at most a cut last line; keep only the prompts whose image is there.
        self.prompts: dict[str, str] = {}
        prompts_file = self.images / "prompts.jsonl"
        for _, row in read_jsonl(prompts_file) if prompts_file.is_file() else ():
            if isinstance(row, JSONLineError) or not isinstance(row, dict):
                continue
            uid, prompt = row.get("uid"), row.get("prompt")
            if isinstance(uid, str) and isinstance(prompt, str) and self._image_of(uid) is not None:
                self.prompts[uid] = prompt
        tmp = prompts_file.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for uid, prompt in self.prompts.items():
                f.write(json.dumps({"uid": uid, "prompt": prompt}) + "\n")
        os.replace(tmp, prompts_file)
        self._prompts_file = open(prompts_file, "a", encoding="utf-8")

    def _image_of(self, uid: str) -> Path | None:
        for suffix in (".jpg", ".png", ".webp"):
            if (self.images / f"{uid}{suffix}").is_file():
                return self.images / f"{uid}{suffix}"
        return None

    def has(self, uid: str) -> bool:
        return uid in self.prompts

    def add(self, uid: str, prompt: str, image: bytes) -> None:
        path = self.images / f"{uid}{_image_suffix(image)}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(image)
        os.replace(tmp, path)  # the image first: a prompt line always has its image
        self._prompts_file.write(json.dumps({"uid": uid, "prompt": prompt}) + "\n")
        self._prompts_file.flush()
        self.prompts[uid] = prompt

    def shard_done(self, shard: str, counts: dict[str, int]) -> None:
        self.state["shards_done"].append(shard)
        self.state.setdefault("shard_counts", {})[shard] = counts
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.state_path)

    def close(self) -> None:
        self._prompts_file.close()


def _fetch_shard(store, shard: str, wanted: set[str], cache: _Cache) -> dict[str, int]:
    """Fetches into `cache` the `wanted` uids found in `shard`, reading only the uid columns of each row group and the
    image column of the row groups that hold one; removes them from `wanted`. Returns what was read."""
    import pyarrow.parquet as pq

    counts = {"row_groups": 0, "row_groups_scanned": 0, "row_groups_image_reads": 0, "bytes_read": 0, "found": 0}
    with store.open(shard) as f:
        pf = pq.ParquetFile(f, pre_buffer=False)
        names = pf.schema_arrow.names
        missing = [c for c in (*_INDEX_COLUMNS, "jpg_0", "jpg_1") if c not in names]
        if missing:
            raise ValueError(
                f"Pick-a-Pic shard {shard!r} of {store.name} lacks the column(s) {missing}; --pickapic must be "
                "Pick-a-Pic v1 (columns caption, image_0_uid, image_1_uid, jpg_0, jpg_1)"
            )
        counts["row_groups"] = pf.num_row_groups
        for group in range(pf.num_row_groups):
            if not wanted:
                break
            table = pf.read_row_group(group, columns=_INDEX_COLUMNS)
            counts["row_groups_scanned"] += 1
            captions = table.column("caption").to_pylist()
            hits: dict[str, list[tuple[int, str]]] = {"jpg_0": [], "jpg_1": []}
            for column in (0, 1):
                for row, uid in enumerate(table.column(f"image_{column}_uid").to_pylist()):
                    if uid in wanted and isinstance(captions[row], str):
                        hits[f"jpg_{column}"].append((row, uid))
            del table
            columns = [c for c, rows in hits.items() if rows]
            if not columns:
                continue
            images = pf.read_row_group(group, columns=columns)
            counts["row_groups_image_reads"] += 1
            for column in columns:
                values = images.column(column)
                for row, uid in hits[column]:
                    if uid not in wanted:  # both columns of one row group can hold the same uid
                        continue
                    value = values[row].as_py()
                    if isinstance(value, dict):  # a datasets.Image column: {"bytes", "path"}
                        value = value.get("bytes")
                    if not isinstance(value, (bytes, bytearray)) or not value:
                        logger.warning("%s row group %d: no image bytes for uid %s", shard, group, uid)
                        continue
                    cache.add(uid, captions[row], bytes(value))
                    wanted.discard(uid)
                    counts["found"] += 1
            del images
        counts["bytes_read"] = f.bytes_read
        counts["shard_bytes"] = f.size
    return counts


def fetch_pickapic_images(
    needed: dict[str, set[str]],
    pickapic: str | Path,
    cache_dir: str | Path,
    *,
    revision: str | None = None,
    search_all_shards: bool = False,
) -> dict[str, Any]:
    """Fetches the images and captions of `needed` (`{RichHF split: uids}`) from Pick-a-Pic v1 into `cache_dir`.

    Resumable: shards recorded as done in `cache_dir/fetch_state.json` are skipped, uids already in the cache are not
    looked for again. Writes `fetch_report.json` and `missing_uids.json` (`{split: [uid, ...]}`) there.

    Returns:
        The report: `shards` (read this run), `shards_skipped` (done before), `row_groups_scanned`,
        `row_groups_image_reads`, `bytes_read`, `shard_bytes` (the total size of the shards read), `found` (this run),
        `cached` (found before), `missing`.
    """
    store = _open_store(pickapic, revision)
    cache_dir = Path(cache_dir)
    cache = _Cache(cache_dir)
    try:
        all_needed = set().union(*needed.values()) if needed else set()
        cached = {uid for uid in all_needed if cache.has(uid)}
        shards = store.shards()
        if not shards:
            raise ValueError(f"`pickapic` {store.name} holds no parquet shards; pass Pick-a-Pic v1 (or a copy of it)")
        by_split: dict[str, list[str]] = {}
        for shard in shards:
            by_split.setdefault(shard_split(shard) or "", []).append(shard)
        done = set(cache.state["shards_done"])
        totals = {"shards": 0, "row_groups_scanned": 0, "row_groups_image_reads": 0, "bytes_read": 0, "found": 0}
        totals["shard_bytes"] = 0
        passes = []
        for pickapic_split in dict.fromkeys(PICKAPIC_SPLIT_OF.values()):  # train, then test
            uids = {u for s, us in needed.items() if PICKAPIC_SPLIT_OF[s] == pickapic_split for u in us}
            passes.append((by_split.get(pickapic_split, []), uids))
        if search_all_shards:
            passes.append((shards, None))  # None: whatever is still missing
        skipped = set()
        for shard_list, uids in passes:
            wanted = {u for u in (all_needed if uids is None else uids) if not cache.has(u)}
            todo = [s for s in shard_list if s not in done]
            skipped |= {s for s in shard_list if s in done}
            if not wanted or not todo:
                continue
            bar = tqdm(todo, desc=f"fetching from {store.name}", unit=" shards")
            for shard in bar:
                if not wanted:
                    break
                counts = _fetch_shard(store, shard, wanted, cache)
                cache.shard_done(shard, counts)
                done.add(shard)
                totals["shards"] += 1
                for key in ("row_groups_scanned", "row_groups_image_reads", "bytes_read", "found", "shard_bytes"):
                    totals[key] += counts[key]
                bar.set_postfix(found=len(cached) + totals["found"], missing=len(wanted))
                logger.info(
                    "%s: %d of %d row groups scanned, %d image reads, %.1f of %.1f MB read, %d found",
                    shard,
                    counts["row_groups_scanned"],
                    counts["row_groups"],
                    counts["row_groups_image_reads"],
                    counts["bytes_read"] / 1e6,
                    counts["shard_bytes"] / 1e6,
                    counts["found"],
                )
        missing = {split: sorted(u for u in uids if not cache.has(u)) for split, uids in needed.items()}
    finally:
        cache.close()
    report = {
        "pickapic": store.name,
        **totals,
        "shards_skipped": len(skipped),
        "cached": len(cached),
        "needed": len(all_needed),
        "missing": sum(len(v) for v in missing.values()),
    }
    (cache_dir / MISSING_NAME).write_text(json.dumps(missing, indent=2) + "\n", encoding="utf-8")
    (cache_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if report["missing"]:
        logger.warning("%d uid(s) found in no shard: listed in %s", report["missing"], cache_dir / MISSING_NAME)
    return report


def fetch_richhf(
    tfrecords: Sequence[str | Path],
    pickapic: str | Path,
    out_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    search_all_shards: bool = False,
    score_scale: str = "auto",
    overwrite: bool = False,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> dict[str, Any]:
    """The RichHF-18K images and prompts fetched from Pick-a-Pic v1, then the canonical data set built at `out_dir`.

    Args:
        tfrecords (`Sequence[str | Path]`): the release's TFRecord files, or the folder holding them.
        pickapic (`str | Path`): a hub dataset repository id (`yuvalkirstain/pickapic_v1`) or a local folder laid
            out like it.
        out_dir (`str | Path`): where the data set goes (absent or empty, unless `overwrite`).
        cache_dir (`str | Path`, *optional*, defaults to `out_dir` + `.fetch`): the fetched images, prompts and the
            resume state.
        revision (`str`, *optional*): the hub revision (branch, tag or commit).
        search_all_shards (`bool`, *optional*, defaults to `False`): look for uids not found in their Pick-a-Pic
            split's shards in every other shard.
        score_scale, overwrite, max_record_bytes: as `convert_richhf`.

    Returns:
        `convert_richhf`'s report, with the fetch report under `"fetch"`.
    """
    if score_scale not in SCORE_SCALES:
        raise ValueError(f"`score_scale` must be one of {SCORE_SCALES}, got {score_scale!r}")
    paths = expand_tfrecord_paths(tfrecords)
    out = Path(out_dir)
    check_output_dir(out, overwrite=overwrite)  # before the long download, not after it
    cache = Path(cache_dir) if cache_dir is not None else out.with_name(out.name + ".fetch")
    records, ranges = _scan(paths, max_record_bytes)
    needed: dict[str, set[str]] = {}
    for record in records:
        if record.reason is None and record.uid is not None:
            needed.setdefault(record.split, set()).add(record.uid)
    logger.info("%d uids to fetch from %d TFRecord record(s)", sum(map(len, needed.values())), len(records))
    fetch = fetch_pickapic_images(needed, pickapic, cache, revision=revision, search_all_shards=search_all_shards)
    src = cache / "images"
    _find_source(src)
    out = prepare_output_dir(out, overwrite=overwrite)
    return _convert_scanned(paths, records, ranges, src, out, score_scale, max_record_bytes, extra={"fetch": fetch})


def _run(args: argparse.Namespace) -> int:
    fetch_richhf(
        args.tfrecords,
        args.pickapic,
        args.out,
        cache_dir=args.cache,
        revision=args.revision,
        search_all_shards=args.search_all_shards,
        score_scale=args.score_scale,
        overwrite=args.overwrite,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `fetch-richhf` to the `rahf data` command line."""
    parser = subparsers.add_parser(
        "fetch-richhf",
        help="RichHF-18K TFRecords -> only their images and prompts read out of Pick-a-Pic v1 -> canonical data set",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--tfrecords", nargs="+", required=True, metavar="PATH", help="the release's TFRecord files or their folder"
    )
    parser.add_argument(
        "--pickapic",
        default=DEFAULT_PICKAPIC,
        metavar="REPO_OR_DIR",
        help=f"hub dataset repository id (default {DEFAULT_PICKAPIC}) or a local folder laid out like it",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder of the data set (absent or empty)")
    parser.add_argument("--cache", default=None, metavar="DIR", help="fetched images and resume state (OUT.fetch)")
    parser.add_argument("--revision", default=None, help="hub revision of --pickapic (branch, tag or commit)")
    parser.add_argument(
        "--search_all_shards",
        action="store_true",
        help="look for uids not found in their Pick-a-Pic split's shards in every other shard too",
    )
    parser.add_argument(
        "--score_scale", choices=SCORE_SCALES, default="auto", help="score scale of the TFRecords (default: detect)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a data set saved at --out before")
    parser.set_defaults(func=_run)
