"""rahf data fetch-richhf on a local folder laid out like the Pick-a-Pic v1 hub repository: only the row groups that
hold a needed uid have their image column read, an interrupted run resumes, uids found nowhere are listed."""

from __future__ import annotations

import functools
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_data_richhf import _record

from rahf.data import fetch_richhf as F
from rahf.data.cli import main as data_main
from rahf.data.schema import load_rich_feedback
from rahf.data.tfrecord import write_tfrecords

ROWS_PER_GROUP = 2


@functools.cache
def _encoded(uid: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(_image(uid)).save(out, format="PNG", compress_level=0)  # stored, not deflated: fast to write
    return out.getvalue()


def _image(uid: str) -> np.ndarray:
    # About 77 kB as a PNG: an image column chunk is far bigger than the uid columns and the footer.
    return np.random.default_rng(zlib.crc32(uid.encode())).integers(0, 256, (160, 160, 3), dtype=np.uint8)


def _prompt(uid: str) -> str:
    return f"a photo of {uid} on a table"  # 7 words


# A Pick-a-Pic row holds two images of one caption: t3 shares its row, so its caption, with t2.
CAPTION_OF = {"t3": "t2"}


def _write_shard(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "are_different": [True] * len(pairs),
            "caption": [_prompt(a if not a.startswith("decoy") else b) for a, b in pairs],
            "image_0_uid": [a for a, _ in pairs],
            "image_1_uid": [b for _, b in pairs],
            "jpg_0": [_encoded(a) for a, _ in pairs],
            "jpg_1": [_encoded(b) for _, b in pairs],
            "label_0": [0.5] * len(pairs),
        }
    )
    pq.write_table(table, path, row_group_size=ROWS_PER_GROUP)


def _decoys(n: int, tag: str) -> list[tuple[str, str]]:
    return [(f"decoy-{tag}-{i}a", f"decoy-{tag}-{i}b") for i in range(n)]


@pytest.fixture()
def hub(tmp_path: Path) -> dict:
    """Pick-a-Pic-shaped shards (data/{split}-NNNNN-of-NNNNN.parquet, 2-row row groups) and release TFRecords."""
    root = tmp_path / "pickapic_v1"
    # train-00000: 5 row groups, needed uids in groups 1 (column 1) and 3 (column 0).
    s0 = _decoys(10, "s0")
    s0[2] = (s0[2][0], "t0")
    s0[7] = ("t1", s0[7][1])
    _write_shard(root / "data" / "train-00000-of-00003.parquet", s0)
    # train-00001: needed in group 0 (both columns of one row) and the dev uid in group 4.
    s1 = _decoys(10, "s1")
    s1[0] = ("t2", "t3")
    s1[9] = (s1[9][0], "d0")
    _write_shard(root / "data" / "train-00001-of-00003.parquet", s1)
    # train-00002: no needed uid at all.
    _write_shard(root / "data" / "train-00002-of-00003.parquet", _decoys(6, "s2"))
    # test: the test uids; "t0" also appears here, and must not be taken for a test record.
    st = _decoys(6, "st")
    st[1] = ("x0", st[1][1])
    st[3] = ("t0", st[3][1])
    st[4] = (st[4][0], "x1")
    _write_shard(root / "data" / "test-00000-of-00001.parquet", st)
    # validation_unique: holds x2, which a test record needs; found only with search_all_shards.
    _write_shard(root / "data" / "validation_unique-00000-of-00001.parquet", [("x2", "decoy-vu-0")])
    (root / "README.md").write_text("---\nconfigs: ...\n---\n")

    tf = tmp_path / "richhf-18k"
    tf.mkdir()
    train = ["t0", "t1", "t2", "t3", "ghost"]  # ghost: in no shard
    records = {
        uid: _record(uid, (0.5, 0.5, 0.5, 0.5), seed=i) for i, uid in enumerate(train + ["d0", "x0", "x1", "x2"])
    }
    for record in records.values():
        record["prompt_misalignment_label"] = [b"1 1 0 1 1 1 1"]
    write_tfrecords(tf / "train.tfrecord", [records[u] for u in train])
    write_tfrecords(tf / "dev.tfrecord", [records["d0"]])
    write_tfrecords(tf / "test.tfrecord", [records[u] for u in ("x0", "x1", "x2")])
    return {"root": root, "tf": tf, "dir": tmp_path}


def _check_dataset(out: Path, expected: dict[str, list[str]]) -> None:
    ds = load_rich_feedback(out)
    for split, uids in expected.items():
        assert ds[split]["uid"] == uids
        for row in ds[split]:
            assert row["prompt"] == _prompt(CAPTION_OF.get(row["uid"], row["uid"]))
            np.testing.assert_array_equal(np.asarray(row["image"]), _image(row["uid"]))
            assert row["word_labels"] == [1, 1, 0, 1, 1, 1, 1]


def test_fetch_reads_only_the_needed_row_groups_and_lists_the_missing_uids(hub: dict) -> None:
    out = hub["dir"] / "out"
    report = F.fetch_richhf([hub["tf"]], hub["root"], out)
    fetch = report["fetch"]
    # Pick-a-Pic train shards: shard 0 (5 row groups scanned, 2 image reads), shard 1 (5, 2: t2 and t3 in one read),
    # shard 2 (3 scanned, none read: "ghost" is wanted until the end); test shard: 3 scanned (x2 is never found),
    # 2 image reads; validation_unique is not looked at.
    assert fetch["shards"] == 4
    assert fetch["row_groups_scanned"] == 5 + 5 + 3 + 3
    assert fetch["row_groups_image_reads"] == 2 + 2 + 0 + 2
    assert fetch["found"] == 7 and fetch["missing"] == 2 and fetch["needed"] == 9
    # No shard is read whole: only 14 of the 4 shards' 64 images, and none of the shard that holds no needed uid.
    assert fetch["bytes_read"] < 0.35 * fetch["shard_bytes"]
    cache = hub["dir"] / "out.fetch"
    per_shard = json.loads((cache / "fetch_state.json").read_text())["shard_counts"]
    idle = per_shard["data/train-00002-of-00003.parquet"]
    assert idle["row_groups_image_reads"] == 0 and idle["bytes_read"] < 0.15 * idle["shard_bytes"]
    assert all(c["bytes_read"] < 0.5 * c["shard_bytes"] for c in per_shard.values())
    assert json.loads((cache / "missing_uids.json").read_text()) == {
        "train": ["ghost"],
        "validation": [],
        "test": ["x2"],
    }
    assert json.loads((cache / "fetch_report.json").read_text()) == fetch
    assert (report["read"], report["converted"]) == (9, 7)
    assert report["skip_reasons_by_split"]["train"] == {"missing image": 1}
    assert report["skip_reasons_by_split"]["test"] == {"missing image": 1}
    assert json.loads((out / "conversion_report.json").read_text()) == report
    _check_dataset(out, {"train": ["t0", "t1", "t2", "t3"], "validation": ["d0"], "test": ["x0", "x1"]})


def test_search_all_shards_finds_uids_outside_their_split(hub: dict) -> None:
    report = F.fetch_richhf([hub["tf"]], hub["root"], hub["dir"] / "out", search_all_shards=True)
    assert report["fetch"]["missing"] == 1  # only "ghost"
    _check_dataset(hub["dir"] / "out", {"test": ["x0", "x1", "x2"]})


def test_an_interrupted_fetch_resumes_without_rereading_done_shards(hub: dict, monkeypatch) -> None:
    real_add = F._Cache.add
    calls = {"n": 0}

    def dying_add(self, uid, prompt, image):
        calls["n"] += 1
        if calls["n"] == 4:  # killed in the middle of the second shard (t0, t1 done; t2 written, t3 next)
            raise KeyboardInterrupt
        real_add(self, uid, prompt, image)

    monkeypatch.setattr(F._Cache, "add", dying_add)
    out = hub["dir"] / "out"
    with pytest.raises(KeyboardInterrupt):
        F.fetch_richhf([hub["tf"]], hub["root"], out)
    monkeypatch.setattr(F._Cache, "add", real_add)
    cache = hub["dir"] / "out.fetch"
    assert json.loads((cache / "fetch_state.json").read_text())["shards_done"] == ["data/train-00000-of-00003.parquet"]
    with open(cache / "images" / "prompts.jsonl", "a") as f:
        f.write('{"uid": "t3", "prom')  # a line cut by the kill
    assert not out.exists()

    report = F.fetch_richhf([hub["tf"]], hub["root"], out)
    fetch = report["fetch"]
    assert fetch["shards_skipped"] == 1 and fetch["cached"] == 3  # t0, t1, t2
    assert fetch["found"] == 4 and fetch["missing"] == 2
    assert fetch["row_groups_scanned"] == 5 + 3 + 3  # shard 0 not read again
    _check_dataset(out, {"train": ["t0", "t1", "t2", "t3"], "validation": ["d0"], "test": ["x0", "x1"]})
    lines = (cache / "images" / "prompts.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["uid"] for line in lines) == ["d0", "t0", "t1", "t2", "t3", "x0", "x1"]

    # A third run has nothing left to read but the shards that could still hold the missing uids.
    again = F.fetch_richhf([hub["tf"]], hub["root"], hub["dir"] / "out2", cache_dir=cache)
    assert again["fetch"]["shards"] == 0 and again["fetch"]["cached"] == 7
    _check_dataset(hub["dir"] / "out2", {"train": ["t0", "t1", "t2", "t3"], "test": ["x0", "x1"]})


def test_cli_and_bad_sources(hub: dict, tmp_path: Path) -> None:
    argv = [
        "fetch-richhf",
        "--tfrecords",
        str(hub["tf"]),
        "--pickapic",
        str(hub["root"]),
        "--out",
        str(tmp_path / "o"),
    ]
    assert data_main(argv) == 0
    assert len(load_rich_feedback(tmp_path / "o")["train"]) == 4
    assert data_main(argv) == 2  # --out not empty
    assert F.shard_split("data/train-00003-of-00645.parquet") == "train"
    assert F.shard_split("data/validation_unique-00000-of-00001.parquet") == "validation_unique"
    with pytest.raises(ValueError, match="neither a local folder nor a hub repository id"):
        F._open_store("not a repo", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no parquet shards"):
        F.fetch_pickapic_images({"train": {"a"}}, tmp_path / "empty", tmp_path / "c")
    assert isinstance(F._open_store("yuvalkirstain/pickapic_v1", None), F._HubStore)  # no network until it reads


def test_a_hub_repository_id_is_read_through_hffilesystem(hub: dict, tmp_path: Path, monkeypatch) -> None:
    """The hub path with HfFileSystem stood in for by a local file system of the same paths (no network)."""
    import shutil

    import huggingface_hub
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    mirror = tmp_path / "hf" / "datasets" / "someone" / "pickapic_v1"
    shutil.copytree(hub["root"], mirror)
    opened = []

    class FakeHfFileSystem(DirFileSystem):
        def __init__(self):
            super().__init__(path=str(tmp_path / "hf"), fs=LocalFileSystem())

        def open(self, path, mode="rb", **kwargs):
            opened.append((path, kwargs.get("block_size")))
            return super().open(path, mode, **kwargs)

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", FakeHfFileSystem)
    report = F.fetch_richhf([hub["tf"]], "someone/pickapic_v1", tmp_path / "out")
    assert report["fetch"]["pickapic"] == "hub dataset someone/pickapic_v1"
    assert report["fetch"]["found"] == 7 and report["fetch"]["row_groups_image_reads"] == 6
    assert sorted(p for p, _ in opened) == sorted(
        f"datasets/someone/pickapic_v1/data/{name}"
        for name in (
            "train-00000-of-00003.parquet",
            "train-00001-of-00003.parquet",
            "train-00002-of-00003.parquet",
            "test-00000-of-00001.parquet",
        )
    )
    assert {b for _, b in opened} == {2**20}
    _check_dataset(tmp_path / "out", {"train": ["t0", "t1", "t2", "t3"], "test": ["x0", "x1"]})
