#!/usr/bin/env bash
# The GPU proof in one command, on a CUDA machine with torch and transformers and no network:
#   bash scripts/gpu-proof.sh OUT_DIR [benchmarks/gpu_proof.py options, e.g. --shapes llama-3-8b --runs 5]
# Installs the wheels in .whl/ (made here by scripts/gpu-wheels.sh) into a private folder, runs
# benchmarks/gpu_proof.py (report.md, report.json), then the gpu-marked tests (gpu-tests.log).
# UMEM_PROOF_TESTS=0 skips the tests. Exit status: the proof's, else the tests'.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: scripts/gpu-proof.sh OUT_DIR [proof options]}"
shift
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SITE="${UMEM_PROOF_SITE:-/tmp/umem-proof-site}"
started=$(date +%s)

WHEELS="${UMEM_PROOF_WHEELS:-$ROOT/.whl}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "gpu-proof: installing the carried wheels failed" >&2; exit 2; }
fi
export PYTHONPATH="$ROOT/plugin:$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import fastapi, uvicorn, torch, transformers, clearml_umem.server" \
  || { echo "gpu-proof: the router cannot be imported; run scripts/gpu-wheels.sh where pip works" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"

"$PY" "$ROOT/benchmarks/gpu_proof.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/proof.log"
proof_rc=${PIPESTATUS[0]}
echo "gpu-proof: proof finished with status $proof_rc after $(( $(date +%s) - started )) s"

tests_rc=0
if [ "${UMEM_PROOF_TESTS:-1}" = "1" ]; then
  # only the modules that need a device; the others import packages this machine lacks (openai, clearml)
  (cd "$ROOT" && "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -m gpu --continue-on-collection-errors \
    tests/test_transformers_engine.py tests/test_weight_store.py tests/test_overlapped_read.py tests/test_device_usage.py \
    tests/test_vllm_gpu.py tests/test_layer_pipeline.py tests/test_graph_capture.py) \
    2>&1 | tee "$OUT/gpu-tests.log"
  tests_rc=${PIPESTATUS[0]}
fi
echo "gpu-proof: done after $(( $(date +%s) - started )) s (proof $proof_rc, tests $tests_rc)"
[ "$proof_rc" -ne 0 ] && exit "$proof_rc"
exit "$tests_rc"
