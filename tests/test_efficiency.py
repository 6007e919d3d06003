"""The speed options give the same results on and off: SDPA vs eager attention, fused vs for-each AdamW, gradient
checkpointing, the KV cache of keyword decoding, larger scoring batches; the loss never waits for the device; and
benchmarks/gpu_efficiency.py writes the entries it promises (tiny preset)."""

from __future__ import annotations

import copy
import importlib.util
import json
import traceback
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from rahf import RichFeedbackPredictor
from rahf.testing import tiny_rahf_model, tiny_rahf_processor
from rahf.training_utils import build_optimizer

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle above a blue square", "two green triangles on grass", "a tall tree"]
LABELS = [[1, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1], [1, 0, 1]]


def make_batch(model, processor, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = [Image.fromarray((torch.rand(40, 56, 3, generator=g) * 255).byte().numpy()) for _ in PROMPTS]
    batch = dict(processor(images=images, text=PROMPTS, keyword_labels=LABELS))
    size, b = model.config.heatmap_size, len(PROMPTS)
    batch["heatmap_labels"] = (torch.rand(b, 2, size, size, generator=g) > 0.8).float()
    batch["score_labels"] = torch.rand(b, 4, generator=g)
    return batch


def loss_and_grads(model, batch) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_step(a, b, rtol=1e-4, atol=1e-5) -> None:
    out_a, grads_a = a
    out_b, grads_b = b
    for name in ("loss", "heatmaps", "scores", "sequence_logits", "heatmap_loss", "score_loss", "sequence_loss"):
        torch.testing.assert_close(getattr(out_a, name), getattr(out_b, name), rtol=rtol, atol=atol, equal_nan=True)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_sdpa_attention_matches_eager(variant):
    model = tiny_rahf_model(variant).eval()  # eval: no dropout, so both passes see the same function
    batch = make_batch(model, tiny_rahf_processor(variant))
    model.set_attn_implementation("sdpa")
    impls = {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    assert impls == {"sdpa"}  # both towers, encoder and decoder stacks included
    sdpa = loss_and_grads(model, batch)
    model.set_attn_implementation("eager")
    assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {"eager"}
    assert_same_step(sdpa, loss_and_grads(model, batch))


def test_gradient_checkpointing_matches():
    model = tiny_rahf_model().train()
    batch = make_batch(model, tiny_rahf_processor())
    plain = loss_and_grads(model, batch)
    # as rahf train --gradient_checkpointing does it (transformers v5 renamed it; v4 has only the old name)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    layers = {type(m).__name__ for m in model.modules() if getattr(m, "gradient_checkpointing", False)}
    assert {"ViTLayer", "T5Block"} <= layers  # both towers recompute
    assert_same_step(plain, loss_and_grads(model, batch))


def test_fused_adamw_matches_foreach():
    torch.manual_seed(0)
    base = tiny_rahf_model().train()
    batch = make_batch(base, tiny_rahf_processor())
    weights = {}
    for fused in (False, True):
        model = copy.deepcopy(base)
        optimizer = build_optimizer(model.parameters(), learning_rate=1e-3, weight_decay=0.01, fused=fused)
        assert optimizer.defaults.get("fused") is (True if fused else None)
        for _ in range(3):
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        weights[fused] = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = any(not torch.equal(weights[True][n], p.detach()) for n, p in base.named_parameters())
    assert moved
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_keyword_decoding_kv_cache_gives_identical_tokens(variant):
    model, processor = tiny_rahf_model(variant).eval(), tiny_rahf_processor(variant)
    images = [Image.new("RGB", (40, 40), (30 * i, 90, 160)) for i in range(len(PROMPTS))]
    pixel_values = processor.preprocess_images(images)
    enc = processor.encode_prompts(PROMPTS, tasks=["keywords"])
    kwargs = {"pixel_values": pixel_values, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    kwargs["image_index"] = enc["image_index"]
    cached = model.generate_keywords(**kwargs, max_new_tokens=12, use_cache=True)
    uncached = model.generate_keywords(**kwargs, max_new_tokens=12, use_cache=False)
    assert cached.shape[1] > 2
    assert torch.equal(cached, uncached)


def test_larger_scoring_batches_give_the_same_feedback():
    model, processor = tiny_rahf_model(), tiny_rahf_processor()
    images = [Image.new("RGB", (48, 40 + 8 * i), (40 * i, 100, 200 - 30 * i)) for i in range(5)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(5)]
    one = RichFeedbackPredictor(model, processor, batch_size=1, max_new_tokens=8)(images, prompts)
    five = RichFeedbackPredictor(model, processor, batch_size=5, max_new_tokens=8)(images, prompts)
    for a, b in zip(one, five):
        for name, value in a.scores.items():
            assert abs(value - b.scores[name]) < 1e-5
        for name, heat in a.heatmaps.items():
            assert abs(heat - b.heatmaps[name]).max() < 1e-5
        assert a.misaligned_word_indices == b.misaligned_word_indices


class _HostSyncs(TorchFunctionMode):
    """Records the calls that make the host wait for the device (a sync per call on a GPU) made from rahf's code."""

    OPS = {"item", "nonzero", "__bool__", "tolist", "any", "all", "__int__", "__float__"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.OPS:
            # The caller: the innermost frame outside torch (transformers' own mask checks are not ours to count).
            frames = [f for f in traceback.extract_stack()[:-1] if "site-packages/torch/" not in f.filename]
            if frames and "/rahf/" in frames[-1].filename and "site-packages" not in frames[-1].filename:
                self.calls.append(f"{func.__name__} at {Path(frames[-1].filename).name}:{frames[-1].lineno}")
        return func(*args, **(kwargs or {}))


def test_multi_head_training_step_has_no_host_sync_in_rahf():
    model = tiny_rahf_model().train()
    batch = make_batch(model, tiny_rahf_processor())
    batch["score_labels"][0, 1] = float("nan")  # unknown labels are masked, not indexed out
    with _HostSyncs() as syncs:
        out = model(**batch)
        out.loss.backward()
    assert not syncs.calls, syncs.calls
    assert torch.isfinite(out.loss)


def test_nothing_known_is_a_zero_loss_term_with_finite_gradients():
    model = tiny_rahf_model().train()
    batch = make_batch(model, tiny_rahf_processor())
    batch["heatmap_labels"][:] = float("nan")
    batch["score_labels"][:] = float("nan")
    out = model(**batch)
    assert out.heatmap_loss.item() == 0.0 and out.score_loss.item() == 0.0
    torch.testing.assert_close(out.loss, model.config.sequence_loss_weight * out.sequence_loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gpu_efficiency_benchmark_writes_its_entries(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_efficiency", ROOT / "benchmarks" / "gpu_efficiency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--size", "tiny", "--quick", "--score_batch_sizes", "1", "--image_side", "64"]
    argv += ["--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    workloads = [e["workload"] for e in report["entries"]]
    assert workloads == ["matmul_peak", "forward", "train_step", "train_step_breakdown", "score", "score_keywords"]
    for entry in report["entries"]:
        assert {"workload", "batch", "flops_per_s", "peak_flops_per_s", "share_of_peak"} <= entry.keys()
        if entry["workload"] != "train_step_breakdown":
            assert entry["flops_per_s"] > 0 and 0 < entry["share_of_peak"]
    breakdown = report["entries"][3]
    assert breakdown["forward_by_part_ms"]["image_tower"] > 0 and breakdown["backward_ms"] > 0
    assert breakdown["host_syncs"]["forward"].get("aten::nonzero", 0) == 0


def test_scoring_with_keywords_runs_the_fusion_encoder_once():
    model, processor = tiny_rahf_model(), tiny_rahf_processor()
    images = [Image.new("RGB", (48, 40), (60 * i, 100, 160)) for i in range(len(PROMPTS))]
    predictor = RichFeedbackPredictor(model, processor, batch_size=len(PROMPTS), max_new_tokens=8)
    calls = []
    handle = model.text_model.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        both = predictor(images, PROMPTS, outputs=["scores", "heatmaps", "keywords"])
        assert len(calls) == 1  # shared by the heads and the keyword decoder
        dense = predictor(images, PROMPTS, outputs=["scores", "heatmaps"])
        keywords = predictor(images, PROMPTS, outputs=["keywords"])
    finally:
        handle.remove()
    for a, d, k in zip(both, dense, keywords):
        assert a.scores == d.scores
        for name in a.heatmaps:
            assert (a.heatmaps[name] == d.heatmaps[name]).all()
        assert a.misaligned_word_indices == k.misaligned_word_indices
