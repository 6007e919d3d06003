#!/usr/bin/env bash
# One GPU check of the real-size paths, for a machine with a CUDA torch (run from the repository root):
#   bash benchmarks/device_check.sh OUT_DIR
# 1. inference throughput of both variants at tiny and base size (bf16), 2. a few bf16 training steps of the
# base-size model (ViT-L/16-384 + t5-base shapes, random towers: no hub needed) on a small synthetic set.
set -uo pipefail
out=${1:-device-check}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
python3 benchmarks/predict.py --sizes tiny base --device cuda --dtype bfloat16 --json "$out/predict_gpu.json" 2>&1 | grep -v Warning | tee "$out/predict_gpu.txt"
python3 - <<'PY'
import json
from rahf.data.synth import SynthConfig, generate_synthetic
generate_synthetic("/tmp/rahf_synth_small", SynthConfig(num_train=64, num_validation=16, num_test=16), overwrite=True)
cfg = json.load(open("configs/model/base.json"))
cfg.pop("vision_model_name_or_path"); cfg.pop("text_model_name_or_path")
json.dump(cfg, open("/tmp/base_random.json", "w"))
PY
python3 -m rahf.train --config configs/train/richhf18k_base.yaml --data_dir /tmp/rahf_synth_small \
  --model_config /tmp/base_random.json --output_dir /tmp/rahf_base_run --max_train_steps 12 --train_batch_size 4 \
  --mixed_precision bf16 --checkpointing_steps 10 --validation_steps 12 --logging_steps 2 2>&1 | grep -v "it/s\]" | tail -n 15 | tee "$out/train_base_bf16.txt"
cp /tmp/rahf_base_run/logs/train_log.jsonl "$out/train_base_log.jsonl" 2>/dev/null
python3 -c "import torch; print('max GPU memory (GiB)', round(torch.cuda.max_memory_allocated() / 2**30, 2))"
