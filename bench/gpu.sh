#!/usr/bin/env bash
# lorakit on one CUDA GPU, offline, in one command (under 8 minutes on an H100/H200-class card):
#
#   bash bench/gpu.sh [WORKDIR]
#
# Writes a full-size random SDXL checkpoint (6.9 GB, seeded; no download), then trains the real `lorakit train`
# at 1024x1024, batch 1, LoRA dim 32, bf16 (--mixed_precision bf16 --full_bf16), AdamW, cached latents and text
# outputs, three times: every U-Net block checkpointed (sd-scripts' --gradient_checkpointing), the budget plan
# (--gradient_checkpointing with the GPU's free memory as budget), and no checkpointing; then the budget plan once
# more without --full_bf16. Each run prints s/step
# (median after the first step), torch.cuda.max_memory_allocated against lorakit's estimate, and the model-FLOP
# utilisation against the card's measured bf16 matrix-product rate (bench/train_step.py).
#
# Needs PyTorch with CUDA and lorakit's dependencies; bench/README.md says how to carry them as wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=${1:-$(mktemp -d /tmp/lorakit-gpu-XXXXXX)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

"$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA device visible to torch")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
mkdir -p "$WORK"
if [ ! -f "$WORK/full.safetensors" ]; then
  start=$(date +%s)
  "$PYTHON" -m lorakit random-model "$WORK/full.safetensors" --size full --format single-file --dtype fp16
  echo "random full-size SDXL written in $(( $(date +%s) - start )) s"
fi
"$PYTHON" bench/train_step.py --size full --checkpoint "$WORK/full.safetensors" --resolution 1024 --dim 32 \
  --precision bf16 --runs adamw --plans all budget none --steps 10
# sd-scripts' most common setting: bf16 autocast over a float32 network (no --full_bf16)
"$PYTHON" bench/train_step.py --size full --checkpoint "$WORK/full.safetensors" --resolution 1024 --dim 32 \
  --precision mixed --runs adamw --plans budget --steps 10
echo "work folder (the checkpoint is kept for a rerun): $WORK"
