#!/usr/bin/env bash
# The main job on the real sample frames shipped in samples/, on a CPU in a few minutes:
# convert -> pretrain a tiny MultiMAE -> finetune semantic segmentation on RGB-D -> evaluate per sensor set.
# Usage: bash scripts/demo.sh [WORK_DIR]   (default: demo/; its previous demo runs are replaced)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-demo}
mkdir -p "$work"
rm -rf "$work/pretrain" "$work/finetune"
mmtk() { python3 -m mmtk "$@"; }  # the interpreter setup.sh installed into, whatever is on PATH

mmtk convert --rgbd samples/nyuv2_multimae "$work/nyuv2_sample.h5" --force --no-progress
mmtk info "$work/nyuv2_sample.h5"
mmtk pretrain recipes/tiny.yaml --data "$work/nyuv2_sample.h5" --out "$work/pretrain"
mmtk finetune recipes/tiny_finetune_semseg.yaml --init "$work/pretrain/last.pt" \
    --data "$work/nyuv2_sample.h5" --out "$work/finetune"
mmtk eval --checkpoint "$work/finetune/last.pt" --data "$work/nyuv2_sample.h5" \
    --inputs rgb --inputs depth --inputs rgb,depth --json "$work/eval.json"
