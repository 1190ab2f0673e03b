#!/bin/sh
# Install the clipserve serving environment into a new virtual environment: the wheel and its
# runtime dependencies (with the `http` extra: the optional OpenAI-compatible HTTP API, and the
# `simd` extra: the optional SIMD JPEG path, --preprocess-simd), pinned
# by a constraints file, and never torch. The Dockerfile runs this
# script to build the serving images and .ci/k8s.sh runs the very same script in CI.
#
# usage: install-server.sh VENV WHEEL CONSTRAINTS cpu|gpu
#   gpu needs ONNXRUNTIME_GPU_VERSION (an onnxruntime-gpu release built for the image's CUDA).
set -eu

if [ "$#" -ne 4 ]; then
  echo "usage: $0 VENV WHEEL CONSTRAINTS cpu|gpu" >&2
  exit 2
fi
venv=$1
wheel=$2
constraints=$3
flavour=$4

python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install --quiet --disable-pip-version-check --constraint "$constraints" "$wheel[http,simd]"

case "$flavour" in
  cpu) ;;
  gpu)
    # The base requirement `onnxruntime` is installed whatever the extras (pip evaluates
    # `extra != 'gpu'` with no extra for base requirements), and both wheels write the same
    # `onnxruntime` package: remove the CPU build, then add the CUDA build alone.
    : "${ONNXRUNTIME_GPU_VERSION:?set ONNXRUNTIME_GPU_VERSION for the gpu flavour}"
    $pip uninstall --quiet --yes onnxruntime
    $pip install --quiet --disable-pip-version-check --no-deps \
      "onnxruntime-gpu==$ONNXRUNTIME_GPU_VERSION"
    ;;
  *)
    echo "flavour must be cpu or gpu, got '$flavour'" >&2
    exit 2
    ;;
esac

# Every requirement met. For gpu, one unmet by design: clipserve's metadata asks for the
# distribution `onnxruntime`, and onnxruntime-gpu provides the same module under another name.
problems=$($pip check 2>&1 || true)
if [ "$flavour" = gpu ]; then
  problems=$(printf '%s\n' "$problems" | grep -v "requires onnxruntime, which is not installed" || true)
fi
case "$problems" in
  "" | "No broken requirements found.") echo "requirements consistent ($flavour)" ;;
  *) printf '%s\n' "$problems" >&2; exit 1 ;;
esac
