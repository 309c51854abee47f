#!/usr/bin/env bash
# Second device call: the capture gate's gpu test, then the proof's load scenario (where the race hit).
set -uo pipefail
OUT="${OUT:?}"; t0=$(date +%s); R=/tmp/r; mkdir -p $R
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 2
export PYTHONPATH="$PWD/plugin:$PWD:$SITE" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 60 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_graph_capture.py > $R/gpu-test.log 2>&1
echo "gpu test rc=$? after $(( $(date +%s) - t0 )) s" | tee -a $R/timeline.txt
left=$(( 165 - ($(date +%s) - t0) ))
UMEM_PROOF_TESTS=0 UMEM_PROOF_WHEELS=/nonexistent UMEM_PROOF_SITE=$SITE timeout $left bash scripts/gpu-proof.sh $R/proof \
  --shapes llama-3.2-1b --runs 2 --load-requests 64 --load-shape llama-3.2-1b > $R/proof-stdout.txt 2>&1
echo "proof rc=$? after $(( $(date +%s) - t0 )) s" | tee -a $R/timeline.txt
echo "offset errors: $(grep -c 'Offset increment' $R/proof-stdout.txt) failed mid-stream: $(grep -c 'failed mid-stream' $R/proof-stdout.txt) captures skipped: $(grep -c 'runs without it' $R/proof-stdout.txt)" | tee -a $R/timeline.txt
tail -5 $R/gpu-test.log
tar czf $OUT/verify.tgz -C $R .
