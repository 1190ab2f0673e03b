#!/usr/bin/env bash
# Fetch what benchmarks/gpu_check.sh installs on a GPU machine with no package index, into .whl/
# (ignored by git: add `/.whl/` to .git/info/exclude), for CPython 3.12 x86-64, as few bytes as
# possible (about 66 MB; 57 MB with SIMD=0):
#   - the server's small dependencies as wheels (grpcio, protobuf, open_clip, ...);
#   - with SIMD=1 (the default), the `simd` extra's wheels (simplejpeg, pyvips with its libvips
#     build, cffi; about 9 MB), for gpu_check.py's --preprocess-simd JPEG points;
#   - onnxruntime-gpu (CUDA 13 build) as one .tar.xz of its Python package, pruned to the device
#     code of one GPU architecture (ARCH, default 90: H100/H200) by benchmarks/prune_fatbin.py,
#     without the C API library (libonnxruntime.so, not used from Python) and without its
#     `quantization` tools (`transformers` stays: the fp16 export uses its converter).
#     The full wheel is ~255 MB; this is ~48 MB.
# Needs readelf, zstd and xz.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ARCH=${ARCH:-90}
ORT=${ORT_VERSION:-1.31.1}
mkdir -p .whl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
          --implementation cp "${platforms[@]}" -d "$1" "${@:2}"; }
# wcwidth 0.2.x is pure Python (0.9 ships a compiled module 20x larger)
get .whl grpcio==1.81.1 grpcio-health-checking==1.81.1 grpcio-reflection==1.81.1 \
    protobuf==6.33.5 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
if [ "${SIMD:-1}" = 1 ]; then
  get .whl simplejpeg==1.9.0 pyvips-binary==8.18.7 cffi==2.1.1 pycparser==3.12
  # pyvips is published as a source archive only: build its (pure-Python) wheel here
  "$PY" -m pip wheel -q --no-deps -w .whl pyvips==3.2.0
fi
get "$tmp" "onnxruntime-gpu==$ORT"
mkdir "$tmp/pkg"
(cd "$tmp/pkg" && unzip -q "$tmp"/onnxruntime_gpu-*.whl)
rm -rf "$tmp/pkg/onnxruntime/quantization" "$tmp"/pkg/onnxruntime/capi/libonnxruntime.so.*
"$PY" benchmarks/prune_fatbin.py "$tmp/pkg/onnxruntime/capi/libonnxruntime_providers_cuda.so" \
  --keep "$ARCH" --drop-only-arch-kernels GroupProblemShape
echo "compressing (about two minutes)"
tar -C "$tmp/pkg" -c onnxruntime "onnxruntime_gpu-$ORT.dist-info" \
  | xz -9e -T0 > ".whl/onnxruntime_gpu-$ORT-sm$ARCH.tar.xz"
ls -la .whl
du -cb .whl/* | tail -n 1
