"""AdamW step time, torch's fused kernel against for-each, over the same parameters, alternately.

    python benchmarks/fused_adamw.py [--device cpu|cuda] [--millions 50] [--repeats 2]

The parameters are 1024 x 1024 matrices plus as many 1024-vectors as biases (about `--millions` M in all), each with
a random gradient. Prints the milliseconds per step of each kernel per repeat, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--millions", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    n = max(1, args.millions * 10**6 // (1024 * 1024))
    shapes = [(1024, 1024)] * n + [(1024,)] * (2 * n)
    params = [torch.nn.Parameter(torch.randn(s, device=args.device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    ms: dict[str, list[float]] = {"foreach": [], "fused": []}
    for _ in range(args.repeats):
        for name in ms:
            optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True if name == "fused" else None)
            optimizer.step()  # state allocation
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            ms[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    result = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "parameters_millions": sum(p.numel() for p in params) / 1e6,
        "ms_per_step": ms,
        "foreach_over_fused": min(ms["foreach"]) / min(ms["fused"]),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
