#!/usr/bin/env bash
# The diffusers LoRA guide's command (train_text_to_image_lora.py on lambdalabs/pokemon-blip-captions), run by
# difflora. Offline: the model and the dataset come from the local Hugging Face cache (HF_HUB_CACHE, HF_HOME
# or ~/.cache/huggingface/hub) or from folders; copy them there from a machine with network, e.g.
#   huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5
#   huggingface-cli download --repo-type dataset lambdalabs/pokemon-blip-captions
# Differences from the guide: no `accelerate launch` (one process), no --push_to_hub/--hub_model_id, and
# TensorBoard logs (output_dir/logs) instead of wandb. fp16 needs CUDA: MIXED_PRECISION defaults to fp16 when
# nvidia-smi sees a GPU, else to no (bf16 also works on CPU).
# Every setting can be overridden from the environment; extra flags are passed through:
#   MODEL_NAME=/path/to/sd15 MAX_TRAIN_STEPS=100 bash examples/train_pokemon.sh --rank=8
set -euo pipefail

MODEL_NAME=${MODEL_NAME:-stable-diffusion-v1-5/stable-diffusion-v1-5}
DATASET_NAME=${DATASET_NAME:-lambdalabs/pokemon-blip-captions}
OUTPUT_DIR=${OUTPUT_DIR:-sd-pokemon-model-lora}
RESOLUTION=${RESOLUTION:-512}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-1}
GRADIENT_ACCUMULATION_STEPS=${GRADIENT_ACCUMULATION_STEPS:-4}
MAX_TRAIN_STEPS=${MAX_TRAIN_STEPS:-15000}
CHECKPOINTING_STEPS=${CHECKPOINTING_STEPS:-500}
DATALOADER_NUM_WORKERS=${DATALOADER_NUM_WORKERS:-8}
SEED=${SEED:-1337}
# the guide's prompt; VALIDATION_PROMPT= (empty) leaves validation out
VALIDATION_PROMPT=${VALIDATION_PROMPT-A pokemon with blue eyes.}
if [[ -z "${MIXED_PRECISION:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MIXED_PRECISION=fp16; else MIXED_PRECISION=no; fi
fi
# the installed package's CLI (in the difflora repository: its own bin, after npm run build:ts)
read -r -a difflora <<<"${DIFFLORA:-npx --no-install difflora}"

args=(
  --pretrained_model_name_or_path="$MODEL_NAME"
  --dataset_name="$DATASET_NAME"
  --mixed_precision="$MIXED_PRECISION"
  --dataloader_num_workers="$DATALOADER_NUM_WORKERS"
  --resolution="$RESOLUTION" --center_crop --random_flip
  --train_batch_size="$TRAIN_BATCH_SIZE"
  --gradient_accumulation_steps="$GRADIENT_ACCUMULATION_STEPS"
  --max_train_steps="$MAX_TRAIN_STEPS"
  --learning_rate=1e-04
  --max_grad_norm=1
  --lr_scheduler=cosine --lr_warmup_steps=0
  --output_dir="$OUTPUT_DIR"
  --report_to=tensorboard
  --checkpointing_steps="$CHECKPOINTING_STEPS"
  --seed="$SEED"
)
[[ -n "$VALIDATION_PROMPT" ]] && args+=(--validation_prompt="$VALIDATION_PROMPT")

set -x
exec "${difflora[@]}" train "${args[@]}" "$@"
