#!/usr/bin/env bash
# Install the tested CPU stack into a project-local virtual environment.
#
#   bash tools/setup_env.sh            # creates/updates ./.venv
#   VENV=/path/to/venv PYTHON=python3.11 bash tools/setup_env.sh
#
# Idempotent: a stamp file records the hash of the requirement files, and the
# whole script is skipped when nothing changed. Each step is also safe to rerun
# (pip skips what is already installed; mmcv's compiled wheel is cached by pip).
# See docs/installation.md for why each step is as it is.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.mmseg_robust-installed"
HASH=$(cat requirements/*.txt setup.py setup.cfg tools/setup_env.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
    exit 0
fi

step() { echo "[setup_env $(date +%H:%M:%S)] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    step "creating virtual environment $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. torch + torchvision as a matching pair. --isolated ignores the machine's pip
#    configuration, whose find-links holds a CPU-only torch wheel that pip would
#    prefer for torch==2.13.0 and that does not match the registry's torchvision
#    ("operator torchvision::nms does not exist"). The CUDA builds run on CPU.
step "torch/torchvision (requirements/torch.txt)"
$PIP install --isolated -q -r requirements/torch.txt

# 2. Build tools: mmcv 2.1.0's setup.py and mmengine's `mmseg::` config
#    inheritance need pkg_resources, removed in setuptools 81.
step "build tools (requirements/build.txt)"
$PIP install -q -r requirements/build.txt

# 3. mmcv full, compiled against the installed torch (about 11 minutes on 2
#    cores the first time; pip caches the wheel, so reruns are instant).
if ! "$VENV/bin/python" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
    step "compiling mmcv (requirements/mmcv.txt), about 11 minutes on 2 cores"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} $PIP install -q --no-build-isolation -r requirements/mmcv.txt
fi

# 4. The OpenMMLab libraries and the rest, at the tested versions, then this
#    package in editable mode with its test extras.
step "runtime and test requirements"
$PIP install -q -r requirements/tested.txt -r requirements/tests.txt
$PIP install -q --no-build-isolation --no-deps -e .

"$VENV/bin/python" -c "import mmseg_robust, mmseg, mmcv, mmpretrain, torch; print('mmseg_robust', mmseg_robust.__version__, '| torch', torch.__version__, '| mmcv', mmcv.__version__, '| mmseg', mmseg.__version__, '| mmpretrain', mmpretrain.__version__)"
echo "$HASH" > "$STAMP"
step "done"
