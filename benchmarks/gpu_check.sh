#!/usr/bin/env bash
# GPU check of clipserve, one prepared script (< 8 minutes on one H100/H200):
#   1. installs what the GPU machine lacks from what benchmarks/gpu_wheels.sh put in $WHEELS
#      (no package index there): onnxruntime-gpu (CUDA 13 build, pruned to one architecture)
#      and the server's small dependencies; checks that ONNX Runtime runs on the GPU;
#   2. exports ViT-L-14 --pretrained none three times, fp32, fp16, and fp16 at --opset 23 (ONNX
#      Attention nodes) (in parallel; each export gates its own parity against PyTorch:
#      cosine >= 0.99999 fp32, >= 0.999 fp16);
#   3. runs benchmarks/gpu_check.py: fp16 vs fp32 parity on the GPU, images/s of the raw
#      session at each batch bucket (session.run, I/O binding, CUDA graphs; the opset-23
#      export beside, with the provider of each kind of node), images/s through gRPC (tensors
#      and JPEGs), texts/s, GPU memory, and last open_clip's image tower in PyTorch fp16;
#   4. runs benchmarks/gil_waits.py: what a busy interpreter costs the server's threads on this
#      host's cores (batch stacking, JPEG decoding, at switch intervals of 5 and 0.5 ms);
#   5. runs benchmarks/engine_gaps.py on the fp16 export: how long the GPU waits between two
#      batches while tensors queue for it.
#
# Prepare on a machine with PyPI (bash benchmarks/gpu_wheels.sh), then run from the
# repository root:  bash benchmarks/gpu_check.sh   (results: $OUT/gpu_check.json, log on stdout)
# CPU dry run of the Python side, on this machine's own packages (none of the carried wheels):
#   WHEELS=none DEVICE=cpu MODEL=clipserve-demo bash benchmarks/gpu_check.sh
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
for archive in "$WHEELS"/*.tar.xz; do  # onnxruntime-gpu, pruned (gpu_wheels.sh)
  [ -e "$archive" ] || continue
  say "unpacking $(basename "$archive")"
  mkdir -p "$WORK/site"
  "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
    "$archive" "$WORK/site"
  export CUDA_MODULE_LOADING=LAZY  # the pruned provider's dropped units must never be loaded
done
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  say "installing carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl
fi
[ -d "$WORK/site" ] && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
# the CUDA 13 libraries of the nvidia-* wheels (PyTorch's), for the CUDA provider to load
nvidia_libs=$("$PY" - <<'PY'
import glob, os, site, sys
dirs = set()
for base in [*site.getsitepackages(), *sys.path]:
    dirs.update(os.path.dirname(p) for p in glob.glob(f"{base}/nvidia/**/lib*.so*", recursive=True))
print(":".join(sorted(dirs)))
PY
)
[ -n "$nvidia_libs" ] && export LD_LIBRARY_PATH="$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# clipserve itself, laid out as the wheel lays it out (no build step needed)
rm -rf "$WORK/pkg" && mkdir -p "$WORK/pkg"
cp -r src/clipserve "$WORK/pkg/clipserve"
for sub in server export clients; do cp -r "$sub" "$WORK/pkg/clipserve/$sub"; done
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - "$DEVICE" <<'PY'
import sys
import grpc, google.protobuf, numpy, onnx, onnxruntime as ort, torch
print("python", sys.version.split()[0], "onnxruntime", ort.__version__, ort.get_available_providers())
print("grpcio", grpc.__version__, "protobuf", google.protobuf.__version__, "numpy",
      numpy.__version__, "onnx", onnx.__version__, "torch", torch.__version__,
      "cuda", torch.cuda.is_available())
if sys.argv[1] == "cuda":  # a one-operator model on the GPU: fail here, not after the exports
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    a = numpy.random.default_rng(0).standard_normal((64, 64), dtype=numpy.float32)
    (out,) = session.run(None, {"x": a})
    error = float(numpy.abs(out - a @ a).max() / numpy.abs(a @ a).max())  # TF32: ~1e-3
    print("smoke test providers", session.get_providers(), "max relative error", error)
    if session.get_providers()[0] != "CUDAExecutionProvider" or error > 1e-2:
        sys.exit("ONNX Runtime does not run on the GPU here; see the provider errors above")
PY
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv

# -- 2. export fp32, fp16 and fp16 at opset 23 side by side ---------------------------------
exports=()
for variant in fp32 fp16 fp16-opset23; do
  repo="$WORK/$MODEL-$variant"
  opset=18
  [ "$variant" = fp16-opset23 ] && opset=23
  if [ ! -f "$repo/clipserve.json" ]; then
    say "exporting $MODEL $variant"
    "$PY" -m clipserve --log-level WARNING export --model "$MODEL" --pretrained none \
      --precision "${variant%%-*}" --opset "$opset" --output "$repo" --force \
      > "$WORK/export-$variant.log" 2>&1 &
    exports+=($!)
  fi
done
for pid in "${exports[@]}"; do
  wait "$pid" || { tail -n 30 "$WORK"/export-*.log; exit 1; }
done
say "exports done"
for variant in fp32 fp16 fp16-opset23; do
  "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2], 'parity', json.dumps(m.get('parity', {}))[:400])" \
    "$WORK/$MODEL-$variant/clipserve.json" "$variant"
done

# -- 3. measure ---------------------------------------------------------------------------------
BUCKETS=${BUCKETS:-1,8,16,32,64,128}
SECONDS_PER_POINT=${SECONDS_PER_POINT:-2}
"$PY" benchmarks/gpu_check.py --fp32 "$WORK/$MODEL-fp32" --fp16 "$WORK/$MODEL-fp16" \
  --fp16-attention "$WORK/$MODEL-fp16-opset23" \
  --device "$DEVICE" --buckets "$BUCKETS" --seconds "$SECONDS_PER_POINT" \
  --processes "${PROCESSES:-6}" --out "$RESULTS/gpu_check.json"
say "interpreter lock waits on this host"
"$PY" benchmarks/gil_waits.py --repeats 7 | tee "$RESULTS/gil_waits.txt" || say "gil_waits failed"
say "the engine's idle time between batches (fp16, tensors)"
"$PY" benchmarks/engine_gaps.py --repository "$WORK/$MODEL-fp16" --scenario tensor --items 8 \
  --clients 32 --seconds 3 --rounds 2 \
  --flags "--device $DEVICE --vision-max-batch-size ${BUCKETS##*,} --max-items-per-request 256 --max-queue-size 8192" \
  | tee "$RESULTS/engine_gaps.txt" || say "engine_gaps failed"
say "done"
