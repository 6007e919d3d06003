import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rich_feedback_fixture import tiny_split
from transformers import AutoConfig, AutoModel, CLIPModel, ResNetConfig, ResNetModel

from rahf.baselines import (
    BASELINES,
    BaselineProcessor,
    BaselineRater,
    CenterPriorRater,
    CLIPRater,
    RAHFCLIPModel,
    RAHFResNetConfig,
    RAHFResNetModel,
    build_baseline,
    build_trainable,
    load_rater,
    tiny_clip_config,
    tiny_resnet_config,
)
from rahf.predictor import RichFeedbackPredictor
from rahf.testing import tiny_rahf_model, tiny_rahf_processor, tiny_tokenizer

PROMPTS = ["a red circle above a blue square", "two green triangles on grass"]


def images(seed=0, sizes=((56, 40), (30, 44))):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in sizes]


def tiny_resnet(seed=0, **overrides):
    config = tiny_resnet_config(image_size=32, heatmap_size=16, **overrides)
    torch.manual_seed(seed)
    return RAHFResNetModel(config).eval(), BaselineProcessor(image_size=32)


def labels(model, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    size = model.config.heatmap_size
    return {
        "heatmap_labels": (torch.rand(batch, len(model.config.heatmap_names), size, size, generator=g) > 0.8).float(),
        "score_labels": torch.rand(batch, len(model.config.score_names), generator=g),
    }


def save_tiny_clip_checkpoint(path, seed=0):
    """A random tiny CLIP saved as a PickScore / CLIP checkpoint would be: model, tokenizer, preprocessor config."""
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config())
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": 32},
                "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32},
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    return model


# --------------------------------------------------------------------------------------------------------------------
# Every baseline: what it produces, shapes and ranges


EXPECTED = {
    "resnet50": (["plausibility", "alignment", "aesthetics", "overall"], ["implausibility", "misalignment"]),
    "clip_finetuned": (["plausibility", "alignment", "aesthetics", "overall"], []),
    "clip_score": (["alignment"], []),
    "pickscore": (["plausibility", "alignment", "aesthetics", "overall"], []),
    "clip_gradient": ([], ["misalignment"]),
    "center_prior": ([], ["implausibility", "misalignment"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_baseline_rates_with_the_predictor_interface(name):
    assert set(BASELINES) == set(EXPECTED)
    rater = build_baseline(name)
    scores, heatmaps = EXPECTED[name]
    assert rater.capabilities == {"scores": scores, "heatmaps": heatmaps, "keywords": False}
    ims = images()
    feedbacks = rater(ims, PROMPTS)
    assert len(feedbacks) == 2
    for fb, im, prompt in zip(feedbacks, ims, PROMPTS):
        assert fb.prompt == prompt and fb.misaligned_word_indices == []
        assert sorted(fb.scores) == sorted(scores) and sorted(fb.heatmaps) == sorted(heatmaps)
        for value in fb.scores.values():
            assert np.isfinite(value)
            if name != "pickscore":  # PickScore keeps its own scale (exp(logit_scale) * cosine)
                assert -1.0 <= value <= 1.0
        for heat in fb.heatmaps.values():
            assert heat.shape == (im.height, im.width) and heat.dtype == np.float32
            assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    if name == "pickscore":  # one score for all four columns, as the paper's Table 1 uses it
        assert len(set(feedbacks[0].scores.values())) == 1
    # asking for a subset returns only that subset; an output the baseline lacks is simply absent
    [fb] = rater(ims[:1], PROMPTS[:1], outputs=["alignment", "misalignment"])
    assert set(fb.scores) == {"alignment"} & set(scores) and set(fb.heatmaps) == {"misalignment"} & set(heatmaps)
    with pytest.raises(ValueError, match="unknown output"):
        rater(ims[:1], PROMPTS[:1], outputs=["sharpness"])


def test_unknown_model_type_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"known baselines: \['center_prior', 'clip_finetuned'"):
        build_baseline("vgg16")
    with pytest.raises(ValueError, match="resnet50"):
        load_rater("vgg16")
    with pytest.raises(ValueError, match="trainable baselines"):
        build_trainable("center_prior")


# --------------------------------------------------------------------------------------------------------------------
# ResNet-50 baseline


def test_resnet_shapes_ranges_and_ignores_the_rest_of_a_rahf_batch():
    model, processor = tiny_resnet()
    batch = processor(images=images(), text=PROMPTS, keyword_labels=[[1] * 7, [1] * 5])
    assert set(batch) == {"pixel_values"} and batch["pixel_values"].shape == (2, 3, 32, 32)
    extra = {
        "input_ids": torch.ones(2, 4, dtype=torch.long),
        "attention_mask": torch.ones(2, 4),
        "labels": torch.ones(2, 3, dtype=torch.long),
        "image_index": torch.arange(2),
    }
    out = model(**batch, **extra, **labels(model))
    assert out.heatmaps.shape == (2, 2, 16, 16) and out.scores.shape == (2, 4)
    for t in (out.heatmaps, out.scores):
        assert torch.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()
    assert out.loss is not None and out.heatmap_loss is not None and out.score_loss is not None
    with pytest.raises(ValueError, match="heatmap_labels"):
        model(**batch, heatmap_labels=torch.zeros(2, 2, 8, 8))


@pytest.mark.parametrize("separate", [False, True])
def test_resnet_every_trainable_parameter_gets_a_gradient(separate):
    model, processor = tiny_resnet(separate_backbones=separate)
    assert (model.score_resnet is not None) == separate
    model.train()
    model(**processor(images=images()), **labels(model)).loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not missing, missing


def test_resnet_loss_falls_on_a_fixed_batch():
    model, processor = tiny_resnet()
    model.train()
    batch = {**processor(images=images()), **labels(model)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_resnet_save_and_load_give_identical_outputs_from_safetensors_only(tmp_path):
    model, processor = tiny_resnet(seed=3)
    model.train()  # move the batch-norm running statistics away from their initial values
    with torch.no_grad():
        model(**processor(images=images(seed=5)))
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is RAHFResNetModel and AutoConfig.from_pretrained(tmp_path).model_type == "rahf_resnet"
    processor2 = BaselineProcessor.from_pretrained(tmp_path)
    batch, batch2 = processor(images=images()), processor2(images=images())
    torch.testing.assert_close(batch["pixel_values"], batch2["pixel_values"], rtol=0, atol=0)
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    torch.testing.assert_close(a.heatmaps, b.heatmaps, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    # the rater loads the same model through load_rater, and gives heatmaps at each image's size
    rater = load_rater(tmp_path)
    assert isinstance(rater, BaselineRater)
    feedbacks = rater(images(), PROMPTS)
    assert feedbacks[1].heatmaps["implausibility"].shape == (44, 30)
    assert feedbacks[0].scores["overall"] == pytest.approx(float(a.scores[0, 3]), abs=1e-6)


def test_resnet_builds_from_a_pretrained_backbone_and_a_json_preset(tmp_path):
    torch.manual_seed(1)
    backbone = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    backbone.save_pretrained(tmp_path / "resnet")
    (tmp_path / "resnet" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]})
    )
    preset = {
        "model_type": "rahf_resnet",
        "image_size": 32,
        "heatmap_size": 16,
        "heatmap_head_channels": 8,
        "score_head_hidden_sizes": [8],
        "backbone_name_or_path": str(tmp_path / "resnet"),
    }
    (tmp_path / "preset.json").write_text(json.dumps(preset))
    model, processor = build_trainable("resnet50", tmp_path / "preset.json", seed=0)
    for key, tensor in backbone.state_dict().items():
        torch.testing.assert_close(model.resnet.state_dict()[key], tensor, rtol=0, atol=0)
    assert processor.image_mean == [0.1, 0.2, 0.3] and processor.image_size == 32
    again, _ = build_trainable("resnet50", tmp_path / "preset.json", seed=0)
    torch.testing.assert_close(model.heatmap_head.out.weight, again.heatmap_head.out.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rahf_clip"):
        (tmp_path / "bad.json").write_text(json.dumps({"model_type": "rahf_resnet"}))
        build_trainable("clip_finetuned", tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------------------------------
# CLIP baselines


def test_clip_finetuned_trains_and_round_trips(tmp_path):
    model, processor = build_trainable("clip_finetuned", None, seed=0)
    assert model.config.heatmap_names == [] and processor.tokenizer is not None
    model.train()
    batch = processor(images=images(), text=PROMPTS, keyword_labels=[[1] * 7, [1] * 5])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    score_labels = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.3, 0.1]])
    model(**batch, score_labels=score_labels, heatmap_labels=torch.zeros(2, 0, 16, 16)).loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not missing, missing
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(**batch, score_labels=score_labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is RAHFCLIPModel
    batch2 = BaselineProcessor.from_pretrained(tmp_path)(images=images(), text=PROMPTS)
    for key in batch:
        torch.testing.assert_close(batch[key], batch2[key], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).scores, loaded(**batch).scores, rtol=0, atol=0)


def test_clip_gradient_map_has_the_image_size_and_lies_in_0_1():
    rater = build_baseline("clip_gradient", seed=0)
    ims = images(sizes=((64, 48), (20, 36)))
    maps = rater.gradient_maps(ims, PROMPTS)
    for heat, im in zip(maps, ims):
        assert heat.shape == (im.height, im.width)
        assert heat.min() == pytest.approx(0.0) and heat.max() == pytest.approx(1.0) and heat.std() > 0.01
    # it is the gradient of the cosine: a map from an unsmoothed rater peaks where a pixel change moves it most
    raw = CLIPRater(rater.model, rater.processor, mode="clip_gradient", smoothing_sigma=0.0)
    [heat] = raw.gradient_maps([ims[0].resize((32, 32))], PROMPTS[:1])
    enc = rater.processor(images=[ims[0].resize((32, 32))], text=PROMPTS[:1])
    pixels = enc["pixel_values"].clone().requires_grad_(True)
    with torch.enable_grad():
        img = F.normalize(rater.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = F.normalize(rater.model.get_text_features(input_ids=enc["input_ids"]).pooler_output, dim=-1)
        (grad,) = torch.autograd.grad((img * txt).sum(), pixels)
    expected = grad.abs().amax(1)[0].numpy()
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(heat, expected, atol=1e-5)


def test_pickscore_loads_from_a_locally_saved_checkpoint(tmp_path):
    clip = save_tiny_clip_checkpoint(tmp_path / "pickscore").eval()
    rater = load_rater(tmp_path / "pickscore", model_type="pickscore")
    assert isinstance(rater, CLIPRater) and rater.processor.resize_mode == "crop"
    ims = images(sizes=((48, 32), (32, 40)))
    feedbacks = rater(ims, PROMPTS)
    enc = rater.processor(images=ims, text=PROMPTS)
    with torch.no_grad():
        img = F.normalize(clip.get_image_features(pixel_values=enc["pixel_values"]).pooler_output, dim=-1)
        txt = F.normalize(
            clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output,
            dim=-1,
        )
        expected = (clip.logit_scale.exp() * (img * txt).sum(-1)).numpy()
    for fb, value in zip(feedbacks, expected):
        assert set(fb.scores) == {"plausibility", "alignment", "aesthetics", "overall"}
        assert all(v == pytest.approx(float(value), abs=1e-4) for v in fb.scores.values())
    # the tokenizer may live elsewhere (PickScore's does): processor_name_or_path
    (tmp_path / "weights_only").mkdir()
    clip.save_pretrained(tmp_path / "weights_only")
    again = load_rater(
        tmp_path / "weights_only", model_type="pickscore", processor_name_or_path=str(tmp_path / "pickscore")
    )
    assert again(ims, PROMPTS)[0].scores["overall"] == pytest.approx(feedbacks[0].scores["overall"], abs=1e-5)
    # off-the-shelf CLIP from the same folder: the cosine, for alignment only
    cos = load_rater(tmp_path / "pickscore", model_type="clip_score")(ims, PROMPTS)
    assert set(cos[0].scores) == {"alignment"}
    assert cos[0].scores["alignment"] * float(clip.logit_scale.detach().exp()) == pytest.approx(
        float(expected[0]), abs=1e-3
    )
    with pytest.raises(ValueError, match="clip_score"):
        load_rater(tmp_path / "pickscore")  # a CLIP checkpoint needs to be told how to rate


# --------------------------------------------------------------------------------------------------------------------
# Centre prior, load_rater dispatch, the trainer's batch


def test_center_prior_is_a_centred_gaussian_and_fits_its_peak():
    rater = CenterPriorRater(sigma=0.2)
    [fb] = rater([Image.new("RGB", (41, 31))], ["a cat"])
    heat = fb.heatmaps["implausibility"]
    assert np.unravel_index(heat.argmax(), heat.shape) == (15, 20)
    np.testing.assert_allclose(heat, heat[::-1, ::-1], atol=1e-6)
    split = tiny_split(6)
    rater.fit(split)
    gts = [np.asarray(m, dtype=np.float64) / 255 for m in split["implausibility_map"]]
    g = rater.gaussian(*gts[0].shape).astype(np.float64)

    def sse(peak):
        return sum(((peak * g - gt) ** 2).sum() for gt in gts)

    best = rater.peak["implausibility"]
    assert 0 < best < 1 and sse(best) < sse(best * 1.1) and sse(best) < sse(best * 0.9)


def test_load_rater_dispatches_on_the_saved_model(tmp_path):
    model, processor = tiny_rahf_model(), tiny_rahf_processor()
    model.save_pretrained(tmp_path / "rahf")
    processor.save_pretrained(tmp_path / "rahf")
    assert isinstance(load_rater(tmp_path / "rahf"), RichFeedbackPredictor)
    with pytest.raises(ValueError, match="drop --model_type"):
        load_rater(tmp_path / "rahf", model_type="resnet50")
    resnet, resnet_processor = build_trainable("resnet50", None, seed=0)
    resnet.save_pretrained(tmp_path / "run" / "final")
    resnet_processor.save_pretrained(tmp_path / "run" / "final")
    assert isinstance(load_rater(tmp_path / "run"), BaselineRater)  # a training run's folder: its final/
    assert isinstance(load_rater("center_prior"), CenterPriorRater)
    with pytest.raises(ValueError, match="neither a model folder nor a baseline name"):
        load_rater(tmp_path / "missing")


@pytest.mark.parametrize("model_type", ["resnet50", "clip_finetuned"])
def test_trainable_baselines_take_the_rahf_collators_batch(model_type):
    from rahf.data.collate import RAHFCollator
    from rahf.data.training import RichFeedbackTorchDataset

    model, processor = build_trainable(model_type, None, seed=0)
    config = model.config
    dataset = RichFeedbackTorchDataset(tiny_split(3), heatmap_size=config.heatmap_size, augment=True)
    batch = RAHFCollator(processor, config.score_names, config.heatmap_names)([dataset[i] for i in range(3)])
    batch.pop("uid")
    out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert out.scores.shape == (3, 4)
    if model_type == "resnet50":
        assert out.heatmaps.shape == batch["heatmap_labels"].shape and out.heatmap_loss is not None
    else:
        assert out.heatmaps is None and batch["heatmap_labels"].shape[1] == 0


def test_tiny_presets_match_the_offline_defaults():
    model, _ = build_trainable("resnet50", "configs/model/resnet50_tiny.json", seed=0)
    assert isinstance(model.config, RAHFResNetConfig)
    ours, default = model.config.to_dict(), tiny_resnet_config().to_dict()
    for key in ("resnet_config", "image_size", "heatmap_size", "heatmap_head_channels", "score_head_hidden_sizes"):
        assert ours[key] == default[key], key
