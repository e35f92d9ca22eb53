#!/usr/bin/env bash
# The checks that need a CUDA GPU, in order of importance, each with a time cap and its own log:
#   1. the GPU tests (parity on CUDA, bf16 autocast, deterministic resume in bf16 and fp16, bf16 pseudo-labels)
#   2. the pretraining step of MultiMAE-base (images/s and MFU against the measured GEMM rate), eager
#   3. optimizer steps of the recipes, and the data loader feeding them
#   4. `mmtk pretrain base` end to end on the sample frame (loader, bf16, checkpoint, TensorBoard)
#   5. the demo (convert -> pretrain -> finetune -> eval) on the GPU
#   6. the pretraining step with compiled blocks
# Usage: bash scripts/gpu_check.sh [LOG_DIR]   (mmtk installed; default LOG_DIR: gpu_logs/)
set -uo pipefail
cd "$(dirname "$0")/.."
logs=$(realpath -m "${1:-gpu_logs}")
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
work=$(mktemp -d)

step() {  # step NAME SECONDS COMMAND...: run with a time cap, log to LOG_DIR/NAME.log, print a status line
    local name=$1 cap=$2 start=$SECONDS
    shift 2
    timeout "$cap" "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (cap $cap s)" | tee -a "$logs/summary.txt"
    tail -n 25 "$logs/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"
} | tee "$logs/summary.txt"

step tests 240 python3 -m pytest -q -rs -k cuda tests/test_model.py tests/test_parity.py \
    tests/test_engine_resume.py tests/test_pseudo_label.py
step bench_model 120 python3 benchmarks/bench_model.py --device cuda --batch 128 --steps 10
step bench_train 150 python3 benchmarks/bench_train.py --recipes base tiny --base-batch 256 --steps 20 \
    --loader-recipe base --workers 6 12 15
python3 -m mmtk convert --rgbd samples/nyuv2_multimae "$work/sample.h5" --no-progress >/dev/null 2>&1
step pretrain_base 150 python3 -m mmtk pretrain base --data "$work/sample.h5" --out "$work/base" \
    --set optim.batch_size=256 --set data.repeat=2560 --set train.max_steps=40 --set train.log_every=10 \
    --set data.num_workers=12
{ ls -R "$work/base"; cat "$work/base/metrics.jsonl"; } >>"$logs/pretrain_base.log" 2>&1
step demo 150 bash scripts/demo.sh "$work/demo"
step bench_model_compiled 240 python3 benchmarks/bench_model.py --device cuda --batch 128 --steps 10 --compile
rm -rf "$work"
