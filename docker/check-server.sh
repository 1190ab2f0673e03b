#!/bin/sh
# Check a serving environment made by install-server.sh: the CLI starts, the SIMD JPEG path
# loads, torch and open_clip are absent, and ONNX Runtime offers the execution provider of the
# flavour. Needs no GPU and no network. Run by the Dockerfile (the image does not build unless
# it passes) and by .ci/k8s.sh.
#
# usage: check-server.sh VENV cpu|gpu
set -eu

if [ "$#" -ne 2 ]; then
  echo "usage: $0 VENV cpu|gpu" >&2
  exit 2
fi
venv=$1
case "$2" in
  cpu) provider=CPUExecutionProvider ;;
  gpu) provider=CUDAExecutionProvider ;;
  *) echo "flavour must be cpu or gpu, got '$2'" >&2; exit 2 ;;
esac

"$venv/bin/clipserve" serve --help >/dev/null
"$venv/bin/clipserve" client --help >/dev/null
"$venv/bin/python" - "$provider" <<'PY'
import importlib.metadata
import importlib.util
import sys

provider = sys.argv[1]
# the export side's modules (torch, torchvision, open_clip) have no place in a serving image
present = [name for name in ("torch", "torchvision", "open_clip")
           if importlib.util.find_spec(name) is not None]
if present:
    sys.exit(f"the serving environment must not contain {', '.join(present)}")
try:
    import torch  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    sys.exit("import torch works in the serving environment")

if importlib.util.find_spec("aiohttp") is None:  # the http extra: --http-port works
    sys.exit("the serving environment lacks aiohttp (the http extra)")

from clipserve.repository import Preprocess
from clipserve.server.preprocess import ImagePreprocessor

# the simd extra: --preprocess-simd starts (simplejpeg imports, libvips' shared library loads)
simd = ImagePreprocessor(Preprocess(224, (0.5,) * 3, (0.5,) * 3), simd=True).simd_versions

if provider == "CUDAExecutionProvider":
    try:
        importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:  # both wheels write the module `onnxruntime`: which one wins is an accident
        sys.exit("the CPU onnxruntime is installed next to onnxruntime-gpu")

import onnxruntime

if provider not in onnxruntime.get_available_providers():
    sys.exit(f"{provider} missing from {onnxruntime.get_available_providers()}")
import clipserve.server.app  # noqa: F401  (the whole server imports without torch)

print(f"serving environment ok: clipserve {importlib.metadata.version('clipserve')}, "
      f"onnxruntime {onnxruntime.__version__} ({provider}), simplejpeg {simd['simplejpeg']}, "
      f"libvips {simd['libvips']}")
PY
