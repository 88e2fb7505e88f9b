#!/usr/bin/env bash
# Exact command: MEGATRON_LM=/path/to/Megatron-LM bash examples/megatron_lm/run_gpu.sh [NUM_GPUS]
# Hardware: 1, 2, 4 or 8 NVIDIA GPUs (EP = NUM_GPUS divides the 8 experts), CUDA torch, Transformer Engine, Megatron-LM's own requirements, this package
# installed (pip install -e .). Prints Megatron-LM's log and the launcher's "lossfree:" summary lines.
# Status: NOT yet run (the one GPU machine lent so far had no Megatron-LM checkout or Transformer Engine);
# the CPU variant run_cpu.sh is the verified one.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
NGPU=${1:-1}
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout}"
export MEGATRON_LM CUDA_DEVICE_MAX_CONNECTIONS=1
cd "$MEGATRON_LM"
torchrun --nproc-per-node "$NGPU" "$HERE/pretrain_lossfree_gpt.py" \
  --transformer-impl transformer_engine --bf16 \
  --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 \
  --num-layers 4 --hidden-size 512 --ffn-hidden-size 2048 --num-attention-heads 8 \
  --seq-length 1024 --max-position-embeddings 1024 --position-embedding-type rope --normalization RMSNorm \
  --micro-batch-size 4 --global-batch-size $((4 * NGPU)) --train-iters 100 \
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 10 --clip-grad 1.0 \
  --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 512 --moe-token-dispatcher-type alltoall \
  --moe-grouped-gemm --moe-router-load-balancing-type none --expert-model-parallel-size "$NGPU" \
  --lossfree-balancing bias --lossfree-update-rule sign --lossfree-update-rate 1e-3 \
  --log-interval 10 --eval-interval 1000 --eval-iters 0 "$@"
