#!/usr/bin/env bash
# The GPU check (`python -m benchmarks gpu_check`, benchmarks/gpu_check.py: DDPM bf16/fp32 and VDM
# train steps at batch 128, the 1000-step and 20-step sampling chains, bits/dim throughput; one
# JSON), on a machine whose image has JAX for CUDA but not all of vdm_jax's training dependencies,
# and no internet.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # where pip works: the missing packages' wheels into .whl/
#   bash benchmarks/gpu_check.sh [--out=PATH]      # on the GPU machine: installs .whl/ (if there), runs the check
#   bash benchmarks/gpu_check.sh --dry             # anywhere: the same program at small shapes (the test suite)
#
# Under 8 minutes on one H100 or H200 (sections past --budget_s=420 s are skipped and say so).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the training layer imports that a JAX-for-CUDA image with flax, optax, orbax and chex lacks,
# for CPython 3.12 on x86-64 Linux (the GPU image's). Pinned to the versions the tests run with.
WHEELS=(grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 portpicker==1.6.0)
PYTHON_VERSION="${GPU_CHECK_PYTHON_VERSION:-3.12}"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  ls .whl
  exit 0
fi

if [[ -d .whl ]] && ! python3 -c "import grain, ml_collections" 2>/dev/null; then
  python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
# The repository first on the path: the check measures this checkout's vdm_jax.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m benchmarks gpu_check "$@"
