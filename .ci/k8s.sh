#!/usr/bin/env bash
# Container and Kubernetes checks (called by .ci/run; no cluster, no container engine needed):
#   1. render every kustomization; k8s/rendered/ must match (the contract tests read it)
#   2. validate every rendered manifest strictly against pinned schemas (scripts/validate_k8s.py)
#   3. checkov security scan of the manifests and the Dockerfile (skips are justified in place)
#   4. hadolint on the Dockerfile
#   5. the serving images' install steps (docker/install-server.sh, docker/check-server.sh) for
#      the cpu and gpu flavours on a freshly built wheel: no torch, `clipserve serve` runs
# Usage: bash .ci/k8s.sh            check
#        bash .ci/k8s.sh --write    re-render k8s/rendered/ after editing k8s/
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

write=false
case "${1:-}" in
  --write) write=true ;;
  "") ;;
  *) echo "usage: $0 [--write]" >&2; exit 2 ;;
esac

# -- tools: a virtual environment per hash of their pins, reused across runs ----------------
cache_root="${CLIPSERVE_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clipserve-ci}"
key=$(sha256sum .ci/k8s-requirements.txt | cut -c1-16)
venv="$cache_root/k8s-venv-$key"
if [ ! -f "$venv/.complete" ]; then
  say "installing k8s tools into $venv (key $key)"
  rm -rf "$venv"
  mkdir -p "$cache_root"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r .ci/k8s-requirements.txt
  touch "$venv/.complete"
else
  say "reusing $venv"
fi
bin="$venv/bin"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# -- 1. render ---------------------------------------------------------------------------------
# rendered file <- kustomization
targets=(
  "gpu:k8s/overlays/gpu"
  "cpu:k8s/overlays/cpu"
  "cpu-model-per-pod:k8s/examples/cpu-model-per-pod"
  "kserve:k8s/kserve"
)
say "render ($("$bin/kubectl" version --client | tr '\n' ' '))"
mkdir -p "$work/rendered"
for target in "${targets[@]}"; do
  name=${target%%:*}
  source=${target#*:}
  {
    echo "# Rendered from $source by .ci/k8s.sh --write: edit the kustomization, not this file."
    "$bin/kubectl" kustomize "$source"
  } > "$work/rendered/$name.yaml"
  echo "$source -> k8s/rendered/$name.yaml"
done
if $write; then
  rm -rf k8s/rendered
  cp -r "$work/rendered" k8s/rendered
  echo "wrote k8s/rendered/"
elif ! diff -ru k8s/rendered "$work/rendered"; then
  echo "k8s/rendered/ is out of date: run bash .ci/k8s.sh --write and commit the result" >&2
  exit 1
fi

# -- 2. schemas --------------------------------------------------------------------------------
say "validate rendered manifests (strict)"
"$bin/python" scripts/validate_k8s.py "$work"/rendered/*.yaml

# -- 3. security scan --------------------------------------------------------------------------
say "checkov: manifests and Dockerfile"
# --skip-download: no calls to the vendor's platform; the checks ship with the package.
(cd "$work/rendered" && "$bin/checkov" --quiet --compact --skip-download \
  --framework kubernetes --directory .)
"$bin/checkov" --quiet --compact --skip-download --framework dockerfile --file Dockerfile

# -- 4. Dockerfile lint ------------------------------------------------------------------------
say "hadolint Dockerfile"
"$bin/hadolint" --config .hadolint.yaml Dockerfile

# -- 5. serving image install steps ------------------------------------------------------------
# The Dockerfile's install step, per flavour, into a virtual environment kept between runs and
# keyed by everything that decides its dependencies (pyproject.toml, the pins, the script, the
# onnxruntime-gpu release): on a new key it is made afresh by docker/install-server.sh; on every
# run the freshly built wheel replaces clipserve in it and docker/check-server.sh runs.
say "serving environments: wheel -> docker/install-server.sh (cpu, gpu) -> docker/check-server.sh"
if ! "$bin/python" -m pip wheel -q --no-deps --wheel-dir "$work/dist" . >"$work/wheel.log" 2>&1; then
  cat "$work/wheel.log" >&2
  exit 1
fi
wheel=$(ls "$work"/dist/clipserve-*.whl)
ort_gpu=$(sed -n 's/^ARG ONNXRUNTIME_GPU_VERSION=//p' Dockerfile)
serve_key=$(cat pyproject.toml .ci/requirements.txt docker/install-server.sh | sha256sum | cut -c1-12)
for flavour in cpu gpu; do
  env_dir="$cache_root/serve-$flavour-$serve_key-ort$ort_gpu"
  if [ ! -f "$env_dir/.complete" ]; then
    echo "new $flavour environment $env_dir"
    rm -rf "$cache_root"/serve-"$flavour"-*
    ONNXRUNTIME_GPU_VERSION=$ort_gpu sh docker/install-server.sh "$env_dir" "$wheel" \
      .ci/requirements.txt "$flavour"
    touch "$env_dir/.complete"
  else
    "$env_dir/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
      --force-reinstall "$wheel"
  fi
  sh docker/check-server.sh "$env_dir" "$flavour"
  if "$env_dir/bin/python" -c "import torch" 2>/dev/null; then
    echo "import torch works in the $flavour serving environment" >&2
    exit 1
  fi
done
say "k8s and container checks passed"
