import pytest
import torch
from PIL import Image
from transformers import T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel

from rahf import RAHFModel, RAHFProcessor
from rahf.testing import tiny_rahf_config, tiny_rahf_model, tiny_rahf_processor

PROMPTS = ["a red circle above a blue square", "two green triangles on grass"]
LABELS = [[1, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1]]


def make_batch(processor, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [Image.fromarray((torch.rand(40, 56, 3, generator=g) * 255).byte().numpy()) for _ in PROMPTS]
    return processor(images=images, text=PROMPTS, keyword_labels=LABELS)


def labels_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    size, b = model.config.heatmap_size, len(PROMPTS)
    return {
        "heatmap_labels": (torch.rand(b, 2, size, size, generator=g) > 0.8).float(),
        "score_labels": torch.rand(b, 4, generator=g),
    }


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
@pytest.mark.parametrize("tower", ["vit", "siglip_vision_model", "clip_vision_model"])
def test_output_shapes_and_ranges(variant, tower):
    model = tiny_rahf_model(variant, vision_model_type=tower)
    out = model(**make_batch(tiny_rahf_processor(variant, vision_model_type=tower)))
    assert out.heatmaps.shape == (2, 2, 16, 16)
    assert out.scores.shape == (2, 4)
    assert out.sequence_logits.shape[0] == 2 and out.sequence_logits.shape[-1] == model.config.text_config.vocab_size
    for t in (out.heatmaps, out.scores):
        assert torch.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()


def test_augmented_prompt_runs_only_the_requested_tasks():
    model, processor = tiny_rahf_model("augmented_prompt"), tiny_rahf_processor("augmented_prompt")
    enc = processor(images=[Image.new("RGB", (20, 20))] * 2, text=PROMPTS, tasks=["misalignment", "overall"])
    assert enc["input_ids"].shape[0] == 4 and enc["task_ids"].tolist() == [1, 5, 1, 5]
    out = model(**enc)
    assert torch.isnan(out.heatmaps[:, 0]).all() and torch.isfinite(out.heatmaps[:, 1]).all()
    assert torch.isnan(out.scores[:, :3]).all() and torch.isfinite(out.scores[:, 3]).all()
    assert out.sequence_logits is None


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_every_trainable_parameter_gets_a_gradient(variant):
    model = tiny_rahf_model(variant).train()
    out = model(**make_batch(tiny_rahf_processor(variant)), **labels_for(model))
    assert out.heatmap_loss is not None and out.score_loss is not None and out.sequence_loss is not None
    out.loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not missing, missing


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_loss_falls_on_a_fixed_batch(variant):
    model = tiny_rahf_model(variant).train()
    batch = {**make_batch(tiny_rahf_processor(variant)), **labels_for(model)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_loss_weights_are_applied():
    batch = make_batch(tiny_rahf_processor())
    base = tiny_rahf_model()
    out = base(**batch, **labels_for(base))
    weighted = tiny_rahf_model(heatmap_loss_weight=2.0, score_loss_weight=0.0, sequence_loss_weight=0.5)
    out_w = weighted(**batch, **labels_for(base))
    expected = 2.0 * out.heatmap_loss + 0.5 * out.sequence_loss
    torch.testing.assert_close(out_w.loss, expected)


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_heatmap_loss_can_be_binary_cross_entropy(variant):
    batch = make_batch(tiny_rahf_processor(variant))
    mse_model = tiny_rahf_model(variant)
    assert mse_model.config.heatmap_loss == "mse"  # the paper's loss stays the default
    bce_model = tiny_rahf_model(variant, heatmap_loss="bce")
    bce_model.load_state_dict(mse_model.state_dict())
    labels = labels_for(mse_model)
    out_mse, out_bce = mse_model(**batch, **labels), bce_model(**batch, **labels)
    torch.testing.assert_close(out_bce.heatmaps, out_mse.heatmaps, equal_nan=True)
    known = ~torch.isnan(out_bce.heatmaps)
    p, y = out_bce.heatmaps[known].double(), labels["heatmap_labels"][known].double()
    expected_bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(out_bce.heatmap_loss.double(), expected_bce, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out_mse.heatmap_loss.double(), ((p - y) ** 2).mean(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="heatmap_loss"):
        tiny_rahf_config(variant, heatmap_loss="l1")


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_save_and_load_give_identical_outputs_from_safetensors_only(tmp_path, variant):
    model, processor = tiny_rahf_model(variant), tiny_rahf_processor(variant)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files
    loaded = RAHFModel.from_pretrained(tmp_path).eval()
    processor2 = RAHFProcessor.from_pretrained(tmp_path)
    batch, batch2 = make_batch(processor), make_batch(processor2)
    for key in batch:
        torch.testing.assert_close(batch[key], batch2[key])
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    for name in ("heatmaps", "scores", "sequence_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True)


def test_builds_from_pretrained_towers_saved_locally(tmp_path):
    torch.manual_seed(1)
    vit = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        add_pooling_layer=False,
    )
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    )
    vit.save_pretrained(tmp_path / "vit")
    t5.save_pretrained(tmp_path / "t5")
    config = tiny_rahf_config(
        vision_model_name_or_path=str(tmp_path / "vit"), text_model_name_or_path=str(tmp_path / "t5")
    )
    model = RAHFModel.from_pretrained_towers(config)
    for name, tensor in vit.state_dict().items():
        torch.testing.assert_close(model.vision_model.state_dict()[name], tensor, rtol=0, atol=0)
    for name, tensor in t5.state_dict().items():
        torch.testing.assert_close(model.text_model.state_dict()[name], tensor, rtol=0, atol=0)
    # the full model saves and reloads with the towers' weights inside
    model.save_pretrained(tmp_path / "rahf")
    again = RAHFModel.from_pretrained(tmp_path / "rahf")
    torch.testing.assert_close(
        again.vision_model.embeddings.patch_embeddings.projection.weight,
        vit.embeddings.patch_embeddings.projection.weight,
    )


def test_decoder_can_attend_to_text_only():
    config_kwargs = {"decoder_attends_to": "text"}
    model = tiny_rahf_model(**config_kwargs)
    out = model(**make_batch(tiny_rahf_processor(**config_kwargs)))
    assert out.sequence_logits is not None and torch.isfinite(out.sequence_logits).all()


def test_bad_label_shape_names_the_argument():
    model = tiny_rahf_model()
    with pytest.raises(ValueError, match="heatmap_labels"):
        model(**make_batch(tiny_rahf_processor()), heatmap_labels=torch.zeros(2, 2, 8, 8))


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
@pytest.mark.parametrize("heatmap_loss", ["mse", "bce"])
def test_nan_labels_are_left_out_of_the_loss(variant, heatmap_loss):
    # A word swap makes some labels unknown (NaN): the loss is the one over the known labels, and stays finite.
    model = tiny_rahf_model(variant, heatmap_loss=heatmap_loss)
    batch = make_batch(tiny_rahf_processor(variant))
    labels = labels_for(model)
    full = model(**batch, **labels)
    unknown = {k: v.clone() for k, v in labels.items()}
    unknown["score_labels"][0, 1] = float("nan")
    unknown["heatmap_labels"][1, 1] = float("nan")
    out = model(**batch, **unknown)
    assert torch.isfinite(out.loss)
    known_h = ~torch.isnan(full.heatmaps) & ~torch.isnan(unknown["heatmap_labels"])
    p, y = full.heatmaps[known_h].double(), labels["heatmap_labels"][known_h].double()
    expected_h = ((p - y) ** 2).mean() if heatmap_loss == "mse" else -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    torch.testing.assert_close(out.heatmap_loss.double(), expected_h, rtol=1e-4, atol=1e-6)
    known_s = ~torch.isnan(full.scores) & ~torch.isnan(unknown["score_labels"])
    expected_s = ((full.scores[known_s] - labels["score_labels"][known_s]) ** 2).mean()
    torch.testing.assert_close(out.score_loss, expected_s)
    torch.testing.assert_close(out.sequence_loss, full.sequence_loss)  # the keyword target is untouched
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("tower", ["vit", "clip_vision_model"])
def test_image_token_pool_averages_the_tower_grid(tmp_path, tower):
    from rahf.testing import tiny_rahf_config

    config = tiny_rahf_config(vision_model_type=tower, image_token_pool=2)
    config.vision_config.patch_size = 4  # an 8x8 tower grid, pooled to the 4x4 grid of a patch-8 tower
    config = type(config).from_dict(config.to_dict())  # validated again
    assert (config.tower_grid, config.patch_grid) == (8, 4)
    torch.manual_seed(0)
    model = RAHFModel(config).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    tokens = model.vision_model(pixel_values=pixel_values).last_hidden_state[:, -64:]  # (2, 64, D), row-major 8x8
    grid = tokens.reshape(2, 8, 8, -1)
    expected = (grid[:, 0::2, 0::2] + grid[:, 0::2, 1::2] + grid[:, 1::2, 0::2] + grid[:, 1::2, 1::2]) / 4
    torch.testing.assert_close(
        model.get_image_features(pixel_values), model.visual_projection(expected.reshape(2, 16, -1))
    )
    processor = tiny_rahf_processor()
    batch = processor(images=[Image.new("RGB", (32, 32))] * 2, text=PROMPTS, keyword_labels=LABELS)
    out = model(**batch, **labels_for(model))
    assert out.heatmaps.shape == (2, 2, 16, 16) and torch.isfinite(out.loss)
    model.save_pretrained(tmp_path)
    again = RAHFModel.from_pretrained(tmp_path).eval()
    assert again.config.image_token_pool == 2
    torch.testing.assert_close(again(**batch).scores, model(**batch).scores)
    with pytest.raises(ValueError, match="image_token_pool"):
        tiny_rahf_config(image_token_pool=3)  # a 4x4 grid


# --- separate heads (head_structure="separate") and flattening score heads ------------------------------------------

SEPARATE = {"head_structure": "separate", "score_head_pooling": "flatten"}


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_separate_heads_shapes_gradients_and_round_trip(tmp_path, variant):
    from rahf.modeling_rahf import RAHFHeadSet, RAHFLayerNorm2d, RAHFResidualBlock

    model = tiny_rahf_model(variant, **SEPARATE).train()
    processor = tiny_rahf_processor(variant, **SEPARATE)
    assert isinstance(model.heatmap_head, RAHFHeadSet) and len(model.heatmap_head.heads) == 2
    assert isinstance(model.score_head, RAHFHeadSet) and len(model.score_head.heads) == 4
    kinds = {type(m) for m in model.heatmap_head.modules()}
    assert RAHFLayerNorm2d in kinds and RAHFResidualBlock in kinds
    grid, channels = model.config.patch_grid, model.config.score_head_channels
    assert model.score_head.heads[0].mlp[0].in_features == channels * grid * grid  # the map flattened
    batch = make_batch(processor)
    out = model(**batch, **labels_for(model))
    assert out.heatmaps.shape == (2, 2, 16, 16) and out.scores.shape == (2, 4)
    assert torch.isfinite(out.heatmaps).all() and torch.isfinite(out.scores).all()
    out.loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not missing, missing

    model.eval().save_pretrained(tmp_path)
    loaded = RAHFModel.from_pretrained(tmp_path).eval()
    assert loaded.config.head_structure == "separate" and loaded.config.score_head_pooling == "flatten"
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    for name in ("heatmaps", "scores"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_each_output_has_its_own_head_and_augmented_rows_use_theirs():
    model = tiny_rahf_model("multi_head", head_structure="separate").eval()
    batch = make_batch(tiny_rahf_processor("multi_head", head_structure="separate"))
    with torch.no_grad():
        before = model(**batch)
        model.score_head.heads[2].mlp[-1].bias.add_(5.0)  # only aesthetics' head changes
        after = model(**batch)
    changed = (after.scores - before.scores).abs().amax(0)
    assert changed[2] > 0 and changed[[0, 1, 3]].abs().max() == 0
    torch.testing.assert_close(after.heatmaps, before.heatmaps, rtol=0, atol=0)

    model = tiny_rahf_model("augmented_prompt", head_structure="separate").eval()
    processor = tiny_rahf_processor("augmented_prompt", head_structure="separate")
    enc = processor(images=[Image.new("RGB", (20, 20))] * 2, text=PROMPTS, tasks=["misalignment", "overall"])
    with torch.no_grad():
        out = model(**enc)
        image_embeds = model.get_image_features(enc["pixel_values"])[torch.tensor([0, 0, 1, 1])]  # one per row
        features = model._feature_map(model.fuse(image_embeds, enc["input_ids"], enc["attention_mask"])[0])
    assert torch.isnan(out.scores[:, :3]).all() and torch.isfinite(out.scores[:, 3]).all()
    with torch.no_grad():
        # image 0's "overall" row (task row 1) through the overall head, and nothing else
        want = model.score_head.heads[3](features[1:2])[0, 0]
    torch.testing.assert_close(out.scores[0, 3], want)


def test_shared_heads_stay_the_default_and_bad_head_options_are_named():
    config = tiny_rahf_config()
    assert (config.head_structure, config.score_head_pooling) == ("shared", "mean")
    with pytest.raises(ValueError, match="head_structure"):
        tiny_rahf_config(head_structure="split")
    with pytest.raises(ValueError, match="score_head_pooling"):
        tiny_rahf_config(score_head_pooling="max")
