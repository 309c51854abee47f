#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the sources vendored in the llama-cpp-python sdist.
#
# Why this way: nothing on PyPI or Debian ships a prebuilt llama-server, and no network but the
# package registry is assumed. The llama-cpp-python sdist on PyPI vendors the whole of llama.cpp,
# so pip can fetch it and cmake can build the server from it. The build is portable
# (GGML_NATIVE=OFF: a cached binary must not crash on another CPU), static (one file to point
# at), and does not download the web UI (LLAMA_USE_PREBUILT_UI=OFF; the router never serves it).
# The result is cached: a second run with the same version finds the binary and returns at once.
#
# Usage: scripts/install-llama-server.sh [CACHE_DIR]
#   CACHE_DIR                default: $UMEM_LLAMA_CACHE or
#                            $HOME/.cache/clearml-umem/llama-server-<version>
#   LLAMA_CPP_PYTHON_VERSION which sdist to build from (default: 0.3.36)
#   PYTHON                   interpreter whose pip downloads the sdist (default: python3)
#   UMEM_LLAMA_CUDA=1        build with CUDA (needs nvcc); the default is a CPU build
#   JOBS                     parallel build jobs (default: nproc)
# Prints the binary's path on its last line; use it with UMEM_LLAMA_SERVER=<path>.
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cuda="${UMEM_LLAMA_CUDA:-0}"
flavour="cpu"
[ "$cuda" = "1" ] && flavour="cuda"
cache="${1:-${UMEM_LLAMA_CACHE:-$HOME/.cache/clearml-umem/llama-server-$version-$flavour}}"
python="${PYTHON:-$(command -v python3)}"
jobs="${JOBS:-$(nproc)}"
binary="$cache/bin/llama-server"

mkdir -p "$cache"
# one build at a time per cache: a second run waits for the first, then finds its binary
exec 9>"$cache/.lock"
flock 9
if [ -x "$binary" ] && "$binary" --version >/dev/null 2>&1; then
  echo "install-llama-server: cached $binary" >&2
  echo "$binary"
  exit 0
fi

start=$(date +%s)
work="$cache/build-work"
rm -rf "$work"
mkdir -p "$work"

echo "install-llama-server: downloading the llama-cpp-python==$version sdist" >&2
"$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python --dest "$work" \
  "llama-cpp-python==$version"
sdist="$(ls "$work"/llama_cpp_python-*.tar.gz | head -n 1)"
tar -xzf "$sdist" -C "$work"
src="$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp | head -n 1)"

cmake_args=(
  -DCMAKE_BUILD_TYPE=Release
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF
)
if [ "$cuda" = "1" ]; then
  cmake_args+=(-DGGML_CUDA=ON)
fi
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)

echo "install-llama-server: configuring ($flavour) in $work/build" >&2
cmake -S "$src" -B "$work/build" "${generator[@]}" "${cmake_args[@]}" >"$work/cmake.log" 2>&1 \
  || { tail -n 40 "$work/cmake.log" >&2; exit 1; }
echo "install-llama-server: building llama-server llama-quantize with $jobs jobs (about 5 min on 2 cores)" >&2
cmake --build "$work/build" --target llama-server llama-quantize -j "$jobs" >"$work/build.log" 2>&1 \
  || { tail -n 40 "$work/build.log" >&2; exit 1; }

mkdir -p "$cache/bin"
cp "$work/build/bin/llama-server" "$work/build/bin/llama-quantize" "$cache/bin/"
"$binary" --version >/dev/null 2>&1
rm -rf "$work"

end=$(date +%s)
echo "install-llama-server: built in $((end - start)) s; use it with UMEM_LLAMA_SERVER=$binary" >&2
echo "$binary"
