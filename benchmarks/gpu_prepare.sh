#!/usr/bin/env bash
# Collect, here (with network/registry access), what benchmarks/gpu_check.sh installs on
# a GPU machine that has no network: the pure-Python OpenMMLab wheels and their missing
# dependencies, plus the mmcv 2.1.0 source distribution (compiled there).
#
#   bash benchmarks/gpu_prepare.sh [DIR]       # DIR defaults to benchmarks/gpu_wheels
#   MMCV_WHEEL=path/to/mmcv-2.1.0-cp312-...whl bash benchmarks/gpu_prepare.sh
#
# Written for a GPU machine that has Python 3.12 with a CUDA torch (e.g. 2.11) and
# torchvision installed, plus numpy, scipy, matplotlib, opencv (headless),
# rich, pyyaml, einops, click, markdown, regex and zipp, but no OpenMMLab package and no
# network. Torch itself is not collected (install it there as for any CUDA machine).
# No prebuilt mmcv 2.1.0 wheel exists for cp312/torch 2.11 (OpenMMLab's stop at
# torch 2.1), so gpu_check.sh compiles mmcv's CPU ops there from the sdist; a wheel
# built beforehand for exactly that Python and torch can be given as MMCV_WHEEL, and
# is then tried first.
# DIR is ignored by git (benchmarks/.gitignore); copy it with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-benchmarks/gpu_wheels}
PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# hide pip's warning about configured local index folders that do not exist
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }

# Pinned to the tested stack (requirements/tested.txt) and, for the dependencies the
# GPU machine lacks, to the versions the CI environment uses.
PURE=(
    mmengine==0.10.7 mmsegmentation==1.2.2 mmpretrain==1.2.0 ftfy==6.3.1
    wcwidth==0.9.4 addict==2.4.0 yapf==0.43.0 platformdirs==4.14.9 termcolor==3.3.0
    prettytable==3.18.0 mat4py==0.6.0 modelindex==0.0.2 model-index==0.1.11
    ordered-set==4.1.0 importlib-metadata==10.2.0 lazy-importer==0.1.0
    setuptools==80.10.2
)

mkdir -p "$DIR"
rm -f "$DIR"/*.whl "$DIR"/*.tar.gz
echo "[gpu_prepare] pure-Python wheels for Python $PYVER -> $DIR"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$DIR" "${PURE[@]}" 2>&1 | quiet

echo "[gpu_prepare] mmcv 2.1.0 source distribution"
# pip prepares the sdist's metadata, running its setup.py, which imports pkg_resources:
# the isolated build environment must get setuptools < 81 (PIP_CONSTRAINT reaches it).
constraint=$(mktemp)
echo 'setuptools<81' >"$constraint"
PIP_CONSTRAINT=$constraint $PY -m pip download -q --no-deps --no-binary=:all: -d "$DIR" \
    mmcv==2.1.0 2>&1 | quiet
rm -f "$constraint"

if [ -n "${MMCV_WHEEL:-}" ]; then
    case "$(basename "$MMCV_WHEEL")" in
        mmcv-2.1.0-cp312-*.whl) cp "$MMCV_WHEEL" "$DIR/" ;;
        *) echo "[gpu_prepare] MMCV_WHEEL must be an mmcv-2.1.0-cp312 wheel: $MMCV_WHEEL" >&2; exit 2 ;;
    esac
fi
# A wheel in pip's cache is usable only if built for the GPU machine's Python against
# its torch; `make setup` builds cp311 against torch 2.13: say so, copy none.
cached=$($PY -m pip cache list mmcv 2>/dev/null | grep -o 'mmcv-2.1.0-[^ ]*\.whl' || true)
if [ -n "$cached" ]; then
    echo "[gpu_prepare] pip cache holds: $cached (not copied: the GPU machine needs one built for its Python and torch)"
fi

ls -l "$DIR"
size=$(du -sm "$DIR" | cut -f1)
echo "[gpu_prepare] $DIR: ${size} MiB; copy it with the checkout to the GPU machine"

