#!/usr/bin/env bash
# Issue 17 point 2 on a machine with cores to spare: another client's time to first token while
# big bodies arrive (benchmarks/big_bodies.py), both shapes, in one device call. Needs only CPUs;
# the GPU machine's 16 cores are where this project gets them.
#
# Here:   bash scripts/gpu-wheels.sh      (the router's web stack as wheels, into .whl/)
# There:  the device tool's run, with carry [".whl"] and a timeout of 600 s:
#           bash scripts/device-big-bodies.sh
# It writes $OUT/big-bodies.tar.gz (one file: a device call brings back only a few) holding each
# shape's report, the machine's core count and a timeline. About 7 minutes.
#
# Environment: OUT (required: the folder the tar file goes to), LONG_ROUNDS (default 16),
# TINY_ROUNDS (default 10), SITE (where the wheels are installed, default /tmp/site).
set -uo pipefail
usage() { sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
case "${1:-}" in
  "") ;;
  -h|--help) usage; exit 0 ;;
  *) echo "device-big-bodies.sh takes no arguments (got '$1'); it reads OUT, LONG_ROUNDS, TINY_ROUNDS and SITE from the environment" >&2
     usage >&2; exit 2 ;;
esac
OUT="${OUT:?set OUT to the folder the results go to}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LONG_ROUNDS="${LONG_ROUNDS:-16}"
TINY_ROUNDS="${TINY_ROUNDS:-10}"
SITE="${SITE:-/tmp/site}"
for rounds in "$LONG_ROUNDS" "$TINY_ROUNDS"; do
  [[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "LONG_ROUNDS and TINY_ROUNDS are positive whole numbers (got '$rounds')" >&2; exit 2; }
done
WORK="$(mktemp -d)"
t0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - t0 )) s: $*" | tee -a "$WORK/timeline.txt"; }
ls .whl/*.whl > /dev/null 2>&1 || { echo "no .whl/*.whl: run scripts/gpu-wheels.sh here and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  $(ls .whl/*.whl | grep -vE 'transformers|huggingface_hub|tokenizers|hf_xet|httpx2|httpcore2|truststore|kernels|tomlkit') \
  || { echo "installing the wheels failed" >&2; exit 2; }
export PYTHONPATH="$ROOT/plugin:$ROOT:$SITE" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nproc > "$WORK/nproc.txt"
uname -r > "$WORK/kernel.txt"
stamp installed
for shape in long tiny; do
  rounds=$LONG_ROUNDS; [ "$shape" = tiny ] && rounds=$TINY_ROUNDS
  # a round is three phases of about 5 s each: 16 + 10 rounds fit a 600 s call with the install
  timeout $(( 30 + rounds * 17 )) python3 benchmarks/big_bodies.py --shape "$shape" --rounds "$rounds" --models "$WORK/models" \
    > "$WORK/big-bodies-$shape.txt" 2> "$WORK/big-bodies-$shape.err"
  stamp "big bodies $shape ($rounds rounds) rc=$?"
  grep -v '^{' "$WORK/big-bodies-$shape.txt"
done
rm -rf "$WORK/models"
tar -czf "$OUT/big-bodies.tar.gz" -C "$WORK" .
stamp "results in $OUT/big-bodies.tar.gz"
