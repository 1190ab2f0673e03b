#!/usr/bin/env bash
# GPU check of clipserve, one prepared script (< 8 minutes on one H100/H200):
#   1. installs what the GPU machine lacks from wheels carried in $WHEELS (no internet there):
#      onnxruntime-gpu (CUDA 13 build) and the server's small dependencies;
#   2. exports ViT-L-14 --pretrained none twice, fp32 and fp16 (in parallel; each export gates
#      its own parity against PyTorch: cosine >= 0.99999 fp32, >= 0.999 fp16);
#   3. runs benchmarks/gpu_check.py: fp16 vs fp32 parity on the GPU, images/s of the raw
#      session at each batch bucket (session.run, I/O binding, CUDA graphs), images/s through
#      gRPC (tensors and JPEGs), texts/s, GPU memory.
#
# Prepare the wheels on a machine with PyPI (benchmarks/gpu_wheels.sh), then run from the
# repository root:  bash benchmarks/gpu_check.sh   (results: $OUT/gpu_check.json, log on stdout)
# CPU dry run of the Python side:  DEVICE=cpu MODEL=clipserve-demo bash benchmarks/gpu_check.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
MODEL=${MODEL:-ViT-L-14}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/clipserve-gpu-check}
RESULTS=${OUT:-$WORK}
mkdir -p "$WORK" "$RESULTS"
started=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - started ))s] $*"; }

# -- 1. install -------------------------------------------------------------------------------
if compgen -G "$WHEELS/*.part-*" > /dev/null; then  # wheels too large for one transfer, split
  for first in "$WHEELS"/*.part-aa; do
    whole="$WORK/$(basename "${first%.part-aa}")"
    cat "${first%.part-aa}".part-* > "$whole"
    say "reassembled $(basename "$whole")"
  done
fi
if compgen -G "$WHEELS/*.whl" > /dev/null || compgen -G "$WORK/*.whl" > /dev/null; then
  say "installing carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" $(ls "$WHEELS"/*.whl "$WORK"/*.whl 2>/dev/null)
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# clipserve itself, laid out as the wheel lays it out (no build step needed)
rm -rf "$WORK/pkg" && mkdir -p "$WORK/pkg"
cp -r src/clipserve "$WORK/pkg/clipserve"
for sub in server export clients; do cp -r "$sub" "$WORK/pkg/clipserve/$sub"; done
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PY'
import onnxruntime as ort, grpc, numpy, torch
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("grpcio", grpc.__version__, "numpy", numpy.__version__, "torch", torch.__version__,
      "cuda", torch.cuda.is_available())
PY
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv

# -- 2. export fp32 and fp16 side by side -----------------------------------------------------
for precision in fp32 fp16; do
  repo="$WORK/$MODEL-$precision"
  if [ ! -f "$repo/clipserve.json" ]; then
    say "exporting $MODEL $precision"
    "$PY" -m clipserve --log-level WARNING export --model "$MODEL" --pretrained none \
      --precision "$precision" --output "$repo" --force > "$WORK/export-$precision.log" 2>&1 &
  fi
done
wait || { tail -n 30 "$WORK"/export-*.log; exit 1; }
say "exports done"
for precision in fp32 fp16; do
  "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2], 'parity', json.dumps(m.get('parity', {}))[:400])" \
    "$WORK/$MODEL-$precision/clipserve.json" "$precision"
done

# -- 3. measure ---------------------------------------------------------------------------------
BUCKETS=${BUCKETS:-1,8,16,32,64,128}
SECONDS_PER_POINT=${SECONDS_PER_POINT:-2}
"$PY" benchmarks/gpu_check.py --fp32 "$WORK/$MODEL-fp32" --fp16 "$WORK/$MODEL-fp16" \
  --device "$DEVICE" --buckets "$BUCKETS" --seconds "$SECONDS_PER_POINT" \
  --processes "${PROCESSES:-6}" --out "$RESULTS/gpu_check.json"
say "done"
