"""The torch training dataset: shapes, ranges, crops shared by image and heatmaps, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rahf.data.schema import FEATURES
from rahf.data.training import RichFeedbackTorchDataset, resize_heatmap

SIZE = 64
SQUARE = (20, 30, 36, 46)  # rows 20..29, columns 36..45


def _split(n: int = 4):
    from datasets import Dataset

    rows = []
    for i in range(n):
        image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        image[..., 2] = 40  # a dark blue background, so greyscale is visible
        heat = np.zeros((SIZE, SIZE), dtype=np.uint8)
        small = np.zeros((SIZE // 2, SIZE // 2), dtype=np.uint8)  # the other map at half resolution
        r0, r1, c0, c1 = SQUARE
        image[r0:r1, c0:c1] = 255
        heat[r0:r1, c0:c1] = 255
        small[r0 // 2 : r1 // 2, c0 // 2 : c1 // 2] = 128
        rows.append(
            {
                "uid": f"u{i}",
                "image": Image.fromarray(image),
                "prompt": "a white square",
                "plausibility": 0.1 * i,
                "alignment": 0.5,
                "aesthetics": 0.25,
                "overall": 1.0,
                "implausibility_map": Image.fromarray(heat),
                "misalignment_map": Image.fromarray(small),
                "prompt_words": ["a", "white", "square"],
                "word_labels": [1, 0, 1],
            }
        )
    return Dataset.from_list(rows, features=FEATURES)


def _centroid(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([rows.mean() / mask.shape[0], cols.mean() / mask.shape[1]])


def test_item_shapes_ranges_and_order() -> None:
    ds = RichFeedbackTorchDataset(_split(), heatmap_size=16)
    assert len(ds) == 4
    item = ds[3]
    assert item["heatmaps"].shape == (2, 16, 16) and item["heatmaps"].dtype == torch.float32
    assert 0.0 <= float(item["heatmaps"].min()) and float(item["heatmaps"].max()) <= 1.0
    # Area averaging: the implausibility square covers whole 4x4 cells (rows 20..29 -> cells 5..7, partly 7).
    assert float(item["heatmaps"][0, 6, 10]) == pytest.approx(1.0)
    assert float(item["heatmaps"][1, 6, 10]) == pytest.approx(128 / 255, abs=1e-6)
    assert float(item["heatmaps"][0, 0, 0]) == 0.0
    torch.testing.assert_close(item["scores"], torch.tensor([0.3, 0.5, 0.25, 1.0]))
    assert item["image"].mode == "RGB" and item["image"].size == (SIZE, SIZE)
    assert (item["prompt"], item["prompt_words"], item["word_labels"], item["uid"]) == (
        "a white square",
        ["a", "white", "square"],
        [1, 0, 1],
        "u3",
    )
    # No augmentation: the image is the stored one.
    np.testing.assert_array_equal(np.asarray(item["image"]), np.asarray(_split()[3]["image"]))


def test_crop_moves_image_and_heatmaps_together() -> None:
    ds = RichFeedbackTorchDataset(
        _split(1), heatmap_size=SIZE, augment=True, crop_p=1.0, color_jitter_p=0.0, jpeg_p=0.0, grayscale_p=0.0
    )
    centroids = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        image = np.asarray(item["image"])
        assert image.shape[0] < SIZE or image.shape[1] < SIZE  # it was cropped
        assert image.shape[0] >= 0.8 * SIZE - 1 and image.shape[1] >= 0.8 * SIZE - 1
        in_image = _centroid(image[..., 0] > 127)
        for channel in (0, 1):
            in_heat = _centroid(item["heatmaps"][channel].numpy() > 0.25)
            np.testing.assert_allclose(in_heat, in_image, atol=1.5 / SIZE)
        centroids.append(in_image)
    # The crops differ across epochs, so the square's relative position moves.
    assert np.ptp(np.array(centroids), axis=0).max() > 2 / SIZE


def test_same_seed_epoch_index_same_augmentation() -> None:
    split = _split()
    kwargs = dict(heatmap_size=24, augment=True, crop_p=0.5, color_jitter_p=0.5, jpeg_p=0.5, grayscale_p=0.5)
    a = RichFeedbackTorchDataset(split, seed=7, **kwargs)
    b = RichFeedbackTorchDataset(split, seed=7, **kwargs)
    a.set_epoch(2)
    b.set_epoch(2)
    for index in (3, 0, 2):  # order of access does not matter
        first, second = a[index], b[index]
        np.testing.assert_array_equal(np.asarray(first["image"]), np.asarray(second["image"]))
        torch.testing.assert_close(first["heatmaps"], second["heatmaps"], rtol=0, atol=0)

    # Another epoch or another seed draws differently (for at least one of the items).
    def images(ds: RichFeedbackTorchDataset) -> list[bytes]:
        return [np.asarray(ds[i]["image"]).tobytes() for i in range(len(ds))]

    reference = images(a)
    b.set_epoch(3)
    assert images(b) != reference
    c = RichFeedbackTorchDataset(split, seed=8, **kwargs)
    c.set_epoch(2)
    assert images(c) != reference


def test_photometric_augmentations() -> None:
    only = dict(crop_p=0.0, color_jitter_p=0.0, jpeg_p=0.0, grayscale_p=0.0)
    grey = RichFeedbackTorchDataset(_split(1), heatmap_size=8, augment=True, **{**only, "grayscale_p": 1.0})[0]
    image = np.asarray(grey["image"])
    assert grey["image"].mode == "RGB" and (image[..., 0] == image[..., 2]).all()
    jpeg = RichFeedbackTorchDataset(_split(1), heatmap_size=8, augment=True, **{**only, "jpeg_p": 1.0})[0]
    assert jpeg["image"].size == (SIZE, SIZE) and jpeg["image"].mode == "RGB"
    original = np.asarray(_split(1)[0]["image"]).astype(int)
    assert 0 < np.abs(np.asarray(jpeg["image"]).astype(int) - original).mean() < 20  # lossy, but close
    jitter = RichFeedbackTorchDataset(_split(1), heatmap_size=8, augment=True, **{**only, "color_jitter_p": 1.0})[0]
    assert np.abs(np.asarray(jitter["image"]).astype(int) - original).mean() < 0.15 * 255  # light


def test_bad_arguments() -> None:
    split = _split(1)
    with pytest.raises(ValueError, match="heatmap_size"):
        RichFeedbackTorchDataset(split, heatmap_size=0)
    with pytest.raises(ValueError, match="crop_p"):
        RichFeedbackTorchDataset(split, heatmap_size=8, crop_p=1.5)
    with pytest.raises(ValueError, match="lacks the column"):
        RichFeedbackTorchDataset(split.remove_columns("misalignment_map"), heatmap_size=8)
    with pytest.raises(IndexError):
        RichFeedbackTorchDataset(split, heatmap_size=8)[1]


def test_resize_heatmap_keeps_mass_when_shrinking() -> None:
    heat = np.zeros((64, 64), dtype=np.float32)
    heat[10, 10] = 1.0  # one thin mark
    small = resize_heatmap(heat, 16)
    assert small.sum() * 16 == pytest.approx(heat.sum(), rel=1e-5)  # area average: mass / 16 per 4x4 cell
    assert resize_heatmap(heat, 64) is not None and resize_heatmap(np.ones((8, 8)), 32).max() <= 1.0


def test_schema_validation_names_column_split_and_record(tmp_path) -> None:
    from datasets import DatasetDict

    from rahf.data.schema import load_rich_feedback, save_rich_feedback, validate_dataset, validate_example

    good = _split(3)
    validate_dataset(DatasetDict(train=good))
    row = dict(good[1])
    validate_example(row, 1, "train")
    cases = {
        "'alignment' must be a float in \\[0, 1\\]": {"alignment": 1.5},
        "'prompt_words' and 'word_labels' must have the same length": {"word_labels": [1, 0]},
        "'word_labels' must hold only 0": {"word_labels": [1, 2, 1]},
        "'prompt_words' must be split_prompt_words": {"prompt_words": ["a", "white", "squares"]},
        "'misalignment_map' must hold an image": {"misalignment_map": None},
        "missing column\\(s\\) \\['prompt'\\]": {"prompt": ...},
    }
    for message, change in cases.items():
        bad = {k: v for k, v in {**row, **change}.items() if v is not ...}
        with pytest.raises(ValueError, match=f"split 'validation', record 7 \\(uid 'u1'\\): .*{message}"):
            validate_example(bad, 7, "validation")
    # On a whole data set: the first bad record is named.
    broken = good.map(lambda r, i: {"overall": 2.0 if i == 2 else r["overall"]}, with_indices=True)
    with pytest.raises(ValueError, match="split 'test', record 2 \\(uid 'u2'\\): column 'overall'"):
        validate_dataset(DatasetDict(test=broken))
    with pytest.raises(ValueError, match="unknown split name\\(s\\) \\['dev'\\]"):
        validate_dataset(DatasetDict(dev=good))
    with pytest.raises(ValueError, match="missing column\\(s\\) \\['uid'\\]"):
        validate_dataset(DatasetDict(train=good.remove_columns("uid")))
    # The loader: a saved DatasetDict (empty splits included) round-trips; anything else is refused clearly.
    save_rich_feedback(DatasetDict(train=good, validation=good.select([])), tmp_path / "ok")
    loaded = load_rich_feedback(tmp_path / "ok")
    assert len(loaded["train"]) == 3 and len(loaded["validation"]) == 0
    good.save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ValueError, match="not a saved datasets.DatasetDict.*single Dataset"):
        load_rich_feedback(tmp_path / "single")
    with pytest.raises(ValueError, match="is not a folder"):
        load_rich_feedback(tmp_path / "nope")


def _augmented_collator(tasks_per_image):
    from rahf.data.collate import RAHFCollator
    from rahf.testing import tiny_rahf_config, tiny_rahf_processor

    config = tiny_rahf_config("augmented_prompt")
    processor = tiny_rahf_processor("augmented_prompt")
    return RAHFCollator(processor, config.score_names, config.heatmap_names, tasks_per_image=tasks_per_image), config


def test_tasks_per_image_keeps_k_rows_per_image_drawn_from_the_item_seed() -> None:
    full, config = _augmented_collator(None)
    sampled, _ = _augmented_collator(3)
    ds = RichFeedbackTorchDataset(_split(4), heatmap_size=16, seed=5)
    items = [ds[i] for i in range(4)]
    all_rows = full(items)
    num_tasks = len(config.task_names)
    assert len(all_rows["task_ids"]) == 4 * num_tasks
    batch = sampled(items)
    # three distinct tasks per image, each row the same tokens as the full batch's row of that (image, task)
    assert batch["image_index"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for i in range(4):
        tasks = batch["task_ids"][batch["image_index"] == i]
        assert len(set(tasks.tolist())) == 3
    for row in range(len(batch["task_ids"])):
        i, t = int(batch["image_index"][row]), int(batch["task_ids"][row])
        full_row = int(i * num_tasks + t)
        assert int(all_rows["task_ids"][full_row]) == t
        torch.testing.assert_close(batch["input_ids"][row], all_rows["input_ids"][full_row])
    # per-image labels are untouched
    torch.testing.assert_close(batch["heatmap_labels"], all_rows["heatmap_labels"])
    torch.testing.assert_close(batch["labels"], all_rows["labels"])
    # the same (seed, epoch, index) draws the same tasks; another epoch draws others (for some image)
    assert torch.equal(sampled([ds[i] for i in range(4)])["task_ids"], batch["task_ids"])
    ds.set_epoch(1)
    assert not torch.equal(sampled([ds[i] for i in range(4)])["task_ids"], batch["task_ids"])


def test_tasks_per_image_batch_trains_every_kept_head_only() -> None:
    from rahf.testing import tiny_rahf_model

    sampled, config = _augmented_collator(2)
    model = tiny_rahf_model("augmented_prompt")
    ds = RichFeedbackTorchDataset(_split(2), heatmap_size=config.heatmap_size, seed=0)
    batch = sampled([ds[0], ds[1]])
    batch.pop("uid")
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # a (image, task) pair left out of the step has no prediction, so no loss term
    known_scores = ~torch.isnan(out.scores)
    num_h = len(config.heatmap_names)
    expected = torch.zeros_like(known_scores)
    for i, t in zip(batch["image_index"].tolist(), batch["task_ids"].tolist()):
        if num_h <= t < num_h + len(config.score_names):
            expected[i, t - num_h] = True
    assert torch.equal(known_scores, expected)


def test_tasks_per_image_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="tasks_per_image"):
        _augmented_collator(0)
    sampled, _ = _augmented_collator(2)
    item = RichFeedbackTorchDataset(_split(1), heatmap_size=16)[0]
    item.pop("sample_seed")
    with pytest.raises(ValueError, match="sample_seed"):
        sampled([item])


# --------------------------------------------------------------------------------------------------------------------
# Word swaps

GROUPS = {"colour": ["red", "white", "blue"], "shape": ["square", "circle"]}


def _swap_split():
    from datasets import Dataset

    rows = []
    for i, (prompt, labels) in enumerate(
        [
            ("a white square, on grass", [1, 1, 1, 1, 1]),  # aligned: may be swapped
            ("a white square on grass", [1, 0, 1, 1, 1]),  # already misaligned: never swapped
            ("a cat on grass", [1, 1, 1, 1]),  # nothing to swap
        ]
        * 4
    ):
        rows.append(
            {
                **{k: v for k, v in _split(1)[0].items() if k not in ("uid", "prompt", "prompt_words", "word_labels")},
                "uid": f"u{i}",
                "prompt": prompt,
                "prompt_words": prompt.replace(",", "").split(),
                "word_labels": labels,
            }
        )
    return Dataset.from_list(rows, features=FEATURES)


def test_word_swap_marks_the_swapped_word_and_hides_what_it_makes_unknown() -> None:
    split = _swap_split()
    plain = RichFeedbackTorchDataset(split, heatmap_size=16)
    swapped = RichFeedbackTorchDataset(split, heatmap_size=16, word_swap_rate=1.0, word_swap_groups=GROUPS)
    seen = set()
    for epoch in range(4):
        swapped.set_epoch(epoch)
        for i in range(len(split)):
            item, ref = swapped[i], plain[i]
            if i % 3:  # misaligned or nothing swappable: untouched
                assert item["word_swap"] is None and item["prompt"] == ref["prompt"]
                assert item["word_labels"] == ref["word_labels"]
                torch.testing.assert_close(item["scores"], ref["scores"])
                continue
            swap = item["word_swap"]
            assert swap["from"] in ("white", "square") and swap["to"] != swap["from"]
            assert {swap["from"], swap["to"]} <= set(GROUPS["colour"]) or {swap["from"], swap["to"]} <= set(
                GROUPS["shape"]
            )
            assert item["prompt"] == ref["prompt"].replace(swap["from"], swap["to"])
            assert item["prompt_words"][swap["index"]] == swap["to"]
            assert item["word_labels"] == [0 if k == swap["index"] else 1 for k in range(5)]
            # Alignment and overall, and the misalignment heatmap, are unknown now; the image-only labels are kept.
            assert torch.isnan(item["scores"][[1, 3]]).all()
            torch.testing.assert_close(item["scores"][[0, 2]], ref["scores"][[0, 2]])
            assert torch.isnan(item["heatmaps"][1]).all()
            torch.testing.assert_close(item["heatmaps"][0], ref["heatmaps"][0])
            np.testing.assert_array_equal(np.asarray(item["image"]), np.asarray(ref["image"]))
            seen.add((swap["from"], swap["to"]))
    assert len(seen) >= 3  # the draws vary across items and epochs


def test_word_swap_rate_draws_are_deterministic_and_leave_image_augmentation_alone() -> None:
    split = _swap_split()
    kwargs = dict(heatmap_size=16, augment=True, seed=3, crop_p=0.5, color_jitter_p=0.5, jpeg_p=0.0, grayscale_p=0.5)
    half = RichFeedbackTorchDataset(split, word_swap_rate=0.5, word_swap_groups=GROUPS, **kwargs)
    again = RichFeedbackTorchDataset(split, word_swap_rate=0.5, word_swap_groups=GROUPS, **kwargs)
    none = RichFeedbackTorchDataset(split, **kwargs)
    count = 0
    for epoch in range(5):
        for ds in (half, again, none):
            ds.set_epoch(epoch)
        for i in range(0, len(split), 3):
            a, b, c = half[i], again[i], none[i]
            assert a["prompt"] == b["prompt"] and a["word_swap"] == b["word_swap"]
            np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(c["image"]))  # same image draws
            count += a["word_swap"] is not None
    assert 0 < count < 20  # about half of the 20 swappable draws


def test_word_swap_groups_are_checked(tmp_path) -> None:
    from rahf.data.training import load_word_swap_groups

    split = _swap_split()
    with pytest.raises(ValueError, match="word_swap_groups"):
        RichFeedbackTorchDataset(split, heatmap_size=16, word_swap_rate=0.5)
    with pytest.raises(ValueError, match="word_swap_rate"):
        RichFeedbackTorchDataset(split, heatmap_size=16, word_swap_rate=1.5, word_swap_groups=GROUPS)
    with pytest.raises(ValueError, match="two or more distinct"):
        load_word_swap_groups({"colour": ["red", "red"]})
    with pytest.raises(ValueError, match="one group"):
        load_word_swap_groups({"a": ["red", "blue"], "b": ["red", "green"]})
    with pytest.raises(ValueError, match="single prompt word"):
        load_word_swap_groups({"a": ["red", "light blue"]})
    with pytest.raises(ValueError, match="not a file"):
        load_word_swap_groups(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_word_swap_groups(bad)
    good = tmp_path / "groups.json"
    good.write_text('{"colour": ["red", "white", "blue"], "shape": ["square", "circle"]}')
    assert load_word_swap_groups(good) == GROUPS
