#!/usr/bin/env bash
# Exact command: bash examples/gpu_fp8_pretrain.sh [NUM_GPUS]
# Hardware: 1-8 NVIDIA GPUs with FP8 (Hopper/Ada for tensorwise, Blackwell for mxfp8), Transformer Engine
# installed (pip install 'megatron_moe_lossfree[te]'). Prints the same table as the CPU demo (step, loss,
# lr, tokens/s, MaxVio_batch) and validation perplexity; writes runs/gpu_fp8/.
# Status: FP8 NOT yet run (Transformer Engine could not be installed on the one GPU machine lent so far);
# the same model in bf16 with Megatron's local spec ran 50 steps on one NVIDIA H200 (make gpu-check,
# benchmarks/results.md). Several GPUs (EP > 1, NCCL) not run.
set -euo pipefail
NGPU=${1:-1}
torchrun --nproc-per-node "$NGPU" -m megatron_moe_lossfree pretrain --preset tiny-cpu \
  --hidden-size 512 --num-attention-heads 8 --ffn-hidden-size 2048 --moe-ffn-hidden-size 512 \
  --seq-length 512 --micro-batch-size 8 --global-batch-size $((8 * NGPU)) --train-iters 300 \
  --expert-model-parallel-size "$NGPU" --bf16 \
  --transformer-impl transformer_engine --fp8-format hybrid --fp8-recipe tensorwise \
  --out runs/gpu_fp8
