#!/usr/bin/env bash
# Exact command: MEGATRON_LM=/tmp/megatron-lm bash examples/megatron_lm/run_cpu.sh [extra pretrain_gpt.py flags]
# Hardware: a CPU (gloo); Megatron-LM main checkout at $MEGATRON_LM, this repo's .venv.
# Switches (environment):
#   STOCK=1           Megatron-LM's unchanged pretrain_gpt.py with the plugin's --spec (no --lossfree-* flags)
#   STOCK=1 NATIVE=1  the same pretrain_gpt.py WITHOUT the plugin's --spec: Megatron's own router (the reference)
#   V3=1              DeepSeek-V3-shaped router flags (sigmoid, expert bias at rate 1e-2, 4 groups / top-2,
#                     seq_aux_loss, scaling factor 2.5) instead of --moe-router-load-balancing-type none
#   NPROC=4           ranks (torchrun --nproc-per-node); add e.g. --pipeline-model-parallel-size 2
#                     --expert-model-parallel-size 2 as extra flags
# Prints: Megatron-LM's log; see docs/megatron_lm.md for the output seen and where a CPU run stops.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout}"
export MEGATRON_LM CUDA_DEVICE_MAX_CONNECTIONS=1 NO_VCS_VERSION=1 TORCHDYNAMO_DISABLE=1
cd "$MEGATRON_LM"
if [ "${STOCK:-0}" = 1 ]; then
  # Megatron-LM's unchanged pretrain_gpt.py: the plugin only through --spec, its flags at their defaults.
  SCRIPT="$HERE/cpu_stock_pretrain_gpt.py"
  PLUGIN=(--spec megatron_moe_lossfree.megatron.megatron_lm lossfree_gpt_layer_spec)
  if [ "${NATIVE:-0}" = 1 ]; then PLUGIN=(); fi
else
  SCRIPT="$HERE/pretrain_lossfree_gpt.py"
  PLUGIN=(--lossfree-balancing bias --lossfree-update-rule sign --lossfree-update-rate 1e-2)
fi
if [ "${V3:-0}" = 1 ]; then
  ROUTER=(--moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-2
          --moe-router-num-groups 4 --moe-router-group-topk 2 --moe-router-load-balancing-type seq_aux_loss
          --moe-aux-loss-coeff 1e-2 --moe-router-topk-scaling-factor 2.5)
else
  ROUTER=(--moe-router-load-balancing-type none)
fi
# TORCHRUN: another launcher, e.g. TORCHRUN="/path/to/python -m torch.distributed.run" (the tests: their lane's python)
read -r -a LAUNCH <<< "${TORCHRUN:-$REPO/.venv/bin/torchrun}"
"${LAUNCH[@]}" --nproc-per-node "${NPROC:-1}" --master-port "${MASTER_PORT:-29533}" "$SCRIPT" \
  --distributed-backend gloo --transformer-impl local \
  --no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion \
  --no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion --disable-bias-linear \
  --mock-data --tokenizer-type NullTokenizer --vocab-size 1024 \
  --num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 \
  --seq-length 64 --max-position-embeddings 64 --position-embedding-type rope \
  --micro-batch-size 2 --global-batch-size 4 --train-iters 5 \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 1 --clip-grad 1.0 \
  --attention-dropout 0.0 --hidden-dropout 0.0 --inference-rng-tracker \
  --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 64 --moe-token-dispatcher-type alltoall \
  "${ROUTER[@]}" ${PLUGIN[@]+"${PLUGIN[@]}"} \
  --log-interval 1 --eval-interval 1000 --eval-iters 0 "$@"
