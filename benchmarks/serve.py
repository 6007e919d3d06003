"""`rahf serve` throughput with dynamic batching vs one request at a time, side by side in one run, on 127.0.0.1.

    python benchmarks/serve.py [--size tiny] [--clients 8] [--requests 6] [--max_batch_size 8] [--json FILE]

Both servers serve the same randomly initialised model (a configs/model preset); `--clients` threads each send
`--requests` one-image requests (bounded: clients x requests per mode), payloads encoded before the clock starts.
"one at a time" is max_batch_size 1 (every request its own model call); "batched" gathers up to --max_batch_size
images waiting at most --max_wait_ms. Prints images/s and latency for both, then checks every batched answer against
`RichFeedbackPredictor` on the same request alone, then sends each kind of bad request and prints its answer.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rahf import RAHFConfig, RAHFModel, RAHFProcessor, RichFeedbackPredictor  # noqa: E402
from rahf.client import RAHFClient, encode_image  # noqa: E402
from rahf.serve import ServeConfig, run_in_thread  # noqa: E402
from rahf.tokenization import build_offline_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle above a blue square", "a cat on a wooden table", "two birds on a wire at dusk"]


def build(size: str) -> RichFeedbackPredictor:
    config = RAHFConfig.from_json_file(ROOT / "configs" / "model" / f"{size}.json")
    config = RAHFConfig.from_dict(
        {**config.to_dict(), "vision_model_name_or_path": None, "text_model_name_or_path": None}
    )  # random towers: no hub needed
    torch.manual_seed(0)
    processor = RAHFProcessor.from_config(config, tokenizer=build_offline_tokenizer(1024))
    return RichFeedbackPredictor(RAHFModel(config), processor, max_new_tokens=16)


def post(url: str, payload: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/score", data=payload, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def load(url: str, payloads: list[list[bytes]]) -> dict:
    """Every client thread sends its payloads in turn; returns images/s and latency percentiles."""
    latencies: list[float] = []
    answers: dict[tuple[int, int], dict] = {}
    errors: list[str] = []

    def work(c: int) -> None:
        for r, payload in enumerate(payloads[c]):
            t0 = time.perf_counter()
            status, answer = post(url, payload)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(f"{status}: {answer}")
            answers[(c, r)] = answer

    threads = [threading.Thread(target=work, args=(c,)) for c in range(len(payloads))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "seconds": wall,
        "images_per_s": n / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[min(n - 1, int(0.95 * n))],
        "answers": answers,
    }


def bad_requests(png: str) -> list[tuple[str, bytes]]:
    big = json.dumps({"images": ["A" * 2_000_000], "prompts": ["a"]}).encode()
    bomb = encode_image(Image.new("L", (4000, 4000)))  # ~20 kB that decodes to 16 MP
    return [
        ("non-image bytes", json.dumps({"images": [base64.b64encode(b"hello world").decode()], "prompts": ["a"]})),
        ("truncated PNG", json.dumps({"images": [png[:100]], "prompts": ["a"]})),
        ("not base64", json.dumps({"images": ["%%%"], "prompts": ["a"]})),
        ("missing prompt", json.dumps({"images": [png]})),
        ("empty prompt", json.dumps({"images": [png], "prompts": [" "]})),
        ("prompts 2 vs images 3", json.dumps({"images": [png] * 3, "prompts": ["a", "b"]})),
        ("body over the limit (2 MB vs 1 MB)", big),
        ("65 images (limit 64)", json.dumps({"images": [png] * 65, "prompts": ["a"]})),
        ("20 images of 4000 x 4000 (320 MP, limit 200 MP)", json.dumps({"images": [bomb] * 20, "prompts": ["a"]})),
        ("path outside the root", json.dumps({"paths": ["../../etc/passwd"], "prompts": ["a"]})),
        ("absolute path", json.dumps({"paths": ["/etc/passwd"], "prompts": ["a"]})),
        ("not JSON", "{prompts: ["),
        ("unknown key", json.dumps({"images": [png], "prompts": ["a"], "seed": 3})),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "base"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6, help="requests per client per mode")
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--max_wait_ms", type=float, default=10.0)
    parser.add_argument("--image_size", type=int, default=256, help="side of the (random) PNGs sent")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    predictor = build(args.size)
    rng = np.random.default_rng(0)
    side = args.image_size
    payloads, requests = [], []
    for c in range(args.clients):
        row = []
        for r in range(args.requests):
            image = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
            prompt = PROMPTS[(c + r) % len(PROMPTS)]
            requests.append((c, r, image, prompt))
            row.append(json.dumps({"images": [encode_image(image)], "prompts": [prompt]}).encode())
        payloads.append(row)
    print(
        f"model={args.size} torch threads={torch.get_num_threads()} clients={args.clients} "
        f"requests={args.clients * args.requests} per mode, one {side}x{side} image each"
    )

    results = {}
    modes = [("one at a time", 1, 0.0), ("batched", args.max_batch_size, args.max_wait_ms)]
    for name, max_batch, wait in modes:
        config = ServeConfig(max_batch_size=max_batch, max_wait_ms=wait)
        with run_in_thread(predictor, config) as server:
            post(server.url, payloads[0][0])  # warm-up
            before = RAHFClient(server.url).health()
            stats = load(server.url, payloads)
            after = RAHFClient(server.url).health()
        batches = after["batches"] - before["batches"]
        stats["mean_batch"] = (after["images"] - before["images"]) / batches
        results[name] = stats
    print(f"{'mode':14} {'max_batch':>9} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'mean batch':>10}")
    for (name, max_batch, _), stats in zip(modes, results.values()):
        print(
            f"{name:14} {max_batch:9d} {stats['images_per_s']:9.2f} {stats['p50_ms']:8.0f} {stats['p95_ms']:8.0f} "
            f"{stats['mean_batch']:10.2f}"
        )
    speedup = results["batched"]["images_per_s"] / results["one at a time"]["images_per_s"]
    print(f"batched / one at a time: {speedup:.2f}x")

    # The batched answers against the predictor on each request alone.
    max_diff, words_equal = 0.0, 0
    for c, r, image, prompt in requests:
        [answer] = results["batched"]["answers"][(c, r)]["results"]
        [alone] = predictor([image], [prompt], outputs=["scores", "keywords"])
        max_diff = max(max_diff, max(abs(answer["scores"][k] - v) for k, v in alone.scores.items()))
        words_equal += answer["misaligned_word_indices"] == alone.misaligned_word_indices
    print(
        f"batched answers vs the predictor alone: max |score difference| {max_diff:.2e}, misaligned words equal in "
        f"{words_equal}/{len(requests)}"
    )

    print("\nbad requests (server: max_body_bytes 1 MB, max_images 64, image_root set), each answer:")
    root = ROOT / "rahf" / "assets"
    png = encode_image(Image.new("RGB", (32, 32), (200, 30, 30)))
    with run_in_thread(predictor, ServeConfig(max_body_bytes=1_000_000, image_root=str(root))) as server:
        answers = []
        for label, body in bad_requests(png):
            status, answer = post(server.url, body if isinstance(body, bytes) else body.encode())
            answers.append({"request": label, "status": status, "error": answer.get("error")})
            print(f"  {label}: {status} {answer.get('error')}")
        status, answer = post(server.url, json.dumps({"images": [png], "prompts": ["a red square"]}).encode())
        health = RAHFClient(server.url).health()["status"]
        print(f"  afterwards: a good request -> {status}, /health -> {health}")
    if args.json:
        for stats in results.values():
            del stats["answers"]
        Path(args.json).write_text(
            json.dumps({"modes": results, "speedup": speedup, "max_score_diff": max_diff, "bad": answers}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
