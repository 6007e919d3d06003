"""Issue 12, model / processor / predictor side: bad input is one clear ValueError naming the argument or field, the
value and the fix, and nothing is lost, unpickled or looked up on the model hub."""

import json
import pickle
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rahf import RAHFConfig, RAHFModel, RAHFProcessor, RichFeedbackPredictor, load_image
from rahf.cli import main
from rahf.image_io import ImageTooLargeError
from rahf.testing import tiny_rahf_config, tiny_rahf_model, tiny_rahf_processor

IMAGE = Image.new("RGB", (20, 12), (200, 30, 30))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_rahf_model().save_pretrained(folder)
    tiny_rahf_processor().save_pretrained(folder)
    return folder


def copy_of(saved_model: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(saved_model, folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels but holds almost nothing: decoding it would be the expensive (or
    failing) step, so only a check made from the header can refuse it cheaply."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


class _TouchOnUnpickle:
    """Unpickling this creates `marker`: proof that something ran pickle on the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---------------------------------------------------------------------------------------------------------------------
# Batch size


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_predictor_refuses_a_bad_batch_size_at_construction(bad):
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1.*got " + repr(bad).replace(".", r"\.")):
        RichFeedbackPredictor(tiny_rahf_model(), tiny_rahf_processor(), batch_size=bad)


def test_predictor_refuses_a_bad_batch_size_at_call_and_from_pretrained(saved_model):
    predictor = RichFeedbackPredictor(tiny_rahf_model(), tiny_rahf_processor(), batch_size=2)
    assert len(predictor([IMAGE] * 3, "a red cat")) == 3  # 2 + 1: no image lost to the batching
    predictor.batch_size = -1
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1 \(images per forward pass\), got -1"):
        predictor([IMAGE] * 2, "a red cat")
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1 \(images per forward pass\), got 0"):
        RichFeedbackPredictor.from_pretrained(saved_model, batch_size=0)


@pytest.mark.parametrize("bad", ["-1", "0", "two"])
def test_cli_batch_size_is_checked_by_argparse_and_nothing_is_written(saved_model, tmp_path, capsys, bad):
    image = tmp_path / "a.png"
    IMAGE.save(image)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "predict",
                "--model",
                str(saved_model),
                "--image",
                str(image),
                "--prompt",
                "a cat",
                "--out",
                str(tmp_path / "out"),
                "--batch_size",
                bad,
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --batch_size: must be a whole number >= 1" in err and bad in err
    assert not (tmp_path / "out").exists()


def test_predictor_checks_its_other_arguments():
    model, processor = tiny_rahf_model(), tiny_rahf_processor()
    with pytest.raises(ValueError, match="max_new_tokens"):
        RichFeedbackPredictor(model, processor, max_new_tokens=0)
    with pytest.raises(ValueError, match="keyword_threshold"):
        RichFeedbackPredictor(model, processor, keyword_threshold=1.5)
    with pytest.raises(ValueError, match="max_pixels"):
        RichFeedbackPredictor(model, processor, max_image_pixels=0)
    with pytest.raises(ValueError, match="processor does not match the model.*variant"):
        RichFeedbackPredictor(model, tiny_rahf_processor("augmented_prompt"))


# ---------------------------------------------------------------------------------------------------------------------
# Image size cap


@pytest.mark.parametrize("side", [14_000, 10_000])
def test_an_oversize_image_file_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch, side):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(side, side))
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("decoded an image that the header already showed was over the cap")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(
        ImageTooLargeError, match=f"{side} x {side} = {side * side:,} pixels, more than the cap of 40,000,000"
    ):
        load_image(path)
    with pytest.raises(ValueError, match="huge.png"):
        tiny_rahf_processor().preprocess_images([path])


def test_the_cap_comes_from_the_argument_else_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(path)
    assert load_image(path).size == (40, 30)
    with pytest.raises(ImageTooLargeError, match="1,200 pixels, more than the cap of 1,000"):
        load_image(path, max_pixels=1000)
    monkeypatch.setenv("RAHF_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageTooLargeError, match="cap of 1,000"):
        load_image(path)
    assert load_image(path, max_pixels=1200).size == (40, 30)


def test_in_memory_images_and_arrays_are_capped_and_checked():
    with pytest.raises(ImageTooLargeError, match="the RGB image is 40 x 30 = 1,200 pixels, more than the cap of 100"):
        load_image(Image.new("RGB", (40, 30)), max_pixels=100)
    with pytest.raises(ImageTooLargeError, match=r"image array of shape \(30, 40, 3\).*more than the cap of 100"):
        load_image(np.zeros((30, 40, 3), np.uint8), max_pixels=100)
    # an array is refused from its shape, before any conversion copies it
    big = np.broadcast_to(np.zeros(1, np.float32), (10_000, 10_000, 3))
    with pytest.raises(ImageTooLargeError, match="100,000,000 pixels"):
        load_image(big)
    with pytest.raises(ValueError, match=r"channels first: transpose it"):
        load_image(np.zeros((3, 30, 40), np.uint8))
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_image(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="at least one pixel"):
        load_image(np.zeros((0, 5), np.uint8))
    assert load_image(np.ones((4, 5, 1), np.float32)).size == (5, 4)


def test_predictor_and_processor_take_their_own_cap(monkeypatch):
    monkeypatch.setenv("RAHF_MAX_IMAGE_PIXELS", "100")
    model, processor = tiny_rahf_model(), tiny_rahf_processor()
    with pytest.raises(ImageTooLargeError, match="cap of 100"):
        RichFeedbackPredictor(model, processor)([IMAGE], "a red cat")
    # a cap above the environment's is honoured all the way to the processor's own check
    [feedback] = RichFeedbackPredictor(model, processor, max_image_pixels=240)([IMAGE], "a red cat")
    assert feedback.heatmaps["implausibility"].shape == (12, 20)
    assert processor(images=[IMAGE], text=["a cat"], max_image_pixels=240)["pixel_values"].shape[0] == 1


def test_cli_max_image_pixels_sets_the_cap(saved_model, tmp_path, capsys, monkeypatch):
    image = tmp_path / "a.png"
    IMAGE.save(image)
    args = [
        "predict",
        "--model",
        str(saved_model),
        "--image",
        str(image),
        "--prompt",
        "a cat",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*args, "--max_image_pixels", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rahf predict: error: image") and "240 pixels, more than the cap of 100" in err
    assert "--max_image_pixels" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("RAHF_MAX_IMAGE_PIXELS", "100")
    assert main([*args, "--max_image_pixels", "240"]) == 0
    assert (tmp_path / "out" / "a" / "feedback.json").is_file()


def test_cli_refuses_a_decompression_bomb_in_one_line(saved_model, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(14_000, 14_000))
    code = main(
        [
            "predict",
            "--model",
            str(saved_model),
            "--image",
            str(bomb),
            "--prompt",
            "a cat",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "bomb.png" in err and "196,000,000 pixels" in err and "DecompressionBomb" not in err


# ---------------------------------------------------------------------------------------------------------------------
# Missing folders are errors, never model-hub lookups


@pytest.fixture
def hub_on_but_no_network(monkeypatch):
    """The hub switched on (as a user's shell has it), and any attempt to reach it fails the test."""
    import socket

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


@pytest.mark.usefixtures("hub_on_but_no_network")
@pytest.mark.parametrize("missing", ["./no-such-model", "runs/tiny/final", "no-such-model"])
def test_a_missing_local_folder_is_an_error_not_a_hub_lookup(tmp_path, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"`pretrained_path` '{missing}' is not a folder"):
        RichFeedbackPredictor.from_pretrained(missing)
    with pytest.raises(ValueError, match=f"'{missing}' is not a folder"):
        RAHFProcessor.from_pretrained(missing)
    with pytest.raises(ValueError, match=f"`pretrained_model_name_or_path` '{missing}' is not a folder"):
        RAHFModel.from_pretrained(missing)


@pytest.mark.usefixtures("hub_on_but_no_network")
def test_cli_missing_model_folder_names_the_flag(tmp_path, capsys):
    image = tmp_path / "a.png"
    IMAGE.save(image)
    for missing in (str(tmp_path / "missing"), "org/name"):
        assert (
            main(
                [
                    "predict",
                    "--model",
                    missing,
                    "--image",
                    str(image),
                    "--prompt",
                    "a cat",
                    "--out",
                    str(tmp_path / "out"),
                ]
            )
            == 2
        )
        assert f"rahf predict: error: `--model` '{missing}' is not a folder" in capsys.readouterr().err


def test_a_missing_local_tower_is_an_error_not_a_hub_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_rahf_config(vision_model_name_or_path="./towers/vit")
    with pytest.raises(ValueError, match="`vision_model_name_or_path` './towers/vit' is not a folder"):
        RAHFModel.from_pretrained_towers(config)


# ---------------------------------------------------------------------------------------------------------------------
# RAHFConfig fields


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"heatmap_size": "32"},
            re.escape("`heatmap_size` must be a positive int, got '32' (a str); write 32 in config.json"),
        ),
        ({"heatmap_size": 0}, "`heatmap_size` must be a positive int, got 0"),
        ({"heatmap_size": [16, 8]}, r"`heatmap_size` must be one side \(heatmaps are square\)"),
        ({"text_config": [1, 2]}, r"`text_config` must be a mapping .* got \[1, 2\] \(a list\)"),
        ({"text_config": {"model_type": "bert"}}, "`text_config.model_type` must be one of \\['t5'\\], got 'bert'"),
        ({"text_config": {"d_model": "64"}}, "`text_config.d_model` has the wrong type, got '64' .*write 64"),
        ({"text_config": {"vocab_size": -1}}, "`text_config.vocab_size` must be a positive int, got -1"),
        ({"vision_config": "vit"}, "`vision_config` must be a mapping"),
        ({"vision_config": {"model_type": "vit", "num_channels": 1}}, "`vision_config.num_channels` must be 3"),
        (
            {"vision_config": {"model_type": "vit", "image_size": 32, "patch_size": 64}},
            "patch_size` \\(64\\) is larger",
        ),
        ({"variant": 3}, "`variant` must be one of \\['multi_head', 'augmented_prompt'\\], got 3 \\(an int\\)"),
        ({"score_names": "overall"}, "`score_names` must be a non-empty list of names, got 'overall'"),
        ({"score_names": []}, "`score_names` must be a non-empty list"),
        ({"heatmap_names": ["implausibility", " "]}, "`heatmap_names` must hold non-empty names"),
        ({"score_names": ["overall", "overall"]}, "must be distinct"),
        ({"task_strings": ["x"]}, "`task_strings` must be None or a mapping"),
        ({"task_strings": {"implausibilty": "x"}}, r"`task_strings` has entries for \['implausibilty'\]"),
        ({"task_strings": {"overall": ""}}, "`task_strings` values must be non-empty texts"),
        ({"heatmap_loss_weight": float("nan")}, "`heatmap_loss_weight` must be a finite number >= 0, got nan"),
        ({"score_loss_weight": -1.0}, "`score_loss_weight` must be a finite number >= 0, got -1.0"),
        ({"sequence_loss_weight": "1"}, "`sequence_loss_weight` must be a finite number >= 0, got '1' .*write 1 in"),
        ({"heatmap_loss": "l1"}, "`heatmap_loss` must be one of \\['mse', 'bce'\\], got 'l1'"),
        ({"heatmap_head_channels": 0}, "`heatmap_head_channels` must be a positive int, got 0"),
        ({"score_head_channels": 2.5}, "`score_head_channels` must be a positive int, got 2.5"),
        ({"score_head_num_convs": -1}, "`score_head_num_convs` must be an int >= 0, got -1"),
        ({"score_head_hidden_size": None}, "`score_head_hidden_size` must be a positive int, got None"),
        ({"image_token_pool": 3}, "`image_token_pool` must be an int >= 1 that divides"),
        ({"decoder_attends_to": "image"}, "`decoder_attends_to` must be one of"),
        ({"keyword_threshold": "0.5"}, "`keyword_threshold` must be None .*got '0.5' \\(a str\\); write 0.5"),
        ({"keyword_threshold": 1.0}, "`keyword_threshold` must be None \\(greedy decoding\\) or a probability"),
        ({"max_text_length": -5}, "`max_text_length` must be an int >= 2, got -5"),
        ({"max_target_length": True}, "`max_target_length` must be an int >= 2, got True"),
        ({"image_mean": [0.5]}, r"`image_mean` must be a list of 3 numbers .*got \[0.5\]"),
        ({"image_std": [0, 0, 0]}, r"`image_std` must hold 3 numbers > 0 .*got \[0, 0, 0\]"),
        ({"image_std": [0.5, float("inf"), 0.5]}, r"`image_std` must hold 3 finite numbers, .*channel 1 is inf"),
        ({"text_model_name_or_path": ""}, "`text_model_name_or_path` must be None or a hub id / folder"),
        ({"is_encoder_decoder": "yes"}, "`is_encoder_decoder` must be true or false"),
    ],
)
def test_every_config_field_is_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_rahf_config(**overrides)


def test_good_values_are_normalised_and_round_trip(tmp_path):
    config = tiny_rahf_config(heatmap_size=[16, 16], heatmap_loss_weight=2, score_head_num_convs=0)
    assert config.heatmap_size == 16 and config.heatmap_loss_weight == 2.0
    assert isinstance(config.heatmap_loss_weight, float)
    config.save_pretrained(tmp_path)
    assert RAHFConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    # a default task no longer in the model (fewer scores) is dropped, not an error
    assert list(tiny_rahf_config(score_names=["overall"], task_strings=config.task_strings).task_strings) == [
        "implausibility",
        "misalignment",
        "overall",
        "keywords",
    ]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("heatmap_size", "32", "`heatmap_size` must be a positive int, got '32' (a str); write 32 in config.json"),
        ("text_config", [1, 2], "`text_config` must be a mapping of text-tower settings"),
    ],
)
def test_a_saved_folder_with_a_bad_config_json_names_the_field(saved_model, tmp_path, capsys, field, value, message):
    folder = copy_of(saved_model, tmp_path)
    edit_json(folder / "config.json", **{field: value})
    for load in (RAHFModel.from_pretrained, RichFeedbackPredictor.from_pretrained):
        with pytest.raises(ValueError) as err:
            load(folder)
        assert "config.json" in str(err.value) and message in str(err.value)
    image = tmp_path / "a.png"
    IMAGE.save(image)
    assert (
        main(
            [
                "predict",
                "--model",
                str(folder),
                "--image",
                str(image),
                "--prompt",
                "a cat",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("rahf predict: error:") and message in err and len(err.splitlines()) == 1


def test_a_folder_of_another_model_type_is_named(saved_model, tmp_path):
    folder = copy_of(saved_model, tmp_path)
    edit_json(folder / "config.json", model_type="rahf_resnet")
    with pytest.raises(ValueError, match="holds a 'rahf_resnet' model .*not a 'rahf' one"):
        RAHFModel.from_pretrained(folder)


def test_init_model_reports_a_bad_preset_in_one_line(tmp_path, capsys):
    preset = json.loads((Path(__file__).resolve().parent.parent / "configs/model/tiny.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**preset, "heatmap_size": "32"}))
    (tmp_path / "broken.json").write_text("{oops")
    for name, message in (
        ("bad.json", "`heatmap_size` must be a positive int, got '32'"),
        ("broken.json", "is not valid JSON"),
        ("missing.json", "is not a file"),
    ):
        assert main(["init-model", "--config", str(tmp_path / name), "--out", str(tmp_path / "m")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The processor's config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_processor": {"image_mean": [0.5]}}, r"`image_mean` must be a list of 3 numbers .*got \[0.5\]"),
        ({"image_processor": {"image_std": [0, 0, 0]}}, r"`image_std` must hold 3 numbers > 0"),
        ({"image_processor": {"image_std": [0.5, 0.5, "0.5"]}}, r"`image_std` must hold 3 finite numbers"),
        ({"max_text_length": -5}, "`max_text_length` must be an int >= 2, got -5 .*processor_config.json"),
        ({"max_target_length": 0}, "`max_target_length` must be an int >= 2, got 0"),
        (
            {"image_processor": {"size": "32"}},
            "`size` must be a positive int, got '32' .*write 32 in the `image_processor` entry",
        ),
        ({"variant": "both"}, "`variant` must be one of"),
        ({"task_names": []}, "`task_names` must be a non-empty list"),
        ({"task_strings": {"overall": 3}}, "`task_strings` must map each task to a non-empty text"),
        ({"image_szie": 32}, r"unknown settings \['image_szie'\]"),
    ],
)
def test_a_bad_processor_config_names_the_field_and_the_file(saved_model, tmp_path, changes, message):
    folder = copy_of(saved_model, tmp_path)
    if "image_processor" in changes:  # the image processor's settings are nested in processor_config.json
        saved = json.loads((folder / "processor_config.json").read_text())["image_processor"]
        changes = {**changes, "image_processor": {**saved, **changes["image_processor"]}}
    edit_json(folder / "processor_config.json", **changes)
    for load in (RAHFProcessor.from_pretrained, RichFeedbackPredictor.from_pretrained):
        with pytest.raises(ValueError, match=message) as err:
            load(folder)
        assert "processor_config.json" in str(err.value)


def test_processor_construction_is_checked_too():
    processor = tiny_rahf_processor()
    kwargs = {k: v for k, v in processor.to_dict().items() if k != "processor_class"}
    with pytest.raises(ValueError, match="`image_std` must hold 3 numbers > 0"):
        RAHFProcessor(processor.tokenizer, **{**kwargs, "image_std": [0.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="`task_strings` has no text for the tasks"):
        RAHFProcessor(processor.tokenizer, **{**kwargs, "variant": "augmented_prompt", "task_strings": {}})
    with pytest.raises(ValueError, match="`tokenizer` is required"):
        RAHFProcessor(None, **kwargs)


def test_unreadable_processor_files_are_clear_errors(saved_model, tmp_path):
    folder = copy_of(saved_model, tmp_path)
    (folder / "processor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        RAHFProcessor.from_pretrained(folder)
    folder2 = tmp_path / "no_tokenizer"
    shutil.copytree(saved_model, folder2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder2 / name).unlink()
    with pytest.raises(ValueError, match="could not load the tokenizer saved in"):
        RAHFProcessor.from_pretrained(folder2)


# ---------------------------------------------------------------------------------------------------------------------
# Empty prompts


@pytest.mark.parametrize("empty", ["", "   ", " , . ! "])
def test_every_processor_path_refuses_an_empty_prompt(empty):
    processor = tiny_rahf_processor("augmented_prompt")
    for call in (
        lambda: processor(images=[IMAGE] * 2, text=["a cat", empty]),
        lambda: processor.encode_prompts(["a cat", empty]),
        lambda: processor.encode_keyword_targets(["a cat", empty], [[1, 1], []]),
    ):
        with pytest.raises(ValueError, match="prompt 1 is empty"):
            call()


def test_the_predictor_refuses_an_empty_prompt_before_any_batch():
    model = tiny_rahf_model()
    calls = []
    model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    predictor = RichFeedbackPredictor(model, tiny_rahf_processor(), batch_size=1)
    with pytest.raises(ValueError, match=r"prompt 2 is empty \(' '\)"):
        predictor([IMAGE] * 3, ["a cat", "a dog", " "])
    assert not calls
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        predictor([IMAGE], "")


def test_the_training_collator_names_the_record_of_an_empty_prompt():
    from rahf.data.collate import RAHFCollator

    def item(uid, prompt, labels):
        return {
            "uid": uid,
            "image": IMAGE,
            "prompt": prompt,
            "word_labels": labels,
            "heatmaps": torch.zeros(2, 16, 16),
            "scores": torch.zeros(4),
        }

    collator = RAHFCollator(tiny_rahf_processor())
    assert collator([item("r1", "a cat", [1, 1])])["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match=r"prompt 1 \(record 'r2'\) is empty \(' ; '\)"):
        collator([item("r1", "a cat", [1, 1]), item("r2", " ; ", [])])


def test_cli_refuses_an_empty_prompt(saved_model, tmp_path, capsys):
    image = tmp_path / "a.png"
    IMAGE.save(image)
    assert (
        main(
            [
                "predict",
                "--model",
                str(saved_model),
                "--image",
                str(image),
                "--prompt",
                "  ",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "rahf predict: error: --prompt: prompt 0 is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Weights: safetensors only, never unpickled


def test_the_malicious_pickle_is_live():
    """The control for the tests below: unpickling the payload does create its marker."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "control"
        pickle.loads(pickle.dumps(_TouchOnUnpickle(marker)))
        assert marker.exists()


def _bin_only(saved_model: Path, tmp_path: Path, payload) -> Path:
    folder = copy_of(saved_model, tmp_path)
    (folder / "model.safetensors").unlink()
    if isinstance(payload, dict):
        torch.save(payload, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    return folder


CLEAR = "holds pytorch_model.bin but no model.safetensors; rahf loads weights from safetensors only (never unpickles)"


def test_a_real_pytorch_model_bin_is_refused_with_the_conversion_command(saved_model, tmp_path):
    folder = _bin_only(saved_model, tmp_path, load_file(saved_model / "model.safetensors"))
    for load in (RAHFModel.from_pretrained, RichFeedbackPredictor.from_pretrained):
        with pytest.raises(ValueError, match=CLEAR.replace("(", r"\(").replace(")", r"\)")) as err:
            load(folder)
        assert f"`{folder}`" in str(err.value) and "save_file" in str(err.value)
        assert "weights_only=False" not in str(err.value)
    with pytest.raises(ValueError, match="safetensors only"):
        RAHFModel.from_pretrained(saved_model, use_safetensors=False)


def test_a_malicious_pickle_is_never_unpickled(saved_model, tmp_path, capsys):
    marker = tmp_path / "marker"
    folder = _bin_only(saved_model, tmp_path, _TouchOnUnpickle(marker))
    for load in (RAHFModel.from_pretrained, RichFeedbackPredictor.from_pretrained):
        with pytest.raises(ValueError, match="no model.safetensors; rahf loads weights from safetensors only"):
            load(folder)
    image = tmp_path / "a.png"
    IMAGE.save(image)
    assert (
        main(
            [
                "predict",
                "--model",
                str(folder),
                "--image",
                str(image),
                "--prompt",
                "a cat",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert CLEAR in err and "UnpicklingError" not in err and "weights_only=False" not in err
    assert not marker.exists()


def test_baselines_load_safetensors_only(tmp_path):
    from rahf.baselines import BaselineRater, RAHFResNetModel, build_trainable

    model, processor = build_trainable("resnet50", None, seed=0)
    model.save_pretrained(tmp_path / "good")
    processor.save_pretrained(tmp_path / "good")
    assert isinstance(BaselineRater.from_pretrained(tmp_path / "good"), BaselineRater)

    marker = tmp_path / "marker"
    for name, payload in (("real", model.state_dict()), ("evil", _TouchOnUnpickle(marker))):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        (folder / "model.safetensors").unlink()
        if isinstance(payload, dict):
            torch.save(payload, folder / "pytorch_model.bin")
        else:
            (folder / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
        for load in (
            RAHFResNetModel.from_pretrained,
            BaselineRater.from_pretrained,
            lambda p: build_trainable("resnet50", None, pretrained_model_name_or_path=p),
        ):
            with pytest.raises(ValueError, match="holds pytorch_model.bin but no model.safetensors"):
                load(folder)
    assert not marker.exists()
