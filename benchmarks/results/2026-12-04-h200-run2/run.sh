#!/usr/bin/env bash
# One device call: big bodies (issue 17 point 2) on 16 cores, then the proof on the 1B shape with
# transformers 5.25 carried (continuous batching's first run on a GPU).
set -uo pipefail
OUT="${OUT:?}"; t0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - t0 )) s: $*" | tee -a "$OUT/timeline.txt"; }
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || { echo install failed; exit 2; }
export PYTHONPATH="$PWD/plugin:$PWD:$SITE" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
stamp installed
python3 - > "$OUT/preflight.txt" 2>&1 <<'PY'
import importlib.metadata as md, torch, transformers, huggingface_hub
print("torch", torch.__version__, "transformers", transformers.__version__, "hub", huggingface_hub.__version__,
      "tokenizers", md.version("tokenizers"), "cuda", torch.cuda.is_available())
from clearml_umem.engines.batching import batching_unavailable, installed_batching_unavailable
print("batching unavailable:", installed_batching_unavailable())
import clearml_umem.server, fastapi, uvicorn
print("router imports ok")
PY
pf=$?; cat "$OUT/preflight.txt"
if [ $pf -ne 0 ]; then
  stamp "preflight failed: dropping the carried transformers stack"
  rm -rf "$SITE"; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    $(ls .whl/*.whl | grep -vE 'transformers|huggingface_hub|tokenizers|hf_xet|httpx2|httpcore2|truststore|kernels|tomlkit')
fi
nproc > "$OUT/nproc.txt"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1
stamp "big bodies tiny"
timeout 260 python3 benchmarks/big_bodies.py --rounds 10 --shape tiny --models /tmp/tiny > "$OUT/big-bodies-tiny.txt" 2> "$OUT/big-bodies-tiny.err"
stamp "big bodies tiny rc=$?"
timeout 140 python3 benchmarks/big_bodies.py --rounds 6 --shape long --models /tmp/tiny > "$OUT/big-bodies-long.txt" 2> "$OUT/big-bodies-long.err"
stamp "big bodies long rc=$?"
left=$(( 575 - ($(date +%s) - t0) ))
UMEM_PROOF_TESTS=0 UMEM_PROOF_SITE=$SITE UMEM_PROOF_WHEELS=/nonexistent timeout $left bash scripts/gpu-proof.sh "$OUT/proof" \
  --shapes llama-3.2-1b --runs 2 --load-requests 64 --load-shape llama-3.2-1b > "$OUT/proof-stdout.txt" 2>&1
stamp "proof rc=$?"
gzip -f "$OUT/proof/proof.log" "$OUT"/*.err 2>/dev/null; true
