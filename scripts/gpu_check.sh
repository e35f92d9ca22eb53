#!/usr/bin/env bash
# The checks that need a CUDA GPU, in order of importance, each with a time cap and its own log:
#   tests          the GPU tests: compiled step (no host sync, inductor = eager), parity on CUDA, bf16 autocast,
#                  deterministic resume in bf16 and fp16, bf16 pseudo-labels
#   bench_model_128, bench_model_256
#                  MultiMAE-base pretraining step at batch 128 and 256, eager / step-compiled / blocks-compiled x
#                  bf16 / fp32: images/s and MFU against the GEMM rate measured in the same run (one table each)
#   bench_train    base.yaml's optimizer step (bf16, compiled step), and whether the data loader keeps up with it
#   pretrain_base  `mmtk pretrain base` end to end on the sample frame (loader, bf16, checkpoint)
#   cudagraphs     the compiled step with CUDA graphs (mode="reduce-overhead"), batch 128
#   bf16_decoder   the compiled bf16 step with the semseg decoder in bf16 too (the default keeps it in fp32)
#   demo           convert -> pretrain -> finetune -> eval on the GPU
# Usage: bash scripts/gpu_check.sh [LOG_DIR [STEP ...]]   (mmtk installed; default LOG_DIR gpu_logs/)
# Without STEPs: tests, bench_model_128 and bench_model_256, as much as fits one call of under 10 minutes; then
# what the summary says was skipped or cut, and the rest, in a second call, e.g.
#   bash scripts/gpu_check.sh gpu_logs2 bench_model_256 bench_train pretrain_base cudagraphs bf16_decoder demo
# The whole call stops after GPU_CHECK_BUDGET seconds (default 560): each step's cap is cut to what is left and
# steps that would get under 30 s are skipped, so the call always ends with its summary.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=$(realpath -m "${1:-gpu_logs}")
shift $(( $# > 0 ? 1 : 0 ))
wanted=" ${*:-tests bench_model_128 bench_model_256} "
budget=${GPU_CHECK_BUDGET:-560}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
work=$(mktemp -d)

step() {  # step NAME SECONDS COMMAND...: run with a time cap, log to LOG_DIR/NAME.log, print a status line
    local name=$1 cap=$2 start=$SECONDS
    shift 2
    [[ $wanted == *" $name "* ]] || return 0
    local left=$((budget - SECONDS))
    if ((left < 30)); then
        echo "== $name: skipped, ${left} s of the ${budget} s budget left" | tee -a "$logs/summary.txt"
        return 0
    fi
    ((cap > left)) && cap=$left
    timeout "$cap" "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (cap $cap s)" | tee -a "$logs/summary.txt"
    tail -n 30 "$logs/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"
} | tee "$logs/summary.txt"

step tests 180 python3 -m pytest -q -rs -k cuda tests/test_compiled_step.py tests/test_model.py tests/test_parity.py \
    tests/test_engine_resume.py tests/test_pseudo_label.py
# One table per batch size (bench_model_128, bench_model_256); --budget: rows that would start after it are
# skipped (a step-compiled row takes a minute or two, most of it compiling), so each table prints inside its cap,
# and every row is also printed as soon as it is measured
for batch in 128 256; do
    rows=$((budget - SECONDS - 70)); ((rows > 260)) && rows=260  # leave the last row 70 s inside the cap
    step "bench_model_$batch" 330 python3 benchmarks/bench_model.py --device cuda --batch "$batch" \
        --modes eager step blocks --precisions bf16 fp32 --steps 10 --budget "$rows"
done
step bench_train 240 python3 benchmarks/bench_train.py --recipes base --precisions bf16 --base-batch 256 --steps 20 \
    --loader-recipe base --workers 6 12 15 --compile step
if [[ $wanted == *" pretrain_base "* ]]; then
    python3 -m mmtk convert --rgbd samples/nyuv2_multimae "$work/sample.h5" --no-progress >/dev/null 2>&1
fi
step pretrain_base 150 python3 -m mmtk pretrain base --data "$work/sample.h5" --out "$work/base" \
    --set optim.batch_size=256 --set data.repeat=2560 --set train.max_steps=40 --set train.log_every=10 \
    --set data.num_workers=12 --set train.compile=step
[[ -d $work/base ]] && { ls -R "$work/base"; cat "$work/base/metrics.jsonl"; } >>"$logs/pretrain_base.log" 2>&1
step cudagraphs 200 python3 benchmarks/bench_model.py --device cuda --batch 128 --modes step-cudagraphs \
    --precisions bf16 fp32 --steps 10 --budget 150
step bf16_decoder 150 python3 benchmarks/bench_model.py --device cuda --batch 128 --modes step --precisions bf16 \
    --steps 10 --fp32-decoders
step demo 150 bash scripts/demo.sh "$work/demo"
rm -rf "$work"
