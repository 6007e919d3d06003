"""How much of the hardware RAHF uses: training and scoring as a share of the device's own measured matmul peak.

    python benchmarks/gpu_efficiency.py --device cuda --json out.json            # bf16 autocast, base size
    python benchmarks/gpu_efficiency.py --device cpu --json out.json             # fp32, base size: ~6 min on 2 cores
    python benchmarks/gpu_efficiency.py --device cpu --batch_sizes 1 2           # more batches: minutes more each
    python benchmarks/gpu_efficiency.py --device cpu --size tiny --quick         # the tiny preset, seconds

In one run:

1. the peak: a large square GEMM in the dtype the model computes in (bf16 on a GPU, fp32 on a CPU), best of a few;
2. base-size multi-head RAHF (configs/model/base.json with random towers: ViT-L/16-384 + t5-base shapes, no hub) at
   real shapes: a training step (forward, backward, clipping, AdamW) at each `--batch_sizes`, and scoring through
   `RichFeedbackPredictor` (scores + heatmaps; then with keywords) at each `--score_batch_sizes`; each as model
   FLOPs per second (FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` on the eager-attention
   formulation, so that every attention matmul is counted) over the peak; the peak memory of each;
3. a breakdown of one training step from `torch.profiler`: data loading (the real dataset + collator through a
   DataLoader), forward by part (image tower, projection, fusion encoder = the T5 encoder over image and text
   tokens, heads, keyword decoder, the rest: loss), backward, optimizer; and the host syncs of an unannotated step
   (`aten::_local_scalar_dense` / `aten::item` / `aten::nonzero` / `cudaStreamSynchronize` calls) with its top ops.

The options of the optimisations (`--attn_implementation`, `--no_fused_adam`, `--gradient_checkpointing`,
`--compile`, `--no_kv_cache`, `--dataloader_num_workers`) let one run compare them; the JSON records them.
Every JSON entry has `workload`, `batch`, `flops_per_s`, `peak_flops_per_s` and `share_of_peak`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT_WORDS = (
    "a red circle above a blue square on a wooden table next to a tall green tree under a cloudy sky".split()
)
SYNC_OPS = (
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::nonzero",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
)


# --------------------------------------------------------------------------------------------------------------------
# Device helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory since the last reset (CUDA); on CPU, the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """FLOP/s of the best of `repeats` timed (size x size) @ (size x size) products in `dtype`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1  # a CUDA GEMM is too short to time alone
    for _ in range(2):
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * size**3 / best


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast with fp32 master weights; nothing in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# Model and data at real shapes


def build_model(size: str, attn_implementation: str):
    from rahf import RAHFConfig, RAHFModel, RAHFProcessor
    from rahf.tokenization import build_offline_tokenizer

    data = json.loads((ROOT / "configs" / "model" / f"{size}.json").read_text())
    data.update(vision_model_name_or_path=None, text_model_name_or_path=None)  # random towers at real shapes
    config = RAHFConfig.from_dict(data)
    torch.manual_seed(0)
    model = RAHFModel(config)
    model.set_attn_implementation(attn_implementation)
    processor = RAHFProcessor.from_config(config, tokenizer=build_offline_tokenizer(1024))
    return model, processor


def build_dataset(num_records: int, image_side: int, heatmap_size: int, seed: int = 0):
    """A canonical split in memory: random `image_side` images (RichHF-18K's are 512 px), prompts of 12-20 words."""
    from datasets import Dataset
    from PIL import Image

    from rahf.data.schema import FEATURES, SCORE_NAMES
    from rahf.data.training import RichFeedbackTorchDataset

    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {name: [] for name in FEATURES}
    for i in range(num_records):
        words = [str(w) for w in rng.choice(PROMPT_WORDS, size=int(rng.integers(12, 21)))]
        rows["uid"].append(f"bench-{i}")
        rows["image"].append(Image.fromarray(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)))
        rows["prompt"].append(" ".join(words))
        for name in SCORE_NAMES:
            rows[name].append(float(rng.random()))
        for key in ("implausibility_map", "misalignment_map"):
            heat = np.zeros((image_side, image_side), np.uint8)
            heat[image_side // 4 : image_side // 2, image_side // 4 : image_side // 2] = 255
            rows[key].append(Image.fromarray(heat, mode="L"))
        rows["prompt_words"].append(words)
        rows["word_labels"].append([int(v) for v in rng.random(len(words)) < 0.8])
    return RichFeedbackTorchDataset(Dataset.from_dict(rows, features=FEATURES), heatmap_size=heatmap_size)


def make_loader(dataset, processor, config, batch_size: int, num_workers: int, pin_memory: bool):
    from torch.utils.data import DataLoader

    from rahf.data.collate import RAHFCollator

    collator = RAHFCollator(processor, config.score_names, config.heatmap_names)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=True,
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def cycle(loader):
    while True:
        yield from loader


def to_device(batch: dict, device: torch.device) -> dict:
    batch = dict(batch)
    batch.pop("uid", None)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------------------------
# Forward by part


PARTS = {
    "image_tower": "vision_model",
    "projection": "visual_projection",
    "fusion_encoder": "text_model.encoder",
    "heatmap_head": "heatmap_head",
    "score_head": "score_head",
    "keyword_decoder": "text_model.decoder",
    "lm_head": "text_model.lm_head",
}


@contextlib.contextmanager
def annotate_parts(model, device: torch.device, sync: bool):
    """A profiler range around each part's forward; with `sync`, the device is synchronised at each edge, so that a
    range's CPU time is its device time too."""
    handles, open_ranges = [], {}
    for label, path in PARTS.items():
        module = model.get_submodule(path)

        def pre(_module, _args, label=label):
            if sync:
                synchronize(device)
            ctx = torch.profiler.record_function(f"forward/{label}")
            ctx.__enter__()
            open_ranges[label] = ctx

        def post(_module, _args, _out, label=label):
            if sync:
                synchronize(device)
            open_ranges.pop(label).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------------------------
# Training


class Trainer:
    """One training step as `rahf train` takes it: forward, backward, gradient clipping, AdamW, zero_grad."""

    def __init__(self, model, device, dtype, fused_adam: bool, compile_model: bool):
        from rahf.training_utils import build_optimizer

        self.model = model.to(device).train()
        self.device, self.dtype = device, dtype
        self.optimizer = build_optimizer(
            model.parameters(), learning_rate=1e-5, weight_decay=0.01, decay_1d=False, fused=fused_adam
        )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.forward = torch.compile(model) if compile_model else model

    def step(self, batch: dict, annotate: bool = False, uncompiled: bool = False) -> torch.Tensor:
        rf = torch.profiler.record_function if annotate else (lambda _name: contextlib.nullcontext())
        sync = (lambda: synchronize(self.device)) if annotate else (lambda: None)
        forward = self.model if uncompiled else self.forward  # the FLOP counter sees no op inside a compiled graph
        with rf("forward"), autocast(self.device, self.dtype):
            loss = forward(**batch).loss
        sync()
        with rf("backward"):
            loss.backward()
            sync()
        with rf("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sync()
        return loss.detach()


def count_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


_FLOPS_PER_SAMPLE: dict[str, float] = {}


def eager_flops(model, fn, workload: str, batch: int, scale: bool) -> int:
    """FLOPs of `fn()` with the towers' attention in eager form (every matmul visible to the counter); the call also
    serves as a warm-up. With `scale` (the CPU, where a base-size step takes most of a minute), a workload counted
    once is scaled by batch for the next batches: every sample is independent, and only the text padding differs."""
    if scale and workload in _FLOPS_PER_SAMPLE:
        return int(_FLOPS_PER_SAMPLE[workload] * batch)
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        flops = count_flops(fn)
    finally:
        model.set_attn_implementation(impl)
    _FLOPS_PER_SAMPLE[workload] = flops / batch
    return flops


def bench_training(model, processor, dataset, args, device, dtype, peak) -> list[dict]:
    results = []
    trainer = Trainer(model, device, dtype, fused_adam=args.fused_adam, compile_model=args.compile)
    pin = device.type == "cuda"
    for batch_size in args.batch_sizes:
        loader = make_loader(dataset, processor, model.config, batch_size, args.dataloader_num_workers, pin)
        batches = cycle(loader)
        batch = to_device(next(batches), device)
        # Model FLOPs of one step (forward + backward; the optimizer's elementwise work is not counted).
        flops = eager_flops(
            model, lambda b=batch: trainer.step(b, uncompiled=True), "train_step", batch_size, device.type == "cpu"
        )
        for _ in range(args.warmup):
            trainer.step(to_device(next(batches), device))
        synchronize(device)
        reset_peak_memory(device)
        times, data_times = [], []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            batch = to_device(next(batches), device)
            t1 = time.perf_counter()
            trainer.step(batch)
            synchronize(device)
            t2 = time.perf_counter()
            times.append(t2 - t0)
            data_times.append(t1 - t0)
        step = float(np.median(times))
        row = {
            "workload": "train_step",
            "batch": batch_size,
            "step_s": step,
            "data_wait_s": float(np.median(data_times)),
            "images_per_s": batch_size / step,
            "flops_per_step": flops,
            "flops_per_s": flops / step,
            "peak_flops_per_s": peak,
            "share_of_peak": flops / step / peak,
            "peak_memory_gib": peak_memory_gib(device),
        }
        results.append(row)
        log(row)
        del loader, batches
    return results


def profile_training(model, processor, dataset, args, device, dtype, batch_size: int) -> dict:
    """The breakdown of one step (annotated, synchronised at each edge) and the host syncs of a plain one."""
    trainer = Trainer(model, device, dtype, fused_adam=args.fused_adam, compile_model=args.compile)
    loader = make_loader(
        dataset, processor, model.config, batch_size, args.dataloader_num_workers, device.type == "cuda"
    )
    batches = cycle(loader)
    trainer.step(to_device(next(batches), device))  # warm-up
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    with torch.profiler.profile(activities=activities) as prof, annotate_parts(model, device, sync=True):
        t0 = time.perf_counter()
        with torch.profiler.record_function("data_loading"):
            batch = to_device(next(batches), device)
            synchronize(device)
        trainer.step(batch, annotate=True)
        synchronize(device)
        wall = time.perf_counter() - t0
    ms = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key.startswith(("forward", "backward"))}
    ms.update({e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key in ("data_loading", "optimizer")})
    parts = {label: ms.get(f"forward/{label}", 0.0) for label in PARTS}
    forward = ms.get("forward", 0.0)
    breakdown = {
        "data_loading_ms": ms.get("data_loading", 0.0),
        "forward_ms": forward,
        "forward_by_part_ms": {**parts, "rest": forward - sum(parts.values())},
        "backward_ms": ms.get("backward", 0.0),
        "optimizer_ms": ms.get("optimizer", 0.0),
        "step_wall_ms": wall * 1e3,
    }

    # Host syncs phase by phase of a plain step (nothing of ours synchronises in it). On a CPU, `aten::item` in the
    # optimizer reads its CPU step counters (no device to wait for); on a GPU what counts is cudaStreamSynchronize.
    batch = to_device(next(batches), device)
    syncs: dict[str, dict[str, int]] = {}
    op_ms: dict[str, float] = {}
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for phase in ("forward", "backward", "optimizer"):
        with torch.profiler.profile(activities=activities) as prof:
            if phase == "forward":
                with autocast(device, dtype):
                    loss = trainer.forward(**batch).loss
            elif phase == "backward":
                loss.backward()
            else:
                torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
                trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)
        phase_events = prof.key_averages()
        syncs[phase] = {e.key: e.count for e in phase_events if e.key in SYNC_OPS}
        for e in phase_events:
            op_ms[e.key] = op_ms.get(e.key, 0.0) + getattr(e, key) / 1e3
    synchronize(device)
    breakdown["host_syncs"] = syncs
    breakdown["top_ops_ms"] = {k: round(v, 2) for k, v in sorted(op_ms.items(), key=lambda kv: -kv[1])[:15]}
    return {"workload": "train_step_breakdown", "batch": batch_size, **breakdown}


# --------------------------------------------------------------------------------------------------------------------
# Scoring


def bench_scoring(model, processor, args, device, peak, score_dtype) -> list[dict]:
    from PIL import Image

    from rahf import RichFeedbackPredictor

    model = model.to(device, score_dtype).eval()
    predictor = RichFeedbackPredictor(
        model, processor, device=device, batch_size=max(args.score_batch_sizes), max_new_tokens=args.keyword_tokens
    )
    rng = np.random.default_rng(0)
    results = []
    generate = model.generate_keywords

    def generate_with_cache(*a, **kw):
        return generate(*a, use_cache=args.kv_cache, **kw)

    model.generate_keywords = generate_with_cache
    try:
        for batch_size in args.score_batch_sizes:
            predictor.batch_size = batch_size
            side = args.image_side
            images = [
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(batch_size)
            ]
            prompts = [" ".join(rng.choice(PROMPT_WORDS, size=16)) for _ in range(batch_size)]
            for workload, outputs in (
                ("score", ["scores", "heatmaps"]),
                ("score_keywords", ["scores", "heatmaps", "keywords"]),
            ):
                flops = eager_flops(
                    model,
                    lambda o=outputs, i=images, p=prompts: predictor(i, p, outputs=o),
                    workload,
                    batch_size,
                    device.type == "cpu",
                )
                for _ in range(args.warmup):
                    predictor(images, prompts, outputs=outputs)
                synchronize(device)
                reset_peak_memory(device)
                times = []
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    predictor(images, prompts, outputs=outputs)
                    synchronize(device)
                    times.append(time.perf_counter() - t0)
                t = float(np.median(times))
                row = {
                    "workload": workload,
                    "batch": batch_size,
                    "call_s": t,
                    "images_per_s": batch_size / t,
                    "flops_per_call": flops,
                    "flops_per_s": flops / t,
                    "peak_flops_per_s": peak,
                    "share_of_peak": flops / t / peak,
                    "peak_memory_gib": peak_memory_gib(device),
                    "keyword_tokens": args.keyword_tokens if workload == "score_keywords" else None,
                }
                results.append(row)
                log(row)
    finally:
        model.generate_keywords = generate
    return results


def bench_forward(model, processor, dataset, args, device, dtype, peak) -> dict:
    """The bare model forward (no grad) of a training batch: the figure the CPU target is set on."""
    model = model.to(device).eval()
    loader = make_loader(dataset, processor, model.config, args.batch_sizes[0], 0, False)
    batch = to_device(next(iter(loader)), device)
    batch.pop("labels", None)  # scores + heatmaps: keywords are decoded at inference

    compiled = torch.compile(model) if args.compile else model

    def run(module=compiled):
        with torch.no_grad(), autocast(device, dtype):
            module(**batch)

    flops = eager_flops(model, lambda: run(model), "forward", args.batch_sizes[0], False)
    compile_s = None
    if args.compile:  # the first call compiles: timed apart
        t0 = time.perf_counter()
        run()
        compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        run()
    times, paired = [], []
    for _ in range(args.iters):
        # A GEMM peak right before each forward: on a shared machine the load drifts, and a pair sees the same one.
        local_peak = matmul_peak(device, dtype, 2048, 2) if device.type == "cpu" else peak
        synchronize(device)
        t0 = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        paired.append(flops / times[-1] / local_peak)
    t = float(np.median(times))
    row = {
        "workload": "forward",
        "batch": args.batch_sizes[0],
        "forward_s": t,
        "flops_per_call": flops,
        "flops_per_s": flops / t,
        "peak_flops_per_s": peak,
        "share_of_peak": flops / t / peak,
        # each forward over the peak measured just before it (CPU), the median of the pairs
        "share_of_paired_peak": float(np.median(paired)),
        "compile_s": compile_s,
    }
    log(row)
    model.train()
    return row


def log(row: dict) -> None:
    keys = ("workload", "batch", "images_per_s", "flops_per_s", "share_of_peak", "peak_memory_gib")
    shown = {k: (f"{row[k]:.3g}" if isinstance(row[k], float) else row[k]) for k in keys if k in row}
    print(" ".join(f"{k}={v}" for k, v in shown.items()), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: bf16 on cuda, float32 on cpu",
    )
    parser.add_argument("--size", default="base", choices=["base", "tiny"], help="configs/model/<size>.json")
    parser.add_argument(
        "--batch_sizes", type=int, nargs="+", default=None, help="training (default cuda 4 8 16, cpu 1)"
    )
    parser.add_argument(
        "--score_batch_sizes", type=int, nargs="+", default=None, help="scoring (default cuda 8 32 64, cpu 2)"
    )
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default cuda 5, cpu 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default cuda 2, cpu 0)")
    parser.add_argument(
        "--keyword_tokens", type=int, default=16, help="new tokens per keyword sequence (random weights never stop)"
    )
    parser.add_argument("--image_side", type=int, default=512, help="side of the random images (RichHF-18K: 512)")
    parser.add_argument("--quick", action="store_true", help="the smallest batch of each, one timed iteration")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument(
        "--no_fused_adam", dest="fused_adam", action="store_false", help="for-each AdamW instead of fused"
    )
    parser.add_argument(
        "--no_kv_cache", dest="kv_cache", action="store_false", help="keyword decoding recomputes the prefix"
    )
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward (and the training forward)")
    parser.add_argument("--dataloader_num_workers", type=int, default=None, help="default cuda 4, cpu 0")
    parser.add_argument("--skip", nargs="*", default=[], choices=["forward", "train", "profile", "score"])
    parser.add_argument("--json", default=None, help="write every entry here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    # A base-size training step takes most of a minute on two CPU cores: the CPU defaults keep a run to minutes.
    args.batch_sizes = args.batch_sizes or ([4, 8, 16] if on_gpu else [1])
    args.score_batch_sizes = args.score_batch_sizes or ([8, 32, 64] if on_gpu else [2])
    args.iters = args.iters or (5 if on_gpu else 1)
    if args.warmup is None:
        args.warmup = 2 if on_gpu else 0  # the FLOP-counting call before each timing warms up too
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = 4 if on_gpu else 0
    if args.quick:
        args.batch_sizes, args.score_batch_sizes = args.batch_sizes[:1], args.score_batch_sizes[:1]
        args.iters, args.warmup, args.keyword_tokens = 1, min(args.warmup, 1), min(args.keyword_tokens, 8)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs; bf16 autocast is unaffected

    name = torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine()
    header = {
        "device": f"{args.device} ({name})",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "options": {
            k: getattr(args, k)
            for k in ("size", "attn_implementation", "fused_adam", "kv_cache", "gradient_checkpointing", "compile")
        }
        | {"dataloader_num_workers": args.dataloader_num_workers},
    }
    print(json.dumps(header), flush=True)

    peak_args = (device, dtype, 8192 if on_gpu else 2048, 10 if on_gpu else 5)
    peak = matmul_peak(*peak_args)
    entries: list[dict] = [
        {"workload": "matmul_peak", "batch": None, "flops_per_s": peak, "peak_flops_per_s": peak, "share_of_peak": 1.0}
    ]
    log(entries[0])

    model, processor = build_model(args.size, args.attn_implementation)
    if args.gradient_checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    dataset = build_dataset(max(8, 2 * max(args.batch_sizes)), args.image_side, model.config.heatmap_size)

    def save() -> None:  # after each part, so that a run cut short by a time limit keeps what it measured
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({**header, "entries": entries}, indent=2) + "\n")

    save()
    if "forward" not in args.skip:
        entries.append(bench_forward(model, processor, dataset, args, device, dtype, peak))
        save()
    if "train" not in args.skip:
        entries += bench_training(model, processor, dataset, args, device, dtype, peak)
        save()
    if "profile" not in args.skip:
        breakdown = profile_training(model, processor, dataset, args, device, dtype, args.batch_sizes[0])
        print(json.dumps(breakdown, indent=1), flush=True)
        entries.append({**breakdown, "flops_per_s": None, "peak_flops_per_s": peak, "share_of_peak": None})
        save()
    if "score" not in args.skip:
        # Scoring in the compute dtype itself (bf16 weights on a GPU), as RichFeedbackPredictor runs it.
        model.zero_grad(set_to_none=True)
        entries += bench_scoring(model, processor, args, device, peak, dtype)
        save()
    # The peak again at the end, the best of both taken: on a shared machine one measurement can be unlucky. The
    # shares above were divided by the first; they are scaled here if the second was higher.
    second = matmul_peak(*peak_args)
    if second > peak:
        for entry in entries:
            if entry.get("share_of_peak") is not None and entry["workload"] != "matmul_peak":
                entry["share_of_peak"] *= peak / second
            entry["peak_flops_per_s"] = second
        entries[0]["flops_per_s"] = second
    print(f"matmul peak: {peak:.3g} then {second:.3g} FLOP/s; shares against {max(peak, second):.3g}", flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
