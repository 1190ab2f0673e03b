#!/usr/bin/env bash
# Generate the public API's stubs for C++, Java, C#, Go and TypeScript into gen/<language>/ with
# one `buf generate` (buf.gen.yaml), then compile-check each language whose toolchain is
# installed. Prints one line per language; exits non-zero if generation or a compile check fails.
# gen/ is not committed. Python stubs are not made here (scripts/gen_stubs.py, committed).
#
# Needs the Node tools (`cd tools/buf && npm ci --ignore-scripts`), protoc and the plugins of
# buf.gen.yaml, and for the checks g++ with pkg-config protobuf grpc++, javac with the protobuf
# and gRPC jars, and Go with the protobuf and gRPC sources in GOPATH layout. .ci/stubs.sh
# installs all of them on Debian (docs/stubs.md).
#
# Usage: bash scripts/gen_other_stubs.sh           a language without toolchain: generate-only
#        bash scripts/gen_other_stubs.sh --strict  a language without toolchain fails (CI)

# The per-language functions below are called by name ("toolchain_$lang"), which shellcheck
# cannot follow.
# shellcheck disable=SC2317
set -euo pipefail
cd "$(dirname "$0")/.."

strict=false
case "${1:-}" in
  --strict) strict=true ;;
  "") ;;
  *) echo "usage: $0 [--strict]" >&2; exit 2 ;;
esac

node_bin=tools/buf/node_modules/.bin
if [ ! -x "$node_bin/buf" ]; then
  echo "no buf: run '(cd tools/buf && npm ci --ignore-scripts)' or bash .ci/stubs.sh" >&2
  exit 1
fi

# Debian's locations of the Java jars and of the Go sources; override for other layouts.
java_lib_dir=${JAVA_LIB_DIR:-/usr/share/java}
go_lib_path=${GO_LIB_PATH:-/usr/share/gocode}

work=$(mktemp -d)
trap 'rm -rf "$work"; rm -f gen/ts/node_modules' EXIT

"$node_bin/buf" generate

have() { command -v "$1" >/dev/null 2>&1; }

# Each language has toolchain_<lang>, which prints what is missing and fails when the toolchain
# is incomplete (else prints the versions in use), and compile_<lang>, which compiles gen/<lang>
# and fails on any error.

toolchain_cpp() {
  if ! have g++ || ! have pkg-config; then echo "no g++ or pkg-config"; return 1; fi
  pkg-config --exists protobuf grpc++ || { echo "pkg-config: no protobuf or grpc++"; return 1; }
  echo "g++ $(g++ -dumpfullversion)," \
    "protobuf $(pkg-config --modversion protobuf), grpc++ $(pkg-config --modversion grpc++)"
}
compile_cpp() {
  local cflags libs src objs=()
  read -ra cflags <<< "$(pkg-config --cflags protobuf grpc++)"
  read -ra libs <<< "$(pkg-config --libs protobuf grpc++)"
  mkdir -p "$work/cpp"
  while IFS= read -r src; do
    objs+=("$work/cpp/${#objs[@]}.o")
    g++ -std=c++17 -fPIC -c -Igen/cpp "${cflags[@]}" "$src" -o "${objs[-1]}"
  done < <(find gen/cpp -name '*.cc' | sort)
  # Linking with --no-undefined proves that every symbol the stubs use exists in the installed
  # runtime libraries (generated code and runtime of matching versions), not only in headers.
  g++ -shared -Wl,--no-undefined -o "$work/cpp/libclipserve_api.so" "${objs[@]}" "${libs[@]}"
}

java_jars=(protobuf grpc-api grpc-stub grpc-protobuf grpc-protobuf-lite guava
  # javax.annotation.Generated, which grpc_java_plugin 1.41 writes and Java 11+ lacks
  geronimo-annotation-1.3-spec)
toolchain_java() {
  have javac || { echo "no javac"; return 1; }
  local jar
  for jar in "${java_jars[@]}"; do
    [ -f "$java_lib_dir/$jar.jar" ] || { echo "no $java_lib_dir/$jar.jar"; return 1; }
  done
  echo "$(javac -version 2>&1), jars from $java_lib_dir"
}
compile_java() {
  local classpath sources
  classpath=$(printf "$java_lib_dir/%s.jar:" "${java_jars[@]}")
  mapfile -t sources < <(find gen/java -name '*.java' | sort)
  javac -d "$work/java" -cp "$classpath" "${sources[@]}"
}

# The generated Go package's import path (go_package in clip_service.proto).
go_import=github.com/clipserve/clipserve/gen/go/clipserve/v1
toolchain_go() {
  have go || { echo "no go"; return 1; }
  local pkg
  for pkg in google.golang.org/grpc google.golang.org/protobuf; do
    [ -d "$go_lib_path/src/$pkg" ] || { echo "no $pkg sources under $go_lib_path/src"; return 1; }
  done
  echo "$(go version | cut -d' ' -f3), GOPATH mode with $go_lib_path"
}
compile_go() {
  # GOPATH mode, offline: the stubs are copied to their import path in a scratch GOPATH whose
  # second entry holds the distribution's Go sources of protobuf and gRPC. GOFLAGS is cleared
  # so a user's module flags (-mod=...) do not apply.
  mkdir -p "$work/gopath/src/$go_import"
  cp gen/go/clipserve/v1/*.go "$work/gopath/src/$go_import/"
  (
    cd "$work/gopath"
    export GO111MODULE=off GOFLAGS="" GOPATH="$work/gopath:$go_lib_path"
    go vet "$go_import"
    go build "$go_import"
  )
}

toolchain_ts() {
  [ -x "$node_bin/tsc" ] || { echo "no tsc in $node_bin"; return 1; }
  echo "tsc $("$node_bin/tsc" --version | cut -d' ' -f2), @bufbuild/protobuf from tools/buf"
}
compile_ts() {
  local sources
  # Node-style resolution of @bufbuild/protobuf from the generated files finds tools/buf's
  # packages through this link (removed on exit).
  ln -sfn ../../tools/buf/node_modules gen/ts/node_modules
  mapfile -t sources < <(find gen/ts -name '*.ts' -not -path 'gen/ts/node_modules/*' | sort)
  "$node_bin/tsc" --noEmit --strict --target es2022 --module nodenext "${sources[@]}"
}

# C#: protoc's generator writes the messages; Debian packages neither the Google.Protobuf
# assembly nor grpc_csharp_plugin, so nothing is compiled here (docs/stubs.md: Grpc.Tools), and
# no compile_csharp exists.
toolchain_csharp() {
  echo "no Google.Protobuf assembly in Debian; .NET builds use NuGet"
  return 1
}

failed=0
for lang in cpp java go ts csharp; do
  n=$(find "gen/$lang" -type f | wc -l)
  files="$n file$([ "$n" -eq 1 ] || echo s)"
  if ! toolchain=$("toolchain_$lang"); then
    if $strict && [ "$lang" != csharp ]; then
      echo "$lang: generated $files, FAILED: toolchain missing ($toolchain)"
      failed=1
    else
      echo "$lang: generated $files, generate-only ($toolchain)"
    fi
    continue
  fi
  # errexit does not apply inside a function run as a condition, so run it in a subshell with
  # its own errexit and read the status afterwards.
  set +e
  (set -e; "compile_$lang") > "$work/$lang.log" 2>&1
  rc=$?
  set -e
  if [ "$rc" -eq 0 ]; then
    echo "$lang: generated $files, compiled OK ($toolchain)"
  else
    echo "$lang: generated $files, COMPILE FAILED ($toolchain):"
    sed 's/^/    /' "$work/$lang.log"
    failed=1
  fi
done
exit "$failed"
