#!/usr/bin/env bash
# The main job on the embedded synthetic dataset: train the small model, then test it.
# Each stage is skipped when its result is already in the work dir.
#   bash tools/demo.sh [WORK_DIR]     (make demo)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-work_dirs/demo}
CFG=configs/synthetic/upernet_convnext-micro_synthetic.py
CLEAN=$WORK/clean

stage() { echo "[demo $(date +%H:%M:%S)] $*"; }

if [ ! -f "$CLEAN/iter_2000.pth" ]; then
    stage "1/2 training the clean small model (about 3 minutes on 2 cores)"
    python tools/train.py "$CFG" --work-dir "$CLEAN" --resume
else
    stage "1/2 clean model already trained: $CLEAN/iter_2000.pth"
fi
stage "2/2 testing the clean model"
python tools/test.py "$CFG" "$CLEAN/iter_2000.pth" --work-dir "$CLEAN/test"
