#!/usr/bin/env bash
# The GPU check of issue 18 (share of the chip's peak; distributed training), one script for a machine with a CUDA
# torch, from the repository root; about 5-7 minutes on one H200, each step under its own time limit:
#   bash benchmarks/device_check_efficiency.sh OUT_DIR
# 1. "before": base-size RAHF with the options off (eager attention, for-each AdamW, keyword decoding without the
#    KV cache, data loading on the main process) at training batch 4 and scoring batch 8, the batches of the
#    earlier measurements (the README's 29.7 images/s with keywords at batch 8 is the "today" to beat 3x); the
#    loss's masked mean and the shared fusion pass stay on, as they have no switch;
# 2. "after": the defaults (SDPA, fused AdamW, KV cache, 4 loader workers, pinned memory) at training batch
#    4/8/16 and scoring batch 8/32/64, with the profiler breakdown of the step;
# 3. rahf train under FSDP (configs/accelerate/fsdp.yaml, one process per GPU, at most 2): checkpoint, resume;
# 4. torch.compile of the training forward at batch 16 (worth an option only if it beats step 2);
# 5. gradient checkpointing at batch 16 (memory against time).
# Each JSON holds entries with workload, batch, flops_per_s, peak_flops_per_s and share_of_peak; summary.txt
# lists them side by side.
set -uo pipefail
out=${1:-device-check-efficiency}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
bench="python3 benchmarks/gpu_efficiency.py --device cuda --dtype bfloat16"
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s)')" | tee "$out/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$out/env.txt"

timeout 75 $bench --attn_implementation eager --no_fused_adam --no_kv_cache --dataloader_num_workers 0 \
  --batch_sizes 4 --score_batch_sizes 8 --json "$out/before.json" 2>&1 | grep -v Warning | tee "$out/before.txt"
timeout 150 $bench --json "$out/after.json" 2>&1 | grep -v Warning | tee "$out/after.txt"
timeout 100 python3 -m pytest tests/test_train_fsdp.py -x -q -p no:cacheprovider 2>&1 | tail -n 15 | tee "$out/fsdp_test.txt"
timeout 90 $bench --compile --batch_sizes 16 --skip forward profile score --json "$out/compile.json" 2>&1 \
  | grep -v Warning | tail -n 5 | tee "$out/compile.txt"
timeout 45 $bench --gradient_checkpointing --batch_sizes 16 --skip forward profile score \
  --json "$out/checkpointing.json" 2>&1 | grep -v Warning | tail -n 5 | tee "$out/checkpointing.txt"

python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'run':14} {'workload':16} {'batch':>5} {'img/s':>8} {'TFLOP/s':>8} {'share':>6} {'GiB':>6}")
for name in ("before", "after", "compile", "checkpointing"):
    path = out / f"{name}.json"
    if not path.is_file():
        print(f"{name:14} (no result)")
        continue
    for e in json.loads(path.read_text())["entries"]:
        if e.get("flops_per_s") is None:
            continue
        ips = e.get("images_per_s")
        print(f"{name:14} {e['workload']:16} {str(e['batch']):>5} {ips if ips is None else round(ips, 1)!s:>8} "
              f"{e['flops_per_s'] / 1e12:8.1f} {e['share_of_peak']:6.1%} {e.get('peak_memory_gib') or 0:6.1f}")
for name in ("before", "after"):
    path = out / f"{name}.json"
    if path.is_file():
        for e in json.loads(path.read_text())["entries"]:
            if e["workload"] == "train_step_breakdown":
                keep = {k: e[k] for k in ("data_loading_ms", "forward_ms", "forward_by_part_ms", "backward_ms",
                                          "optimizer_ms", "step_wall_ms", "host_syncs")}
                print(name, "breakdown (batch", e["batch"], "):", json.dumps(keep, default=round))
PY
