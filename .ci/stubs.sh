#!/usr/bin/env bash
# Proto checks (called by .ci/run):
#   1. buf lint of the public API (STANDARD rules, buf.yaml)
#   2. buf breaking (FILE rules) against the released API, proto/releases/clipserve-v1.json
#   3. stubs for C++, Java, Go, TypeScript and C# generated and compile-checked
#      (scripts/gen_other_stubs.sh --strict; C# is generate-only)
# Installs what it needs, idempotently: Debian packages only when one is missing (and only then
# `apt-get update`), the Node tools of tools/buf only when node_modules is missing or was
# installed from another lockfile. Needs Node.js >= 20 with npm. Details: docs/stubs.md.
# Usage: bash .ci/stubs.sh
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

# -- Debian packages: protoc, the plugins of buf.gen.yaml, each language's compiler and runtime --
apt_packages=(
  protobuf-compiler                   # protoc with its cpp, java and csharp generators
  protobuf-compiler-grpc              # grpc_cpp_plugin
  protobuf-compiler-grpc-java-plugin  # grpc_java_plugin
  protoc-gen-go protoc-gen-go-grpc
  g++ pkg-config libprotobuf-dev libgrpc++-dev
  default-jdk-headless libprotobuf-java libgrpc-java libguava-java
  libgeronimo-annotation-1.3-spec-java
  golang-go golang-google-protobuf-dev golang-google-grpc-dev
)
missing=()
for pkg in "${apt_packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 \
    "${missing[@]}" > /dev/null
else
  say "Debian packages present (${#apt_packages[@]})"
fi

# -- Node tools (buf, protoc-gen-es, tsc), pinned by tools/buf/package-lock.json ---------------
tools=tools/buf
node_major=$(node -p 'process.versions.node.split(".")[0]' 2> /dev/null || echo 0)
if ! command -v npm > /dev/null || [ "$node_major" -lt 20 ]; then
  echo "Node.js >= 20 with npm is needed (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi
lock_key=$(sha256sum "$tools/package-lock.json" | cut -c1-16)
stamp="$tools/node_modules/.installed-from-lock"
buf="$tools/node_modules/.bin/buf"
installed() {  # node_modules holds this lockfile's install, with the commands used below
  local cmd
  [ "$(cat "$stamp" 2> /dev/null || true)" = "$lock_key" ] || return 1
  for cmd in buf protoc-gen-es tsc; do
    [ -x "$tools/node_modules/.bin/$cmd" ] || return 1
  done
}
if ! installed; then
  say "npm ci in $tools (lockfile $lock_key)"
  # --ignore-scripts: no package code runs at install. buf's postinstall would only replace its
  # Node launcher with the platform binary; the launcher runs that same binary.
  (cd "$tools" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  echo "$lock_key" > "$stamp"
else
  say "reusing $tools/node_modules (lockfile $lock_key)"
fi

# -- checks -------------------------------------------------------------------------------------
say "buf lint (buf $("$buf" --version))"
"$buf" lint
echo "lint OK: $("$buf" ls-files | tr '\n' ' ')"

say "buf breaking against the released API (proto/releases/clipserve-v1.json)"
"$buf" breaking --against proto/releases/clipserve-v1.json
echo "no breaking change"

say "stubs for other languages (scripts/gen_other_stubs.sh)"
bash scripts/gen_other_stubs.sh --strict

say "proto checks passed in ${SECONDS}s"
