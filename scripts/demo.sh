#!/usr/bin/env bash
# The main job: set up, then serve three tiny models with room for one and print TTFT per tier.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UMEM_VENV:-$ROOT/.venv}"
for arg in "$@"; do
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
    if [ -x "$VENV/bin/clearml-umem" ]; then
      echo "usage: bash scripts/demo.sh [demo options]: sets up $VENV (once), then runs 'clearml-umem demo'"
      echo
      exec "$VENV/bin/clearml-umem" demo --help
    fi
    cat <<'USAGE'
usage: bash scripts/demo.sh [--keep-serving] [--engine {transformers,llamacpp}] [--rounds N]
                            [--device auto|cpu|cuda] [--work-dir DIR] [--llama-server PATH] [--log-level LEVEL]

Sets up .venv on first use (python3 -m venv, then pip install -e '.[test]': a few minutes), then runs
'clearml-umem demo': three tiny models (or two tiny GGUF models with --engine llamacpp) served with room
for one, streaming requests from every tier, and a table of time to first token per model and tier.

  --keep-serving   leave the router up after the table, to open its status page or run 'clearml-umem ps'
  --engine         transformers (default) or llamacpp (needs llama-server: scripts/install-llama-server.sh)
  --rounds N       measurements per model and tier; the median is shown (default 3)
  --device         auto (default), cpu or cuda
  --work-dir DIR   where the tiny models are built and cached (default ~/.cache/clearml-umem/demo)
  --llama-server   llama-server binary for --engine llamacpp (default: UMEM_LLAMA_SERVER, PATH, the install cache)
  --log-level      the router's log level (default warning)

Environment: UMEM_VENV (default .venv), PYTHON (default python3), UMEM_TORCH (default torch==2.13.0).
After setup, 'clearml-umem demo --help' says the same.
USAGE
    exit 0
  fi
done
bash "$ROOT/scripts/setup.sh"
status=0
"$VENV/bin/clearml-umem" demo "$@" || status=$?
if [ "$status" = 0 ] && [ "$(command -v clearml-umem || true)" != "$VENV/bin/clearml-umem" ]; then
  echo "  (the clearml-umem commands above are in $VENV/bin: run 'source $VENV/bin/activate' first)"
fi
exit "$status"
