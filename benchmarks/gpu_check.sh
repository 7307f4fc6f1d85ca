#!/usr/bin/env bash
# GPU readiness check, for a GPU machine without network access (docs/gpu_check.md):
# installs the OpenMMLab stack from wheels copied there with the checkout, then
#   amp_train                 tools/train.py --amp, 5 iterations (synthetic PIR-AT)
#   sea                       benchmarks/bench_sea.py, UperNet-ConvNeXt-T, 8 x 512x512
#   adversarial_training      benchmarks/bench_adversarial_training.py, same model, fp32
#   adversarial_training_amp  the same with AMP
# and, in a second call with --cheaper-passes, instead of the three benchmarks:
#   cheaper_passes_speed      benchmarks/cheaper_passes.py: pass time with channels_last,
#                             bf16, compile on UperNet-ConvNeXt-T, 8 x 512x512
#   cheaper_passes_strength   the same on the demo model, with the SEA strength change
# each under its own timeout, the whole under --deadline (470 s), writing summary.json,
# one <step>.json per step and gpu_check.log into OUT_DIR (default work_dirs/gpu_check).
#
# On a machine with network: bash benchmarks/gpu_prepare.sh   (fills benchmarks/gpu_wheels)
# Copy the checkout, benchmarks/gpu_wheels included, to the GPU machine; there:
#                             bash benchmarks/gpu_check.sh [OUT_DIR]
#                             bash benchmarks/gpu_check.sh --cheaper-passes [OUT_DIR2]
# On any machine with the stack installed, to check the script logic and the JSON on
# the CPU in about a minute:
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --cpu work_dirs/gpu_check_cpu
# Other options: python benchmarks/gpu_check.py --help. Exit status 0 iff all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -u benchmarks/gpu_check.py "$@"
