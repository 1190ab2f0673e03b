#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.sh installs on the GPU machine (which has no internet)
# into .whl/ (ignored by git: add `/.whl/` to .git/info/exclude), for CPython 3.12 x86-64.
# onnxruntime-gpu is larger than one transfer may carry (64 MiB): it is split into 48 MiB parts,
# to be carried one or two per call into the same warm machine; gpu_check.sh reassembles them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
          --implementation cp "${platforms[@]}" -d .whl "$@"; }
get onnxruntime-gpu==1.31.1 grpcio==1.81.1 grpcio-health-checking==1.81.1 \
    grpcio-reflection==1.81.1 protobuf==6.33.5 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth
cd .whl
for wheel in onnxruntime_gpu-*.whl; do
  split -b 48M "$wheel" "$wheel.part-" && rm "$wheel"
done
ls -la
