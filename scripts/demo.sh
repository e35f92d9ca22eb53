#!/usr/bin/env bash
# The main job on the real sample frames shipped in samples/, on a CPU in a few minutes:
# convert -> pretrain a tiny MultiMAE -> finetune semantic segmentation on RGB-D -> evaluate per sensor set.
# Usage: bash scripts/demo.sh [WORK_DIR]   (default: demo/ in the current folder; its previous demo runs are
# replaced). Runs from any folder; the recipes are the installed package's (mmtk recipes).
set -euo pipefail
samples="$(cd "$(dirname "$0")/.." && pwd)/samples"
work=${1:-demo}
mkdir -p "$work"
rm -rf "$work/pretrain" "$work/finetune"
mmtk() { python3 -m mmtk "$@"; }  # the interpreter setup.sh installed into, whatever is on PATH

mmtk convert --rgbd "$samples/nyuv2_multimae" "$work/nyuv2_sample.h5" --force --no-progress
mmtk info "$work/nyuv2_sample.h5"
mmtk pretrain tiny --data "$work/nyuv2_sample.h5" --out "$work/pretrain"
mmtk finetune tiny_finetune_semseg --init "$work/pretrain" --data "$work/nyuv2_sample.h5" --out "$work/finetune"
mmtk eval --run "$work/finetune" --data "$work/nyuv2_sample.h5" --inputs rgb --inputs depth --inputs rgb,depth \
    --json "$work/eval.json"
